"""What packing the linear weights for oneDNN buys an uncompiled CPU encoder (pipeline/packing.py).

For each model and shape (rows = batch x seq): the same bf16 (or, with ``--dtype fp32``, fp32)
model with plain ``nn.Linear`` weights; packed in the layout oneDNN picks for ``rows`` rows
("row-count layout", what inductor's freezing and our first packing did); and packed as the
library packs (``pack_linear_weights``: per weight shape the faster at ``rows`` of the one-row
and the row-count layout and, in fp32, the plain weight on MKL's GEMM); and that plus the
fusions the packing step adds (pipeline/fusion.py: q/k/v as one GEMM, the FFN's GELU and the
residual adds as post-ops); and that with, per output shape, the faster of the add post-op and
torchbridge's add + LayerNorm kernel (bf16, where it can be built), which is what the optimizer
builds. Timed interleaved in this one
process (rounds of ``--runs`` calls each, order rotating, median of the per-round medians and
p90), the first call apart, and the min cosine of each packed model's outputs to the plain
one's. Models: real all-MiniLM-L6-v2 when its asset can be fetched (skipped with the reason
otherwise) and BERT-base with random weights (speed does not depend on them). Writes JSON:

    python benchmarks/packed_linear.py [--dtype fp32] --output bench-results/packed_linear.json
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from unittest import mock

import torch

from torchbridge.bench.assets._fetch import AssetUnavailableError
from torchbridge.bench.assets.minilm import load_minilm
from torchbridge.bench.harness import round_timings, time_rounds
from torchbridge.bench.report import write_study
from torchbridge.pipeline import fusion, packing
from torchbridge.pipeline.loading import load_model

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = ("plain", "row-count layout", "chosen layout", "chosen layout + fusions",
            "chosen layout + fusions + norm kernel")


def packed_copy(model: torch.nn.Module, rows: int, variant: str) -> torch.nn.Module:
    packed = copy.deepcopy(model)
    if variant == "plain":
        return packed
    fuse = "+ fusions" in variant
    if fuse:
        fusion.fuse_qkv(packed)
    if variant == "row-count layout":  # every weight in the layout oneDNN picks for `rows` rows
        with mock.patch.object(packing, "fastest_rows_hint", lambda weight, rows: rows):
            packing.pack_linear_weights(packed, rows)
    else:
        packing.pack_linear_weights(packed, rows)
    if fuse:
        fusion.fuse_gelu(packed)
        fusion.fuse_residual_add(packed)
    if variant.endswith("+ norm kernel"):  # per shape the faster of the add post-op and the kernel
        fusion.choose_norm_kernel(packed, rows)
    return packed


def models() -> list[tuple[str, torch.nn.Module, list[tuple[int, int]], str | None]]:
    out = []
    try:
        minilm, _ = load_minilm()
        out.append(("all-MiniLM-L6-v2", minilm, [(1, 16), (4, 32), (32, 32), (32, 128)], None))
    except AssetUnavailableError as err:  # the asset is optional: say why it is missing
        out.append(("all-MiniLM-L6-v2", None, [], f"not measured: {err}"))
    bert = load_model("bert-base-uncased", "sequence-classification", random_weights=True,
                      attn_implementation="sdpa")
    out.append(("bert-base (random weights)", bert, [(1, 16), (8, 32), (8, 128)], None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("bench-results/packed_linear.json"))
    args = parser.parse_args()
    rows = []
    for name, model, shapes, note in models():
        if model is None:
            rows.append({"model": name, "note": note})
            print(f"{name}: {note}")
            continue
        plain = model.eval().to(DTYPES[args.dtype])
        for batch, seq in shapes:
            ids = torch.randint(1000, 2000, (batch, seq), generator=torch.Generator().manual_seed(0))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            variants = {v: packed_copy(plain, batch * seq, v) for v in VARIANTS}
            calls = {k: (lambda m=m, inputs=inputs: m(**inputs)[0]) for k, m in variants.items()}
            with torch.no_grad():
                ref = calls["plain"]().float().flatten(0, -2)
                cosine = {k: torch.nn.functional.cosine_similarity(
                    calls[k]().float().flatten(0, -2), ref, dim=-1).min().item() for k in calls}
                timed = time_rounds(calls, rounds=args.rounds, runs=args.runs)
            med = {k: t["median_ms"] for k, t in timed.items()}
            row = {"model": name, "shape": [batch, seq],
                   **round_timings(timed),
                   "speedup_over_plain": {k: round(med["plain"] / v, 3) for k, v in med.items()},
                   "min_cosine_to_plain": {k: round(v, 6) for k, v in cosine.items()}}
            rows.append(row)
            print(f"{name} {batch}x{seq}: " + ", ".join(
                f"{k} {med[k]:.1f} ms ({row['speedup_over_plain'][k]}x, min cos "
                f"{row['min_cosine_to_plain'][k]:.5f})" for k in VARIANTS), flush=True)
    write_study(args.output, rows, dtype=args.dtype)


if __name__ == "__main__":
    main()
