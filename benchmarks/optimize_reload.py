"""What `torchbridge optimize --output DIR` saves, measured: time to a first answer, each in a fresh
process with an empty inductor cache, for

  cold     TextModelOptimizer().optimize(MODEL) (load fp32, plan, convert, verify, compile, warm up),
           with torchbridge's kernel cache empty too (built on first use, torchbridge/kernels)
  saved    TextModelOptimizer().optimize(DIR)    (the saved plan + converted weights, no verify),
           compile cache artifacts loaded when the plan compiles; the kernels built by the
           `torchbridge optimize` run before it, as on a machine that optimized the model before
  no-cache the same with the compile-cache file hidden

    python benchmarks/optimize_reload.py MODEL [--random-weights] [--task T] [--output FILE]

Writes a JSON record (default bench-results/optimize_reload.json) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
t0 = time.perf_counter()
mode, src, task, random = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if mode == "cold":
    from torchbridge.models.text import TextModelConfig, TextModelOptimizer
    model = TextModelOptimizer(TextModelConfig(random_weights=random)).optimize(src, task=task)
else:
    from torchbridge.models.text import TextModelOptimizer
    model = TextModelOptimizer().optimize(src)
ready = time.perf_counter() - t0
ids = torch.randint(1000 if model.config.vocab_size > 5000 else 1, model.config.vocab_size - 1,
                    (1, 16))
t1 = time.perf_counter()
with torch.no_grad():
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
first = time.perf_counter() - t1
print(json.dumps({"ready_s": ready, "first_call_s": first, "total_s": ready + first}))
"""


def child(mode: str, src: str, task: str, random: bool, kernels: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:  # a cold compile cache each
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHBRIDGE_KERNELS=str(kernels))
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, src, task, "1" if random else "0"],
                              capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--task", default="sequence-classification")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--output", type=Path, default=Path("bench-results/optimize_reload.json"))
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="tb-optimized-")  # removed when main returns
    out_dir = Path(tmp.name) / "saved"
    cmd = ["torchbridge", "optimize", args.model, "--task", args.task, "--output", str(out_dir)]
    if args.random_weights:
        cmd.append("--random-weights")
    kernels = Path(tmp.name) / "kernels"  # this machine's kernel cache, as the optimize run left it
    subprocess.run([sys.executable, "-m", "torchbridge.cli", *cmd[1:]], check=True,
                   capture_output=True, env=dict(os.environ, TORCHBRIDGE_KERNELS=str(kernels)))
    record = {"model": args.model, "task": args.task, "command": " ".join(cmd),
              "files": sorted(f.name for f in out_dir.iterdir())}
    record["cold"] = child("cold", args.model, args.task, args.random_weights,
                           Path(tmp.name) / "no-kernels-yet")
    record["saved"] = child("saved", str(out_dir), args.task, False, kernels)
    cache = out_dir / "compile_cache.bin"
    if cache.exists():
        cache.rename(out_dir / "compile_cache.hidden")
        record["saved_no_cache"] = child("saved", str(out_dir), args.task, False, kernels)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
