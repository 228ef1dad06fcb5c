"""What was actually applied, read back from the optimized model (never copied from the config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchbridge.backends import describe
from torchbridge.pipeline.padding import trims_padding
from torchbridge.pipeline.verify import VerifyResult
from torchbridge.precisions.casting import autocast_dtype, fp32_norm_count, weight_dtype

from .plan import Plan

RANDOM_WEIGHTS_BANNER = "RANDOM WEIGHTS: outputs are meaningless; use for speed measurements only"


@dataclass
class StepRecord:
    name: str
    applied: bool
    detail: str


@dataclass
class OptimizationReport:
    model_name: str
    task: str
    model_type: str
    random_weights: bool
    plan: Plan
    steps: list[StepRecord] = field(default_factory=list)
    verify: VerifyResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # encoders: the gate batch (real text) that weight formats may calibrate on; never serialized
    calibration_inputs: dict | None = field(default=None, repr=False)
    compiled: bool = False  # read back after the first compiled call succeeded
    compiled_graphs: int = 0
    efficient_attention: bool = False  # sdpa calls counted in a probe forward
    attention_implementation: str = "eager"
    weight_dtype: str = "float32"
    amp_dtype: str | None = None
    fp32_norms: int = 0
    trim_padding: bool = False
    gradient_checkpointing: bool = False
    profile_table: str | None = None
    profile_top_ops: list[dict[str, Any]] = field(default_factory=list)
    generation: dict[str, Any] | None = None
    float_layers: list[str] = field(default_factory=list)  # kept out of int8 by the accuracy control
    accuracy_control: dict[str, Any] | None = None
    precision_search: list[dict[str, Any]] | None = None  # the candidates measured, when selecting

    def step(self, name: str, applied: bool, detail: str) -> None:
        self.steps.append(StepRecord(name, applied, detail))

    def read_back(self, model: nn.Module) -> None:
        """Fill the facts that must come from the model itself."""
        self.weight_dtype = str(weight_dtype(model)).replace("torch.", "")
        amp = autocast_dtype(model)
        self.amp_dtype = None if amp is None else str(amp).replace("torch.", "")
        self.fp32_norms = fp32_norm_count(model)
        self.trim_padding = trims_padding(model)
        flag = "is_activation_checkpointing"  # transformers 5 name; 4.x calls it is_gradient_...
        flag = flag if hasattr(type(model), flag) else "is_gradient_checkpointing"
        self.gradient_checkpointing = bool(getattr(model, flag, False))
        config = getattr(model, "config", None)
        self.attention_implementation = getattr(config, "_attn_implementation", None) or "eager"

    def info(self) -> dict[str, Any]:
        """The guide's get_optimization_info() keys, plus the fuller report."""
        plan = self.plan
        return {
            "model_name": self.model_name,
            "task": self.task,
            "model_type": self.model_type,
            "random_weights": self.random_weights,
            "device": str(plan.device.torch_device),
            "backend": plan.device.backend,
            "dtype": self.weight_dtype,
            "dtype_reason": plan.dtype_reason,
            "amp_dtype": self.amp_dtype,
            "amp_reason": plan.amp_reason,
            "fp32_norm_layers": self.fp32_norms,
            "trim_padding": self.trim_padding,
            "quantization": plan.quantization,
            "precision": plan.precision_name,
            "gate": vars(plan.gate),
            "float_layers": list(self.float_layers),
            "accuracy_control": self.accuracy_control,
            "precision_search": self.precision_search,
            "optimization_mode": plan.mode.value,
            "torch_compile": self.compiled,
            "compile_mode": plan.compile_mode if self.compiled else None,
            "compile_reason": plan.compile_reason,
            "compile_options": plan.compile_kwargs() if self.compiled else None,
            "compiled_graphs": self.compiled_graphs,
            "efficient_attention": self.efficient_attention,
            "attention_implementation": self.attention_implementation,
            "gradient_checkpointing": self.gradient_checkpointing,
            "warmup": {"steps": plan.warmup_steps, "shape": list(plan.warmup_shape)},
            "steps": [vars(s) for s in self.steps],
            "verify": None if self.verify is None else self.verify.to_dict(),
            "timings": dict(self.timings),
            "notes": list(self.notes),
            "device_info": describe(plan.device),
            "profile_top_ops": list(self.profile_top_ops),
            "generation": self.generation,
            "optimized": True,
        }

    def summary(self) -> str:
        lines = []
        if self.random_weights:
            lines.append(RANDOM_WEIGHTS_BANNER)
        plan = self.plan
        lines.append(
            f"{self.model_name} ({self.model_type}, {self.task}) on {plan.device.torch_device} "
            f"[{plan.device.backend}], mode {plan.mode.value}"
        )
        lines.append(f"  precision: {self.weight_dtype} ({plan.dtype_reason})"
                     + (f", autocast {self.amp_dtype}" if self.amp_dtype else "")
                     + (f", quantization {plan.quantization}" if plan.quantization else ""))
        if self.task != "module":
            lines.append(f"  attention: {self.attention_implementation}"
                         f" ({'sdpa kernels in use' if self.efficient_attention else 'no sdpa kernels'})")
        lines.append(f"  torch.compile: {'yes, ' + plan.compile_mode if self.compiled else 'no'}"
                     + (f" ({self.compiled_graphs} graph(s))" if self.compiled else "")
                     + f" - {plan.compile_reason}")
        if self.precision_search:
            lines.append("  precision measured (" + (plan.select_precision or "") + "): " + "; ".join(
                f"{c['precision']} {c.get('median_ms', float('nan')):.1f} ms "
                f"{'pass' if c['passed'] else 'fail'}" for c in self.precision_search))
        if self.float_layers:
            lines.append(f"  kept in {self.weight_dtype} by the accuracy control: "
                         f"{', '.join(self.float_layers)}")
        for s in self.steps:
            lines.append(f"  [{'x' if s.applied else ' '}] {s.name}: {s.detail}")
        if self.verify is not None:
            lines.append("  " + self.verify.summary())
        if self.timings:
            lines.append("  timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


def plan_info(plan: Plan) -> dict[str, Any]:
    """get_optimization_info() before optimize(): what the plan will do, and why."""
    return {
        "device": str(plan.device.torch_device),
        "backend": plan.device.backend,
        "dtype": str(plan.dtype).replace("torch.", ""),
        "dtype_reason": plan.dtype_reason,
        "quantization": plan.quantization,
        "precision": plan.precision_name,
        "gate": vars(plan.gate),
        "optimization_mode": plan.mode.value,
        "torch_compile": plan.compile,
        "compile_mode": plan.compile_mode if plan.compile else None,
        "compile_reason": plan.compile_reason,
        "efficient_attention": plan.attention == "sdpa",
        "attention_implementation": plan.attention,
        "amp": plan.amp,
        "amp_reason": plan.amp_reason,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "select_precision": plan.select_precision,
        "warmup": {"steps": plan.warmup_steps, "shape": list(plan.warmup_shape)},
        "verify": plan.verify,
        "notes": list(plan.notes),
        "device_info": describe(plan.device),
        "optimized": False,
    }


def count_sdpa_calls(model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """Run one forward and count calls of F.scaled_dot_product_attention: proof that the modules
    really use the fused attention kernels, whatever the config claims."""
    from torch.overrides import TorchFunctionMode

    class _Counter(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention:
                _Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), _Counter():
        model(**inputs)
    return _Counter.calls
