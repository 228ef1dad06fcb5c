"""Dynamic int8 quantization for compute-bound batches (encoders, prefill).

Weights are int8 with one symmetric scale per output channel (quantized once); activations are
quantized per token at run time (one scale and zero point per row, from its own min and max:
asymmetric, because the input of every FFN-out projection comes out of a GELU and is nearly all
>= 0; on real all-MiniLM-L6-v2 this lifted the worst of 10,000 smoothed sentence embeddings
from 0.9908 to 0.9963 against fp32, benchmarks/int8_accuracy_minilm.py), so the matmul
runs on int8 integer units (``torch._int_mm``: VNNI/AMX on x86 CPUs, IMMA on GPUs) and is rescaled
in fp32, the result cast back to the activations' dtype (bf16 when the model is bf16).
Per-token scales keep one loud token from flattening the resolution of the others.

What was measured (``benchmarks/int8_study.py``; a 2-core Xeon with AMX-INT8 and AMX-BF16,
shared with other jobs, so candidates run round-robin in one process and the numbers below are
medians of per-round ratios of process CPU time, which does not count time spent waiting for a
core; full numbers and commands in docs/int8.md):

* Under torch.compile (inductor, freezing) the quantize and rescale need no hand fusion: the
  generated code runs LayerNorm + row absmax + quantize as one kernel, rescale + bias + GELU + the
  next quantize as one, and rescale + bias + residual add as one; only ``_int_mm`` stays an
  extern call (oneDNN). Eager, the same arithmetic is 2.8-5x slower than compiled (0.36x / 0.19x
  at the GEMM level), so the int8 path is meant to run compiled.
* What limits it: on this CPU a bare ``_int_mm`` is only ~1.25x a bf16 GEMM (AMX runs both), and
  the per-token quantize plus the int32 [tokens, out] round trip of the rescale cost more than
  that: one BERT-base layer's Q/K/V projections take 11.2 ms as dynamic int8 against 9.1 ms in
  bf16 and 7.2 ms for the bare int8 GEMMs (1 thread). At model level (BERT-base 8 x 128) int8
  ran 2.6-2.8x HF eager fp32 at 1 thread and 2.8-3.2x at 2 threads, against 3.5x / 3.7x for the
  compiled bf16 path (CTranslate2 int8: 3.3x / 4.0x).
* Within noise (differences under ~15% did not repeat across runs): a [K, N] contiguous weight
  vs a transposed [N, K] view, inductor max-autotune (``_int_mm`` is not templated on CPU; the
  same extern kernel runs), per-tensor instead of per-token activation scales (no faster, and
  coarser), one fused QKV GEMM instead of three (0.73x in one run, 1.11x in another).
* bf16 activations between the int8 GEMMs (model cast to bf16) were slower than fp32 ones in
  every run (0.93x at 1 thread, 0.86x at 2): the quantize reads them in fp32 anyway, and the
  rest of the bf16 graph did not make up for it.
* oneDNN's own int8 linear (``onednn.qlinear_pointwise``, rescale + bias + bf16 output fused in
  the GEMM, no int32 round trip) was 1.29x the per-token ``_int_mm`` projection, still slower
  than bf16, and it takes one activation scale per tensor only; not adopted. (Batch-1
  decoding used it for a while, where one tensor is one token; the decoder's own reduction over
  the int8 weight now streams faster: generation/projections.py.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from torchbridge.precisions.int8_weight_only import quantize_per_channel
from torchbridge.precisions.swap import swap_linears, weight_out_in


def asymmetric_grid(x2: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, uint8 zero point) mapping [min, max] of each row (or of the whole tensor), widened
    to include 0, onto [0, 255]. Asymmetric, so a one-sided input (after GELU nearly all of it is
    >= 0) keeps all 256 levels, not 128."""
    low = x2.amin(dim=1, keepdim=True) if per_row else x2.amin()
    high = x2.amax(dim=1, keepdim=True) if per_row else x2.amax()
    x_scale = ((high.clamp(min=0.0) - low.clamp(max=0.0)) / 255.0).clamp(min=1e-8)
    return x_scale, torch.round(-low.clamp(max=0.0) / x_scale)


class Int8DynamicLinear(nn.Module):
    """y = ((q(x / s) - z_x) @ W_int8^T) * s_x * s_w + b, with q the per-token asymmetric int8
    quantization (scale s_x and zero point z_x per token).

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
        # colsum(W_int8) * s_w, [1, out]: the zero point's share of every output
        self.register_buffer("zero_weight", (q.float().sum(dim=1) * scales).reshape(1, -1))
        self.register_buffer("inv_smooth", None if smooth is None else smooth.reciprocal())
        bias = getattr(module, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as fp32 rows [tokens, in], divided by the smoothing scales if any."""
        x2 = x.reshape(-1, self.in_features).float()
        return x2 if self.inv_smooth is None else x2 * self.inv_smooth

    def quantize_tokens(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows x2 [tokens, in] on their per-token grid: (codes in [0, 255] as floats, zero
        point, scale), x2 ~ (codes - zero) * scale. The one place the activation grid is spelled
        (this forward and the decoder's batch-1 projection use it)."""
        x_scale, zero = asymmetric_grid(x2, per_row=True)
        return (torch.round(x2 / x_scale) + zero).clamp(0, 255), zero, x_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        codes, zero, x_scale = self.quantize_tokens(self.rows(x))
        zero = zero - 128.0  # the same grid on int8: [-128, 127]
        xq = (codes - 128.0).to(torch.int8)
        if xq.device.type == "cuda" and xq.shape[0] <= 16:
            # cuBLAS int8 GEMM needs M > 16; tiny batches are bandwidth-bound anyway. The device
            # test comes first: compiled, a test of the size alone would guard the graph to it
            acc = xq.float() @ self.weight_t.float()
        else:
            acc = torch._int_mm(xq, self.weight_t).float()
        # (xq - zero) @ W = xq @ W - zero * colsum(W): the rank-1 correction is added in place
        # (eager, every temporary of [tokens, out] fp32 is a full pass over memory)
        y = acc.mul_(x_scale).mul_(self.scales)
        y = y.addmm_(zero.mul_(x_scale).neg_(), self.zero_weight)
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
