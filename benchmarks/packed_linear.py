"""What packing the bf16 linear weights for oneDNN buys an uncompiled CPU encoder (pipeline/packing.py).

For each model and shape: the same bf16 model with plain ``nn.Linear`` weights and with
``PackedLinear`` (weights reordered once), timed interleaved in this one process (rounds of
``--runs`` calls each, order alternating, median of the per-round medians and p90), the first
call apart, and the min cosine of the packed model's outputs to the plain one's. Models: real
all-MiniLM-L6-v2 when its asset can be fetched (skipped with the reason otherwise) and BERT-base
with random weights (speed does not depend on them). Writes JSON:

    python benchmarks/packed_linear.py --output bench-results/packed_linear.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from torchbridge.backends import describe, detect
from torchbridge.bench.harness import time_callable
from torchbridge.pipeline.loading import load_model
from torchbridge.pipeline.packing import pack_linear_weights


def models() -> list[tuple[str, torch.nn.Module, list[tuple[int, int]], str | None]]:
    out = []
    try:
        from transformers import AutoModel

        from torchbridge.bench.assets.minilm import minilm_dir

        minilm = AutoModel.from_pretrained(minilm_dir(), attn_implementation="sdpa")
        out.append(("all-MiniLM-L6-v2", minilm, [(1, 16), (4, 32), (32, 32)], None))
    except Exception as err:  # noqa: BLE001 - the asset is optional: say why it is missing
        out.append(("all-MiniLM-L6-v2", None, [], f"not measured: {err}"))
    bert = load_model("bert-base-uncased", "sequence-classification", random_weights=True,
                      attn_implementation="sdpa")
    out.append(("bert-base (random weights)", bert, [(1, 16), (8, 128)], None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        plain = model.eval().to(torch.bfloat16)
        packed = copy.deepcopy(plain)
        pack_linear_weights(packed, rows_hint=32)
        for batch, seq in shapes:
            ids = torch.randint(1000, 2000, (batch, seq), generator=torch.Generator().manual_seed(0))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            calls = {k: (lambda m=m, inputs=inputs: m(**inputs)[0])
                     for k, m in (("plain", plain), ("packed", packed))}
            with torch.no_grad():
                a, b = (calls[k]().float().flatten(0, -2) for k in ("plain", "packed"))
                cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
                timings: dict[str, list] = {"plain": [], "packed": []}
                for r in range(args.rounds):
                    for k in (("plain", "packed") if r % 2 == 0 else ("packed", "plain")):
                        timings[k].append(time_callable(calls[k], runs=args.runs, warmup=1))
            med = {k: statistics.median(t.median_s for t in v) * 1e3 for k, v in timings.items()}
            p90 = {k: statistics.median(t.p90_s for t in v) * 1e3 for k, v in timings.items()}
            row = {"model": name, "shape": [batch, seq], "plain_ms": round(med["plain"], 2),
                   "packed_ms": round(med["packed"], 2), "plain_p90_ms": round(p90["plain"], 2),
                   "packed_p90_ms": round(p90["packed"], 2),
                   "first_call_s": {k: round(v[0].first_call_s, 3) for k, v in timings.items()},
                   "speedup": round(med["plain"] / med["packed"], 3), "min_cosine": round(cosine, 6)}
            rows.append(row)
            print(f"{name} {batch}x{seq}: plain {row['plain_ms']} ms, packed {row['packed_ms']} ms, "
                  f"{row['speedup']}x, min cosine {row['min_cosine']}", flush=True)
    result = {"device": describe(detect("cpu")), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
