"""Dynamic int8 quantization for compute-bound batches (encoders, prefill).

Weights are int8 with one symmetric scale per output channel (quantized once); activations are
quantized per token at run time (one scale per row, from its own absolute maximum), so the matmul
runs on int8 integer units (``torch._int_mm``: VNNI/AMX on x86 CPUs, IMMA on GPUs) and is rescaled
in fp32, the result cast back to the activations' dtype (bf16 when the model is bf16).
Per-token scales keep one loud token from flattening the resolution of the others.

What was measured (``benchmarks/int8_study.py``, BERT-base 8 x 128, 2 threads on a shared 2-core
Xeon with AMX; candidates interleaved round-robin in one process, medians of per-round ratios):

* Under torch.compile (inductor, freezing) the quantize and rescale need no hand fusion: the
  generated code runs LayerNorm + row absmax + quantize as one kernel, rescale + bias + GELU + the
  next quantize as one, and rescale + bias + residual add as one; only ``_int_mm`` stays an
  extern call (oneDNN). Eager, the same arithmetic costs as much as the GEMM itself, which is why
  the int8 path is meant to run compiled.
* Paid: keeping the weight [in, out] contiguous for ``_int_mm(a [M, K], b [K, N])`` (a
  transposed view of [out, in] ran ~1.4x slower per GEMM); bf16 activations between the GEMMs
  (model cast to bf16) over fp32 ones, because LayerNorm, softmax-attention and GELU then move
  half the bytes and SDPA runs in bf16.
* Did not pay: one scale per tensor instead of per token (a second pass over the activations for
  the global max, ~10% slower per GEMM, and coarser); one fused QKV GEMM instead of three (the
  quantize of the shared input is deduplicated by inductor already, and one N=2304 GEMM was not
  faster than three N=768 ones); inductor max-autotune (``_int_mm`` is not templated on CPU, the
  extern oneDNN kernel was chosen anyway). The numbers are in the study's JSON and the README.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from torchbridge.precisions.int8_weight_only import quantize_per_channel
from torchbridge.precisions.swap import swap_linears, weight_out_in


class Int8DynamicLinear(nn.Module):
    """y = (q(x / s) @ W_int8^T) * s_x * s_w + b, with q the per-token int8 quantization.

    ``smooth`` (optional, [in_features]) is a SmoothQuant-style per-input-channel scale s: the
    weight is quantized as W * s and the activation divided by s at run time, which moves the
    range of outlier channels from the activations (quantized per token, so one loud channel
    costs every other channel resolution) into the weights (quantized per output channel).
    Under torch.compile the division fuses into the quantize kernel.
    """

    def __init__(self, module: nn.Module, *, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = weight_out_in(module).to(torch.float32)
        if smooth is not None:
            smooth = smooth.detach().to(torch.float32, copy=True)
            if smooth.shape != (weight.shape[1],) or not bool((smooth > 0).all()):
                raise ValueError(f"smooth must be {weight.shape[1]} positive per-input-channel "
                                 f"scales, got shape {tuple(smooth.shape)}")
            weight = weight * smooth
        q, scales = quantize_per_channel(weight)
        self.out_features, self.in_features = q.shape
        # [in, out] contiguous: the layout _int_mm(a [M, K], b [K, N]) reads fastest
        self.register_buffer("weight_t", q.t().contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("inv_smooth", None if smooth is None else smooth.reciprocal())
        bias = getattr(module, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if self.inv_smooth is not None:
            x2 = x2 * self.inv_smooth
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        xq = torch.round(x2 / x_scale).clamp(-127, 127).to(torch.int8)
        if xq.shape[0] <= 16 and x2.device.type == "cuda":
            # cuBLAS int8 GEMM needs M > 16; tiny batches are bandwidth-bound anyway
            acc = xq.float() @ self.weight_t.float()
        else:
            acc = torch._int_mm(xq, self.weight_t).float()
        # in place: eager, every temporary of [tokens, out] fp32 is a full pass over memory
        y = acc.mul_(x_scale).mul_(self.scales)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        smooth = ", smoothed" if self.inv_smooth is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic{smooth}"


def quantize_dynamic_int8(model: nn.Module, *, include_head: bool = True,
                          skip: Iterable[str] = ()) -> nn.Module:
    """Swap every nn.Linear / Conv1D (but those named in ``skip``) for Int8DynamicLinear, in
    place. Returns ``model``."""
    swap_linears(model, Int8DynamicLinear, include_head=include_head, skip=skip)
    return model
