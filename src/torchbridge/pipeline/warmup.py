"""Where compile happens and is paid for: the first call, right after the compile step, and the
warm-up at the shapes users send (optionally under torch.profiler)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch import nn

from torchbridge.backends import device_ops
from torchbridge.families import MODULE, Family

from .decoding import warm_up_generate
from .plan import Plan
from .report import OptimizationReport
from .verify import token_id_range


class CompileError(RuntimeError):
    """torch.compile was explicitly requested and failed."""


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


def call_args(inputs: Any, device: torch.device) -> tuple[tuple, dict]:
    """Inputs (a dict of keyword arguments, a tuple of positional ones, or one tensor) as
    ``(args, kwargs)`` with their tensors on ``device``."""
    if isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}

    def move(value: Any) -> Any:
        return value.to(device) if torch.is_tensor(value) else value

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def first_call(model: nn.Module, plan: Plan, report: OptimizationReport, batch: Any) -> None:
    graphs_before = _graphs_compiled()
    device = plan.device.torch_device
    args, kwargs = call_args(batch, device)
    for tensor in (*args, *kwargs.values()):
        if torch.is_tensor(tensor) and tensor.dim() >= 2 and report.task != "module":
            # compile for any batch size and length at once (within max_sequence_length)
            # instead of one static graph first and a dynamic one at the second shape
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
            torch._dynamo.maybe_mark_dynamic(tensor, 1)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
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


def warm_up(model: nn.Module, family: Family, report: OptimizationReport,
            example_inputs: Any, gate_batch: Any = None) -> None:
    """``gate_batch``: the first call's inputs; the warm-up passes the same keyword arguments
    (a compiled forward traces a new graph for a new set of them)."""
    plan = report.plan
    if plan.warmup_steps == 0:
        return
    if family is MODULE and example_inputs is None:
        return  # the note about skipped verify and warm-up is already in the report
    t0 = time.perf_counter()
    graphs_before = _graphs_compiled()
    device = plan.device.torch_device
    if example_inputs is not None:
        args, kwargs = call_args(example_inputs, device)
    else:
        batch, seq = plan.warmup_shape
        low, high = token_id_range(model.config)
        ids = torch.randint(low, high, (batch, seq), generator=torch.Generator().manual_seed(1))
        ids = ids.to(device)
        args, kwargs = (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for key, value in (gate_batch.items() if isinstance(gate_batch, dict) else ()):
            if key not in kwargs and torch.is_tensor(value) and value.dim() == 2:
                kwargs[key] = torch.zeros_like(ids)  # e.g. token_type_ids: segment 0
    profiler = _profiler(plan) if plan.profile else None
    with torch.no_grad(), (profiler or contextlib.nullcontext()):
        for _ in range(plan.warmup_steps):
            if family.warmup == "generate" and report.task == "causal-lm":
                warm_up_generate(model, plan, report)
            else:
                model(*args, **kwargs)
    report.compiled_graphs += _graphs_compiled() - graphs_before
    report.timings["warmup_s"] = time.perf_counter() - t0
    if profiler is not None:
        activity = device_ops(plan.device).profiler_activity
        sort_key = f"self_{activity.lower()}_time_total" if activity else "self_cpu_time_total"
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
    extra = device_ops(plan.device).profiler_activity
    if extra:
        activities.append(getattr(ProfilerActivity, extra))
    return profile(activities=activities, record_shapes=True)
