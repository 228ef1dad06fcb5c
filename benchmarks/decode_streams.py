"""How many weight streams a batch-1 projection should read at once (generation/projections.py).

GPT-2 (random weights) in each weight format the decoder reads through its own reduction (fp32,
bf16, int8-weight-only, int8-dynamic: the token quantized, its levels reduced), two generators
each: the decode step compiled with every projection as
one reduction over its whole weight (GEMV_STREAMS = 1) and as GEMV_STREAMS blocks of rows
reduced in one loop (the library's setting). 50 greedy tokens from a 16-token prompt, rounds
interleaved with the order alternating; decode ms/token from the generator's own stats (the
prefill and the first call apart), median and p90 over rounds, GB/s of weights read per token,
and whether the two produced the same tokens (summation order differs, so a near-tie may flip).
Writes JSON:

    python benchmarks/decode_streams.py --output bench-results/decode_streams.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from unittest import mock

import torch

from torchbridge.backends import describe, detect
from torchbridge.generation import projections
from torchbridge.generation.generator import FastGenerator
from torchbridge.pipeline.loading import load_model
from torchbridge.precisions import precision


def build(fmt: str) -> torch.nn.Module:
    model = load_model("gpt2", "causal-lm", random_weights=True).eval()
    if fmt == "bf16":
        return model.to(torch.bfloat16)
    if fmt in ("int8-weight-only", "int8-dynamic"):
        with torch.no_grad():
            return precision(fmt).quantize(model, (), None)
    return model


def generate(gen: FastGenerator, streams: int, prompt: torch.Tensor, tokens: int) -> torch.Tensor:
    """The generator's tokens with its projections read as ``streams`` blocks (compiled so)."""
    with mock.patch.object(projections, "GEMV_STREAMS", streams):
        return gen.generate(prompt, max_new_tokens=tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--formats", default="fp32,bf16,int8-weight-only,int8-dynamic")
    parser.add_argument("--streams", default=f"1,{projections.GEMV_STREAMS}",
                        help="stream counts to compare, the first is the reference")
    parser.add_argument("--output", type=Path, default=Path("bench-results/decode_streams.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(1000, 20000, (1, 16), generator=torch.Generator().manual_seed(0))
    streams = tuple(int(k) for k in args.streams.split(","))
    rows = []
    for fmt in args.formats.split(","):
        model = build(fmt)
        gens = {k: FastGenerator(model) for k in streams}
        outputs, per_token, first_s = {}, {k: [] for k in streams}, {}

        with torch.inference_mode():
            for k in streams:
                outputs[k] = generate(gens[k], k, prompt, args.tokens)  # compiles the step
                first_s[k] = round(gens[k].stats["compile_s"], 1)
                generate(gens[k], k, prompt, args.tokens)  # warm-up
            for r in range(args.rounds):
                for k in (streams if r % 2 else streams[::-1]):
                    generate(gens[k], k, prompt, args.tokens)
                    per_token[k].append(gens[k].stats["decode_ms_per_token"])
        weight_bytes = gens[streams[0]].stats["weight_bytes_per_token"]
        med = {k: statistics.median(v) for k, v in per_token.items()}
        ref = streams[0]
        row = {"format": fmt,
               "decode_ms_per_token_median": {str(k): round(v, 2) for k, v in med.items()},
               "decode_ms_per_token_p90": {str(k): round(statistics.quantiles(v, n=10)[-1], 2)
                                           for k, v in per_token.items()},
               "compile_s": {str(k): v for k, v in first_s.items()},
               "speedup_over_first": {str(k): round(med[ref] / v, 3) for k, v in med.items()},
               "same_tokens_as_first": {str(k): bool(torch.equal(outputs[ref], v))
                                        for k, v in outputs.items()},
               "gb_per_s": {str(k): round(weight_bytes / v / 1e6, 1) for k, v in med.items()}}
        rows.append(row)
        print(f"{fmt:>17}: " + ", ".join(
            f"{k} stream(s) {med[k]:.2f} ms/token ({row['speedup_over_first'][str(k)]}x, "
            f"same tokens: {row['same_tokens_as_first'][str(k)]})" for k in streams), flush=True)
    result = {"device": describe(detect("cpu")), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "model": "gpt2 (random weights)",
              "tokens": args.tokens, "rounds": args.rounds, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
