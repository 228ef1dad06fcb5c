"""The ``torchbridge`` command: thin argparse subcommands, one library call each.

Errors are one line on stderr (what was asked, what exists, the fix) and a non-zero exit status:
2 for a request that cannot be met as written (bad argument, unknown model, device or peer),
1 for a failure while running. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """A request that cannot be met as written (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def positive_int(value: str) -> int:
    """argparse type for counts: a whole number >= 1 (shared by every subcommand's options)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _add_model_options(p: argparse.ArgumentParser) -> None:
    from torchbridge.pipeline.config import QUANTIZATION_CHOICES, OptimizationMode
    from torchbridge.precisions import DTYPE_SPELLINGS

    p.add_argument("--mode", default="inference", choices=[m.value for m in OptimizationMode],
                   help="optimization mode (preset of dtype, compile mode, warm-up shape)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPE_SPELLINGS),
                   help="compute precision of the optimized model; auto = the device's best")
    p.add_argument("--quantization", default=None, choices=[q for q in QUANTIZATION_CHOICES if q],
                   help="weight format on top of the dtype (see docs/precisions.md)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N], xpu[:N] or mps")
    p.add_argument("--task", default=None,
                   help="e.g. text-classification, causal-lm (default: from the checkpoint)")
    p.add_argument("--random-weights", action="store_true",
                   help="build the architecture with seeded random weights (benchmarking only)")


def _model_config(args: argparse.Namespace, **extra: Any) -> Any:
    from torchbridge.models.text import TextModelConfig
    from torchbridge.precisions import DTYPE_SPELLINGS

    fields: dict[str, Any] = {"optimization_mode": args.mode, "device": args.device,
                              "random_weights": args.random_weights, **extra}
    if DTYPE_SPELLINGS[args.dtype] is not None:
        fields["dtype"] = DTYPE_SPELLINGS[args.dtype]
    if args.quantization:
        fields["quantization"] = args.quantization
    if getattr(args, "no_compile", False):
        fields["use_torch_compile"] = False
    return TextModelConfig(**fields)


def build_parser() -> argparse.ArgumentParser:
    from torchbridge.bench.peers import PEERS

    parser = _Parser(prog="torchbridge", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("env", help="versions, device and capabilities (paste into bug reports)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("benchmark", help="baseline vs optimized vs peers, in one run")
    p.add_argument("model", help="hub name (offline cache) or local folder")
    _add_model_options(p)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="default 8 for encoders, 1 for generation")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="sequence length (encoders, default 128) or prompt length (default 8)")
    p.add_argument("--new-tokens", type=positive_int, default=50, help="tokens to generate")
    p.add_argument("--compare", default="all",
                   help=f"peers: all, none or a comma list of {', '.join(PEERS)}")
    p.add_argument("--variants", default="",
                   help="more torchbridge rows, comma list of fp32, int8-dynamic, "
                        "int8-static (encoders), int8-weight-only")
    p.add_argument("--runs", type=positive_int, default=10,
                   help="timed calls per row (per round with --rounds)")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="rounds of --runs calls, interleaved across the rows so that load from "
                        "other processes lands on every row alike")
    p.add_argument("--warmup", type=int, default=2, help="discarded calls after the first")
    p.add_argument("--no-padded", action="store_true",
                   help="time only full-length inputs, not the mixed-length batch")
    p.add_argument("--output", type=Path, default=None,
                   help="folder for results.json/.md/.png (default bench-results/<model>)")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")
    p.add_argument("--no-compile", action="store_true",
                   help="optimized row without torch.compile (the mode's preset otherwise)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for every row (default: torch's default)")

    p = sub.add_parser("generate", help="generate text with the optimized model")
    p.add_argument("model")
    p.add_argument("prompt")
    _add_model_options(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")

    p = sub.add_parser("classify", help="classify texts with the optimized model")
    p.add_argument("model")
    p.add_argument("texts", nargs="+")
    _add_model_options(p)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("optimize", help="optimize once and save what makes the next load fast")
    p.add_argument("model")
    _add_model_options(p)
    p.add_argument("--output", type=Path, required=True, help="folder to write")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")

    p = sub.add_parser("serve", help="serve the model over HTTP (OpenAI-shaped, batched)")
    p.add_argument("model", help="hub name (offline cache), local folder or optimize --output")
    _add_model_options(p)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    from torchbridge.serve.cli import add_arguments as add_serve_arguments

    add_serve_arguments(p)

    p = sub.add_parser("run", help="run the model over a JSONL, CSV or Parquet file (streamed, "
                       "sharded, resumable; bad rows to an errors file)")
    p.add_argument("model")
    _add_model_options(p)
    from torchbridge.data.command import add_run_arguments

    add_run_arguments(p)
    return parser


# --- subcommands ----------------------------------------------------------------------------


def cmd_env(args: argparse.Namespace) -> int:
    from torchbridge.bench.environment import env_report

    env = env_report(args.device)
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    dev = env["device"]
    print(f"torchbridge {env['torchbridge']}  torch {env['torch']}  "
          f"transformers {env['transformers']}  python {env['python']}")
    print(f"platform    {env['platform']}")
    if env.get("load_average"):
        print(f"load avg    {' '.join(f'{x:.2f}' for x in env['load_average'])} (1, 5, 15 min)")
    peers = ", ".join(f"{k} {v}" if v else f"{k} (not installed)"
                      for k, v in env["peers"].items())
    print(f"optional    {peers}")
    print(f"device      {dev['type']}{'' if dev['index'] is None else ':' + str(dev['index'])} "
          f"{dev['name']} ({dev['vendor']}, backend {dev['backend']})")
    if dev.get("compute_capability"):
        print(f"capability  sm {dev['compute_capability']}, {dev.get('total_memory_gb')} GB")
    print(f"precision   bf16={dev['bf16']} fp16={dev['fp16']} fp8={dev['fp8']}")
    print(f"cpu         ISA: {', '.join(dev['cpu_isa']) or 'none detected'}; "
          f"threads {dev['threads']} of {dev['cpu_count']} cores; waits: {env['openmp_spin']}")
    for mode, auto in env["auto"].items():
        compile_ = auto["compile_mode"] if auto["torch_compile"] else "off"
        print(f"auto[{mode}] dtype {auto['dtype']} ({auto['dtype_reason']}), attention "
              f"{auto['attention']}, compile {compile_}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from torchbridge.bench.peers import parse_compare
    from torchbridge.bench.report import markdown_table, write_results
    from torchbridge.bench.runner import BenchSpec, run_benchmark
    from torchbridge.families import canonical_task
    from torchbridge.pipeline.loading import default_task

    compare = parse_compare(args.compare)
    task = canonical_task(args.task) if args.task else default_task(args.model)
    gen = task == "causal-lm"
    spec = BenchSpec(
        model=args.model, task=task,
        batch_size=args.batch_size or (1 if gen else 8),
        seq_len=args.seq_len or (8 if gen else 128),
        new_tokens=args.new_tokens, mode=args.mode, dtype=args.dtype,
        quantization=args.quantization, device=args.device, compare=compare,
        random_weights=args.random_weights, runs=args.runs, rounds=args.rounds, warmup=args.warmup,
        padded=not args.no_padded, compile=False if args.no_compile else None,
        threads=args.threads, variants=[v.strip() for v in args.variants.split(",") if v.strip()],
    )
    spec.validate()
    if args.random_weights:
        print(f"note: {args.model} runs with seeded random weights: the timings are real, the "
              "outputs are not those of the trained model", file=sys.stderr)
    doc = run_benchmark(spec)
    out = args.output or Path("bench-results") / Path(args.model).name
    paths = write_results(doc, out)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(markdown_table(doc))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def _tokenizer(model: str) -> Any:
    from torchbridge.pipeline.loading import load_tokenizer

    return load_tokenizer(model)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from torchbridge.models.text import TextModelOptimizer

    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    tok = _tokenizer(args.model)
    opt = TextModelOptimizer(_model_config(args))
    model = opt.optimize(args.model, task=args.task or "causal-lm")
    inputs = tok(args.prompt, return_tensors="pt").to(opt.device)
    sampling: dict[str, Any] = {"do_sample": False}
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    torch.manual_seed(args.seed)
    # the prompt goes through the streamer too, so streamed and printed text decode alike
    streamer = TextStreamer(tok, skip_prompt=False, skip_special_tokens=True) \
        if args.stream else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else model.config.eos_token_id
    # the optimized model's generate is the library's decoding path (static KV cache, compiled
    # decode step) where the architecture has one, transformers' otherwise (the report says)
    with torch.no_grad():  # the warm-up ran under no_grad: same guards, no recompile
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer,
                             pad_token_id=pad, **sampling)
    if not streamer:
        print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    import torch

    from torchbridge.models.text import TextModelOptimizer

    tok = _tokenizer(args.model)
    opt = TextModelOptimizer(_model_config(args))
    model = opt.optimize(args.model, task=args.task or "sequence-classification")
    batch = tok(args.texts, return_tensors="pt", padding=True, truncation=True).to(opt.device)
    with torch.no_grad():  # the warm-up ran under no_grad: same guards, no recompile
        probs = model(**batch).logits.float().softmax(-1).cpu()
    labels = getattr(model.config, "id2label", None) or {}
    results = []
    for text, p in zip(args.texts, probs, strict=True):
        i = int(p.argmax())
        results.append({"text": text, "label": labels.get(i, str(i)), "score": float(p[i])})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['label']}\t{r['score']:.4f}\t{r['text']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from torchbridge.serve.cli import serve

    return serve(args, _model_config(args))


def cmd_run(args: argparse.Namespace) -> int:
    from torchbridge.data.command import run_command

    return run_command(args, _model_config(args))


def cmd_optimize(args: argparse.Namespace) -> int:
    from torchbridge.models.text import TextModelOptimizer

    optimizer = TextModelOptimizer(_model_config(args))
    model = optimizer.optimize(args.model, task=args.task)
    summary = optimizer.save_pretrained(model, args.output, source=args.model)
    summary["optimize_s"] = round(optimizer.report.timings["total_s"], 3)
    print(json.dumps(summary, indent=2))
    return 0


COMMANDS = {"env": cmd_env, "benchmark": cmd_benchmark, "generate": cmd_generate,
            "classify": cmd_classify, "optimize": cmd_optimize, "run": cmd_run,
            "serve": cmd_serve}


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "what you asked for does not exist here" (exit 2)."""
    from torchbridge.backends import DeviceNotAvailableError
    from torchbridge.bench.peers import PeerUnavailable
    from torchbridge.pipeline.loading import ModelNotAvailableError
    from torchbridge.precisions import PrecisionNotSupportedError

    return (UsageError, ValueError, ModelNotAvailableError, DeviceNotAvailableError,
            PeerUnavailable, PrecisionNotSupportedError)


def _quiet_transformers() -> None:
    # the CLI prints its own progress; transformers' per-load bars and advice would bury it
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if not sys.stderr.isatty():
            os.environ.setdefault("TORCHBRIDGE_NO_PROGRESS", "1")
        if not debug:
            _quiet_transformers()
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("torchbridge: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        code = EXIT_USAGE if isinstance(err, _usage_errors()) else EXIT_FAILURE
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not isinstance(err, UsageError):
            msg = f"torchbridge: error: {msg}"
        print(msg + ("" if code == EXIT_USAGE else "  (rerun with --debug for the traceback)"),
              file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
