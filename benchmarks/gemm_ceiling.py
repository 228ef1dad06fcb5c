"""What this device's matmul units and memory allow: GFLOP/s of each GEMM path at BERT-base shapes.

An encoder forward at batch 8 x 128 is ~90% GEMMs, so the speedup of a precision over the fp32
baseline cannot exceed the ratio of their best GEMM rates. This script measures those rates
(median of many runs after warm-up; torchbridge/bench/ceiling.py, which `torchbridge benchmark`
also runs at its start) and the memory read rate, and writes them as JSON, so speedup targets can
be checked against what the hardware can do on the day:

    python benchmarks/gemm_ceiling.py --output bench-results/gemm_ceiling.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from torchbridge.backends import describe, detect
from torchbridge.bench.ceiling import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--output", type=Path, default=Path("bench-results/gemm_ceiling.json"))
    args = parser.parse_args()
    info = detect(args.device)
    result = measure(info.torch_device, args.runs)
    fp32 = result["ceiling_gflops"]["fp32"]
    result["max_speedup_over_fp32_gemm"] = {
        name: round(rate / fp32, 2) for name, rate in result["ceiling_gflops"].items()}
    result = {"device": describe(info), "torch": torch.__version__, **result}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    for name, rate in result["gemm_gflops"].items():
        print(f"{name:>30}: {rate:8.1f} GFLOP/s")
    for name, rate in result["ceiling_gflops"].items():
        print(f"{'ceiling ' + name:>30}: {rate:8.1f} GFLOP/s  "
              f"({result['max_speedup_over_fp32_gemm'][name]:.2f}x fp32)")
    print(f"{'memory reads':>30}: {result['read_gb_per_s']:8.1f} GB/s")


if __name__ == "__main__":
    main()
