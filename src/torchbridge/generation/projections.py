"""How a decoder reads one projection's weights (generation/decoders.py builds its layers of these).

Batch-1 decoding streams every weight once per token, so each projection is spelled the way that
streams fastest here. The GEMV kernels torch dispatches to (MKL sgemv for `F.linear` at M=1,
oneDNN bf16) reached only 13-18 GB/s on GPT-2's 768x50257 LM head on the development CPU, while a
plain vectorized reduction that inductor generates read the same bytes at 30-36 GB/s (bf16 2.1 ms
vs 4.4 ms, int8 1.3 ms, fp32 4.9 vs 11.9 ms): `Proj` spells float and int8-weight-only projections
as that reduction, with fp32 activations whatever the weight dtype; int8-dynamic ones
(`DynamicProj`) quantize the token per token as their module does and reduce its integer levels
the same way (`benchmarks/decode_kernels.py` measures the kernels). Batches of rows (prefill,
batched decoding) run GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchbridge.precisions.int8_dynamic import Int8DynamicLinear
from torchbridge.precisions.int8_weight_only import Int8WeightOnlyLinear, int8_weight_matmul

__all__ = ["Proj", "DynamicProj", "ProjGroup"]

# A batch-1 projection is computed as this many reductions over row blocks of its weight, which
# inductor fuses into one loop that streams that many weight blocks at once (one multiply-add
# chain each). In a decode step the projections depend on each other, so there is no other
# projection to overlap with, and one stream per thread left the memory system idle between
# requests: `python benchmarks/decode_streams.py` measures whole decode steps with 1 and 8.
GEMV_STREAMS = 8


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Proj(nn.Module):
    """One projection y = x W^T (* scales) + b, W stored [out, in] (float, bf16 or int8)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", None if scales is None else scales.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())

    @classmethod
    def from_module(cls, module: nn.Module) -> Proj | DynamicProj:
        if isinstance(module, Int8DynamicLinear):
            return DynamicProj(module)
        if isinstance(module, Int8WeightOnlyLinear):
            return cls(module.weight_int8, module.scales, module.bias)
        if isinstance(module, nn.Linear):
            return cls(module.weight.detach(), None, _maybe(module.bias))
        from transformers.pytorch_utils import Conv1D

        if isinstance(module, Conv1D):  # x @ W + b with W [in, out]
            return cls(module.weight.detach().t(), None, _maybe(module.bias))
        raise TypeError(f"unsupported projection module {type(module).__name__}")

    @classmethod
    def fuse(cls, parts: list[Proj | DynamicProj]) -> Proj | ProjGroup:
        """Concatenate projections that read the same input (q|k|v, gate|up) along out."""
        if any(isinstance(p, DynamicProj) for p in parts):
            return ProjGroup(parts)  # each has its own activation scaling: run them side by side
        if len({p.weight.dtype for p in parts}) != 1 or len({p.scales is None for p in parts}) != 1:
            raise ValueError("cannot fuse projections of different precisions")
        w = torch.cat([p.weight for p in parts], 0)
        s = None if parts[0].scales is None else torch.cat([p.scales for p in parts], 0)
        if all(p.bias is None for p in parts):
            b = None
        else:
            b = torch.cat(
                [p.bias if p.bias is not None else p.weight.new_zeros(p.weight.shape[0],
                                                                        dtype=torch.float32)
                 for p in parts], 0)
        return cls(w, s, b)

    def forward(self, x: torch.Tensor, gemv: bool = False) -> torch.Tensor:
        w = self.weight
        if gemv:
            y = reduce_rows(x, w)
            if self.scales is not None:
                y = y * self.scales
        elif w.dtype == torch.int8:
            y = int8_weight_matmul(x, w, self.scales)
        elif w.dtype != x.dtype:
            # GEMM (prefill, batched decode): run in the weight's dtype (oneDNN bf16 kernels).
            y = F.linear(x.to(w.dtype), w).to(x.dtype)
        else:
            y = F.linear(x, w)
        if self.bias is not None:
            y = y + self.bias
        return y

    def weight_bytes(self) -> int:
        """Bytes one call reads of this projection's weights."""
        return _nbytes(self.weight, self.scales, self.bias)


class DynamicProj(nn.Module):
    """An int8-dynamic projection (int8 weights and per-token int8 activations) as the decoder
    calls it. Batch-1 rows: the token is quantized on the module's own grid and its integer levels
    go through `reduce_rows` over an [out, in] copy of the int8 weight (the module keeps [in,
    out] for its GEMM), rescaled as the module does: the module's arithmetic with the products
    summed in fp32 instead of int32 (exact while partial sums stay below 2**24). Anything else
    runs the model's own module (shared, not modified)."""

    def __init__(self, module: Int8DynamicLinear):
        super().__init__()
        self.module = module
        self.register_buffer("weight", module.weight_t.t().contiguous())

    def forward(self, x: torch.Tensor, gemv: bool = False) -> torch.Tensor:
        m = self.module
        if not gemv:
            return m(x)
        codes, zero, x_scale = m.quantize_tokens(m.rows(x))
        y = reduce_rows(codes - zero, self.weight) * (x_scale * m.scales)
        if m.bias is not None:
            y = y + m.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], m.out_features)

    def weight_bytes(self) -> int:
        """Bytes one call reads of this projection's weights."""
        m = self.module
        return _nbytes(self.weight, m.scales, m.bias)


class ProjGroup(nn.Module):
    """Projections that read the same input but cannot share one weight (int8-dynamic ones
    scale their input each its own way), run side by side and concatenated along out."""

    def __init__(self, parts: list[Proj | DynamicProj]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor, gemv: bool = False) -> torch.Tensor:
        return torch.cat([p(x, gemv) for p in self.parts], dim=-1)


def reduce_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] (fp32) times w [out, in] (any dtype) -> [..., out] fp32, for a few rows.

    A broadcast-multiply + sum that inductor fuses into one vectorized reduction over contiguous
    ``in``, converting bf16/int8 to fp32 in registers, over GEMV_STREAMS row blocks of ``w`` at
    once. The input is materialized first: otherwise inductor inlines its producer (layer norm,
    embedding lookup, GELU) into the reduction and recomputes it for every output row, which
    made the int8 step compute-bound (28 ms vs 17 ms for bf16 at 1 thread)."""
    x = _realize(x.contiguous()).unsqueeze(-2)
    return torch.cat([(x * part.to(torch.float32)).sum(-1) for part in w.chunk(GEMV_STREAMS)], -1)


def _realize(x: torch.Tensor) -> torch.Tensor:
    """Identity in eager mode; under inductor, forces `x` into a buffer of its own.
    (The prim is registered by importing torch._inductor.inductor_prims, which FastGenerator does
    when it compiles; `import torchbridge.generation` stays light.)"""
    if torch.compiler.is_compiling():
        return torch.ops.prims.inductor_force_stride_order.default(x, x.stride())
    return x


def _maybe(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
