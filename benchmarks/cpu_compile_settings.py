"""Which torch.compile settings pay on this device, for an encoder: the study behind the plan.

Times BERT-base (random weights; speed does not depend on them) at batch 8 x 128 in bf16 (or
--dtype) with SDPA: eager, torch.compile default, with inductor freezing, and with freezing +
dynamic shapes (what TextModelOptimizer uses on CPU when compile is asked for), and the library's
own model without compile, with and without ``use_amp`` (where the default path's time goes), each
in this one process, median and p90 after warm-up, first call apart. Writes JSON:

    python benchmarks/cpu_compile_settings.py --output bench-results/cpu_compile_settings.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from torchbridge.backends import describe, detect, synchronize
from torchbridge.bench.harness import time_callable
from torchbridge.models.text import TextModelConfig, TextModelOptimizer
from torchbridge.pipeline.loading import load_model
from torchbridge.precisions import DTYPE_NAMES

DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def _time(fn, device, runs: int) -> tuple[float, float, float]:
    timing = time_callable(fn, runs=runs, warmup=1, sync=lambda: synchronize(device))
    return timing.first_call_s, timing.median_s * 1e3, timing.p90_s * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-base-uncased")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, default=Path("bench-results/cpu_compile_settings.json"))
    args = parser.parse_args()
    info = detect(args.device)
    device = info.torch_device
    ids = torch.randint(1000, 30000, (args.batch_size, args.seq_len), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    variants = {
        "eager": None,
        "compile default": {},
        "compile freezing": {"options": {"freezing": True}},
        "compile freezing + dynamic": {"options": {"freezing": True}, "dynamic": True},
    }
    library = {"torchbridge use_amp=True": True, "torchbridge use_amp=False": False}
    rows = []
    for name in [*variants, *library]:
        torch._dynamo.reset()
        model = load_model(args.model, "sequence-classification", random_weights=True,
                           attn_implementation="sdpa")
        if name in library:  # the optimizer's path: cast, autocast per use_amp, trim, checks
            config = TextModelConfig(device=args.device, dtype=DTYPES[args.dtype],
                                     use_amp=library[name], use_torch_compile=False,
                                     warmup_steps=0)
            forward = TextModelOptimizer(config).optimize(model).forward
        else:
            model = model.to(device, DTYPES[args.dtype])
            kwargs = variants[name]
            forward = model.forward if kwargs is None else torch.compile(model.forward, **kwargs)

        def call(forward=forward):
            with torch.no_grad():
                return forward(**inputs).logits

        first, median, p90 = _time(call, device, args.runs)
        rows.append({"variant": name, "first_call_s": round(first, 2), "median_ms": round(median, 1),
                     "p90_ms": round(p90, 1)})
        print(f"{name:>28}: median {median:7.1f} ms  p90 {p90:7.1f} ms  first call {first:6.1f} s")
    base = rows[0]["median_ms"]
    for row in rows:
        row["speedup_vs_eager"] = round(base / row["median_ms"], 3)
    result = {"device": describe(info), "torch": torch.__version__, "model": args.model,
              "dtype": args.dtype, "shape": [args.batch_size, args.seq_len], "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
