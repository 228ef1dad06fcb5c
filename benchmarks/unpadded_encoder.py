"""What removing padding inside the encoder buys mixed-length batches (pipeline/unpadding.py).

Two versions of the optimizer's bf16 CPU encoder (packed weights and the fusions), each behind
its padding trimmer as the optimizer sets it up: "grouped" runs a mixed-length batch in groups of
similar length, each trimmed to its longest row (the trimmer alone); "padding removed" runs it as
one call whose encoder computes the token-wise work on real tokens only. Batches: the benchmark's
padded 8 x 128 (rows of 128 down to 32 tokens), the same rows full-length, one long row with
seven short ones, and real review sentences (all-MiniLM-L6-v2's tokenizer, in the given order,
batches of 32) when the asset can be fetched. Models: BERT-base with random weights (speed does
not depend on them) and real all-MiniLM-L6-v2. Timed interleaved in this one process (rounds of
``--runs`` calls, order rotating; median of the per-round medians and p90), the first call apart;
with the min cosine between the two versions' outputs at real positions. Writes JSON:

    python benchmarks/unpadded_encoder.py --output bench-results/unpadded_encoder.json
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from torchbridge.bench.assets._fetch import AssetUnavailableError
from torchbridge.bench.assets.minilm import load_minilm, review_sentences
from torchbridge.bench.harness import round_timings, time_rounds
from torchbridge.bench.report import write_study
from torchbridge.pipeline import fusion, packing
from torchbridge.pipeline.loading import load_model
from torchbridge.pipeline.padding import wrap_trim_padding
from torchbridge.pipeline.unpadding import remove_padding
from torchbridge.pipeline.verify import padded_batch

VERSIONS = ("grouped", "padding removed")


def versions(model: torch.nn.Module, rows: int, task: str) -> dict[str, torch.nn.Module]:
    packed = copy.deepcopy(model).eval().to(torch.bfloat16)
    fusion.fuse_qkv(packed)
    packing.pack_linear_weights(packed, rows)
    fusion.fuse_gelu(packed)
    fusion.fuse_residual_add(packed)
    unpadded = copy.deepcopy(packed)
    remove_padding(unpadded)
    return {"grouped": wrap_trim_padding(packed, task),
            "padding removed": wrap_trim_padding(unpadded, task, split=False)}


def batches(config, tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    padded = padded_batch(config, 8, 128)
    out = {"8x128 padded (128..32)": padded,
           "8x128 full": {"input_ids": padded["input_ids"],
                          "attention_mask": torch.ones_like(padded["attention_mask"])}}
    skew = padded_batch(config, 8, 128, seed=1)
    skew["attention_mask"][1:, 16:] = 0
    out["8x128, 7 rows of 16"] = skew
    if tokenizer is not None:
        enc = tokenizer(review_sentences(32), padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        out[f"32 reviews (x{enc['input_ids'].shape[1]})"] = {
            k: enc[k] for k in ("input_ids", "attention_mask")}
    return out


def models():
    """(name, model, tokenizer or None, note)."""
    out = []
    try:
        out.append(("all-MiniLM-L6-v2", *load_minilm(), None))
    except AssetUnavailableError as err:  # the asset is optional: say why it is missing
        out.append(("all-MiniLM-L6-v2", None, None, f"not measured: {err}"))
    bert = load_model("bert-base-uncased", "feature-extraction", random_weights=True,
                      attn_implementation="sdpa")
    out.append(("bert-base (random weights)", bert, None, None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--output", type=Path, default=Path("bench-results/unpadded_encoder.json"))
    args = parser.parse_args()
    rows = []
    tokenizer = None
    for name, model, own_tokenizer, note in models():
        tokenizer = own_tokenizer or tokenizer  # BERT-base shares MiniLM's WordPiece vocabulary
        if model is None:
            rows.append({"model": name, "note": note})
            print(f"{name}: {note}")
            continue
        built = versions(model, 8 * 128, "feature-extraction")
        for label, inputs in batches(model.config, tokenizer).items():
            real = inputs["attention_mask"].bool()
            calls = {k: (lambda m=m, inputs=inputs: m(**inputs).last_hidden_state)
                     for k, m in built.items()}
            with torch.no_grad():
                outs = [calls[k]().float()[real] for k in VERSIONS]
                cosine = torch.nn.functional.cosine_similarity(*outs, dim=-1).min().item()
                timed = time_rounds(calls, rounds=args.rounds, runs=args.runs)
            med = {k: t["median_ms"] for k, t in timed.items()}
            row = {"model": name, "batch": label, "shape": list(real.shape),
                   "real_tokens": int(real.sum()),
                   **round_timings(timed),
                   "speedup": round(med["grouped"] / med["padding removed"], 3),
                   "min_cosine_between": round(cosine, 6)}
            rows.append(row)
            print(f"{name}, {label} ({row['real_tokens']} real tokens): grouped "
                  f"{med['grouped']:.1f} ms, padding removed {med['padding removed']:.1f} ms "
                  f"({row['speedup']}x), min cos {cosine:.5f}", flush=True)
    write_study(args.output, rows)


if __name__ == "__main__":
    main()
