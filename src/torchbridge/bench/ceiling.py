"""What the device allows on the day: GEMM GFLOP/s per precision at BERT-base shapes, and the
rate it reads memory at.

An encoder forward at batch 8 x 128 is ~90% GEMMs, so no path in a precision can run its GEMMs
faster than that precision's best GEMM kernel here; a batch-1 decode step reads every weight
once, so none can stream its weights faster than memory reads. The benchmark measures both at
its start and reports each row's GFLOP/s (encoders) or GB/s (decoding) as a fraction of them:
how much of the machine a row uses, comparable across hosts where absolute numbers are not.

Each precision's ceiling is its best path: fp32 through MKL and oneDNN, bf16 and fp16 through
``F.linear`` and oneDNN packed in the one-row and the row-count layouts (pipeline/packing.py
explains why both), int8 through ``torch._int_mm`` and oneDNN's int8 linear (prepacked weights,
uint8 activations with one scale per tensor, bf16 out).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F

from torchbridge.backends import synchronize
from torchbridge.bench.harness import time_callable

# (M, K, N) of BERT-base's projections at batch 8 x 128: QKV/out (768x768), FFN in and out.
SHAPES = [(1024, 768, 768), (1024, 768, 3072), (1024, 3072, 768)]
# precision of a row's dtype label -> its ceiling's key
_PRECISION_OF = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _gflops(fn: Any, flops: float, device: torch.device, runs: int) -> float:
    timing = time_callable(fn, runs=runs, warmup=2, sync=lambda: synchronize(device))
    return flops / timing.median_s / 1e9


def gemm_rates(device: torch.device, runs: int = 10) -> dict[str, float]:
    """GFLOP/s of every GEMM path, averaged over SHAPES: {path: rate}."""
    totals: dict[str, list[float]] = {}
    packs = device.type == "cpu" and torch.backends.mkldnn.is_available()
    for m, k, n in SHAPES:
        x = torch.randn(m, k, device=device)
        w = torch.randn(n, k, device=device) * 0.02
        paths = {"fp32": lambda x=x, w=w: F.linear(x, w)}
        for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            xd, wd = x.to(dt), w.to(dt)
            paths[name] = lambda xd=xd, wd=wd: F.linear(xd, wd)
        a8 = torch.randint(-127, 127, (m, k), dtype=torch.int8, device=device)
        b8 = torch.randint(-127, 127, (k, n), dtype=torch.int8, device=device)
        paths["int8"] = lambda a8=a8, b8=b8: torch._int_mm(a8, b8)
        if packs:
            for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                xd = x.to(dt)
                for hint in (1, m):
                    packed = torch.ops.mkldnn._reorder_linear_weight(w.to(dt), hint)
                    paths[f"{name}_onednn_packed_{'one_row' if hint == 1 else 'row_count'}"] = (
                        lambda xd=xd, p=packed: torch.ops.mkldnn._linear_pointwise(
                            xd, p, None, "none", [], ""))
            # oneDNN's int8 linear: uint8 activations, prepacked int8 weights, bf16 out
            qw = torch.ops.onednn.qlinear_prepack(b8.t().contiguous(), [m, k])
            scales, zeros = torch.full((n,), 0.01), torch.zeros(n, dtype=torch.int32)
            au8 = (a8.to(torch.int32) + 128).to(torch.uint8)
            paths["int8_onednn_qlinear"] = lambda au8=au8, qw=qw, s=scales, z=zeros: (
                torch.ops.onednn.qlinear_pointwise(au8, 0.02, 128, qw, s, z, None, 1.0, 0,
                                                   torch.bfloat16, "none", [], ""))
        for name, fn in paths.items():
            totals.setdefault(name, []).append(_gflops(fn, 2.0 * m * k * n, device, runs))
    return {name: round(statistics.mean(rates), 1) for name, rates in totals.items()}


def read_gb_per_s(device: torch.device, megabytes: int = 256, runs: int = 10) -> float:
    """GB/s of a sum over ``megabytes`` of fp32, more than a CPU's last-level cache."""
    data = torch.randn(megabytes * 2**20 // 4, device=device)
    timing = time_callable(data.sum, runs=runs, warmup=2, sync=lambda: synchronize(device))
    return round(data.numel() * 4 / timing.median_s / 1e9, 1)


def measure(device: torch.device, runs: int = 10) -> dict[str, Any]:
    """{"gemm_gflops": every path, "ceiling_gflops": best path per precision, "read_gb_per_s"}."""
    rates = gemm_rates(device, runs)
    best: dict[str, float] = {}
    for path, rate in rates.items():
        precision = path.split("_")[0]
        best[precision] = max(best.get(precision, 0.0), rate)
    return {"shapes_mkn": SHAPES, "gemm_gflops": rates, "ceiling_gflops": best,
            "read_gb_per_s": read_gb_per_s(device, runs=runs)}


def ceiling_key(dtype_label: str | None) -> str | None:
    """The ceiling a row's dtype label is measured against ("int8 dynamic" -> int8), or None."""
    if not dtype_label:
        return None
    if "int8" in dtype_label:
        return "int8"
    return _PRECISION_OF.get(dtype_label.split()[0])
