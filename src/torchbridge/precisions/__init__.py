"""The precision registry: every precision and weight format the library offers, in one table.

A request has two parts. ``dtype`` is the float precision the model computes in (fp32, fp16,
bf16; ``None`` = the fastest the device computes natively). ``quantization`` names a weight format
applied on top of it: ``"int8-dynamic"`` (int8 weights and per-token int8 activations, int8
GEMMs: compute-bound encoders), ``"int8-static"`` (int8 weights and int8 activations on ranges
calibrated once: CPU encoders, oneDNN's int8 GEMM), ``"int8-weight-only"`` (int8 weights, float
compute: bandwidth-bound decoding), ``"fp8-weight-only"`` (fp8 storage, bf16 compute; the guide's
``dtype=torch.float8_e4m3fn`` means this). Each entry says how it is applied, the gate its output
must pass against the fp32 eager model, its bytes per parameter (the memory table reads them) and
where it runs. Adding a precision is one entry here plus, for a new weight format, its module in
this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from torchbridge.backends import DeviceInfo, supports_bf16, supports_fp8, supports_fp16


class PrecisionNotSupportedError(RuntimeError):
    """An explicitly requested precision that this device cannot compute."""


@dataclass(frozen=True)
class Gate:
    """What an optimized model must keep of the fp32 eager model's outputs (see pipeline/verify.py).

    Encoders: ``min_cosine`` of every output vector at real positions (hidden states, logits) and
    ``min_agreement`` of the argmax where the reference's top-2 margin is decisive. Causal LMs:
    ``min_agreement`` of the teacher-forced next token on decisive positions and ``max_kl``, the mean
    KL divergence (nats) of the next-token distributions. Calibrated on real all-MiniLM-L6-v2 and
    SmolLM2-135M (benchmarks/calibrate_gates.py; docs/precisions.md has the measured values).
    """

    min_cosine: float
    min_agreement: float
    max_kl: float


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype | None  # the float dtype it casts to; None for weight formats (they keep the plan's)
    bytes_per_param: float
    gate: Gate
    describe: str
    unsupported: Callable[[DeviceInfo], str | None]  # why it cannot run here, or None
    # weight formats: (model, layers to keep in float, calibration inputs or None) -> model
    quantize: Callable[[nn.Module, tuple[str, ...], dict | None], nn.Module] | None = None
    emulated: Callable[[DeviceInfo], str | None] = lambda info: None  # runs, but slowly: a note
    # weight formats: the compute dtype an auto plan pairs with it on this device, and why
    # (None = the device's auto dtype)
    auto_compute: Callable[[DeviceInfo], tuple[torch.dtype, str] | None] = lambda info: None

    @property
    def is_weight_format(self) -> bool:
        return self.quantize is not None


def _always(info: DeviceInfo) -> None:
    return None


def _bf16_emulated(info: DeviceInfo) -> str | None:
    if info.type == "cpu" and not supports_bf16(info):
        return "bf16 is emulated on this CPU (no AVX512_BF16/AMX): expect it slower than fp32"
    return None


def _bf16_unsupported(info: DeviceInfo) -> str | None:
    if info.type == "cuda" and not supports_bf16(info):
        return (f"{info.name} (compute capability {info.capability}) has no bf16 tensor cores "
                "(needs 8.0+); use dtype=torch.float16")
    return None


def _fp16_emulated(info: DeviceInfo) -> str | None:
    if info.type == "cpu" and not supports_fp16(info):
        return "fp16 is emulated on this CPU (no AMX-FP16): expect it slower than fp32"
    return None


def _fp8_unsupported(info: DeviceInfo) -> str | None:
    if supports_fp8(info):
        return None
    return (f"{info.name} ({info.backend}) has no fp8 hardware; fp8 needs an NVIDIA GPU of compute "
            "capability 8.9+ (Ada, Hopper, Blackwell); use quantization='int8-weight-only' for the "
            "same memory saving here")


# SmoothQuant's alpha for int8 with activations where calibration inputs exist (encoders; for
# int8-static see int8_static.static_modules). Dynamic int8: on real
# all-MiniLM-L6-v2 over 10,000 review sentences it lifted the worst sentence embedding's cosine to
# fp32 from 0.9920 to 0.9963 (fp32 compute) and 0.9917 to 0.9953 (bf16), mean 0.9987 -> 0.9994
# (benchmarks/int8_accuracy_minilm.py --sentences 10000 --alphas 0.5).
INT8_SMOOTH_ALPHA = 0.5


def _int8_dynamic_compute(info: DeviceInfo) -> tuple[torch.dtype, str] | None:
    # The quantize reads fp32 activations anyway; bf16 between the int8 GEMMs was slower on the
    # CPU (0.86-0.93x, benchmarks/int8_study.py) and less accurate (worst of 10,000 real MiniLM
    # embeddings 0.9953 vs 0.9963 in fp32, benchmarks/int8_accuracy_minilm.py).
    if info.type != "cpu":
        return None
    return torch.float32, ("fp32 between the int8 GEMMs: on a CPU bf16 activations there were "
                           "slower and less accurate (docs/int8.md)")


def _int8_dynamic(model: nn.Module, skip: tuple[str, ...], calibration: dict | None) -> nn.Module:
    from .int8_dynamic import quantize_dynamic_int8
    from .smoothing import quantize_dynamic_int8_smoothed

    if calibration is None:
        return quantize_dynamic_int8(model, skip=skip)
    return quantize_dynamic_int8_smoothed(model, calibration, INT8_SMOOTH_ALPHA, skip=skip)


def _int8_static_unsupported(info: DeviceInfo) -> str | None:
    if info.type != "cpu":
        return (f"int8-static runs on CPUs (oneDNN's int8 GEMM), not on {info.name} "
                f"({info.backend}); use quantization='int8-dynamic' or 'int8-weight-only' there")
    from .int8_static import available

    return available()


def _int8_static(model: nn.Module, skip: tuple[str, ...], calibration: dict | None) -> nn.Module:
    from .int8_static import quantize_static_int8

    if calibration is None:
        raise ValueError("int8-static needs calibration inputs to measure its activation ranges "
                         "(the optimizer gives encoders calibration sentences, or example_inputs "
                         "when they are a dict of model inputs); for a causal LM use "
                         "quantization='int8-weight-only' or 'int8-dynamic'")
    quantize_static_int8(model, calibration, smooth_alpha=INT8_SMOOTH_ALPHA, skip=skip)
    return model


def _int8_weight_only(model: nn.Module, skip: tuple[str, ...], calibration: dict | None) -> nn.Module:
    from .int8_weight_only import quantize_weights_int8

    return quantize_weights_int8(model, skip=skip)


def _fp8_weight_only(model: nn.Module, skip: tuple[str, ...], calibration: dict | None) -> nn.Module:
    from .fp8 import convert_linears_to_fp8

    return convert_linears_to_fp8(model)


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", torch.float32, 4, Gate(0.999999, 1.0, 1e-4), "float32 everywhere",
              _always),
    Precision("fp16", torch.float16, 2, Gate(0.999, 0.97, 0.01), "float16 weights and compute",
              _always, emulated=_fp16_emulated),
    Precision("bf16", torch.bfloat16, 2, Gate(0.995, 0.95, 0.02), "bfloat16 weights and compute",
              _bf16_unsupported, emulated=_bf16_emulated),
    Precision("int8-dynamic", None, 1, Gate(0.98, 0.90, 0.10),
              "int8 weights (per channel) and activations (per token), int8 GEMMs", _always,
              quantize=_int8_dynamic, auto_compute=_int8_dynamic_compute),
    # int8-static's gate is stricter than int8-dynamic's because its ranges are fixed ahead of
    # time: on real all-MiniLM-L6-v2, passing 0.98 on the 8 gate sentences let the min over 96
    # other sentences fall to 0.978, passing 0.985 to 0.980; 0.99 (the accuracy control keeps
    # ~5 of 37 projections in float) holds >= 0.98 there (docs/precisions.md).
    Precision("int8-static", None, 1, Gate(0.99, 0.90, 0.10),
              "int8 weights (per channel) and activations (per tensor, ranges calibrated on "
              "calibration sentences), oneDNN int8 GEMMs", _int8_static_unsupported, quantize=_int8_static),
    Precision("int8-weight-only", None, 1, Gate(0.99, 0.93, 0.05),
              "int8 weights (per channel), float compute, LM head included", _always,
              quantize=_int8_weight_only),
    Precision("fp8-weight-only", None, 1, Gate(0.99, 0.93, 0.05),
              "fp8 e4m3 weights (per channel scale), bf16 compute", _fp8_unsupported,
              quantize=_fp8_weight_only),
)}

# Weight formats whose optimizer keeps the most sensitive layers in float until the gate passes
# (accuracy_control.py); the others pass the gate whole or fall back.
ACCURACY_CONTROLLED = ("int8-dynamic", "int8-static")

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
WEIGHT_FORMATS = tuple(name for name, p in PRECISIONS.items() if p.is_weight_format)
# What a command line or a JSON file may write for a dtype ("auto" = the plan decides).
DTYPE_SPELLINGS: dict[str, torch.dtype | None] = {
    "auto": None, **{n: d for d, n in DTYPE_NAMES.items()},
    **{str(d).replace("torch.", ""): d for d in DTYPE_NAMES},
}
# The guide's spelling of fp8: a dtype that is really a weight format (compute stays bf16).
DTYPE_ALIASES = {torch.float8_e4m3fn: ("fp8-weight-only", torch.bfloat16)}


def precision(name: str) -> Precision:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}") from None


def of_dtype(dtype: torch.dtype) -> Precision:
    try:
        return PRECISIONS[DTYPE_NAMES[dtype]]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not a compute precision; valid: "
                         f"{', '.join(map(str, DTYPE_NAMES))} or None (auto)") from None


def effective(dtype: torch.dtype, quantization: str | None) -> Precision:
    """The registry entry whose gate and bytes apply: the weight format if any, else the dtype."""
    return precision(quantization) if quantization else of_dtype(dtype)


def check_supported(name: str, info: DeviceInfo) -> str | None:
    """Raise for an explicit request the device cannot run; return a note when it runs emulated."""
    entry = precision(name)
    why = entry.unsupported(info)
    if why:
        raise PrecisionNotSupportedError(f"{name} was requested but {why}.")
    return entry.emulated(info)


def bytes_per_param(name: str) -> float:
    return precision(name).bytes_per_param
