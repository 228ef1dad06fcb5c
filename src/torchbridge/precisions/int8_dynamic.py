"""Dynamic int8 quantization for compute-bound batches (encoders, prefill).

Weights are int8 with one symmetric scale per output channel (quantized once); activations are
quantized per token at run time (one scale per row, from its own absolute maximum), so the matmul
runs on int8 integer units (``torch._int_mm``: VNNI on x86 CPUs, IMMA on GPUs) and is rescaled in
fp32. Per-token scales keep one loud token from flattening the resolution of the others.
Under torch.compile the quantize/rescale arithmetic fuses into the neighbouring kernels.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from torchbridge.precisions.int8_weight_only import quantize_per_channel
from torchbridge.precisions.swap import swap_linears, weight_out_in


class Int8DynamicLinear(nn.Module):
    """y = (q(x) @ W_int8^T) * s_x * s_w + b, with q(x) the per-token int8 quantization of x."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        weight = weight_out_in(module)
        q, scales = quantize_per_channel(weight)
        self.out_features, self.in_features = q.shape
        # [in, out] contiguous: the layout _int_mm(a [M, K], b [K, N]) reads fastest
        self.register_buffer("weight_t", q.t().contiguous())
        self.register_buffer("scales", scales)
        bias = getattr(module, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        xq = torch.round(x2 / x_scale).clamp(-127, 127).to(torch.int8)
        if xq.shape[0] <= 16 and x2.device.type == "cuda":
            # cuBLAS int8 GEMM needs M > 16; tiny batches are bandwidth-bound anyway
            acc = (xq.float() @ self.weight_t.float())
        else:
            acc = torch._int_mm(xq, self.weight_t).float()
        y = acc * x_scale * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic"


def quantize_dynamic_int8(model: nn.Module, *, include_head: bool = True,
                          skip: Iterable[str] = ()) -> nn.Module:
    """Swap every nn.Linear / Conv1D (but those named in ``skip``) for Int8DynamicLinear, in
    place. Returns ``model``."""
    swap_linears(model, Int8DynamicLinear, include_head=include_head, skip=skip)
    return model
