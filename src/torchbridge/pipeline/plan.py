"""TextModelConfig + mode preset + DeviceInfo + model facts -> a concrete Plan.

Every "auto" is resolved here, once, with its reason; the steps only read the plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from torchbridge.backends import DeviceInfo, detect, device_ops
from torchbridge.precisions import (
    DTYPE_ALIASES,
    DTYPE_NAMES,
    Gate,
    check_supported,
    effective,
    of_dtype,
    precision,
)
from torchbridge.precisions.casting import HALF_DTYPES, auto_dtype, auto_dtype_reason, half_dtype

from .config import MODE_PRESETS, OptimizationMode, TextModelConfig

# Where compiling the forward is known to buy nothing: CPU encoders in float precision. The time
# is in oneDNN/MKL GEMMs either way (benchmarks/cpu_compile_settings.py measured eager 504 ms vs
# compiled 499 ms for BERT-base bf16 8x128 after a 25 s first call), so an auto plan skips it.
_COMPILE_PAYS_NOTHING = "on CPU a float encoder spends its time in oneDNN GEMMs with or without " \
    "inductor (benchmarks/cpu_compile_settings.py): compile skipped, saving its first-call time"


@dataclass(frozen=True)
class Plan:
    device: DeviceInfo
    mode: OptimizationMode
    dtype: torch.dtype
    dtype_auto: bool  # chosen by us: a failed gate may fall back to fp32
    dtype_reason: str
    attention: str  # "sdpa" or "eager"
    attention_explicit: bool
    compile: bool
    compile_explicit: bool
    compile_mode: str
    compile_reason: str
    quantization: str | None
    gradient_checkpointing: bool
    warmup_steps: int
    warmup_shape: tuple[int, int]
    max_sequence_length: int
    profile: bool
    verify: bool
    gate: Gate
    trim_padding: bool
    select_precision: str | None = None
    notes: tuple[str, ...] = field(default=())
    use_amp: bool | None = None  # the user's explicit use_amp; None = the default (amp_choice)

    @property
    def amp(self) -> bool:
        """Mixed precision applies (derived: a fallback's new dtype re-decides it)."""
        return amp_choice(self.use_amp, self.dtype)[0]

    @property
    def amp_reason(self) -> str:
        return amp_choice(self.use_amp, self.dtype)[1]

    @property
    def pack_weights(self) -> tuple[bool, str]:
        """(pack the float linear weights for oneDNN?, why): derived, so a fallback re-decides it."""
        if not device_ops(self.device).packs_linear_weights:
            return False, f"no oneDNN weight packing on {self.device.type}"
        if self.dtype not in (torch.bfloat16, torch.float32) or self.quantization or self.amp:
            return False, f"{self.precision_name}{' under autocast' if self.amp else ''}: " \
                          "only plain bf16 and fp32 linears are packed"
        if self.compile:
            return False, "compiled: inductor's freezing packs the weights itself"
        return True, (f"{self.precision_name} linear weights reordered once into oneDNN's blocked "
                      "layout, not per call")

    @property
    def precision_name(self) -> str:
        return effective(self.dtype, self.quantization).name

    def compile_kwargs(self) -> dict[str, Any]:
        """Arguments for torch.compile that mean on this device what the mode means.

        Where the device captures graphs (CUDA) the mode is passed through ("reduce-overhead" =
        CUDA graphs). Elsewhere the mode's inductor options are used without graph capture, plus
        freezing where the device table says it pays (CPU: weights folded into constants and
        pre-packed for oneDNN/MKL GEMMs).
        """
        ops = device_ops(self.device)
        if ops.graph_capture:
            return {"mode": self.compile_mode}
        from torch._inductor import list_mode_options

        options = {k: v for k, v in list_mode_options(self.compile_mode).items()
                   if "cudagraphs" not in k}
        if ops.compile_freezing:
            options["freezing"] = True
        return {"options": options}

    def with_precision(self, dtype: torch.dtype, quantization: str | None, reason: str,
                       tolerance: float | None = None) -> Plan:
        """The same plan at another precision (a fallback or a measured choice: not auto any more)."""
        gate = _gate(effective(dtype, quantization).gate, tolerance)
        return dataclasses.replace(self, dtype=dtype, quantization=quantization, dtype_auto=False,
                                   dtype_reason=reason, gate=gate)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the device is stored by name only (it is detected again at load)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["device"] = str(self.device.torch_device)
        out["mode"] = self.mode.value
        out["dtype"] = DTYPE_NAMES[self.dtype]
        out["gate"] = dataclasses.asdict(self.gate)
        out["warmup_shape"] = list(self.warmup_shape)
        out["notes"] = list(self.notes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], device: DeviceInfo) -> Plan:
        names = {v: k for k, v in DTYPE_NAMES.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.update(device=device, mode=OptimizationMode(data["mode"]), dtype=names[data["dtype"]],
                      gate=Gate(**data["gate"]), warmup_shape=tuple(data["warmup_shape"]),
                      notes=tuple(data.get("notes", ())))
        if "use_amp" not in data and "amp" in data:  # a folder saved before amp was derived
            values["use_amp"] = data["amp"]
        return cls(**values)


def _gate(gate: Gate, tolerance: float | None) -> Gate:
    return gate if tolerance is None else dataclasses.replace(gate, min_cosine=1.0 - tolerance)


def _resolve_dtype(config: TextModelConfig, info: DeviceInfo, notes: list[str]
                   ) -> tuple[torch.dtype, str | None, bool, str]:
    """(compute dtype, weight format implied by the dtype, auto?, reason)."""
    dtype_setting = config.dtype if config.dtype is not None \
        else MODE_PRESETS[config.optimization_mode]["dtype"]
    if dtype_setting in DTYPE_ALIASES:  # the guide's dtype=torch.float8_e4m3fn
        weight_format, dtype = DTYPE_ALIASES[dtype_setting]
        return dtype, weight_format, False, f"{dtype_setting}: requested (= {weight_format})"
    if isinstance(dtype_setting, torch.dtype):
        note = check_supported(of_dtype(dtype_setting).name, info)
        if note:
            notes.append(note)
        return dtype_setting, None, False, f"{dtype_setting}: requested"
    if dtype_setting == "half":
        dtype = half_dtype(info)
        note = check_supported(of_dtype(dtype).name, info)
        if note:
            notes.append(note)
        return dtype, None, False, \
            f"{dtype}: the {config.optimization_mode.value} mode stores half-precision weights"
    dtype = auto_dtype(info)
    return dtype, None, True, auto_dtype_reason(info, dtype)


# Why the default keeps bf16 plain: bf16 has fp32's exponent range, so an fp32 residual stream
# guards against nothing there, and it costs: all-MiniLM-L6-v2 over 256 real review sentences kept
# a per-token min cosine of 0.99989 with it and 0.99986 without, while BERT-base 8 x 128 ran
# 9-14% slower with it on the CPU (benchmarks/cpu_compile_settings.py, torchbridge use_amp rows).
# fp16 overflows past 65504, which a residual stream can reach: there the default applies it.
def amp_choice(use_amp: bool | None, dtype: torch.dtype) -> tuple[bool, str]:
    """(apply mixed precision?, why) for an explicit ``use_amp`` or, with None, the default."""
    if dtype not in HALF_DTYPES:
        return False, f"{dtype} compute: nothing to autocast to"
    if use_amp is not None:
        return use_amp, f"use_amp={use_amp}"
    if dtype == torch.float16:
        return True, f"use_amp default: {dtype} needs an fp32 residual stream (its range ends at 65504)"
    return False, (f"use_amp default: plain {dtype} (fp32's range; the fp32 residual stream measured "
                   "no gain on real weights and cost 9-14% of the forward)")


def make_plan(config: TextModelConfig, *, model_max_positions: int | None = None,
              supports_sdpa: bool = True, kind: str = "encoder", device: DeviceInfo | None = None,
              saved: dict[str, Any] | None = None) -> Plan:
    """Resolve the request. ``kind``: the family's gate kind ("encoder", "causal-lm" or "module"
    for a plain nn.Module); a causal LM's decode step is what gets compiled. ``saved``: the plan
    stored in a `torchbridge optimize` folder (see saved.py)."""
    info = device or detect(config.device)
    device_ops(info)  # an unknown device type raises here, before any work
    if saved is not None:
        return _saved_plan(config, saved, info)
    notes: list[str] = []
    dtype, implied_format, dtype_auto, reason = _resolve_dtype(config, info, notes)
    quantization = config.quantization or implied_format
    if quantization == "int8-static" and kind != "encoder":
        raise ValueError(f"quantization='int8-static' calibrates the activation ranges of an "
                         f"encoder; this model is a {kind} model. Fix: "
                         "quantization='int8-weight-only' (decoding) or 'int8-dynamic'")
    if quantization:
        note = check_supported(quantization, info)
        if note:
            notes.append(note)
        paired = precision(quantization).auto_compute(info) if dtype_auto else None
        if paired is not None:
            dtype, reason = paired

    use_amp = bool(config.use_amp) if config.is_explicit("use_amp") else None
    if use_amp and dtype not in HALF_DTYPES:
        notes.append(f"use_amp: no autocast applied, {dtype} compute has no lower precision to "
                     "autocast to")

    attention = "sdpa" if config.setting("enable_memory_efficient_attention") and supports_sdpa \
        else "eager"

    compile_on, compile_mode = config.setting("use_torch_compile"), config.setting("compile_mode")
    # naming a compile mode is asking for compile too
    compile_explicit = config.is_explicit("use_torch_compile") or config.is_explicit("compile_mode")
    compile_reason = "use_torch_compile=True" if compile_explicit else \
        f"the {config.optimization_mode.value} mode compiles"
    if not compile_on:
        compile_reason = "use_torch_compile=False"
    elif not compile_explicit and info.type == "cpu" and kind == "encoder" and quantization is None:
        compile_on, compile_reason = False, _COMPILE_PAYS_NOTHING
    elif quantization == "int8-static":
        if compile_explicit:
            raise ValueError("use_torch_compile=True was requested with quantization='int8-static', "
                             "whose GEMMs are oneDNN calls on weights it prepacked itself and run "
                             "uncompiled; fix: leave use_torch_compile unset, or use "
                             "quantization='int8-dynamic' (compiled)")
        compile_on, compile_reason = False, ("int8-static: oneDNN int8 GEMMs on prepacked weights, "
                                             "with their post-ops fused; nothing left to compile")
    if compile_on and not device_ops(info).graph_capture and "reduce-overhead" in compile_mode:
        notes.append(f"compile_mode={compile_mode!r}: graph capture (CUDA graphs) does not exist on "
                     f"{info.type}; inductor is used without it")

    max_len = config.max_sequence_length
    if model_max_positions:
        max_len = min(max_len, model_max_positions)
    warmup_shape = (config.setting("warmup_batch_size"), min(config.warmup_seq_len, max_len))

    return Plan(
        device=info, mode=config.optimization_mode, dtype=dtype, dtype_auto=dtype_auto,
        dtype_reason=reason, attention=attention,
        attention_explicit=config.is_explicit("enable_memory_efficient_attention"),
        compile=compile_on, compile_explicit=compile_explicit, compile_mode=compile_mode,
        compile_reason=compile_reason, quantization=quantization,
        gradient_checkpointing=config.setting("gradient_checkpointing"),
        warmup_steps=config.warmup_steps, warmup_shape=warmup_shape, max_sequence_length=max_len,
        profile=config.enable_profiling, verify=config.verify is not False,
        gate=_gate(effective(dtype, quantization).gate, config.verify_tolerance),
        trim_padding=config.trim_padding, select_precision=config.setting("select_precision"),
        notes=tuple(notes), use_amp=use_amp,
    )


# Fields of a saved plan the loading user may still choose: they change how the saved model runs
# here, not what was verified at save time.
_LOAD_TIME_FIELDS = {"use_torch_compile": "compile", "warmup_steps": "warmup_steps",
                     "enable_profiling": "profile", "verify": "verify"}


def _saved_plan(config: TextModelConfig, saved: dict[str, Any], info: DeviceInfo) -> Plan:
    plan = Plan.from_dict(saved, info)
    check_supported(plan.precision_name, info)
    changes: dict[str, Any] = {"verify": config.verify is True, "select_precision": None}
    for field_name, plan_field in _LOAD_TIME_FIELDS.items():
        if config.is_explicit(field_name) and field_name != "verify":
            changes[plan_field] = config.setting(field_name)
    if config.is_explicit("use_torch_compile"):
        changes.update(compile_explicit=True, compile_reason="use_torch_compile set at load")
    if config.dtype is not None and config.dtype != plan.dtype:
        raise ValueError(f"this folder was optimized for {plan.dtype} ({plan.precision_name}); "
                         f"dtype={config.dtype} was asked. Fix: load it without dtype=, or optimize "
                         "the original model again with the new dtype")
    if config.quantization and config.quantization != plan.quantization:
        raise ValueError(f"this folder was optimized with quantization={plan.quantization!r}; "
                         f"{config.quantization!r} was asked. Fix: optimize the original model again")
    return dataclasses.replace(plan, **changes)
