"""How a busy core slows TorchBridge's CPU paths, by how OpenMP threads wait (cpu_threads.py).

Each workload runs in a fresh process per spin setting (libgomp reads GOMP_SPINCOUNT once, when
torch loads it), first on the machine as it is, then with one core kept busy by a spinning
process pinned to it (what a noisy neighbour or a second job does to a shared machine):

* GPT-2 (random weights) int8-weight-only, batch-1 greedy decoding of 50 tokens after an 8-token
  prompt through the compiled decode step: decode ms per token and the whole call;
* BERT-base (random weights) in the default mode, a batch of 8 x 128: ms per forward.

Median and p90 after warm-up in each process; over ``--rounds`` processes per setting (in
alternating order) the median, and its ratio against libgomp's default spin in the same
condition. The conditions run one after the other, so compare within a condition. Writes JSON:

    python benchmarks/cpu_contention.py --output bench-results/cpu_contention.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from torchbridge.cpu_threads import SHARED_CORES_SPIN, SPIN_VARIABLE

WORKLOADS = ("gpt2-int8-decode", "bert-base-bf16")


def _summary(times_s: list[float]) -> dict[str, float]:
    ordered = sorted(times_s)
    return {"median_ms": round(statistics.median(ordered) * 1e3, 2),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 2)}


def child(workload: str, runs: int) -> dict:
    """One workload's timings in this process (the parent set the spin before torch loaded)."""
    import torch

    from torchbridge.pipeline.loading import load_model

    if workload == "gpt2-int8-decode":
        from torchbridge.generation.generator import FastGenerator
        from torchbridge.precisions import precision

        model = load_model("gpt2", "causal-lm", random_weights=True).eval()
        with torch.no_grad():
            model = precision("int8-weight-only").quantize(model, (), None)
        gen = FastGenerator(model)
        prompt = torch.randint(1000, 20000, (1, 8), generator=torch.Generator().manual_seed(0))
        call, per_token = [], []
        with torch.inference_mode():
            for _ in range(2):  # compile, warm-up
                gen.generate(prompt, max_new_tokens=50)
            for _ in range(runs):
                t = time.perf_counter()
                gen.generate(prompt, max_new_tokens=50)
                call.append(time.perf_counter() - t)
                per_token.append(gen.stats["decode_ms_per_token"] / 1e3)
        return {**_summary(call), "decode_ms_per_token": _summary(per_token)["median_ms"]}

    from torchbridge.models.text import TextModelConfig, TextModelOptimizer

    model = load_model("bert-base-uncased", "sequence-classification", random_weights=True).eval()
    opt = TextModelOptimizer(TextModelConfig()).optimize(model, task="sequence-classification")
    ids = torch.randint(1000, 20000, (8, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            opt(input_ids=ids, attention_mask=mask)
        for _ in range(runs):
            t = time.perf_counter()
            opt(input_ids=ids, attention_mask=mask)
            times.append(time.perf_counter() - t)
    return _summary(times)


def run_child(workload: str, spin: str, runs: int, timeout_s: float) -> dict:
    env = dict(os.environ)
    env.pop(SPIN_VARIABLE, None)
    if spin != "default":
        env[SPIN_VARIABLE] = spin
    cmd = [sys.executable, __file__, "--child", workload, "--runs", str(runs)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def busy_core() -> subprocess.Popen:
    """A process spinning on the machine's last core."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    os.sched_setaffinity(hog.pid, {max(os.sched_getaffinity(0))})
    return hog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spins", default=f"default,{SHARED_CORES_SPIN},1000",
                        help="GOMP_SPINCOUNT values to compare ('default': libgomp's own)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--runs", type=int, default=10, help="timed calls per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting")
    parser.add_argument("--conditions", default="as-is,one-core-busy")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    parser.add_argument("--output", type=Path, default=Path("bench-results/cpu_contention.json"))
    parser.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.runs)))
        return
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs at least 2 cores: one is kept busy while the workloads run")

    from torchbridge.bench.environment import env_report

    spins = args.spins.split(",")
    rows, summaries = [], []
    for condition in args.conditions.split(","):
        hog = busy_core() if condition == "one-core-busy" else None
        try:
            for workload in args.workloads.split(","):
                medians: dict[str, list[float]] = {spin: [] for spin in spins}
                for r in range(args.rounds):  # the order alternates: a slow spell hits every setting
                    for spin in spins if r % 2 == 0 else spins[::-1]:
                        result = run_child(workload, spin, args.runs, args.timeout)
                        row = {"condition": condition, "workload": workload, "spin": spin,
                               "round": r, **result}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        if "median_ms" in result:
                            medians[spin].append(result["median_ms"])
                base = statistics.median(medians["default"]) if medians.get("default") else None
                for spin, values in medians.items():
                    if values:
                        summary = {"condition": condition, "workload": workload, "spin": spin,
                                   "median_of_rounds_ms": round(statistics.median(values), 2)}
                        if base:
                            summary["speedup_vs_default"] = round(base / statistics.median(values), 2)
                        summaries.append(summary)
                        print(json.dumps(summary), flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    doc = {"benchmark": "cpu_contention", "env": env_report("cpu"),
           "cores": len(os.sched_getaffinity(0)), "runs": args.runs, "rounds": args.rounds,
           "summary": summaries, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
