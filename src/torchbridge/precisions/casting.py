"""Float precisions (fp32, fp16, bf16): the auto choice, casting, autocast mixed precision.

What ``use_amp`` means here (with half-precision compute; fp32 has nothing to autocast to, so the
step is skipped and the report says why): mixed precision with half-precision weights. The matmul
weights are stored in the planned dtype (the memory saving stays), the LayerNorms keep fp32
weights and return fp32, so the residual stream between the layers stays in fp32, and the forward
runs under ``torch.autocast(device, dtype)``, which feeds every matmul and attention in the planned
dtype (on CUDA it also keeps softmax and reductions in fp32). ``use_amp=False`` is the plain cast:
every weight and activation in the planned dtype, a little faster and a little less accurate.
Left at its default, the plan applies it to fp16 only (pipeline/plan.py, ``amp_choice``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from torchbridge.backends import DeviceInfo, supports_bf16, supports_fp16

HALF_DTYPES = (torch.float16, torch.bfloat16)


def auto_dtype(info: DeviceInfo) -> torch.dtype:
    """The fastest precision the device computes natively: bf16 (Ampere+, ROCm, XPU, CPUs with
    AVX512_BF16 or AMX), else fp16 on GPUs that have fast fp16, else fp32."""
    if supports_bf16(info):
        return torch.bfloat16
    if info.type != "cpu" and supports_fp16(info):
        return torch.float16
    return torch.float32


def auto_dtype_reason(info: DeviceInfo, dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return f"bf16: {info.type} computes bf16 natively"
    if dtype == torch.float16:
        return f"fp16: {info.type} computes fp16 natively but not bf16"
    return f"fp32: {info.type} has no native bf16/fp16 matmul (CPU ISA: {sorted(info.cpu_isa)})"


def half_dtype(info: DeviceInfo) -> torch.dtype:
    """Half precision for memory: bf16 where native, fp16 on other GPUs, bf16 storage on CPUs."""
    if supports_bf16(info):
        return torch.bfloat16
    return torch.float16 if info.type != "cpu" else torch.bfloat16


class Fp32LayerNorm(nn.LayerNorm):
    """A LayerNorm with fp32 weights and fp32 output inside a half-precision model: under
    autocast, the residual additions around it then happen in fp32 too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


def cast_model(model: nn.Module, dtype: torch.dtype, *, fp32_norms: bool = False) -> nn.Module:
    """Cast floating-point weights to ``dtype``. With ``fp32_norms`` the LayerNorms stay in fp32
    (the mixed-precision half of use_amp)."""
    norms = [m for m in model.modules() if type(m) is nn.LayerNorm] if fp32_norms else []
    model.to(dtype)
    for norm in norms:
        norm.float()
        norm.__class__ = Fp32LayerNorm
    return model


def fp32_norm_count(model: nn.Module) -> int:
    return sum(isinstance(m, Fp32LayerNorm) for m in model.modules())


def wrap_autocast(model: nn.Module, device_type: str, dtype: torch.dtype) -> nn.Module:
    """Run the model's forward under autocast; the marker lets the report read it back."""
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            return inner(*args, **kwargs)

    forward.torchbridge_autocast = dtype  # type: ignore[attr-defined]
    model.forward = forward
    return model


def autocast_dtype(model: nn.Module) -> torch.dtype | None:
    return getattr(model.forward, "torchbridge_autocast", None)


def weight_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of the model's weight bytes are stored in, read back from the model."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() or tensor.dtype == torch.int8:
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return max(sizes, key=sizes.get) if sizes else torch.float32
