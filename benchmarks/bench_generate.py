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
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
import transformers

from torchbridge.generation import FastGenerator
from torchbridge.precisions.int8_weight_only import quantize_weights_int8

MODELS = {
    "gpt2": {},
    "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
}
# fast_int8_eager_prompt: the int8 generator with its prompt run eagerly (what compiling the
# prompt's layers buys shows in the time to first token)
VARIANTS = ("hf_eager_fp32", "hf_sdpa_fp32", "fast_fp32", "fast_bf16", "fast_int8",
            "fast_int8_eager_prompt")


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


def make_variant(variant: str, base: torch.nn.Module, name: str, ids: torch.Tensor):
    """Returns (gen(n) -> tokens, weight bytes per token, compile seconds, FastGenerator|None)."""
    if variant.startswith("hf_"):
        model = base
        if variant != "hf_eager_fp32":
            model = build(name, "sdpa")
            model.load_state_dict(base.state_dict())
        mask = torch.ones_like(ids)

        def gen(n: int) -> torch.Tensor:
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False)
        return gen, hf_bytes_per_token(model), 0.0, None
    prec = variant.split("_")[1]
    model = copy.deepcopy(base)
    if prec == "bf16":
        model = model.to(torch.bfloat16)
    elif prec == "int8":
        quantize_weights_int8(model)
    fast = FastGenerator(model, compile=True, compile_prompt=not variant.endswith("eager_prompt"))

    def gen(n: int) -> torch.Tensor:
        return fast.generate(ids, max_new_tokens=n, min_new_tokens=n)
    t = time.perf_counter()
    gen(3)  # compiles the decode step for this (batch, cache bucket)
    return gen, fast.stats["weight_bytes_per_token"], time.perf_counter() - t, fast


def summarize(variant: str, full: list[float], first: list[float], n_new: int, batch: int,
              nbytes: int, compile_s: float, fast: FastGenerator | None) -> dict[str, Any]:
    total, ttft = statistics.median(full), statistics.median(first)
    ms_tok = (total - ttft) / (n_new - 1)
    res = {
        "variant": variant,
        "total_ms_median": total,
        "total_ms_p90": pct(full, 0.9),
        "ttft_ms_median": ttft,
        "ttft_ms_p90": pct(first, 0.9),
        "decode_ms_per_token": ms_tok,
        "tokens_per_s": batch * n_new / (total / 1e3),
        "weight_mb_per_token": nbytes / 1e6,
        "weight_gb_per_s": nbytes / (ms_tok / 1e3) / 1e9,
        "compile_s": compile_s,
    }
    if fast is not None:
        res["compiles"] = fast.stats["compiles"] + fast.stats["prompt_compiles"]
        res["decode_ms_per_token_internal"] = fast.stats["decode_ms_per_token"]
    return res


def bench_case(name: str, base: torch.nn.Module, ids: torch.Tensor, variants: list[str],
               n_new: int, repeats: int) -> list[dict[str, Any]]:
    built = {v: make_variant(v, base, name, ids) for v in variants}
    tokens, full, first = {}, {v: [] for v in variants}, {v: [] for v in variants}
    with torch.inference_mode():
        for v, (gen, *_rest) in built.items():  # warm-up at full length, keep greedy tokens
            tokens[v] = gen(n_new)
            gen(1)
        # Round-robin: each repeat times every variant once, so load changes on this shared
        # machine hit all variants alike and the ratios stay meaningful.
        for _ in range(repeats):
            for v, (gen, *_rest) in built.items():
                full[v] += time_calls(lambda gen=gen: gen(n_new), 1)
                first[v] += time_calls(lambda gen=gen: gen(1), 1)
    rows = []
    ref = tokens[variants[0]][:, ids.shape[1]:]
    for v, (_gen, nbytes, compile_s, fast) in built.items():
        res = summarize(v, full[v], first[v], n_new, ids.shape[0], nbytes, compile_s, fast)
        res["greedy_agreement_vs_baseline"] = float(
            (tokens[v][:, ids.shape[1]:] == ref).float().mean())
        rows.append(res)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench_generate.json")
    args = ap.parse_args(argv)
    if "hf_eager_fp32" not in args.variants:
        args.variants.insert(0, "hf_eager_fp32")  # ratios need the baseline in the same run

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = []
    for name in args.models:
        base = build(name, "eager")
        for b in args.batch:
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, base.config.vocab_size, (b, args.prompt_len), generator=g)
            rows = bench_case(name, base, ids, args.variants, args.new_tokens, args.repeats)
            for res in rows:
                print(f"{name} b{b} {res['variant']:14s} total {res['total_ms_median']:8.1f} ms  "
                      f"ttft {res['ttft_ms_median']:6.1f}  {res['decode_ms_per_token']:6.2f} "
                      f"ms/tok {res['weight_gb_per_s']:5.1f} GB/s  "
                      f"agree {res['greedy_agreement_vs_baseline']:.2f}", flush=True)
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
        # Other processes share these 2 cores: load average above ~2 means the absolute times
        # are inflated (OpenMP threads wait for each other); the ratios are from one run.
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "command": " ".join(sys.argv),
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
