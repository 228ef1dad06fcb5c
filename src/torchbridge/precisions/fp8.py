"""fp8 (e4m3) weight-only storage: one byte per weight with a per-channel scale.

Asked for as ``quantization="fp8-weight-only"`` or, as the guide writes it, ``dtype=torch.float8_e4m3fn``.
The matmul runs in bf16 after dequantizing, so this halves weight memory against bf16 without fp8
compute; it is offered only where fp8 hardware exists (NVIDIA compute capability 8.9+), as the guide
says, since elsewhere int8 weight-only saves the same bytes with better-supported kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchbridge.precisions.swap import swap_linears, weight_out_in


class Fp8Linear(nn.Module):
    """Weight-only fp8 (e4m3) linear: fp8 weights with one fp32 scale per output channel,
    dequantized to bf16 for the matmul. Halves weight memory against bf16; the matmul itself is
    bf16, so it is a memory saving, not a compute one."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        weight = weight_out_in(linear).float()
        amax = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        scale = amax / torch.finfo(torch.float8_e4m3fn).max
        self.register_buffer("weight_fp8", (weight / scale).to(torch.float8_e4m3fn))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight_fp8.to(torch.bfloat16) * self.scale.to(torch.bfloat16))
        return F.linear(x.to(torch.bfloat16), weight, self.bias)


def convert_linears_to_fp8(model: nn.Module) -> nn.Module:
    """Every nn.Linear and Conv1D (GPT-2) to Fp8Linear, in place; the rest of the model in bf16."""
    model.to(torch.bfloat16)
    swap_linears(model, Fp8Linear)
    return model
