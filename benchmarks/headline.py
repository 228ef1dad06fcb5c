"""The guide's two headline workloads, measured here against the baseline and the installed peers.

    python benchmarks/headline.py [--runs N] [--rounds N] [--compare LIST] [--output DIR]

1. bert-base-uncased, sequence classification, batch 8 x seq 128 (full and mixed-length padded);
2. gpt2, batch 1, 8-token prompt, 50 greedy new tokens.

Beside the default torchbridge row: explicit fp32 and int8-dynamic (int8 weights and per-token
int8 activations, what the int8 peers run), for BERT also int8-static (activation ranges calibrated
on the gate batch) and for GPT-2 int8-weight-only (`--variants`).

Each model loads from a local folder or the Hugging Face cache; when it is not available offline
it runs with seeded random weights (speed does not depend on the values) and the output says so.
Writes DIR/<workload>/results.{json,md,png} and DIR/headline.json (both documents), and prints the
two tables. Runs two `torchbridge benchmark` commands (printed as they start), each in its own
process.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from torchbridge.bench.peers import parse_compare
from torchbridge.bench.report import markdown_table
from torchbridge.pipeline.loading import ModelNotAvailableError, load_config

WORKLOADS = [
    # (folder name, model, task, batch, seq or prompt length, new tokens, torchbridge variants)
    ("bert-base-b8-s128", "bert-base-uncased", "sequence-classification", 8, 128, 0,
     "fp32,int8-dynamic,int8-static"),
    ("gpt2-50-tokens", "gpt2", "causal-lm", 1, 8, 50, "fp32,int8-dynamic,int8-weight-only"),
]


def available_offline(name: str) -> bool:
    try:
        load_config(name)
    except ModelNotAvailableError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="timed calls per row and round (default 5)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds interleaved across the rows (default 1: rows one after another; "
                        "docs/cli.md says why)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compare", default="all", help="peers (default: all; missing = skipped)")
    p.add_argument("--output", type=Path, default=Path("bench-results/headline"))
    p.add_argument("--variants", default=None,
                   help="more torchbridge rows, the same for both workloads (default: fp32 and "
                        "int8-dynamic, plus int8-static for BERT and int8-weight-only for GPT-2; "
                        "'' for none)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every row (default: torch's default). On a machine "
                        "shared with other jobs, 1 avoids threads waiting on each other")
    args = p.parse_args(argv)
    parse_compare(args.compare)  # a bad --compare is refused before any workload runs
    docs = {}
    for folder, model, task, batch, seq, new, default_variants in WORKLOADS:
        variants = default_variants if args.variants is None else args.variants
        random = not available_offline(model)
        cmd = (f"torchbridge benchmark {model} --task {task} --batch-size {batch} --seq-len {seq}"
               + (f" --new-tokens {new}" if new else "") + (" --random-weights" if random else "")
               + f" --runs {args.runs} --rounds {args.rounds} --warmup {args.warmup}"
               + f" --compare {args.compare}"
               + (f" --variants {variants}" if variants else "")
               + (f" --threads {args.threads}" if args.threads else "")
               + f" --output {args.output / folder}")
        print(f"$ {cmd}", file=sys.stderr)
        # Each workload in a process of its own: once another runtime (ONNX Runtime, OpenVINO,
        # CTranslate2) has run in a process, torch rows stay slower in it (docs/cli.md), so the
        # encoder's peers would handicap the decoder's torch rows.
        argv_ = [sys.executable, "-m", "torchbridge.cli", *shlex.split(cmd)[1:]]
        done = subprocess.run(argv_, stdout=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            print(f"the {folder} workload failed (exit {done.returncode}); see the output above",
                  file=sys.stderr)
            return done.returncode
        doc = json.loads((args.output / folder / "results.json").read_text())
        doc["command"] = cmd
        print(markdown_table(doc))
        docs[folder] = doc
    (args.output / "headline.json").write_text(json.dumps(docs, indent=2, default=str) + "\n")
    print(f"wrote {args.output}/headline.json and per-workload results.json/.md/.png",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
