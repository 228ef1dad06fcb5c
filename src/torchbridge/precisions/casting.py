"""Precision policy and the steps that apply it: casting, autocast, fp8 weight storage.

What ``use_amp`` means here (with half-precision compute; fp32 has nothing to autocast to, so the
step is skipped and the report says why): mixed precision with half-precision weights. The matmul
weights are stored in the planned dtype (the memory saving stays), the LayerNorms keep fp32
weights and return fp32, so the residual stream between the layers stays in fp32, and the forward
runs under ``torch.autocast(device, dtype)``, which feeds every matmul and attention in the planned
dtype (on CUDA it also keeps softmax and reductions in fp32). ``use_amp=False`` is the plain cast:
every weight and activation in the planned dtype, a little faster and a little less accurate.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from torchbridge.backends import DeviceInfo, supports_bf16, supports_fp8, supports_fp16

HALF_DTYPES = (torch.float16, torch.bfloat16)


class PrecisionNotSupportedError(RuntimeError):
    """An explicitly requested precision that this device cannot compute."""


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


def check_explicit_dtype(info: DeviceInfo, dtype: torch.dtype) -> str | None:
    """Raise when the device cannot compute an explicitly requested dtype; return a note when it
    can, but only emulated (slower)."""
    if dtype == torch.float8_e4m3fn and not supports_fp8(info):
        raise PrecisionNotSupportedError(
            f"dtype=torch.float8_e4m3fn was requested but {info.name} ({info.backend}) has no fp8 "
            "matmul; fp8 needs an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper, Blackwell). "
            "Fix: use dtype=torch.bfloat16 or dtype=None (auto)."
        )
    if dtype == torch.bfloat16 and info.type == "cuda" and not supports_bf16(info):
        raise PrecisionNotSupportedError(
            f"dtype=torch.bfloat16 was requested but {info.name} (compute capability "
            f"{info.capability}) has no bf16 tensor cores (needs 8.0+). Fix: dtype=torch.float16."
        )
    if dtype == torch.bfloat16 and info.type == "cpu" and not supports_bf16(info):
        return "bf16 is emulated on this CPU (no AVX512_BF16/AMX): expect it slower than fp32"
    if dtype == torch.float16 and info.type == "cpu" and not supports_fp16(info):
        return "fp16 is emulated on this CPU (no AMX-FP16): expect it slower than fp32"
    return None


class Fp32LayerNorm(nn.LayerNorm):
    """A LayerNorm with fp32 weights and fp32 output inside a half-precision model: under
    autocast, the residual additions around it then happen in fp32 too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


def cast_model(model: nn.Module, dtype: torch.dtype, *, fp32_norms: bool = False) -> nn.Module:
    """Cast floating-point weights; fp8 is stored as fp8 weights with per-channel scales.
    With ``fp32_norms`` the LayerNorms stay in fp32 (the mixed-precision half of use_amp)."""
    norms = [m for m in model.modules() if type(m) is nn.LayerNorm] if fp32_norms else []
    if dtype == torch.float8_e4m3fn:
        model.to(torch.bfloat16)
        convert_linears_to_fp8(model)
    else:
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


class Fp8Linear(nn.Module):
    """Weight-only fp8 (e4m3) linear: fp8 weights with one fp32 scale per output channel,
    dequantized to bf16 for the matmul. Halves weight memory against bf16; the matmul itself is
    bf16, so it is a memory saving, not a compute one."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        amax = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        scale = amax / torch.finfo(torch.float8_e4m3fn).max
        self.register_buffer("weight_fp8", (weight / scale).to(torch.float8_e4m3fn))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight_fp8.to(torch.bfloat16) * self.scale.to(torch.bfloat16))
        return F.linear(x.to(torch.bfloat16), weight, self.bias)


def convert_linears_to_fp8(model: nn.Module) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Fp8Linear(child))
        else:
            convert_linears_to_fp8(child)
    return model


def weight_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of the model's weight bytes are stored in, read back from the model."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() or tensor.dtype == torch.int8:
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return max(sizes, key=sizes.get) if sizes else torch.float32
