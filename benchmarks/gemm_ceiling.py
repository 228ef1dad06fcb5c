"""What this device's matmul units allow: GFLOP/s of each GEMM path at BERT-base shapes.

An encoder forward at batch 8 x 128 is ~90% GEMMs, so the speedup of a precision over the fp32
baseline cannot exceed the ratio of their GEMM rates. This script measures those rates (median of
many runs after warm-up) and writes them as JSON, so speedup targets can be checked against what
the hardware can do on the day:

    python benchmarks/gemm_ceiling.py --output bench-results/gemm_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from torchbridge.backends import describe, detect, synchronize
from torchbridge.bench.harness import time_callable

# (M, K, N) of BERT-base's projections at batch 8 x 128: QKV/out (768x768), FFN in and out.
SHAPES = [(1024, 768, 768), (1024, 768, 3072), (1024, 3072, 768)]


def _rate(fn, flops: float, device: torch.device, runs: int) -> float:
    timing = time_callable(fn, runs=runs, warmup=2, sync=lambda: synchronize(device))
    return flops / timing.median_s / 1e9


def measure(device: torch.device, runs: int = 20) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for m, k, n in SHAPES:
        flops = 2.0 * m * k * n
        x = torch.randn(m, k, device=device)
        w = torch.randn(n, k, device=device) * 0.02
        xb, wb, xh, wh = x.bfloat16(), w.bfloat16(), x.half(), w.half()
        paths = {
            "fp32": lambda x=x, w=w: F.linear(x, w),
            "bf16": lambda x=xb, w=wb: F.linear(x, w),
            "fp16": lambda x=xh, w=wh: F.linear(x, w),
        }
        a8 = torch.randint(-127, 127, (m, k), dtype=torch.int8, device=device)
        b8 = torch.randint(-127, 127, (k, n), dtype=torch.int8, device=device)
        paths["int8"] = lambda a8=a8, b8=b8: torch._int_mm(a8, b8)
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
            paths["fp32_onednn_packed"] = lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(
                x, p, None, "none", [], "")
        for name, fn in paths.items():
            totals.setdefault(name, []).append(_rate(fn, flops, device, runs))
    return {name: round(statistics.mean(rates), 1) for name, rates in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--output", type=Path, default=Path("bench-results/gemm_ceiling.json"))
    args = parser.parse_args()
    info = detect(args.device)
    rates = measure(info.torch_device, args.runs)
    ceiling = {name: round(rate / rates["fp32"], 2) for name, rate in rates.items()}
    result = {"device": describe(info), "torch": torch.__version__, "shapes_mkn": SHAPES,
              "gflops": rates, "max_speedup_over_fp32_gemm": ceiling}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    for name, rate in rates.items():
        print(f"{name:>20}: {rate:8.1f} GFLOP/s  ({ceiling[name]:.2f}x fp32)")


if __name__ == "__main__":
    main()
