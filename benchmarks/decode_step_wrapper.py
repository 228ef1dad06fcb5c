"""What inductor's C++ wrapper buys a CPU decode step that calls oneDNN's int8 linear.

GPT-2 (random weights) quantized int8-dynamic, two generators over the same model: the step
compiled under "reduce-overhead" (the default mode; on a CPU the step's kernels and its 49 int8
linears a token are called from inductor's C++ wrapper, generation/generator.py) and under
"default" (inductor's Python wrapper). 50 greedy tokens from a 16-token prompt, rounds
interleaved with the order alternating; decode ms/token from the generator's own stats (the
prefill and the first call apart), median and p90 over rounds; the tokens of the two are checked
equal. Cold compile times depend on the inductor cache and are reported as measured. Writes JSON:

    python benchmarks/decode_step_wrapper.py --output bench-results/decode_step_wrapper.json
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
from torchbridge.precisions.int8_dynamic import quantize_dynamic_int8

MODES = {"C++ wrapper (reduce-overhead)": "reduce-overhead", "Python wrapper (default)": "default"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--output", type=Path,
                        default=Path("bench-results/decode_step_wrapper.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = quantize_dynamic_int8(load_model("gpt2", "causal-lm", random_weights=True).eval())
    prompt = torch.randint(1000, 20000, (1, 16), generator=torch.Generator().manual_seed(0))
    gens = {name: FastGenerator(model, compile_mode=mode) for name, mode in MODES.items()}
    first_s, outputs, per_token = {}, {}, {name: [] for name in gens}
    with torch.inference_mode():
        for name, gen in gens.items():
            t0 = time.perf_counter()
            outputs[name] = gen.generate(prompt, max_new_tokens=args.tokens)
            first_s[name] = time.perf_counter() - t0  # compiles the step
            gen.generate(prompt, max_new_tokens=args.tokens)  # warm-up
        for r in range(args.rounds):
            for name in (list(gens) if r % 2 else list(reversed(gens))):
                gens[name].generate(prompt, max_new_tokens=args.tokens)
                per_token[name].append(gens[name].stats["decode_ms_per_token"])
    a, b = outputs.values()
    rows = {name: {"cpp_wrapper": gens[name].stats["cpp_wrapper"],
                   "decode_ms_per_token_median": round(statistics.median(v), 2),
                   "decode_ms_per_token_p90": round(statistics.quantiles(v, n=10)[-1], 2),
                   "first_call_s": round(first_s[name], 1)} for name, v in per_token.items()}
    cpp, py = (rows[name]["decode_ms_per_token_median"] for name in MODES)
    result = {"device": describe(detect("cpu")), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "model": "gpt2 (random weights), int8-dynamic",
              "tokens": args.tokens, "rounds": args.rounds, "rows": rows,
              "speedup_of_cpp_wrapper": round(py / cpp, 3), "same_tokens": bool(torch.equal(a, b))}
    for name, row in rows.items():
        print(f"{name:>30}: {row['decode_ms_per_token_median']:6.2f} ms/token "
              f"(p90 {row['decode_ms_per_token_p90']:.2f}), first call {row['first_call_s']} s")
    print(f"C++ wrapper speedup {result['speedup_of_cpp_wrapper']}x, "
          f"same tokens: {result['same_tokens']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
