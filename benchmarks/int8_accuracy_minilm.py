"""How much accuracy dynamic int8 costs on real weights, and what the accuracy control buys back.

Real all-MiniLM-L6-v2 (torchbridge.bench.assets.minilm) embeds real review sentences in padded
batches; each variant's mean-pooled sentence embeddings are compared with the fp32 eager ones by
cosine (min and mean over the evaluation sentences). Variants: bf16 (the float baseline every
int8 variant starts from), plain int8 (every projection), int8 with SmoothQuant smoothing at a
few alphas, and accuracy-controlled int8 (torchbridge.precisions.accuracy_control) whose gate is
the min embedding cosine on separate calibration sentences (never the evaluation ones).

    python benchmarks/int8_accuracy_minilm.py --output bench-results/int8_accuracy_minilm.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchbridge.precisions.accuracy_control import Int8AccuracyError, accuracy_controlled_int8
from torchbridge.precisions.int8_dynamic import Int8DynamicLinear, quantize_dynamic_int8
from torchbridge.precisions.smoothing import quantize_dynamic_int8_smoothed


def batches(tokenizer, sentences: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=128,
                      return_tensors="pt") for i in range(0, len(sentences), batch_size)]


@torch.no_grad()
def embed(model: nn.Module, inputs: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    out = []
    for b in inputs:
        hidden = model(**b).last_hidden_state.float()
        mask = b["attention_mask"].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1))  # mean pooling over real tokens
    return torch.cat(out)


def cosines(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "p01_cosine": float(cos.quantile(0.01))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="evaluation sentences")
    parser.add_argument("--calibration", type=int, default=64, help="gate/calibration sentences")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gate-cosine", type=float, default=0.995,
                        help="accuracy control: min embedding cosine on the calibration sentences")
    parser.add_argument("--alphas", default="0.5,0.8")
    parser.add_argument("--output", type=Path, default=Path("bench-results/int8_accuracy_minilm.json"))
    args = parser.parse_args()

    from transformers import AutoModel, AutoTokenizer

    from torchbridge.bench.assets.minilm import minilm_dir, review_sentences

    folder = minilm_dir()
    sentences = review_sentences()
    if len(sentences) < args.sentences + args.calibration:
        raise SystemExit(f"only {len(sentences)} sentences; need {args.sentences + args.calibration}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    evaluation = batches(tokenizer, sentences[:args.sentences], args.batch_size)
    calib_sentences = sentences[-args.calibration:]
    calibration = batches(tokenizer, calib_sentences, args.batch_size)
    calib_inputs = tokenizer(calib_sentences[:16], padding=True, truncation=True, max_length=128,
                             return_tensors="pt")
    reference = AutoModel.from_pretrained(folder, attn_implementation="eager").float().eval()
    ref_eval, ref_calib = embed(reference, evaluation), embed(reference, calibration)

    def base(dtype: torch.dtype) -> nn.Module:
        model = copy.deepcopy(reference)
        model.set_attn_implementation("sdpa")
        return model.to(dtype)

    def gate(model: nn.Module) -> tuple[bool, dict]:
        values = cosines(embed(model, calibration), ref_calib)
        return values["min_cosine"] >= args.gate_cosine, values

    rows: dict[str, Any] = {}

    def measure(name: str, model: nn.Module, **extra: Any) -> None:
        row = {**cosines(embed(model, evaluation), ref_eval), **extra,
               "int8_layers": sum(isinstance(m, Int8DynamicLinear) for m in model.modules())}
        rows[name] = row
        print(f"{name:>44}: min {row['min_cosine']:.5f}  mean {row['mean_cosine']:.5f}"
              f"  int8 layers {row['int8_layers']}", flush=True)

    alphas = [float(a) for a in args.alphas.split(",") if a]
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        measure(f"{dtype_name} (no int8)", base(dtype))
        for alpha in [None, *alphas]:
            model = base(dtype)
            tag = "plain" if alpha is None else f"smooth alpha={alpha}"
            if alpha is None:
                quantize_dynamic_int8(model)
            else:
                quantize_dynamic_int8_smoothed(model, dict(calib_inputs), alpha)
            measure(f"{dtype_name} int8 {tag}", model, gate_on_calibration=gate(model)[1])
        for alpha in [None, *alphas]:
            model = base(dtype)
            t0 = time.perf_counter()
            name = f"{dtype_name} int8 accuracy-controlled" + (f" + smooth {alpha}" if alpha else "")
            try:
                _, record = accuracy_controlled_int8(model, gate, sensitivity_inputs=dict(calib_inputs),
                                                     smooth_alpha=alpha)
            except Int8AccuracyError as err:
                rows[name] = {"error": str(err), "record": err.record}
                print(f"{name}: {err}")
                continue
            record["seconds"] = time.perf_counter() - t0
            measure(name, model, control=record)
            print(f"{'':>44}  float: {record['layers_float']}  gate {record['gate']}")
    result = {"model": "sentence-transformers/all-MiniLM-L6-v2 (real weights)",
              "sentences": args.sentences, "calibration_sentences": args.calibration,
              "batch_size": args.batch_size, "gate": f"min embedding cosine >= {args.gate_cosine} "
              "on the calibration sentences", "torch": torch.__version__, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
