"""TextModelOptimizer: load -> plan -> apply -> verify -> warm up -> optimized model + report.

One list of steps per family (``torchbridge.families``), no task special cases here: the family
says which steps run, which gate fits its outputs and how it warms up.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from torchbridge.families import MODULE, Family, canonical_task, family_of
from torchbridge.precisions import ACCURACY_CONTROLLED

from . import saved
from .checks import max_positions
from .config import TextModelConfig, TextModelType
from .decoding import left_padded_prompts, verify_generation
from .loading import calibration_tokenizer, default_task, load_model, private_copy, task_of
from .plan import Plan, make_plan
from .report import OptimizationReport, count_sdpa_calls, plan_info
from .steps import STEPS, prepare_for_quantization
from .verify import (
    CALIBRATION_ONLY_TEXT,
    VerificationError,
    VerifyResult,
    compare_causal,
    compare_encoder,
    flat_outputs,
    padded_batch,
    run_both,
    text_batch,
)
from .warmup import CompileError, call_args, first_call, is_compiled, warm_up  # noqa: F401

log = logging.getLogger("torchbridge")
# Accuracy-control passes before an int8 model that still misses its gate raises (see optimize).
CONTROL_ROUNDS = 4


class TextModelOptimizer:
    """Optimizes a Hugging Face text model (or any ``nn.Module``) for the configured device and mode."""

    def __init__(self, config: TextModelConfig | None = None) -> None:
        self.config = config or TextModelConfig()
        self._plan: Plan | None = None
        self.report: OptimizationReport | None = None

    @property
    def plan(self) -> Plan:
        """The resolved plan: the model-independent one before optimize(), the model's after."""
        if self._plan is None:
            self._plan = make_plan(self.config)
        return self._plan

    @property
    def device(self) -> torch.device:
        return self.plan.device.torch_device

    @property
    def dtype(self) -> torch.dtype:
        return self.plan.dtype

    def get_optimization_info(self) -> dict[str, Any]:
        """Before optimize(): the plan (device, dtype, backend, mode, compile, attention and why).
        After: the full report, read back from the optimized model."""
        if self.report is None:
            return plan_info(self.plan)
        return self.report.info()

    # --- the path ---------------------------------------------------------------------------

    def optimize(self, model_name_or_model: str | nn.Module | None = None, task: str | None = None,
                 *, example_inputs: Any = None, inplace: bool = False,
                 **from_pretrained_kwargs: Any) -> nn.Module:
        """Return an optimized model: a copy of a given module unless ``inplace=True``.

        ``model_name_or_model``: a hub name (local HF cache), a folder (incl. one written by
        ``torchbridge optimize``), or a loaded module; None uses ``config.model_name``.
        ``example_inputs`` (a dict of keyword arguments, a tuple of positional ones or a tensor):
        what verify and warm-up feed a module the library cannot build inputs for.
        """
        t0 = time.perf_counter()
        config = self.config
        if model_name_or_model is None:
            model_name_or_model = config.model_name
        record = None
        if not isinstance(model_name_or_model, nn.Module) and saved.is_saved(model_name_or_model):
            record = saved.read_record(model_name_or_model)
            task = task or record["task"]
        source, name, task = self._load(model_name_or_model, task, inplace, from_pretrained_kwargs,
                                        random_weights=config.random_weights and record is None)
        family = family_of(source, task)
        if family is MODULE:
            task = "module"
        self._check_model_type(source, family)
        load_s = time.perf_counter() - t0

        model_config = getattr(source, "config", None)
        plan = make_plan(
            config, model_max_positions=max_positions(model_config) if model_config else None,
            supports_sdpa=bool(getattr(source, "_supports_sdpa", False)), kind=family.verify,
            saved=None if record is None else record["plan"],
        )
        if plan.attention_explicit and config.setting("enable_memory_efficient_attention") \
                and plan.attention != "sdpa":
            raise ValueError(f"enable_memory_efficient_attention=True was requested but "
                             f"{type(source).__name__} has no SDPA attention in transformers; "
                             "fix: leave the field unset (auto) or set it to False")
        report = OptimizationReport(name, task, family.model_type if family is MODULE else
                                    getattr(model_config, "model_type", "custom"),
                                    config.random_weights and record is None, plan)
        report.notes.extend(plan.notes)
        if record is not None:
            report.notes.append(f"loaded from a `torchbridge optimize` folder: its saved plan; "
                                f"verify at save time: {saved.verify_line(record)}")
            report.float_layers = list(record["float_layers"])
            if plan.compile:
                report.notes.append(saved.load_compile_cache(model_name_or_model, record))
        if family.model_type == "unknown":
            report.notes.append(f"model_type {report.model_type!r} is not a known family: only the "
                                "generic steps ran")
        report.timings["load_s"] = load_s

        # the model's tokenizer, loaded once for the gate's text and the calibration's
        tokenizer = None if example_inputs is not None or family is MODULE \
            else calibration_tokenizer(name, source)
        batch, text = self._gate_batch(source, family, plan, tokenizer, example_inputs)
        if family.verify == "encoder" and isinstance(batch, dict) \
                and (plan.quantization in ACCURACY_CONTROLLED or plan.select_precision):
            # only the int8 formats with activations calibrate (the selection may pick one);
            # deterministic, so a saved folder calibrates alike
            report.calibration_inputs = self._calibration_batch(source, plan, tokenizer,
                                                                example_inputs)
        reference = self._reference(source, family, plan, report, batch)
        if reference is not None and plan.select_precision:
            from .selection import select_precision

            plan = select_precision(self, source, reference, family, plan, report, batch, text)
            report.plan = plan
        elif plan.select_precision:
            report.notes.append(f"select_precision={plan.select_precision!r} not applied: choosing "
                                "a precision needs the gate, and verify is off or has no inputs; "
                                f"kept {plan.precision_name}")
        model = self.apply(source, plan, report, family, batch)
        if reference is not None:
            report.verify = self.verify(model, reference, plan, family, batch, text, report)
            if not report.verify.passed and plan.quantization in ACCURACY_CONTROLLED \
                    and family.verify == "encoder":
                # int8 must never silently lose accuracy: keep the layers that move the output
                # most in float until the gate passes (raises when half of them are not enough).
                # The control measures unfused modules; the built model (fusions, padding
                # removal, its attention kernel) rounds a little differently, so it is verified
                # again, and a miss asks the control for one more float layer (most misses are
                # by a hair), then for twice as many.
                at_least = 0
                for round_ in range(CONTROL_ROUNDS):
                    self._accuracy_control(reference, plan, report, batch, text, at_least)
                    report.steps = []
                    model = self.apply(private_copy(reference), plan, report, family, batch)
                    report.verify = self.verify(model, reference, plan, family, batch, text, report)
                    if report.verify.passed:
                        break
                    kept = len(report.float_layers)
                    at_least = kept + 1 if round_ == 0 else max(1, 2 * kept)
            if not report.verify.passed and plan.dtype_auto and plan.dtype != torch.float32:
                fallback = plan.with_precision(
                    torch.float32, plan.quantization,
                    f"float32: fallback, the auto choice {plan.dtype} failed verify "
                    f"({report.verify.summary()})", config.verify_tolerance)
                log.warning("torchbridge: %s", fallback.dtype_reason)
                report.notes.append(fallback.dtype_reason)
                report.plan, report.steps, plan = fallback, [], fallback
                model = self.apply(private_copy(reference), plan, report, family, batch)
                report.verify = self.verify(model, reference, plan, family, batch, text, report)
            if not report.verify.passed:
                raise VerificationError(f"{name}: the optimized model differs from the fp32 eager "
                                        f"model: {report.verify.summary()}; {report.verify.failures}")
        del reference
        report.calibration_inputs = None  # used by the steps above only
        self._plan = plan
        warm_up(model, family, report, example_inputs, batch)
        report.read_back(model)
        report.timings["total_s"] = time.perf_counter() - t0
        self.report = report
        for line in report.summary().splitlines():
            log.info(line)
        return model

    def save_pretrained(self, model: nn.Module, output_dir: str, *, source: str) -> dict[str, Any]:
        """Write the optimized model, its tokenizer and its plan to ``output_dir`` (see saved.py)."""
        if self.report is None:
            raise RuntimeError("save_pretrained() saves an optimized model: call optimize() first")
        return saved.write(model, self.report, output_dir, source=source,
                           random_weights=self.config.random_weights)

    # --- stages -------------------------------------------------------------------------------

    def _load(self, model_name_or_model: str | nn.Module, task: str | None, inplace: bool,
              kwargs: dict[str, Any], random_weights: bool) -> tuple[nn.Module, str, str]:
        """The fp32 model to optimize (a private copy of a given module), its name and task."""
        if isinstance(model_name_or_model, nn.Module):
            if kwargs:
                raise ValueError(f"loading arguments {sorted(kwargs)} apply to a model name or "
                                 "folder, not to an already-loaded model")
            task = canonical_task(task) if task else (task_of(model_name_or_model) or "feature-extraction")
            source = model_name_or_model if inplace else private_copy(model_name_or_model)
            name = getattr(getattr(source, "config", None), "name_or_path", "") or type(source).__name__
        else:
            name = str(model_name_or_model)
            task = canonical_task(task) if task else default_task(name)
            source = load_model(name, task, random_weights=random_weights, **kwargs)
        source = source.float().eval()
        source.requires_grad_(False)  # inference: no autograd bookkeeping on the weights
        return source, name, task

    def _check_model_type(self, source: nn.Module, family: Family) -> None:
        wanted = self.config.model_type
        actual = getattr(getattr(source, "config", None), "model_type", None)
        if wanted in (None, TextModelType.CUSTOM) or actual is None:
            return
        if wanted.value != actual:
            raise ValueError(f"TextModelConfig(model_type={wanted.value!r}) but the loaded model is "
                             f"{actual!r}. Fix: model_type={actual!r}, or 'custom' to skip this check")

    def _gate_batch(self, source: nn.Module, family: Family, plan: Plan, tokenizer: Any,
                    example_inputs: Any) -> tuple[Any, str]:
        """The inputs every gate and first call use: the caller's example inputs, real text
        through the model's tokenizer, or ids from its vocabulary (the report says which)."""
        if example_inputs is not None:
            return example_inputs, "the caller's example inputs"
        if family is MODULE:
            return None, ""
        if tokenizer is not None:
            return text_batch(tokenizer, min(64, plan.max_sequence_length)), "real text"
        return padded_batch(source.config, 4, min(32, plan.max_sequence_length)), "vocabulary ids"

    def _calibration_batch(self, source: nn.Module, plan: Plan, tokenizer: Any,
                           example_inputs: Any) -> dict[str, torch.Tensor] | None:
        """What int8 formats measure activations on (ranges, smoothing): the caller's example
        inputs, else other text (or ids) than the gate batch, so the gate is measured on inputs
        the calibration never saw."""
        if example_inputs is not None:
            return example_inputs if isinstance(example_inputs, dict) else None
        if tokenizer is not None:
            return text_batch(tokenizer, min(64, plan.max_sequence_length),
                              texts=CALIBRATION_ONLY_TEXT)
        return padded_batch(source.config, 4, min(32, plan.max_sequence_length), seed=1)

    def _reference(self, source: nn.Module, family: Family, plan: Plan, report: OptimizationReport,
                   batch: Any) -> nn.Module | None:
        if not plan.verify:
            report.notes.append("verify off" + (" (a saved folder: verified when it was written)"
                                                if self.config.verify is None else ""))
            return None
        if batch is None:
            if self.config.verify is True:
                raise ValueError(f"verify=True was requested but the library cannot build inputs for "
                                 f"a {type(source).__name__}. Fix: pass example_inputs= to optimize() "
                                 "(a dict of keyword arguments, a tuple or a tensor), or verify=False")
            report.notes.append(f"verify and warm-up skipped: {type(source).__name__} is not a "
                                "transformers model and no example_inputs= were given")
            return None
        reference = private_copy(source)
        if hasattr(reference, "set_attn_implementation"):
            reference.set_attn_implementation("eager")
        return reference

    def apply(self, model: nn.Module, plan: Plan, report: OptimizationReport, family: Family,
              batch: Any) -> nn.Module:
        """Run the family's steps in order; the first call (which compiles) right after compile."""
        apply_s = 0.0
        for name in family.steps:
            t0 = time.perf_counter()
            if name == "compile" and hasattr(model, "config") and family is not MODULE:
                # proof of fused attention, counted on the eager forward before it is compiled
                probe = padded_batch(model.config, 2, 8, device=plan.device.torch_device)
                report.efficient_attention = count_sdpa_calls(model, probe) > 0
            model = STEPS[name](model, plan, report)
            apply_s += time.perf_counter() - t0
            if name == "compile" and batch is not None:
                first_call(model, plan, report, batch)  # compiles (lazily) or fails here
        if "compile" not in family.steps and hasattr(model, "config"):
            probe = padded_batch(model.config, 2, 8, device=plan.device.torch_device)
            report.efficient_attention = count_sdpa_calls(model, probe) > 0
        report.timings["apply_s"] = apply_s
        return model

    def verify(self, model: nn.Module, reference: nn.Module, plan: Plan, family: Family, batch: Any,
               text: str, report: OptimizationReport) -> VerifyResult:
        """The family's gate on ``batch``: the optimized model against the fp32 eager reference."""
        t0 = time.perf_counter()
        device = plan.device.torch_device
        if family.verify == "module":
            with torch.no_grad():
                ref_args, ref_kwargs = call_args(batch, next(reference.parameters()).device)
                ref = reference(*ref_args, **ref_kwargs)
                args, kwargs = call_args(batch, device)
                opt = model(*args, **kwargs)
            ref, opt = flat_outputs(ref), flat_outputs(opt)
            mask = torch.ones(next(iter(ref.values())).shape[0], 1, dtype=torch.long)
            result = compare_encoder(ref, opt, mask, plan.gate, text=text)
        else:
            ref_out, opt_out = run_both(model, reference, batch, device)
            if family.verify == "causal-lm" and report.task == "causal-lm":
                result = compare_causal(ref_out.logits, opt_out.logits, batch["attention_mask"],
                                        plan.gate, text=text)
                summary, failures = verify_generation(model, reference, plan, left_padded_prompts(batch))
                report.generation = {"verify": summary}
                result.failures += failures
                result.passed = not result.failures
            else:
                result = compare_encoder(ref_out, opt_out, batch["attention_mask"], plan.gate, text=text)
        report.timings["verify_s"] = report.timings.get("verify_s", 0.0) + time.perf_counter() - t0
        return result

    def _accuracy_control(self, reference: nn.Module, plan: Plan, report: OptimizationReport,
                          batch: dict[str, torch.Tensor], text: str, at_least: int) -> None:
        """int8 with activations: find the fewest layers to keep in float so the gate passes;
        the quantize step then skips them. Raises Int8AccuracyError when even half of them in
        float fail."""
        from torchbridge.precisions import INT8_SMOOTH_ALPHA
        from torchbridge.precisions.accuracy_control import accuracy_controlled_int8
        from torchbridge.precisions.casting import cast_model

        device = plan.device.torch_device
        candidate = prepare_for_quantization(cast_model(private_copy(reference), plan.dtype), plan)
        candidate = candidate.to(device)
        with torch.no_grad():
            ref_out = reference(**batch)

        def gate(model: nn.Module) -> tuple[bool, dict]:
            with torch.no_grad():
                out = model(**{k: v.to(device) for k, v in batch.items()})
            result = compare_encoder(ref_out, out, batch["attention_mask"], plan.gate, text=text)
            return result.passed, result.measures

        t0 = time.perf_counter()
        static = plan.quantization == "int8-static"  # smoothed as the quantize step does
        calibration = {k: v.to(device) for k, v in (report.calibration_inputs or batch).items()}
        _, record = accuracy_controlled_int8(candidate, gate, sensitivity_inputs=batch,
                                             calibration_inputs=calibration,
                                             smooth_alpha=INT8_SMOOTH_ALPHA, static=static,
                                             min_layers_float=at_least)
        report.float_layers = list(record["layers_float"])
        report.accuracy_control = {k: record[k] for k in ("layers_int8", "layers_float", "gate")
                                   if k in record}
        report.timings["accuracy_control_s"] = time.perf_counter() - t0

