"""Weight-only int8 quantization for decoding.

Decoding at batch 1 reads every weight once per token, so its speed is set by bytes of weights,
not by FLOPs: int8 weights read a quarter of the bytes of fp32. Activations stay in floating
point (weight-only), which keeps accuracy far better than dynamic int8 activations.

Scales are symmetric and per output channel: one fp32 scale per row of the [out, in] weight, so an
outlier in one output channel does not flatten the resolution of all the others.

`quantize_weights_int8(model)` swaps `nn.Linear` and transformers' `Conv1D` (GPT-2's projections,
whose weight is stored transposed as [in, out]) for `Int8WeightOnlyLinear`, LM head included.
The fast generation path (`torchbridge.generation`) reads `weight_int8` and `scales` directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from torchbridge.precisions.swap import swap_linears, weight_out_in

__all__ = [
    "Int8WeightOnlyLinear", "int8_weight_matmul", "quantize_weights_int8", "quantize_per_channel",
    "sqnr_db",
]


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of a [out, in] weight: returns (int8 [out, in], fp32 [out])."""
    w = weight.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    # An all-zero row would give scale 0 and 0/0 below; any positive scale represents it exactly.
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


# From this many rows on (prefill, batches), an eager CPU call runs as one int8 GEMM over two int8
# terms per row instead of the int8-weight kernel below, whose cost grows with the rows.
TWO_TERM_MIN_ROWS = 8


def _two_terms(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each fp32 row as s * (q1 + q2 / 254), q1 and q2 int8 with s = max|row| / 127: q2 codes the
    rounding error of q1, so a row is held to ~1/64,000 of its largest value (bf16 keeps ~1/512
    of each value). Returns ([q1; q2] stacked as [2 * rows, in] int8, s [rows, 1])."""
    s = x2.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127.0
    q1 = torch.round(x2 / s)
    q2 = torch.round((x2 - q1 * s) * (254.0 / s)).clamp(-127, 127)
    return torch.cat([q1, q2]).to(torch.int8), s


def _two_term_matmul(x2: torch.Tensor, weight_int8: torch.Tensor,
                     scales: torch.Tensor) -> torch.Tensor:
    q, s = _two_terms(x2)
    acc = torch._int_mm(q, weight_int8.t())
    rows = s.shape[0]
    return (acc[:rows].float() + acc[rows:].float() / 254.0) * s * scales


@functools.cache
def _two_term_matmul_compiled() -> Callable[..., torch.Tensor]:
    """One compiled call: the split and the rescale fuse around the int8 GEMM (eager, their ~10
    ops cost as much as the GEMM of a few rows). Built on first use: `torch.compile` imports
    dynamo (~2 s), which importing this module should not pay."""
    return torch.compile(_two_term_matmul, dynamic=True)


def int8_weight_matmul(
    x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """x [..., in] @ (weight_int8 [out, in] * scales[:, None])^T, result in x's dtype."""
    k = weight_int8.shape[1]
    rows = x.numel() // k
    if x.device.type == "cpu" and rows >= TWO_TERM_MIN_ROWS:
        # The weights stay exactly int8; the activations go in as two int8 terms per row, so the
        # product is one int8 GEMM (VNNI/AMX) over 2 x rows, int32 accumulation. Against the
        # int8-weight kernel below, which rounds activations to bf16 (one BERT/GPT-2-sized
        # projection, ad hoc): 100x less error to the exact fp32 product, 1.05-1.15x faster at
        # 8 rows, 3.5x at 128. Inside a compiled graph the split fuses into its neighbours.
        matmul = _two_term_matmul if torch.compiler.is_compiling() else _two_term_matmul_compiled()
        y = matmul(x.reshape(rows, k).float(), weight_int8, scales)
        return y.reshape(*x.shape[:-1], weight_int8.shape[0]).to(x.dtype)
    if x.device.type == "cpu" and k % 16 == 0:
        # CPU kernel for int8 weights: streams int8 at ~35 GB/s, but only with bf16 activations
        # (with fp32 ones it takes a ~15x slower path), so activations are rounded to bf16 here.
        # It reads `in` in blocks of 16: other sizes crash or return NaN (torch 2.13), hence the
        # guard and the dequantizing fallback below.
        x2 = x.reshape(-1, k).to(torch.bfloat16)
        s = scales.to(torch.bfloat16)
        if torch.compiler.is_compiling():
            # inductor's lowering of this op asserts its inputs are buffers, not fused producers
            x2 = torch.ops.prims.inductor_force_stride_order.default(x2, x2.stride())
            s = torch.ops.prims.inductor_force_stride_order.default(s, s.stride())
        y = torch._weight_int8pack_mm(x2, weight_int8, s)
        return y.reshape(*x.shape[:-1], weight_int8.shape[0]).to(x.dtype)
    return F.linear(x, weight_int8.to(x.dtype)) * scales.to(x.dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; int8 per-channel gives ~40)."""
    ref = reference.detach().to(torch.float64)
    noise = ref - approx.detach().to(torch.float64)
    return float(10.0 * torch.log10(ref.pow(2).sum() / noise.pow(2).sum().clamp_min(1e-30)))


class Int8WeightOnlyLinear(nn.Module):
    """y = (x @ W_int8^T) * scale + bias, with W stored [out_features, in_features] like nn.Linear."""

    def __init__(
        self,
        weight_int8: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2:
            raise ValueError("weight_int8 must be a 2-D int8 tensor [out_features, in_features]")
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales.to(torch.float32))
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None

    @classmethod
    def from_float(cls, module: nn.Module) -> Int8WeightOnlyLinear:
        """Quantize an `nn.Linear` or a transformers `Conv1D` (weight [in, out])."""
        weight = weight_out_in(module)
        q, s = quantize_per_channel(weight)
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        return cls(q, s, bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.to(torch.float32) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_weight_matmul(x, self.weight_int8, self.scales)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=int8"


def quantize_weights_int8(
    model: nn.Module,
    *,
    include_lm_head: bool = True,
    skip: Iterable[str] = (),
) -> nn.Module:
    """Replace every nn.Linear / Conv1D of `model` in place by an `Int8WeightOnlyLinear`.

    `include_lm_head=False` keeps the output projection (`model.get_output_embeddings()`) in float.
    `skip` lists module names (as in `named_modules`) to leave untouched. Returns `model`.
    Embedding tables stay in float: a lookup reads one row per token, so they cost no bandwidth.
    """

    def make(old: nn.Module) -> Int8WeightOnlyLinear:
        new = Int8WeightOnlyLinear.from_float(old)
        if new.bias is not None:
            new.bias = new.bias.to(old.weight.dtype)
        return new

    swap_linears(model, make, include_head=include_lm_head, skip=skip)
    return model
