"""The batch-1 decode step as one call into torchbridge's C++ kernel (kernels/decode_step.cpp).

Compiled by inductor, a GPT-2 step's two C++ kernels read the weights at the memory's rate, but
every step also ran inductor's Python wrapper (~400 buffer views and allocations for the row
blocks of the projections) and dynamo's entry and guards: ~1 ms of a ~13 ms fp32 step and of a
~6 ms int8 one on the development CPU. `NativeStep` describes the decoder's weights to the
kernel once (pointers into the decoder's own buffers, nothing copied but the int8-dynamic row
sums) and runs each step as one ctypes call. int8-dynamic projections run on AVX512_VNNI there,
where inductor's reduction converted every int8 weight to fp32 first. Short prompts of one
sequence go through the same kernel (`prefill`), all their tokens per pass over the weights.

`NativeStep.unavailable(decoder)` says why a decoder cannot run on it (no kernel library on this
CPU, a weight format or activation the kernel does not implement); FastGenerator then keeps the
compiled step and says so in its stats.
"""

from __future__ import annotations

import ctypes
from ctypes import c_float, c_int32, c_void_p
from typing import Any

import torch
from torch import nn

from torchbridge.generation.decoders import (
    CausalDecoder,
    GPT2Decoder,
    LlamaDecoder,
    StaticKVCache,
)
from torchbridge.generation.projections import DynamicProj, Proj, ProjGroup

__all__ = ["NativeStep", "NATIVE_PROMPT_TOKENS"]

# One sequence's prompts up to this many tokens are prefilled by the native kernel too (each
# weight block read once for the prompt, 4 tokens a pass); longer ones by the compiled prompt
# layer's GEMMs. GPT-2, prefill ms native / compiled (ad hoc, 2 threads): 16 tokens fp32 33 / 79,
# bf16 25 / 35, int8-dynamic 11 / 24, int8-weight-only 23 / 27; at 32 tokens bf16 and
# int8-weight-only (weights converted once per 4 tokens) fell behind the GEMMs.
NATIVE_PROMPT_TOKENS = 16

# decode_step.cpp's enums
_FORMATS = {torch.float32: 0, torch.bfloat16: 1}
_INT8_WEIGHT_ONLY, _INT8_DYNAMIC = 2, 3
_ACTIVATIONS = {"gelu_new": 0, "gelu_pytorch_tanh": 0, "gelu": 1, "silu": 2, "swish": 2,
                "relu": 3}
_FAMILIES = {GPT2Decoder: 0, LlamaDecoder: 1}


class _Proj(ctypes.Structure):
    _fields_ = [("format", c_int32), ("out", c_int32), ("in_", c_int32), ("reserved", c_int32),
                ("weight", c_void_p), ("scales", c_void_p), ("bias", c_void_p),
                ("row_sums", c_void_p), ("inv_smooth", c_void_p)]


class _Group(ctypes.Structure):
    _fields_ = [("parts", c_int32), ("reserved", c_int32), ("part", _Proj * 3)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Group), ("o", _Group), ("up", _Group), ("down", _Group),
                ("norm1_w", c_void_p), ("norm1_b", c_void_p), ("norm2_w", c_void_p),
                ("norm2_b", c_void_p), ("attn_scale", c_float), ("reserved", c_float)]


class _Model(ctypes.Structure):
    _fields_ = [*((name, c_int32) for name in (
        "family", "act", "layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "vocab",
        "embed_format", "max_positions", "reserved")),
        ("eps", c_float), ("rope_scaling", c_float), ("layer", c_void_p), ("embed", c_void_p),
        ("positions", c_void_p), ("inv_freq", c_void_p), ("norm_w", c_void_p),
        ("norm_b", c_void_p), ("head", _Group)]


class _Unsupported(ValueError):
    """What `unavailable` reports: a decoder part the kernel does not implement."""


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeStep:
    """``decoder``'s batch-1 decode step (`CausalDecoder.decode_next`'s arguments and results)
    run by the C++ kernel. Holds references to every tensor the kernel reads."""

    def __init__(self, decoder: CausalDecoder):
        reason = self.unavailable(decoder)
        if reason:
            raise ValueError(f"the native decode step cannot run this decoder: {reason}")
        from torchbridge import kernels

        self._library = kernels._loaded("native decode step")
        self._keep: list[torch.Tensor] = []
        self.decoder = decoder
        self.model = self._describe(decoder)
        self._scratch = torch.empty(0)
        self._caches: dict[tuple[int, ...], tuple[Any, Any]] = {}
        self._next = ctypes.c_int64()

    @staticmethod
    def unavailable(decoder: CausalDecoder) -> str | None:
        """Why ``decoder`` cannot run on the native step here, or None."""
        from torchbridge import kernels

        reason = kernels.unavailable()
        if reason:
            return reason
        try:
            NativeStep._check(decoder)
        except _Unsupported as err:
            return str(err)
        return None

    # -- describing the decoder ------------------------------------------------------------------

    @staticmethod
    def _check(decoder: CausalDecoder) -> None:
        if type(decoder) not in _FAMILIES:
            raise _Unsupported(f"no native step for {type(decoder).__name__}")
        if decoder.act_name not in _ACTIVATIONS:
            raise _Unsupported(f"activation {decoder.act_name!r} is not implemented natively "
                               f"(have {sorted(_ACTIVATIONS)})")
        tables = [decoder.wte, decoder.wpe] if isinstance(decoder, GPT2Decoder) \
            else [decoder.embed_tokens]
        if any(t.dtype not in _FORMATS or t.dtype != tables[0].dtype or t.device.type != "cpu"
               for t in tables):
            raise _Unsupported(f"embedding tables of {[str(t.dtype) for t in tables]}: the "
                               f"native step reads fp32 or bf16 ones on a CPU")
        for m in decoder.modules():
            if isinstance(m, ProjGroup) and len(m.parts) > 3:
                raise _Unsupported(f"a projection group of {len(m.parts)} parts (at most 3)")
            if isinstance(m, Proj) and not (m.weight.dtype in _FORMATS or (
                    m.weight.dtype == torch.int8 and m.scales is not None)):
                raise _Unsupported(f"projection weights of {m.weight.dtype} (the native step "
                                   f"reads fp32, bf16, int8 weight-only and int8-dynamic)")

    def _proj(self, p: Proj | DynamicProj, out: _Proj) -> None:
        if isinstance(p, DynamicProj):
            m = p.module
            sums = p.weight.sum(1, dtype=torch.int32).contiguous()
            self._keep.append(sums)
            out.format, out.weight, out.scales = _INT8_DYNAMIC, p.weight.data_ptr(), _ptr(m.scales)
            out.bias, out.row_sums, out.inv_smooth = _ptr(m.bias), sums.data_ptr(), \
                _ptr(m.inv_smooth)
        else:
            out.format = _INT8_WEIGHT_ONLY if p.weight.dtype == torch.int8 \
                else _FORMATS[p.weight.dtype]
            out.weight, out.scales, out.bias = p.weight.data_ptr(), _ptr(p.scales), _ptr(p.bias)
        out.out, out.in_ = p.weight.shape

    def _group(self, module: nn.Module, out: _Group) -> None:
        parts = list(module.parts) if isinstance(module, ProjGroup) else [module]
        out.parts = len(parts)
        for p, slot in zip(parts, out.part, strict=False):
            self._proj(p, slot)

    def _describe(self, d: CausalDecoder) -> _Model:
        gpt2 = isinstance(d, GPT2Decoder)
        layers = (_Layer * d.n_layers)()
        for layer, block, scale in zip(layers, d.blocks, d.attn_scales, strict=True):
            if gpt2:
                projections = (block.c_attn, block.attn_proj, block.c_fc, block.mlp_proj)
                norms = (block.ln_1_w, block.ln_1_b, block.ln_2_w, block.ln_2_b)
            else:
                projections = (block.qkv, block.o, block.gate_up, block.down)
                norms = (block.in_norm, None, block.post_norm, None)
            for name, module in zip(("qkv", "o", "up", "down"), projections, strict=True):
                self._group(module, getattr(layer, name))
            layer.norm1_w, layer.norm1_b, layer.norm2_w, layer.norm2_b = map(_ptr, norms)
            layer.attn_scale = scale
        self._layers = layers
        embed = d.wte if gpt2 else d.embed_tokens
        inter = d.blocks[0].c_fc.weight.shape[0] if gpt2 else d.inter
        model = _Model(
            family=_FAMILIES[type(d)], act=_ACTIVATIONS[d.act_name], layers=d.n_layers,
            hidden=embed.shape[1], heads=d.n_heads, kv_heads=d.n_kv_heads, head_dim=d.head_dim,
            inter=inter, vocab=self._vocab(d), embed_format=_FORMATS[embed.dtype],
            max_positions=d.max_positions or 0, eps=d.eps,
            rope_scaling=1.0 if gpt2 else d.rope_scaling, layer=ctypes.addressof(layers),
            embed=embed.data_ptr(), positions=d.wpe.data_ptr() if gpt2 else None,
            inv_freq=None if gpt2 else d.inv_freq.data_ptr(),
            norm_w=(d.ln_f_w if gpt2 else d.norm_w).data_ptr(),
            norm_b=d.ln_f_b.data_ptr() if gpt2 else None)
        self._group(d.lm_head, model.head)
        return model

    @staticmethod
    def _vocab(d: CausalDecoder) -> int:
        head = d.lm_head
        parts = list(head.parts) if isinstance(head, ProjGroup) else [head]
        return sum(p.weight.shape[0] for p in parts)

    # -- running a step --------------------------------------------------------------------------

    def _cache_pointers(self, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]) -> Any:
        key = tuple(t.data_ptr() for t in k_cache + v_cache)
        found = self._caches.get(key)
        if found is None:
            for t in k_cache + v_cache:
                if t.dtype != torch.float32 or not t.is_contiguous() or t.shape[0] != 1:
                    raise ValueError(f"the native decode step takes one sequence's contiguous "
                                     f"fp32 cache, got {t.dtype} {tuple(t.shape)}")
            found = tuple((c_void_p * len(ts))(*(t.data_ptr() for t in ts))
                          for ts in (k_cache, v_cache))
            if len(self._caches) >= 8:  # caches the generator dropped
                self._caches.clear()
            self._caches[key] = found
        return found

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, first_slot: int,
             k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], valid: torch.Tensor,
             banned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, positions: int64 [count] of one sequence from cache slot ``first_slot``;
        (the last token's logits [1, V], its greedy next token [1])."""
        count, length = tokens.numel(), valid.shape[1]
        keys, values = self._cache_pointers(k_cache, v_cache)
        need = self._library.tb_decode_scratch(ctypes.byref(self.model), count, length)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.float32)
        logits = torch.empty(1, self.model.vocab, dtype=torch.float32)
        status = self._library.tb_decode_tokens(
            ctypes.byref(self.model), tokens.data_ptr(), positions.data_ptr(), count, first_slot,
            length, keys, values, valid.data_ptr(), banned.data_ptr(), self._scratch.data_ptr(),
            logits.data_ptr(), ctypes.byref(self._next), torch.get_num_threads())
        if status:
            limit = self.model.max_positions or None
            raise ValueError(
                f"the native decode step refused tokens {tokens.tolist()[:8]} at positions "
                f"{positions.tolist()[:8]} from cache slot {first_slot} of {length}: tokens must "
                f"be in 0..{self.model.vocab - 1}" + (f", positions below the model's {limit}"
                                                       if limit else ""))
        return logits, torch.tensor([self._next.value])

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache_pos: torch.Tensor,
                 k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], valid: torch.Tensor,
                 gemv: bool, banned: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`CausalDecoder.decode_next` for one sequence: (logits [1, V], greedy [1], next
        positions, next cache slot)."""
        if tokens.numel() != 1:
            raise ValueError(f"the native decode step runs one sequence, got {tokens.numel()}")
        logits, greedy = self._run(tokens.to(torch.int64).contiguous(), positions.contiguous(),
                                   int(cache_pos[0]), k_cache, v_cache, valid, banned)
        return logits, greedy, positions + 1, cache_pos + 1

    def prefill(self, cache: StaticKVCache, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`CausalDecoder.prefill` of one (left padded) prompt [1, T] through the same kernel, the
        T tokens together: each weight block is read once for all of them."""
        mask = attention_mask.to(torch.bool)
        t = input_ids.shape[1]
        cache.valid.fill_(True)
        cache.valid[:, :t] = mask
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
        no_ban = torch.zeros(self.model.vocab, dtype=torch.bool)
        logits, _ = self._run(input_ids[0].to(torch.int64).contiguous(), positions[0].contiguous(),
                              0, cache.k, cache.v, cache.valid, no_ban)
        return logits, positions[:, -1] + 1
