"""Gate values of every precision on real weights: all-MiniLM-L6-v2 and SmolLM2-135M.

For each precision the model is optimized the library's way (verify on, compile off so the run is
short; compile does not change the numbers a gate sees) and then measured again on a larger set of
real review sentences with the same measures the gates use (cosine and argmax for the encoder,
teacher-forced next-token agreement, mean KL and top-5 overlap for the decoder). The thresholds in
``torchbridge.precisions`` were set from these values; docs/precisions.md lists them.

    python benchmarks/calibrate_gates.py [--sentences 128] [--device auto]
                                         [--output bench-results/gates.json]

The fp32 reference always runs on the CPU; ``--device`` places the optimized candidates (a
precision the device cannot compute is listed with the reason).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from torchbridge.bench.assets._fetch import AssetUnavailableError
from torchbridge.bench.assets.minilm import minilm_dir, review_sentences
from torchbridge.bench.assets.smollm2 import smollm2_dir
from torchbridge.bench.environment import env_report
from torchbridge.models.text import TextModelConfig, TextModelOptimizer
from torchbridge.pipeline.loading import load_model, load_tokenizer
from torchbridge.pipeline.verify import compare_causal, compare_encoder
from torchbridge.precisions import PrecisionNotSupportedError, precision

CANDIDATES = {  # (dtype, weight format) per model kind
    "encoder": [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                (torch.float32, "int8-dynamic"), (torch.bfloat16, "int8-dynamic"),
                (torch.float32, "int8-static"), (torch.bfloat16, "int8-static"),
                (torch.float32, "int8-weight-only"), (torch.bfloat16, "fp8-weight-only")],
    "causal-lm": [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                  (torch.float32, "int8-weight-only"), (torch.bfloat16, "int8-weight-only"),
                  (torch.float32, "int8-dynamic"),
                  (torch.bfloat16, "fp8-weight-only")],
}


def _measure(folder: Path, task: str, kind: str, batch: dict[str, torch.Tensor],
             device: str) -> list[dict]:
    reference = load_model(folder, task)
    with torch.no_grad():
        ref_out = reference(**batch)
    rows = []
    for dtype, fmt in CANDIDATES[kind]:
        name = fmt or {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        label = f"{name} over {str(dtype).replace('torch.', '')}" if fmt else name
        config = TextModelConfig(dtype=dtype, quantization=fmt, use_torch_compile=False,
                                 warmup_steps=0, verify=True, device=device)
        opt = TextModelOptimizer(config)
        t0 = time.perf_counter()
        try:
            model = opt.optimize(str(folder), task=task)
        except (PrecisionNotSupportedError, AssertionError, RuntimeError) as err:
            rows.append({"precision": label, "error": f"{type(err).__name__}: {err}"[:300]})
            continue
        with torch.no_grad():
            out = model(**{k: v.to(opt.plan.device.torch_device) for k, v in batch.items()})
        gate = precision(fmt).gate if fmt else precision(name).gate
        if kind == "encoder":
            wide = compare_encoder(ref_out, out, batch["attention_mask"], gate, text="real text")
        else:
            wide = compare_causal(ref_out.logits, out.logits, batch["attention_mask"], gate,
                                  text="real text")
        rows.append({"precision": label, "gate": vars(gate), "optimize_s": time.perf_counter() - t0,
                     "verify_in_optimize": opt.report.verify.measures,
                     "float_layers": opt.report.float_layers,
                     "generation_check": (opt.report.generation or {}).get("verify"),
                     "real_sentences": wide.measures, "passes_on_real_sentences": wide.passed})
        print(json.dumps(rows[-1], default=str))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=128)
    parser.add_argument("--output", type=Path, default=Path("bench-results/gates.json"))
    parser.add_argument("--device", default="auto", help="where the optimized candidates run")
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"],
                        choices=["minilm", "smollm2"])
    args = parser.parse_args()
    sentences = review_sentences(args.sentences)
    doc: dict = {"env": env_report(args.device), "sentences": len(sentences), "models": {}}
    models = {"minilm": ("all-MiniLM-L6-v2", minilm_dir, "feature-extraction", "encoder"),
              "smollm2": ("SmolLM2-135M", smollm2_dir, "causal-lm", "causal-lm")}
    for label, fetch, task, kind in (models[m] for m in args.models):
        try:
            folder = fetch()
        except AssetUnavailableError as err:
            doc["models"][label] = {"skipped": str(err)}
            continue
        tokenizer = load_tokenizer(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = dict(tokenizer(sentences, padding=True, truncation=True, max_length=96,
                               return_tensors="pt"))
        batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
        doc["models"][label] = _measure(folder, task, kind, batch, args.device)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
