"""Precision chosen by measurement (``select_precision``: the throughput and memory modes' preset).

"speed": every candidate the device supports is applied to a copy of the model, gated against the
fp32 eager model and timed at the plan's warm-up shape; the fastest that passes wins. "size": the
candidates in order of bytes per parameter; the smallest that passes wins. The table of what was
measured goes into the report. Candidates are timed eagerly (compile off), so the choice does not
cost one compile per candidate; the winner is then compiled if the plan says so.

Causal LMs are timed on their forward at the warm-up shape, which ranks prefill; batch-1 decoding
reads every weight once per token, so there the smallest passing weights are also the fastest.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch
from torch import nn

from torchbridge.backends import supports_bf16, supports_fp16, synchronize
from torchbridge.families import Family
from torchbridge.precisions import DTYPE_NAMES, PrecisionNotSupportedError, check_supported, precision

from .loading import private_copy
from .plan import Plan
from .report import OptimizationReport
from .verify import token_id_range

TIMED_CALLS = 3


def candidates(plan: Plan, family: Family, objective: str) -> list[tuple[torch.dtype, str | None]]:
    """(dtype, weight format) pairs worth trying on this device, in the objective's order."""
    info = plan.device
    half = torch.bfloat16 if supports_bf16(info) else (
        torch.float16 if info.type != "cpu" and supports_fp16(info) else None)
    floats = [torch.float32] + ([half] if half is not None else [])
    int8s = ["int8-weight-only"] if family.decoder else ["int8-dynamic"]
    if not family.decoder and not plan.compile:  # int8-static runs uncompiled (plan.py)
        int8s.append("int8-static")
    pairs = [(dtype, None) for dtype in floats]
    for int8 in int8s:
        paired = precision(int8).auto_compute(info)  # the compute an auto plan gives this format
        pairs.append((paired[0] if paired else floats[-1], int8))
    supported = []
    for dtype, fmt in pairs:
        try:
            check_supported(fmt or DTYPE_NAMES[dtype], info)
        except PrecisionNotSupportedError:
            continue
        supported.append((dtype, fmt))
    if objective == "size":
        return sorted(supported, key=lambda p: _bytes(*p))
    return supported


def _bytes(dtype: torch.dtype, fmt: str | None) -> float:
    return precision(fmt).bytes_per_param if fmt else torch.finfo(dtype).bits / 8


def _time(model: nn.Module, plan: Plan) -> float:
    batch, seq = plan.warmup_shape
    low, high = token_id_range(model.config)
    device = plan.device.torch_device
    ids = torch.randint(low, high, (batch, seq), generator=torch.Generator().manual_seed(2)).to(device)
    mask = torch.ones_like(ids)
    samples = []
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # first call apart
        for _ in range(TIMED_CALLS):
            synchronize(device)
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            synchronize(device)
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def select_precision(optimizer: Any, source: nn.Module, reference: nn.Module, family: Family,
                     plan: Plan, report: OptimizationReport, batch: Any, text: str) -> Plan:
    """Measure the candidates and return the plan of the winner (raises when none passes)."""
    objective = plan.select_precision
    table: list[dict[str, Any]] = []
    chosen: Plan | None = None
    eager = dataclasses.replace(plan, compile=False, compile_reason="timed eagerly", warmup_steps=0)
    for dtype, fmt in candidates(plan, family, objective):
        name = fmt or DTYPE_NAMES[dtype]
        trial = eager.with_precision(dtype, fmt, f"{name}: measured")
        scratch = OptimizationReport(report.model_name, report.task, report.model_type, False, trial,
                                     calibration_inputs=report.calibration_inputs)
        model = optimizer.apply(private_copy(reference), trial, scratch, family, batch)
        result = optimizer.verify(model, reference, trial, family, batch, text, scratch)
        row = {"precision": name, "passed": result.passed, "gate": result.measures,
               "_choice": (dtype, fmt)}
        if result.passed and objective == "speed":
            row["median_ms"] = _time(model, trial) * 1e3
        table.append(row)
        del model
        if result.passed and objective == "size":
            chosen = trial
            break
    passing = [r for r in table if r["passed"]]
    if objective == "speed" and passing:
        best = min(passing, key=lambda r: r["median_ms"])
        dtype, fmt = best["_choice"]
        chosen = plan.with_precision(dtype, fmt, f"{best['precision']}: fastest that passed the "
                                     f"gate at {list(plan.warmup_shape)} ({best['median_ms']:.1f} ms)")
    elif chosen is not None:
        chosen = dataclasses.replace(plan, dtype=chosen.dtype, quantization=chosen.quantization,
                                     dtype_auto=False, gate=chosen.gate,
                                     dtype_reason=f"{table[-1]['precision']}: the smallest weights "
                                     "that passed the gate")
    report.precision_search = [{k: v for k, v in row.items() if k != "_choice"} for row in table]
    if chosen is None:
        raise RuntimeError(f"select_precision={objective!r}: no candidate passed the gate: {table}")
    return chosen
