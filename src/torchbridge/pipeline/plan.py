"""TextModelConfig + mode preset + DeviceInfo -> a concrete Plan. Every "auto" is resolved here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from torchbridge.backends import DeviceInfo, detect
from torchbridge.pipeline.verify import TOLERANCES
from torchbridge.precisions.casting import (
    HALF_DTYPES,
    auto_dtype,
    auto_dtype_reason,
    check_explicit_dtype,
    half_dtype,
)

from .config import MODE_PRESETS, OptimizationMode, TextModelConfig


@dataclass(frozen=True)
class Plan:
    device: DeviceInfo
    mode: OptimizationMode
    dtype: torch.dtype
    dtype_auto: bool  # chosen by us: verify may fall back to fp32
    dtype_reason: str
    amp: bool
    attention: str  # "sdpa" or "eager"
    attention_explicit: bool
    compile: bool
    compile_explicit: bool
    compile_mode: str
    quantization: str | None
    gradient_checkpointing: bool
    warmup_steps: int
    warmup_shape: tuple[int, int]
    max_sequence_length: int
    profile: bool
    verify: bool
    tolerance: float
    trim_padding: bool
    notes: tuple[str, ...] = field(default=())

    def compile_kwargs(self) -> dict[str, Any]:
        """Arguments for torch.compile that mean on this device what the mode means.

        On CUDA the mode is passed through ("reduce-overhead" = CUDA graphs). CPUs have no CUDA
        graphs, so there the mode's inductor options are used without them, plus freezing: it
        folds the weights into constants so inductor can pre-pack them for oneDNN/MKL GEMMs.
        """
        if self.device.type == "cuda":
            return {"mode": self.compile_mode}
        from torch._inductor import list_mode_options

        options = {k: v for k, v in list_mode_options(self.compile_mode).items()
                   if "cudagraphs" not in k}
        options["freezing"] = True
        return {"options": options}

    def with_dtype(self, dtype: torch.dtype, reason: str) -> Plan:
        from dataclasses import replace

        return replace(self, dtype=dtype, dtype_auto=False, dtype_reason=reason,
                       tolerance=TOLERANCES[dtype], amp=self.amp and dtype in HALF_DTYPES)


def _setting(config: TextModelConfig, name: str) -> Any:
    """The user's value when set explicitly, else the mode preset's, else the field default."""
    preset = MODE_PRESETS[config.optimization_mode]
    if config.is_explicit(name) or name not in preset:
        return getattr(config, name)
    return preset[name]


def make_plan(config: TextModelConfig, *, model_max_positions: int | None = None,
              supports_sdpa: bool = True, device: DeviceInfo | None = None) -> Plan:
    info = device or detect(config.device)
    notes: list[str] = []
    dtype_setting = config.dtype if config.is_explicit("dtype") else _setting(config, "dtype")
    if isinstance(dtype_setting, torch.dtype):
        dtype, dtype_auto = dtype_setting, False
        reason = f"{dtype_setting}: requested"
        note = check_explicit_dtype(info, dtype)
        if note:
            notes.append(note)
    elif dtype_setting == "half":
        dtype, dtype_auto = half_dtype(info), False
        reason = f"{dtype}: the {config.optimization_mode.value} mode stores half-precision weights"
        note = check_explicit_dtype(info, dtype)
        if note:
            notes.append(note)
    else:  # None or "auto"
        dtype, dtype_auto = auto_dtype(info), True
        reason = auto_dtype_reason(info, dtype)

    quantization = config.quantization
    tolerance = config.verify_tolerance or (TOLERANCES["int8"] if quantization else TOLERANCES[dtype])

    amp = bool(config.use_amp) and dtype in HALF_DTYPES
    if config.use_amp and not amp:
        notes.append(f"use_amp: no autocast applied, {dtype} compute has no lower precision to "
                     "autocast to")

    want_sdpa = _setting(config, "enable_memory_efficient_attention")
    attention_explicit = config.is_explicit("enable_memory_efficient_attention")
    attention = "sdpa" if want_sdpa and supports_sdpa else "eager"

    compile_on = bool(_setting(config, "use_torch_compile"))
    compile_mode = _setting(config, "compile_mode")
    if compile_on and info.type != "cuda" and "reduce-overhead" in compile_mode:
        notes.append(f"compile_mode={compile_mode!r}: CUDA graphs do not exist on {info.type}; "
                     "inductor with weight freezing is used instead")

    max_len = config.max_sequence_length
    if model_max_positions:
        max_len = min(max_len, model_max_positions)
    warmup_seq = config.warmup_seq_len if config.is_explicit("warmup_seq_len") else 128
    warmup_shape = (int(_setting(config, "warmup_batch_size")), min(warmup_seq, max_len))

    return Plan(
        device=info, mode=config.optimization_mode, dtype=dtype, dtype_auto=dtype_auto,
        dtype_reason=reason, amp=amp, attention=attention, attention_explicit=attention_explicit,
        compile=compile_on, compile_explicit=config.is_explicit("use_torch_compile"),
        compile_mode=compile_mode, quantization=quantization,
        gradient_checkpointing=bool(_setting(config, "gradient_checkpointing")),
        warmup_steps=config.warmup_steps, warmup_shape=warmup_shape, max_sequence_length=max_len,
        profile=config.enable_profiling, verify=config.verify, tolerance=tolerance,
        trim_padding=config.trim_padding,
        notes=tuple(notes),
    )
