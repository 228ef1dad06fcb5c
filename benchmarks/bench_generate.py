"""Benchmark text generation: HF `generate` (eager fp32 baseline, sdpa) vs FastGenerator.

Random weights from the configs (speed does not depend on the values): `GPT2Config()` is gpt2,
`GPT2Config(n_embd=1024, n_layer=24, n_head=16)` is gpt2-medium. Every variant runs in the same
process as the baseline, so the ratios come from one run of this noisy shared machine.

For each variant: time to first token (a 1-token generate, prefill + first selection), total time
for N new tokens, ms/token of decoding ((total - ttft) / (N - 1)), tokens/s, GB/s of weights read
per decoded token, compile time apart (the warm-up call), median and p90 over --repeats runs after
warm-up, and greedy-token agreement with the fp32 eager baseline.

    python benchmarks/bench_generate.py --models gpt2 --batch 1 --out bench_generate.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch
import transformers

from torchbridge.generation import FastGenerator
from torchbridge.quantization import quantize_weights_int8

MODELS = {
    "gpt2": {},
    "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
}
VARIANTS = ("hf_eager_fp32", "hf_sdpa_fp32", "fast_fp32", "fast_bf16", "fast_int8")


def build(name: str, attn: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**MODELS[name])
    cfg._attn_implementation = attn
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # No eos: every run generates exactly N tokens, so timings compare equal work.
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model


def hf_bytes_per_token(model: torch.nn.Module) -> int:
    """Weights a decode step reads: all parameters except the position table (one row read)."""
    wpe = model.transformer.wpe.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not wpe)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def time_calls(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def run_variant(variant: str, base: torch.nn.Module, name: str, ids: torch.Tensor,
                n_new: int, repeats: int) -> tuple[dict[str, Any], torch.Tensor]:
    if variant.startswith("hf_"):
        model = base if variant == "hf_eager_fp32" else build(name, "sdpa")
        if variant != "hf_eager_fp32":
            model.load_state_dict(base.state_dict())
        nbytes = hf_bytes_per_token(model)

        def gen(n: int) -> torch.Tensor:
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False)
        compile_s = 0.0
    else:
        prec = variant.split("_")[1]
        model = copy.deepcopy(base)
        if prec == "bf16":
            model = model.to(torch.bfloat16)
        elif prec == "int8":
            quantize_weights_int8(model)
        fast = FastGenerator(model, compile=True)
        nbytes = fast.stats["weight_bytes_per_token"]

        def gen(n: int) -> torch.Tensor:
            return fast.generate(ids, max_new_tokens=n, min_new_tokens=n)
        t = time.perf_counter()
        gen(3)  # compiles the decode step for this (batch, cache bucket)
        compile_s = time.perf_counter() - t
    with torch.inference_mode():
        tokens = gen(n_new)  # warm-up at full length
        gen(1)
        full = time_calls(lambda: gen(n_new), repeats)
        first = time_calls(lambda: gen(1), repeats)
    total, ttft = statistics.median(full), statistics.median(first)
    ms_tok = (total - ttft) / (n_new - 1)
    b = ids.shape[0]
    res = {
        "variant": variant,
        "total_ms_median": total,
        "total_ms_p90": pct(full, 0.9),
        "ttft_ms_median": ttft,
        "ttft_ms_p90": pct(first, 0.9),
        "decode_ms_per_token": ms_tok,
        "tokens_per_s": b * n_new / (total / 1e3),
        "weight_mb_per_token": nbytes / 1e6,
        "weight_gb_per_s": nbytes / (ms_tok / 1e3) / 1e9,
        "compile_s": compile_s,
    }
    if not variant.startswith("hf_"):
        res["compiles"] = fast.stats["compiles"]
    return res, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench_generate.json")
    args = ap.parse_args(argv)
    if "hf_eager_fp32" not in args.variants:
        args.variants.insert(0, "hf_eager_fp32")  # ratios need the baseline in the same run

    results = []
    for name in args.models:
        base = build(name, "eager")
        for b in args.batch:
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, base.config.vocab_size, (b, args.prompt_len), generator=g)
            rows, ref_tokens = [], None
            for v in args.variants:
                res, tokens = run_variant(v, base, name, ids, args.new_tokens, args.repeats)
                if ref_tokens is None:
                    ref_tokens = tokens
                new_ref, new = ref_tokens[:, args.prompt_len:], tokens[:, args.prompt_len:]
                res["greedy_agreement_vs_baseline"] = float((new_ref == new).float().mean())
                rows.append(res)
                print(f"{name} b{b} {v:14s} total {res['total_ms_median']:8.1f} ms  "
                      f"ttft {res['ttft_ms_median']:6.1f}  {res['decode_ms_per_token']:6.2f} ms/tok "
                      f"{res['weight_gb_per_s']:5.1f} GB/s  agree {res['greedy_agreement_vs_baseline']:.2f}",
                      flush=True)
            base_ms = rows[0]["total_ms_median"]
            for r in rows:
                r["speedup_vs_hf_eager_fp32"] = base_ms / r["total_ms_median"]
            results.append({"model": name, "batch": b, "prompt_len": args.prompt_len,
                            "new_tokens": args.new_tokens, "variants": rows})
    report = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "repeats": args.repeats,
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    for r in results:
        print(f"{r['model']} batch {r['batch']}: " + ", ".join(
            f"{v['variant']} {v['speedup_vs_hf_eager_fp32']:.2f}x" for v in r["variants"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
