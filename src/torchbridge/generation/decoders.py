"""gpt-fast style functional decoders that read the weights of a Hugging Face causal LM.

Why not HF's own forward with its `StaticCache`: on CPU the HF static-cache + compile recipe was
measured no faster than eager (1400 vs 1556 ms for 50 GPT-2 tokens). The cost is not the Python
loop but the per-token weight reads: one decode step must stream every weight once. A functional
forward lets the decode step spell each projection the way that streams fastest
(generation/projections.py), keep activations in fp32 whatever the weight dtype, and own a cache
whose layout, padding mask and growth never change a shape, so the compiled step is traced once
per (batch, cache length bucket).

Our own `StaticKVCache` instead of transformers' `StaticCache`: the functional forward indexes the
cache tensors directly (one `index_copy_` per layer, one boolean key-validity row per sequence that
encodes left padding); HF's cache object adds per-layer Python dispatch and its own mask building,
which is what this path exists to avoid. We keep HF's trick of marking the cache tensors as static
addresses on CUDA so CUDA graphs ("reduce-overhead") can replay in-place cache updates.

Weights are copied once into [out, in] layout (GPT-2's Conv1D stores [in, out]) and, for Llama,
q/k/v and gate/up are fused so a decode step launches fewer kernels. That copy costs the model's
size in memory once; for the 100-400M parameter models this library targets that is acceptable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchbridge.generation.projections import DynamicProj, Proj

__all__ = ["StaticKVCache", "CausalDecoder", "GPT2Decoder", "LlamaDecoder", "DECODERS"]


@dataclass
class StaticKVCache:
    """Preallocated keys/values for every layer, sized once per (batch, length bucket)."""

    k: list[torch.Tensor]  # per layer [batch, kv_heads, length, head_dim]
    v: list[torch.Tensor]
    valid: torch.Tensor  # [batch, length] bool: False at left-padding positions of the prompt

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, Hq, T, D] against the whole cache k/v [B, Hkv, L, D]; allowed [B, T, L] bool.

    Grouped-query attention without copying K/V: query head h reads kv head h // (Hq // Hkv),
    the grouping HF's `repeat_kv` implies.
    """
    b, hq, t, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    g = hq // hkv
    scores = torch.matmul(q.reshape(b, hkv, g * t, d), k.transpose(-1, -2)) * scale
    scores = scores.view(b, hkv, g, t, length)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(b, hkv, g * t, length)
    return torch.matmul(probs, v).view(b, hq, t, d)


class CausalDecoder(nn.Module):
    """Family-independent prefill / decode_step; subclasses supply embed, layers and the head."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_positions: int | None
    attn_scales: list[float]  # per layer
    blocks: nn.ModuleList  # per layer: its weights

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block(self, m: nn.Module, scale: float, h: torch.Tensor, positions: torch.Tensor,
              write_kv, read_kv, allowed: torch.Tensor, gemv: bool) -> torch.Tensor:
        """One decoder layer: ``m`` holds its weights, ``scale`` its attention scale;
        ``write_kv(k, v)`` stores its new keys/values, ``read_kv()`` returns its whole cache."""
        raise NotImplementedError

    def layer(self, i: int, h: torch.Tensor, positions: torch.Tensor, write_kv, read_kv,
              allowed: torch.Tensor, gemv: bool) -> torch.Tensor:
        """Layer ``i``; ``write_kv(i, k, v)`` and ``read_kv(i)`` address its cache."""
        return self.block(self.blocks[i], self.attn_scales[i], h, positions,
                          lambda k, v: write_kv(i, k, v), lambda: read_kv(i), allowed, gemv)

    def prompt_layer(self, m: nn.Module, scale: float, h: torch.Tensor, positions: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor,
                     allowed: torch.Tensor) -> torch.Tensor:
        """One layer over a prompt h [B, T, C], its keys/values written to the first T slots of
        its cache. Everything that differs between layers comes in as an argument (the weights
        as tensors of ``m``), so one compiled version of this serves every layer (FastGenerator
        compiles it on a CPU: the ~20 eager ops and ~4 projection calls of a layer cost more
        than its arithmetic at short prompts)."""
        t = h.shape[1]

        def write_kv(k: torch.Tensor, v: torch.Tensor) -> None:
            k_cache[:, :, :t] = k
            v_cache[:, :, :t] = v

        return self.block(m, scale, h, positions, write_kv, lambda: (k_cache, v_cache), allowed,
                          gemv=False)

    def head(self, h: torch.Tensor, gemv: bool) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(self, batch: int, length: int, device: torch.device) -> StaticKVCache:
        shape = (batch, self.n_kv_heads, length, self.head_dim)
        k = [torch.zeros(shape, device=device) for _ in range(self.n_layers)]
        v = [torch.zeros(shape, device=device) for _ in range(self.n_layers)]
        if device.type == "cuda":
            # CUDA graphs replay in-place updates only of static-address inputs (HF does the same).
            for t in k + v:
                torch._dynamo.mark_static_address(t)
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        return StaticKVCache(k, v, valid)

    @torch.no_grad()
    def prefill(
        self, cache: StaticKVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        prompt_layer: Callable[..., torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt [B, T] (left padded), fill cache[:, :, :T], return (last logits [B, V]
        fp32, next position ids [B]). Each layer runs through ``prompt_layer`` (a compiled
        `prompt_layer`), by default eagerly."""
        b, t = input_ids.shape
        mask = attention_mask.to(torch.bool)
        cache.valid.fill_(True)
        cache.valid[:, :t] = mask
        # HF's position ids for padded prompts: cumsum of the mask - 1, pads at 0.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
        idx = torch.arange(cache.length, device=input_ids.device)
        causal = idx[None, :] <= torch.arange(t, device=input_ids.device)[:, None]  # [T, L]
        # A padding query may see itself only, so its row of softmax is never empty (no NaN).
        own = idx[None, :] == torch.arange(t, device=input_ids.device)[:, None]
        allowed = causal[None] & (cache.valid[:, None, :] | own[None])  # [B, T, L]

        run = prompt_layer or self.prompt_layer
        h = self.embed(input_ids, positions)
        for i in range(self.n_layers):
            h = run(self.blocks[i], self.attn_scales[i], h, positions, cache.k[i], cache.v[i],
                    allowed)
        logits = self.head(h[:, -1:], gemv=False)[:, 0]
        return logits, positions[:, -1] + 1

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache_pos: torch.Tensor,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        valid: torch.Tensor,
        gemv: bool,
    ) -> torch.Tensor:
        """One token per row: tokens [B], positions [B] (model positions), cache_pos [1] (slot in
        the cache, shared by all rows because padding is on the left). Returns logits [B, V] fp32.

        All shapes are fixed by the cache, and the growing position is a tensor, so a compiled
        version of this function is traced once per cache and never again as the sequence grows.
        """
        idx = torch.arange(valid.shape[1], device=valid.device)
        allowed = (valid & (idx[None, :] <= cache_pos))[:, None, :]  # [B, 1, L]

        def write_kv(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            k_cache[i].index_copy_(2, cache_pos, k)
            v_cache[i].index_copy_(2, cache_pos, v)

        def read_kv(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return k_cache[i], v_cache[i]

        pos = positions[:, None]
        h = self.embed(tokens[:, None], pos)
        for i in range(self.n_layers):
            h = self.layer(i, h, pos, write_kv, read_kv, allowed, gemv)
        return self.head(h, gemv)[:, 0]

    def decode_next(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache_pos: torch.Tensor,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        valid: torch.Tensor,
        gemv: bool,
        banned: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`decode_step` and what the generation loop needs of every step besides the logits:
        (logits, greedy next tokens [B], next positions, next cache slot). ``banned`` [V] bool
        marks tokens the greedy choice may not take (HF's min-length rules ban EOS this way:
        -inf where banned); the logits come back unchanged. Compiled with the step, the argmax
        and the two increments fuse into its kernels instead of costing eager calls each token
        (GPT-2 int8-weight-only, 50 greedy tokens: 428 vs 436 ms, ad hoc)."""
        logits = self.decode_step(tokens, positions, cache_pos, k_cache, v_cache, valid, gemv)
        greedy = torch.where(banned, float("-inf"), logits).argmax(-1)
        return logits, greedy, positions + 1, cache_pos + 1

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (embedding tables excluded except the tied head:
        a lookup reads one row)."""
        total = sum(m.weight_bytes() for m in self.modules() if isinstance(m, (Proj, DynamicProj)))
        for p in self.norm_params():
            total += p.numel() * p.element_size()
        return total

    def norm_params(self) -> list[torch.Tensor]:
        return []


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32)


class GPT2Decoder(CausalDecoder):
    """GPT-2: learned positions, pre-LayerNorm blocks, fused c_attn (Conv1D), tied LM head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from transformers.activations import ACT2FN

        cfg = model.config
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not a causal LM this path supports")
        tr = model.transformer
        self.n_layers = cfg.n_layer
        self.n_heads = cfg.n_head
        self.n_kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.max_positions = cfg.n_positions
        self.eps = cfg.layer_norm_epsilon
        self.act_name = cfg.activation_function
        self.act = ACT2FN[self.act_name]
        self.register_buffer("wte", tr.wte.weight.detach())
        self.register_buffer("wpe", tr.wpe.weight.detach())
        base = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0
        self.attn_scales = [
            base / (i + 1 if cfg.scale_attn_by_inverse_layer_idx else 1) for i in range(self.n_layers)
        ]
        self.blocks = nn.ModuleList()
        for blk in tr.h:
            m = nn.Module()
            m.c_attn = Proj.from_module(blk.attn.c_attn)
            m.attn_proj = Proj.from_module(blk.attn.c_proj)
            m.c_fc = Proj.from_module(blk.mlp.c_fc)
            m.mlp_proj = Proj.from_module(blk.mlp.c_proj)
            for name, ln in (("ln_1", blk.ln_1), ("ln_2", blk.ln_2)):
                m.register_buffer(name + "_w", _fp32(ln.weight))
                m.register_buffer(name + "_b", _fp32(ln.bias))
            self.blocks.append(m)
        self.register_buffer("ln_f_w", _fp32(tr.ln_f.weight))
        self.register_buffer("ln_f_b", _fp32(tr.ln_f.bias))
        self.lm_head = Proj.from_module(model.lm_head)

    def norm_params(self) -> list[torch.Tensor]:
        out = [self.ln_f_w, self.ln_f_b]
        for m in self.blocks:
            out += [m.ln_1_w, m.ln_1_b, m.ln_2_w, m.ln_2_b]
        return out

    def _ln(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.wte[tokens].float() + self.wpe[positions].float()

    def block(self, m, scale, h, positions, write_kv, read_kv, allowed, gemv):
        b, t, c = h.shape
        qkv = m.c_attn(self._ln(h, m.ln_1_w, m.ln_1_b), gemv)
        q, k, v = qkv.view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        write_kv(k, v)
        kc, vc = read_kv()
        a = _attend(q, kc, vc, allowed, scale).transpose(1, 2).reshape(b, t, c)
        h = h + m.attn_proj(a, gemv)
        x = self.act(m.c_fc(self._ln(h, m.ln_2_w, m.ln_2_b), gemv))
        return h + m.mlp_proj(x, gemv)

    def head(self, h: torch.Tensor, gemv: bool) -> torch.Tensor:
        return self.lm_head(self._ln(h, self.ln_f_w, self.ln_f_b), gemv)


class LlamaDecoder(CausalDecoder):
    """Llama: RoPE, RMSNorm, grouped-query attention, gated MLP; q|k|v and gate|up fused."""

    # Rope types whose frequencies do not depend on the sequence length: inv_freq and
    # attention_scaling read from the model's rotary module describe them completely.
    STATIC_ROPE = ("default", "linear", "llama3", "yarn")

    def __init__(self, model: nn.Module):
        super().__init__()
        from transformers.activations import ACT2FN

        cfg = model.config
        inner = model.model
        rope = inner.rotary_emb
        if rope.rope_type not in self.STATIC_ROPE:
            raise ValueError(
                f"rope_type {rope.rope_type!r} changes with sequence length; supported: "
                f"{self.STATIC_ROPE}"
            )
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_positions = None  # RoPE has no table to run off the end of
        self.eps = cfg.rms_norm_eps
        self.act_name = cfg.hidden_act
        self.act = ACT2FN[self.act_name]
        self.attn_scales = [self.head_dim**-0.5] * self.n_layers
        self.register_buffer("inv_freq", rope.inv_freq.detach().float())
        self.rope_scaling = float(rope.attention_scaling)
        self.register_buffer("embed_tokens", inner.embed_tokens.weight.detach())
        self.blocks = nn.ModuleList()
        for blk in inner.layers:
            at, mlp = blk.self_attn, blk.mlp
            m = nn.Module()
            m.qkv = Proj.fuse([Proj.from_module(at.q_proj), Proj.from_module(at.k_proj),
                               Proj.from_module(at.v_proj)])
            m.o = Proj.from_module(at.o_proj)
            m.gate_up = Proj.fuse([Proj.from_module(mlp.gate_proj), Proj.from_module(mlp.up_proj)])
            m.down = Proj.from_module(mlp.down_proj)
            m.register_buffer("in_norm", _fp32(blk.input_layernorm.weight))
            m.register_buffer("post_norm", _fp32(blk.post_attention_layernorm.weight))
            self.blocks.append(m)
        self.register_buffer("norm_w", _fp32(inner.norm.weight))
        self.lm_head = Proj.from_module(model.lm_head)
        self.inter = cfg.intermediate_size

    def norm_params(self) -> list[torch.Tensor]:
        return [self.norm_w] + [p for m in self.blocks for p in (m.in_norm, m.post_norm)]

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens[tokens].float()

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as HF's LlamaRotaryEmbedding + apply_rotary_pos_emb, in fp32.
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling)[:, None]  # [B, 1, T, D]
        sin = (emb.sin() * self.rope_scaling)[:, None]
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def block(self, m, scale, h, positions, write_kv, read_kv, allowed, gemv):
        b, t, _ = h.shape
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = m.qkv(self._rms(h, m.in_norm), gemv)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q = self._rope(q.view(b, t, hq, d).transpose(1, 2), positions)
        k = self._rope(k.view(b, t, hkv, d).transpose(1, 2), positions)
        v = v.view(b, t, hkv, d).transpose(1, 2)
        write_kv(k, v)
        kc, vc = read_kv()
        a = _attend(q, kc, vc, allowed, scale).transpose(1, 2).reshape(b, t, hq * d)
        h = h + m.o(a, gemv)
        gate, up = m.gate_up(self._rms(h, m.post_norm), gemv).split([self.inter, self.inter], -1)
        return h + m.down(self.act(gate) * up, gemv)

    def head(self, h: torch.Tensor, gemv: bool) -> torch.Tensor:
        return self.lm_head(self._rms(h, self.norm_w), gemv)


DECODERS: dict[str, type[CausalDecoder]] = {"gpt2": GPT2Decoder, "llama": LlamaDecoder}
