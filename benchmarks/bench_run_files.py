"""`torchbridge run` on a 100,000-row file: memory flat, a kill and a rerun lose nothing, bad rows reported.

The claims measured here are about the file runner (streaming, shards, resume, errors), not model
speed, so the model is small: a 2-layer BERT classifier with random weights (hidden 32) and the
real all-MiniLM-L6-v2 WordPiece tokenizer, so tokenization is real work. The texts are real review
sentences (cycled), with bad rows mixed in: empty strings, numbers instead of text, and
over-long texts (the run uses --no-truncation, so those must land in the errors file).

Steps: (1) a 10,000-row run for the memory reference; (2) the 100,000-row run, killed with SIGKILL
after a few shards; (3) the rerun, which must skip the finished shards; then every input id is
looked up in the parts and the errors file (exactly once each). RSS of the `torchbridge run`
process is sampled every 0.2 s during each run.

    python benchmarks/bench_run_files.py --rows 100000 --output bench-results/run_files
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from torchbridge.bench.assets.minilm import minilm_dir, review_sentences
from torchbridge.bench.environment import env_report

LONG = " ".join(["remarkably"] * 600)
ENV = dict(os.environ)  # --threads sets OMP_NUM_THREADS for the `torchbridge run` processes


def make_model(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=512,
                        num_labels=2, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)


def make_input(path: Path, rows: int) -> dict[int, str]:
    """JSONL with ids; returns the ids of the bad rows and the reason they must get."""
    sentences = review_sentences()
    bad: dict[int, str] = {}
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            text: Any = sentences[i % len(sentences)]
            if i % 997 == 5:
                text, bad[i] = "", "empty string"
            elif i % 1499 == 7:
                text, bad[i] = i, "not a string (got int)"
            elif i % 2003 == 11:
                text, bad[i] = LONG, "tokens, more than the model's limit"
            f.write(json.dumps({"id": i, "source": "rt", "text": text}) + "\n")
    return bad


def run(cmd: list[str], *, kill_after_shards: int | None = None, out: Path | None = None
        ) -> dict[str, Any]:
    """Run the CLI, sampling its RSS; optionally SIGKILL it once N shards are done."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    ps = psutil.Process(proc.pid)
    samples: list[tuple[float, float]] = []
    killed = False
    while proc.poll() is None:
        try:
            samples.append((round(time.perf_counter() - t0, 2), ps.memory_info().rss / 2**20))
        except psutil.NoSuchProcess:
            break
        if kill_after_shards and out and len(list((out / "_done").glob("*.json"))) >= kill_after_shards:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    result = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 2),
              "killed": killed, "rss_mb": samples}
    if proc.returncode == 0:
        result["summary"] = json.loads(stdout)
    elif not killed:
        raise RuntimeError(f"torchbridge run failed: {stderr[-2000:]}")
    return result


def rss_profile(samples: list[tuple[float, float]]) -> dict[str, float]:
    values = [mb for _, mb in samples]
    half = len(values) // 2
    return {"peak_mb": round(max(values), 1),
            "peak_first_half_mb": round(max(values[:half] or values), 1),
            "peak_second_half_mb": round(max(values[half:] or values), 1)}


def check_output(out: Path, rows: int, bad: dict[int, str]) -> dict[str, Any]:
    seen: dict[int, int] = {}
    for part in sorted(out.glob("part-*.jsonl")):
        for line in part.open():
            i = json.loads(line)["id"]
            seen[i] = seen.get(i, 0) + 1
    errors = [json.loads(line) for line in (out / "_errors.jsonl").open()]
    for e in errors:
        seen[e["id"]] = seen.get(e["id"], 0) + 1
    wrong_reason = [e["id"] for e in errors if bad.get(e["id"], "@") not in e["error"]]
    return {"rows_in_output_or_errors": len(seen), "rows_seen_twice": sum(c > 1 for c in seen.values()),
            "rows_missing": rows - len(seen), "errors": len(errors), "bad_rows_injected": len(bad),
            "errors_with_unexpected_reason": len(wrong_reason)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--reference-rows", type=int, default=10_000)
    p.add_argument("--shard-rows", type=int, default=5_000)
    p.add_argument("--kill-after-shards", type=int, default=4)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the run processes (OMP_NUM_THREADS; default: torch's)")
    p.add_argument("--output", type=Path, default=Path("bench-results/run_files"))
    args = p.parse_args()
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="bench-run-files-")  # removed when main returns
    work = Path(tmp.name)
    model = work / "tiny-classifier"
    make_model(model)
    base = [sys.executable, "-m", "torchbridge.cli", "run", str(model), "--task", "text-classification",
            "--no-compile", "--no-truncation", "--shard-rows", str(args.shard_rows), "--no-progress"]
    ref_in, big_in = work / "ref.jsonl", work / "big.jsonl"
    make_input(ref_in, args.reference_rows)
    bad = make_input(big_in, args.rows)
    reference = run([*base, "--input", str(ref_in), "--output", str(work / "ref-out")])
    out = work / "big-out"
    cmd = [*base, "--input", str(big_in), "--output", str(out)]
    killed = run(cmd, kill_after_shards=args.kill_after_shards, out=out)
    shards_before = len(list((out / "_done").glob("*.json")))
    resumed = run(cmd)
    check = check_output(out, args.rows, bad)
    doc = {"benchmark": "run_files", "env": env_report(), "rows": args.rows, "threads": args.threads,
           "shard_rows": args.shard_rows, "model": "2-layer BERT, hidden 32, random weights, "
           "all-MiniLM-L6-v2 tokenizer", "input_bytes": big_in.stat().st_size,
           "reference_run": {"rows": args.reference_rows, "seconds": reference["seconds"],
                             **rss_profile(reference["rss_mb"]), "summary": reference["summary"]},
           "killed_run": {"seconds": killed["seconds"], "killed": killed["killed"],
                          "shards_done_at_kill": shards_before, **rss_profile(killed["rss_mb"])},
           "resumed_run": {"seconds": resumed["seconds"], **rss_profile(resumed["rss_mb"]),
                           "summary": resumed["summary"]},
           "check": check,
           "rss_samples_mb": {"reference": reference["rss_mb"], "killed": killed["rss_mb"],
                              "resumed": resumed["rss_mb"]}}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "run_files.json").write_text(json.dumps(doc, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, samples in doc["rss_samples_mb"].items():
            ax.plot([t for t, _ in samples], [m for _, m in samples], label=name)
        ax.set_xlabel("seconds")
        ax.set_ylabel("RSS (MiB)")
        ax.set_title(f"torchbridge run: {args.reference_rows} rows vs {args.rows} rows (killed, resumed)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.output / "run_files.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no chart (pip install torchbridge[bench])", file=sys.stderr)
    summary = {k: v for k, v in doc.items() if k != "rss_samples_mb" and k != "env"}
    print(json.dumps(summary, indent=2))
    return 0 if check["rows_missing"] == 0 and check["rows_seen_twice"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
