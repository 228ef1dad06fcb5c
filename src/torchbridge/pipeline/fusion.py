"""What the packing step fuses in a bf16 or fp32 CPU encoder, on top of packing its linears.

* **Query, key and value as one GEMM.** BERT-style self-attention projects the same hidden
  states three times. At BERT-base's 1,024 rows, three packed 768 -> 768 GEMMs ran 1.6 ms where
  one 768 -> 2304 GEMM over the concatenated weights ran 1.3 ms (a wider GEMM keeps the AMX tiles
  busier; ad hoc). `fuse_qkv` swaps each fusible module for a `FusedQKVSelfAttention` holding the
  concatenated projection as one plain ``nn.Linear`` (packed afterwards like any other). Its
  forward is the one the Hugging Face classes in `FUSIBLE` share: project, split into heads, call
  the model's attention interface, merge heads (DistilBERT's module then applies its output
  projection). The state dict keeps the original names (``query.weight`` ...).
* **The FFN's GELU inside its first GEMM.** oneDNN applies an exact (erf) GELU to the GEMM's
  fp32 accumulator before writing bf16 (a post-op): one pass less over the widest activation
  (`fuse_gelu`, on packed linears only; the activation module becomes ``nn.Identity``).
* **The residual add inside the output GEMM** of each attention and feed-forward block (a
  binary post-op, `fuse_residual_add`): one pass less before each LayerNorm. In eval mode only;
  in training the dropout sits between the two. For bf16 the alternative is torchbridge's add +
  LayerNorm kernel after a plain GEMM (`choose_norm_kernel`, timed per shape): on a 2-core Zen 4
  oneDNN's add post-op cost about twice a separate add, and the kernel does the add and the
  LayerNorm in one pass.
* **Attention by the fastest kernel** (`choose_attention_kernel`): SDPA, two batched GEMMs and
  a softmax, or torchbridge's fused bf16 kernel (pipeline/attention.py), timed at the planned
  shape.
* **Static int8 feed-forward blocks hand over uint8** (`fuse_requantize`): the first GEMM
  (GELU inside) writes its output on the second projection's calibrated grid.

Each output column is the same dot product as before, so outputs move only by the GEMM's
summation order (and the GELU and the add by being taken before the bf16 rounding instead of
after). `python benchmarks/packed_linear.py` measures the three on whole models against packing
alone.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from torchbridge import kernels
from torchbridge.precisions.int8_static import Int8StaticLinear, feed_forward_pairs

from .attention import bmm_attention, fastest_attention, key_bias
from .packing import PackedLinear, fastest, swap_modules

if TYPE_CHECKING:
    from .unpadding import TokenLayout

# Hugging Face self-attention classes with that shared forward: their projection names, and the
# output projection the module applies itself (None: the caller applies it).
FUSIBLE: dict[str, tuple[tuple[str, str, str], str | None]] = {
    "BertSelfAttention": (("query", "key", "value"), None),
    "RobertaSelfAttention": (("query", "key", "value"), None),
    "DistilBertSelfAttention": (("q_lin", "k_lin", "v_lin"), "out_lin"),
}


class FusedQKVSelfAttention(nn.Module):
    """A fusible self-attention module (see `FUSIBLE`) with its q/k/v in one linear."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.names, out_name = FUSIBLE[type(attn).__name__]
        q, k, v = (getattr(attn, name) for name in self.names)
        self.config = attn.config
        self.is_causal = False
        self.scaling = attn.scaling
        self.head_size = attn.attention_head_size
        self.dropout = attn.dropout
        self.eager = sys.modules[type(attn).__module__].eager_attention_forward
        self.width = q.out_features
        self.qkv = nn.Linear(q.in_features, 3 * self.width, bias=q.bias is not None,
                             device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            if q.bias is not None:
                self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        self.out_name = out_name
        if out_name is not None:
            self.add_module(out_name, getattr(attn, out_name))
        # "model" (its attention interface), "bmm" or "fused": the packing step's timed choice
        self.kernel = "model"
        self.register_state_dict_post_hook(_original_names)
        self.train(attn.training)  # a new module starts in training mode (attention dropout on)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                unpadded: TokenLayout | None = None,
                **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        qkv = self.qkv(hidden_states)
        if self._fused(qkv) and unpadded is not None:
            # sequences back to back in the packed rows: one call, no groups
            out = kernels.attention(qkv[0], self.width // self.head_size, self.scaling,
                                    lengths=unpadded.lengths)[None]
            weights = None
        elif unpadded is None:
            out, weights = self._attend(qkv, attention_mask, **kwargs)
            out = out.contiguous()
        else:  # real tokens only (pipeline/unpadding.py): attention by groups of sequences
            out = unpadded.ungrouped([
                self._attend(unpadded.grouped(qkv[0], group), group.mask, **kwargs)[0]
                for group in unpadded.groups])[None]
            weights = None
        if self.out_name is not None:
            out = getattr(self, self.out_name)(out)
        return out, weights

    def _attend(self, qkv: Tensor, attention_mask: Tensor | None,
                **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        batch, seq = qkv.shape[:-1]
        if self._fused(qkv):
            per_key, bias = key_bias(attention_mask, batch, seq)
            if per_key:  # otherwise (a mask that differs by query) the two GEMMs below
                return kernels.attention(qkv, self.width // self.head_size, self.scaling,
                                         key_bias=bias), None
        qkv = qkv.view(batch, seq, 3, -1, self.head_size)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, heads, seq, d]
        if self.kernel in ("bmm", "fused") and not self.training:
            out = bmm_attention(query, key, value, attention_mask, self.scaling)
            return out.reshape(batch, seq, -1), None
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          self.eager)
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=self.dropout.p if self.training else 0.0,
                                 scaling=self.scaling, **kwargs)
        return out.reshape(batch, seq, -1), weights

    def _fused(self, qkv: Tensor) -> bool:
        """Whether this call runs torchbridge's fused kernel: chosen, in eval mode, and on the
        bf16 it was chosen for (a model cast after optimizing gets the two GEMMs)."""
        return self.kernel == "fused" and not self.training and qkv.dtype == torch.bfloat16

    def extra_repr(self) -> str:
        kernel = {"bmm": ", attention as two batched GEMMs",
                  "fused": ", attention by torchbridge's fused kernel"}.get(self.kernel, "")
        return f"{'/'.join(self.names)} fused into one {self.width}x3 projection{kernel}"


def choose_attention_kernel(model: nn.Module, dtype: torch.dtype, batch: int, seq: int) -> str | None:
    """Time the attention kernels at [batch, heads, seq, head] (`fastest_attention`) and give the
    fastest to every `FusedQKVSelfAttention` of ``model`` set to SDPA, in place; returns the
    kernel ("sdpa", "bmm" or "fused"), or None when no fused module uses SDPA."""
    fused = [m for m in model.modules() if isinstance(m, FusedQKVSelfAttention)
             and m.config._attn_implementation == "sdpa"]
    if not fused:
        return None
    first = fused[0]
    kernel = fastest_attention(dtype, batch, first.width // first.head_size, seq, first.head_size)
    for module in fused:
        module.kernel = "model" if kernel == "sdpa" else kernel
    return kernel


def _original_names(module: FusedQKVSelfAttention, state: dict[str, Tensor], prefix: str,
                    local_metadata: Any) -> None:
    for kind in ("weight", "bias"):
        fused = state.pop(f"{prefix}qkv.{kind}", None)
        if fused is not None:
            for name, part in zip(module.names, fused.split(module.width), strict=True):
                state[f"{prefix}{name}.{kind}"] = part


def _fusible(attn: nn.Module) -> bool:
    entry = FUSIBLE.get(type(attn).__name__)
    if entry is None or getattr(attn, "is_causal", True) \
            or getattr(attn.config, "is_decoder", False):
        return False  # a decoder's self-attention also updates a KV cache: not this forward
    linears = [getattr(attn, name, None) for name in entry[0]]
    return all(type(lin) is nn.Linear for lin in linears) \
        and len({(lin.in_features, lin.out_features, lin.weight.dtype, lin.weight.device,
                  lin.bias is None) for lin in linears}) == 1


def fuse_qkv(model: nn.Module) -> int:
    """Swap every fusible self-attention module (plain linears of one dtype) for a
    `FusedQKVSelfAttention`, in place; returns how many were swapped."""
    return swap_modules(model, _fusible, FusedQKVSelfAttention)


# Linears whose oneDNN GEMM can apply a GELU or add a residual itself (post-ops).
_POST_OP_LINEARS = (PackedLinear, Int8StaticLinear)

# Modules whose forward is linear -> activation (-> ...): (linear name, activation name).
_FFN_IN = (("dense", "intermediate_act_fn"), ("lin1", "activation"))


def _exact_gelu(act: nn.Module) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and act.act is torch.nn.functional.gelu


def fuse_gelu(model: nn.Module) -> int:
    """Move every exact GELU that follows a packed or static-int8 linear into that linear's GEMM
    (a oneDNN post-op), in place; returns how many were moved."""
    moved = 0
    for module in model.modules():
        for lin_name, act_name in _FFN_IN:
            lin, act = getattr(module, lin_name, None), getattr(module, act_name, None)
            if isinstance(lin, _POST_OP_LINEARS) and lin.post_op == "none" \
                    and isinstance(act, nn.Module) and _exact_gelu(act):
                lin.post_op = "gelu"
                setattr(module, act_name, nn.Identity())
                moved += 1
    return moved


# Hugging Face modules whose forward is LayerNorm(dropout(dense(hidden)) + input) (the output
# projection and residual of BERT-style attention and feed-forward blocks).
_RESIDUAL_OUTPUTS = frozenset({"BertSelfOutput", "BertOutput", "RobertaSelfOutput",
                               "RobertaOutput"})


class ResidualOutput(nn.Module):
    """A `_RESIDUAL_OUTPUTS` module whose packed dense GEMM also adds the residual, or whose add
    and LayerNorm run as one pass of torchbridge's kernel after the GEMM (`choose_norm_kernel`);
    the same submodules under the same names, so the state dict is unchanged."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = block.dense, block.dropout, block.LayerNorm
        self.norm = "model"  # or "fused": the packing step's timed choice
        self.train(block.training)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        if self.training:  # dropout comes between the GEMM and the add
            return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)
        if self.norm == "fused" and input_tensor.dtype == torch.bfloat16:
            norm = self.LayerNorm
            return kernels.add_layer_norm(self.dense(hidden_states), input_tensor, norm.weight,
                                          norm.bias, norm.eps)
        return self.LayerNorm(self.dense.plus(hidden_states, input_tensor))

    def extra_repr(self) -> str:
        return "residual add and LayerNorm by torchbridge's fused kernel" \
            if self.norm == "fused" else "residual add inside the GEMM"


def fuse_residual_add(model: nn.Module) -> int:
    """Swap every `_RESIDUAL_OUTPUTS` module whose dense linear is packed or static int8 for a
    `ResidualOutput`, in place; returns how many were swapped."""
    return swap_modules(model, lambda m: type(m).__name__ in _RESIDUAL_OUTPUTS
                 and isinstance(getattr(m, "dense", None), _POST_OP_LINEARS), ResidualOutput)


def norm_kernel_unavailable(block: ResidualOutput) -> str | None:
    """Why torchbridge's add + LayerNorm kernel cannot run this block, or None."""
    norm = block.LayerNorm
    if not isinstance(block.dense, PackedLinear) or block.dense.packed.dtype != torch.bfloat16:
        return "it runs after a packed bf16 GEMM only"
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
        return "it needs a LayerNorm with a weight and a bias"
    if norm.normalized_shape[0] % 16:
        return f"it needs a width of a multiple of 16, not {norm.normalized_shape[0]}"
    return kernels.unavailable()


def choose_norm_kernel(model: nn.Module, rows: int) -> tuple[int, str | None]:
    """Time, per dense shape at ``rows`` rows, the residual add inside the GEMM followed by the
    LayerNorm against the plain GEMM followed by torchbridge's add + LayerNorm kernel, and give
    each `ResidualOutput` the faster, in place. Returns how many blocks got the kernel, and why
    it was not a candidate (None when it was)."""
    blocks = [m for m in model.modules() if isinstance(m, ResidualOutput)]
    why_not = next(filter(None, map(norm_kernel_unavailable, blocks)), None) if blocks else None
    if not blocks or why_not:
        return 0, why_not
    chosen: dict[tuple[int, int], str] = {}
    for block in blocks:
        shape = (block.dense.in_features, block.dense.out_features)
        if shape not in chosen:
            chosen[shape] = _faster_norm(block, rows)
        block.norm = chosen[shape]
    return sum(block.norm == "fused" for block in blocks), None


def _faster_norm(block: ResidualOutput, rows: int) -> str:
    dense, norm = block.dense, block.LayerNorm
    x = torch.randn(rows, dense.in_features, dtype=torch.bfloat16)
    residual = torch.randn(rows, dense.out_features, dtype=torch.bfloat16)
    return fastest({
        "model": lambda: norm(dense.plus(x, residual)),
        "fused": lambda: kernels.add_layer_norm(dense(x), residual, norm.weight, norm.bias,
                                                norm.eps)}, runs=7)


def fuse_requantize(model: nn.Module) -> int:
    """Where both projections of a feed-forward block are static int8 and the GELU is inside the
    first GEMM, have that GEMM write its output on the second's uint8 grid (oneDNN requantizes
    the accumulator): the widest activation is written once, as uint8, and never quantized
    again. In place; returns how many blocks were linked."""
    linked = 0
    for _, first, second in feed_forward_pairs(model):
        if isinstance(first, Int8StaticLinear) and isinstance(second, Int8StaticLinear) \
                and first.post_op == "gelu" and first.requantize_to is None \
                and second.smooth is None:  # a smoothed grid is per channel: not oneDNN's
            first.requantize_to = second
            linked += 1
    return linked
