"""The ``torchbridge run`` subcommand: its arguments and the call behind them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from torchbridge.cli import positive_int
from torchbridge.data.files import FORMATS


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", type=Path, required=True, help="a .jsonl, .csv or .parquet file")
    p.add_argument("--text-column", default="text", help="column holding the texts (default text)")
    p.add_argument("--context-column", default=None,
                   help="question answering: the context column (--text-column is the question)")
    p.add_argument("--output", type=Path, required=True,
                   help="folder for part-NNNNN files, _errors.jsonl and _summary.json")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: the output folder's suffix, else the input's)")
    p.add_argument("--shard-rows", type=positive_int, default=10_000,
                   help="rows per output shard, the unit a rerun resumes by (default 10000)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="rows per batch at most")
    p.add_argument("--max-batch-tokens", type=positive_int, default=None,
                   help="padded tokens per batch at most (default 8192 when no --batch-size)")
    p.add_argument("--no-truncation", action="store_true",
                   help="send over-long texts to the errors file instead of truncating them")
    p.add_argument("--normalize", action="store_true", help="embeddings: L2-normalize")
    p.add_argument("--max-new-tokens", type=positive_int, default=50, help="causal LMs: new tokens")
    p.add_argument("--prefix", default="", help="prefix for the result columns' names")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process; ray: Ray Data actors (Parquet in and out)")
    p.add_argument("--address", default=None, help="ray: cluster address (default: start a local one)")
    p.add_argument("--actors", type=positive_int, default=None, help="ray: actor pool size")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="ray: CPUs per actor")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="ray: GPUs per actor")


_RAY_ONLY = ("address", "actors", "cpus_per_actor", "gpus_per_actor")


def run_command(args: argparse.Namespace, config: Any) -> int:
    """Build the model from ``config`` (a TextModelConfig) and run it over the file."""
    from torchbridge.data.run import RunSpec, run_file
    from torchbridge.data.table import Options

    options = Options(batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                      truncation=not args.no_truncation, normalize=args.normalize,
                      max_new_tokens=args.max_new_tokens)
    spec = RunSpec(input=args.input, output=args.output, text_column=args.text_column,
                   context_column=args.context_column, output_format=args.format,
                   shard_rows=args.shard_rows, prefix=args.prefix, options=options,
                   progress=args.progress)
    if not (args.input.is_file() or (args.engine == "ray" and args.input.is_dir())):
        raise ValueError(f"--input {args.input} is not a file"
                         + (" or a folder of Parquet files" if args.engine == "ray" else ""))
    if args.engine == "ray":
        from torchbridge.data.ray_engine import RaySpec, run_ray

        summary = run_ray(args.model, spec, RaySpec(
            address=args.address, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor, task=args.task, config=config))
    else:
        given = [f"--{name.replace('_', '-')}" for name in _RAY_ONLY if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to --engine ray; this run is --engine local")
        from torchbridge.models.text import create_optimized_text_model

        model = create_optimized_text_model(str(args.model), task=args.task, config=config)
        summary = run_file(model, spec)
    print(json.dumps(summary, indent=2))
    this = summary.get("this_run", {})
    print(f"{summary['rows']} rows ({summary['ok']} ok, {summary['errors']} errors -> "
          f"{summary['errors_file']}) in {this.get('seconds')} s, {this.get('rows_per_s')} rows/s",
          file=sys.stderr)
    return 0
