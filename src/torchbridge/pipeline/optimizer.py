"""TextModelOptimizer: load -> plan -> apply -> verify -> warm up -> optimized model + report."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchbridge.families import canonical_task, family_for
from torchbridge.pipeline.padding import PER_TOKEN_FIELDS, wrap_trim_padding
from torchbridge.pipeline.saved import is_saved, saved_config
from torchbridge.pipeline.verify import VerificationError, padded_batch, token_id_range, verify_model
from torchbridge.precisions.casting import cast_model, wrap_autocast

from .config import TextModelConfig
from .decoding import attach_fast_generate, fast_generate_applies
from .loading import default_task, load_model, private_copy, task_of
from .plan import Plan, make_plan
from .report import OptimizationReport, count_sdpa_calls

log = logging.getLogger("torchbridge")

Step = Callable[[nn.Module, Plan, OptimizationReport], nn.Module]


class CompileError(RuntimeError):
    """torch.compile was explicitly requested and failed."""


def _set_attention(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    if not hasattr(model, "set_attn_implementation"):
        report.step("attention", False, "not a transformers model: attention left as is")
        return model
    model.set_attn_implementation(plan.attention)
    report.step("attention", plan.attention == "sdpa",
                f"attn_implementation={plan.attention!r}")
    return model


def _cast(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    model = cast_model(model, plan.dtype, fp32_norms=plan.amp)
    report.step("precision", plan.dtype != torch.float32, plan.dtype_reason)
    return model


def _quantize(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    if plan.quantization is None:
        report.step("quantization", False, "none requested")
        return model
    if plan.quantization == "int8-dynamic":
        from torchbridge.precisions.int8_dynamic import quantize_dynamic_int8

        model = quantize_dynamic_int8(model)
        detail = "int8-dynamic: int8 weights (per channel) and activations (per token), int8 GEMMs"
    else:
        from torchbridge.precisions.int8_weight_only import quantize_weights_int8

        model = quantize_weights_int8(model)
        detail = "int8-weight-only: int8 weights (per channel), LM head included; float compute"
    report.step("quantization", True, detail)
    return model


def _to_device(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    model = model.to(plan.device.torch_device)
    report.step("device", True, str(plan.device.torch_device))
    return model


def _autocast(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    if not plan.amp:
        report.step("autocast", False, "use_amp off, or fp32 compute (nothing to autocast to)")
        return model
    report.step("autocast", True, f"forward under torch.autocast({plan.device.type}, {plan.dtype}),"
                " LayerNorms in fp32")
    return wrap_autocast(model, plan.device.type, plan.dtype)


def _gradient_checkpointing(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    if not plan.gradient_checkpointing:
        report.step("gradient_checkpointing", False, "off")
    elif not getattr(model, "supports_gradient_checkpointing", False):
        report.step("gradient_checkpointing", False, "the architecture does not support it")
    else:
        # transformers 5 renamed it; the old name still works but warns
        (getattr(model, "activation_checkpointing_enable", None)
         or model.gradient_checkpointing_enable)()
        report.step("gradient_checkpointing", True,
                    "on: affects training only (inference keeps no activations to recompute)")
    return model


def _compile(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    if not plan.compile:
        report.step("torch.compile", False, "use_torch_compile=False")
        return model
    if report.task == "causal-lm" and fast_generate_applies(model):
        # ~30 s of compile for GPT-2 on a CPU that generate would never use: the fast generation
        # path compiles its own fixed-shape decode step (see decoding.py)
        report.step("torch.compile", False, "forward left eager: generate compiles its own "
                    "decode step")
        return model
    kwargs = plan.compile_kwargs()
    # The forward is compiled, not the module: the model keeps its class (pipelines,
    # save_pretrained) and the padding trimmer can stay outside the graph.
    model.forward = torch.compile(model.forward, **kwargs)
    report.step("torch.compile", True, f"{plan.compile_mode}: {kwargs}")
    return model


def _trim_padding(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    task, family = report.task, family_for(report.model_type)
    if not plan.trim_padding:
        report.step("trim_padding", False, "trim_padding=False")
    elif task not in PER_TOKEN_FIELDS or family is None or family.decoder:
        report.step("trim_padding", False, f"only for encoder tasks ({report.model_type}, {task})")
    else:
        model = wrap_trim_padding(model, task)
        report.step("trim_padding", True, "right-padded batches run in groups of similar length, "
                    "each trimmed to its longest row")
    return model


# The apply step list, in order. Casting before the device move moves fewer bytes.
STEPS: list[Step] = [_set_attention, _cast, _quantize, _to_device, _autocast,
                     _gradient_checkpointing, _compile, _trim_padding]


def _forward_chain(model: nn.Module):
    forward = model.__dict__.get("forward")
    while forward is not None:
        yield forward
        forward = getattr(forward, "__wrapped__", None) or getattr(
            forward, "_torchdynamo_orig_callable", None)


def is_compiled(model: nn.Module) -> bool:
    """Read back whether the model's forward goes through torch.compile."""
    return any(hasattr(f, "_torchdynamo_orig_callable") for f in _forward_chain(model))


def uncompile(model: nn.Module) -> None:
    """Put back the function torch.compile wrapped (after a failed compile; it is outermost)."""
    forward = model.__dict__.get("forward")
    model.forward = getattr(forward, "_torchdynamo_orig_callable", forward)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class TextModelOptimizer:
    """Optimizes a Hugging Face text model for the configured device and mode."""

    def __init__(self, config: TextModelConfig | None = None) -> None:
        self.config = config or TextModelConfig()
        self._plan: Plan | None = None
        self.report: OptimizationReport | None = None

    @property
    def plan(self) -> Plan:
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
        """What the last optimize() applied, read back from the model, with the full report."""
        if self.report is None:
            raise RuntimeError("get_optimization_info() reports on a model: call optimize() first")
        return self.report.info()

    def optimize(self, model_name_or_model: str | nn.Module, task: str | None = None, *,
                 inplace: bool = False, **from_pretrained_kwargs: Any) -> nn.Module:
        """Return an optimized model: a copy of a given module unless ``inplace=True``."""
        t0 = time.perf_counter()
        config, notes = self.config, []
        if not isinstance(model_name_or_model, nn.Module) and is_saved(model_name_or_model):
            # a folder written by `torchbridge optimize`: its plan, weights verified at save time
            config = saved_config(model_name_or_model, self.config)
            notes.append(f"loaded from a `torchbridge optimize` folder: its saved plan applies to "
                         f"the fields not set explicitly; verify={config.verify}")
        random_weights = config.random_weights and not isinstance(model_name_or_model, nn.Module) \
            and not notes
        source, name, task = self._load(model_name_or_model, task, inplace, from_pretrained_kwargs,
                                        random_weights)
        load_s = time.perf_counter() - t0

        model_config = getattr(source, "config", None)
        model_type = getattr(model_config, "model_type", "custom")
        family = family_for(model_type)
        self._plan = make_plan(
            config,
            model_max_positions=getattr(model_config, "max_position_embeddings", None)
            or getattr(model_config, "n_positions", None),
            supports_sdpa=bool(getattr(source, "_supports_sdpa", False)),
        )
        plan = self._plan
        if plan.attention_explicit and config.enable_memory_efficient_attention \
                and plan.attention != "sdpa":
            raise ValueError(f"enable_memory_efficient_attention=True was requested but "
                             f"{type(source).__name__} has no SDPA attention in transformers; "
                             "fix: leave the field unset (auto) or set it to False")
        report = OptimizationReport(name, task, model_type, random_weights, plan)
        report.notes.extend([*notes, *plan.notes])
        if family is None:
            report.notes.append(f"model_type {model_type!r} is not a known family "
                                "(bert, distilbert, roberta, albert, gpt2, llama): only the generic "
                                "steps ran")
        report.timings["load_s"] = load_s

        reference = None
        if plan.verify:
            reference = private_copy(source)
            if hasattr(reference, "set_attn_implementation"):
                reference.set_attn_implementation("eager")
        model = self._apply(source, plan, report, reference, task)
        if plan.dtype_auto and report.verify is not None and not report.verify.passed:
            fallback = plan.with_dtype(torch.float32, f"float32: fallback, the auto choice "
                                       f"{plan.dtype} failed verify ({report.verify.summary()})")
            log.warning("torchbridge: %s", fallback.dtype_reason)
            report.notes.append(fallback.dtype_reason)
            report.plan, report.steps = fallback, []
            self._plan = fallback
            model = self._apply(private_copy(reference), fallback, report, reference, task)
        if report.verify is not None and not report.verify.passed:
            raise VerificationError(f"{name}: the optimized model differs from the fp32 eager "
                                    f"model: {report.verify.summary()}; {report.verify.failures}")
        if task == "causal-lm":
            attach_fast_generate(model, report.plan, report, reference)
        del reference
        self._warm_up(model, report)
        report.read_back(model)
        report.timings["total_s"] = time.perf_counter() - t0
        self.report = report
        for line in report.summary().splitlines():
            log.info(line)
        return model

    @staticmethod
    def _load(model_name_or_model: str | nn.Module, task: str | None, inplace: bool,
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
        return source.float().eval(), name, task

    def _apply(self, model: nn.Module, plan: Plan, report: OptimizationReport,
               reference: nn.Module | None, task: str) -> nn.Module:
        batch = padded_batch(model.config, 4, min(32, plan.max_sequence_length)) \
            if hasattr(model, "config") else None
        apply_s = 0.0
        for step in STEPS:
            t0 = time.perf_counter()
            if step is _compile and batch is not None:
                # proof of fused attention, counted on the eager forward before it is compiled
                probe = padded_batch(model.config, 2, 8, device=plan.device.torch_device)
                report.efficient_attention = count_sdpa_calls(model, probe) > 0
            model = step(model, plan, report)
            apply_s += time.perf_counter() - t0
            if step is _compile and batch is not None:
                self._first_call(model, plan, report, batch)  # compiles (lazily) or fails here
        report.timings["apply_s"] = apply_s

        if reference is not None:
            t0 = time.perf_counter()
            report.verify = verify_model(
                model, reference, batch, device=plan.device.torch_device,
                tolerance=plan.tolerance, classification=task in (
                    "sequence-classification", "token-classification", "masked-lm", "causal-lm"),
            )
            report.timings["verify_s"] = time.perf_counter() - t0
        return model

    @staticmethod
    def _first_call(model: nn.Module, plan: Plan, report: OptimizationReport,
                    batch: dict[str, torch.Tensor]) -> None:
        graphs_before = _graphs_compiled()
        inputs = {k: v.to(plan.device.torch_device) for k, v in batch.items()}
        for tensor in inputs.values():
            # compile for any batch size and length at once (within max_sequence_length) instead
            # of one static graph first and a dynamic one at the second shape
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
            torch._dynamo.maybe_mark_dynamic(tensor, 1)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                model(**inputs)
        except Exception as err:  # noqa: BLE001 - any compiler failure, re-raised or reported
            if not report.steps[-1].applied:  # nothing was compiled: a plain model error
                raise
            if plan.compile_explicit:
                raise CompileError(f"the first call of the optimized model failed: {err}. "
                                   "Fix: TextModelConfig(use_torch_compile=False)") from err
            report.notes.append(f"torch.compile failed ({type(err).__name__}: {err}); running "
                                "uncompiled (compile was an auto choice)")
            uncompile(model)
            report.steps[-1] = type(report.steps[-1])("torch.compile", False, "failed, see notes")
        report.compiled = is_compiled(model)
        report.compiled_graphs = _graphs_compiled() - graphs_before
        report.timings["compile_s" if report.compiled else "first_call_s"] = time.perf_counter() - t0

    def _warm_up(self, model: nn.Module, report: OptimizationReport) -> None:
        plan = report.plan
        if plan.warmup_steps == 0 or not hasattr(model, "config"):
            return
        batch, seq = plan.warmup_shape
        low, high = token_id_range(model.config)
        ids = torch.randint(low, high, (batch, seq), generator=torch.Generator().manual_seed(1))
        device = plan.device.torch_device
        inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        t0 = time.perf_counter()
        graphs_before = _graphs_compiled()
        profiler = _profiler(plan) if plan.profile else None
        with torch.no_grad(), (profiler or contextlib.nullcontext()):
            for _ in range(plan.warmup_steps):
                model(**inputs)
        report.compiled_graphs += _graphs_compiled() - graphs_before
        report.timings["warmup_s"] = time.perf_counter() - t0
        if profiler is not None:
            sort_key = "self_cuda_time_total" if plan.device.type == "cuda" else "self_cpu_time_total"
            events = profiler.key_averages()
            report.profile_table = events.table(sort_by=sort_key, row_limit=20)
            top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:20]
            report.profile_top_ops = [
                {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                 "cpu_total_ms": e.cpu_time_total / 1e3} for e in top
            ]


def _profiler(plan: Plan):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if plan.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    elif plan.device.type == "xpu":
        activities.append(ProfilerActivity.XPU)
    return profile(activities=activities, record_shapes=True)
