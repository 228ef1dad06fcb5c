"""What computing only the first token in a classifier's last layer buys (pipeline/first_token.py).

Two versions of the default optimizer's bf16 CPU sequence classifier, built by the same
`TextModelOptimizer` (packed weights, fusions, fused kernels, padding removed): "every row", with
`first_token_only` switched off, and "first token", as the optimizer builds it. Models: BERT-base
with random weights (speed does not depend on them), and all-MiniLM-L6-v2's real encoder under a
seeded 2-label head (a 6-layer classifier of real weights) when the asset can be fetched. Batches:
8 x 128 full-length and mixed-length padded (rows of 128 down to 32 tokens), and for MiniLM 32
real review sentences. Timed interleaved in this one process (rounds of ``--runs`` calls, order
rotating; median of the per-round medians and p90), the first call apart; with the largest
difference between the two versions' logits. Writes JSON:

    python benchmarks/first_token.py --output bench-results/first_token.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from pathlib import Path
from unittest import mock

import torch

import torchbridge.pipeline.first_token as first_token
from torchbridge.bench.assets._fetch import AssetUnavailableError
from torchbridge.bench.assets.minilm import load_minilm, review_sentences
from torchbridge.bench.harness import round_timings, time_rounds
from torchbridge.bench.report import write_study
from torchbridge.models.text import TextModelConfig, TextModelOptimizer
from torchbridge.pipeline.loading import load_model
from torchbridge.pipeline.verify import padded_batch

VERSIONS = ("every row", "first token")


def optimized(model: torch.nn.Module, batch: int, seq: int, version: str) -> torch.nn.Module:
    off = mock.patch.object(first_token, "first_token_only", lambda model: False)
    with off if version == "every row" else contextlib.nullcontext():
        opt = TextModelOptimizer(TextModelConfig(warmup_batch_size=batch, warmup_seq_len=seq))
        built = opt.optimize(copy.deepcopy(model), task="sequence-classification")
    applied = any(isinstance(m, first_token.FirstTokenLayer) for m in built.modules())
    if applied != (version == "first token"):
        raise RuntimeError(f"{version!r}: the optimizer did not build what was asked")
    return built


def minilm_classifier():
    """all-MiniLM-L6-v2's encoder under a seeded 2-label head, and its tokenizer."""
    from transformers import BertForSequenceClassification

    encoder, tokenizer = load_minilm()
    torch.manual_seed(0)
    model = BertForSequenceClassification(encoder.config).eval()
    missing, _ = model.bert.load_state_dict(encoder.state_dict(), strict=False)
    if any(not name.startswith("pooler") for name in missing):
        raise RuntimeError(f"MiniLM weights left out: {missing}")
    return model, tokenizer


def batches(config, tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    padded = padded_batch(config, 8, 128)
    out = {"8x128 full": {"input_ids": padded["input_ids"],
                          "attention_mask": torch.ones_like(padded["attention_mask"])},
           "8x128 padded (128..32)": padded}
    if tokenizer is not None:
        enc = tokenizer(review_sentences(32), padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        out[f"32 reviews (x{enc['input_ids'].shape[1]})"] = {
            k: enc[k] for k in ("input_ids", "attention_mask")}
    return out


def models():
    """(name, model or None, tokenizer or None, note)."""
    bert = load_model("bert-base-uncased", "sequence-classification", random_weights=True,
                      attn_implementation="sdpa")
    out = [("bert-base (random weights)", bert, None, None)]
    try:
        out.append(("all-MiniLM-L6-v2 encoder, seeded head", *minilm_classifier(), None))
    except AssetUnavailableError as err:  # the asset is optional: say why it is missing
        out.append(("all-MiniLM-L6-v2", None, None, f"not measured: {err}"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--output", type=Path, default=Path("bench-results/first_token.json"))
    args = parser.parse_args()
    rows = []
    for name, model, tokenizer, note in models():
        if model is None:
            rows.append({"model": name, "note": note})
            print(f"{name}: {note}")
            continue
        built = {v: optimized(model, 8, 128, v) for v in VERSIONS}
        for label, inputs in batches(model.config, tokenizer).items():
            calls = {k: (lambda m=m, inputs=inputs: m(**inputs).logits)
                     for k, m in built.items()}
            with torch.no_grad():
                every, first = (calls[k]().float() for k in VERSIONS)
                timed = time_rounds(calls, rounds=args.rounds, runs=args.runs)
            med = {k: t["median_ms"] for k, t in timed.items()}
            row = {"model": name, "batch": label,
                   "shape": list(inputs["input_ids"].shape), **round_timings(timed),
                   "speedup": round(med["every row"] / med["first token"], 3),
                   "max_logit_diff_between": float((every - first).abs().max()),
                   "argmax_agreement": float((every.argmax(-1) == first.argmax(-1))
                                             .float().mean())}
            rows.append(row)
            print(f"{name}, {label}: every row {med['every row']:.1f} ms, first token "
                  f"{med['first token']:.1f} ms ({row['speedup']}x), max logit diff "
                  f"{row['max_logit_diff_between']:.2e}", flush=True)
    write_study(args.output, rows)


if __name__ == "__main__":
    main()
