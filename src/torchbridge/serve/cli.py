"""`torchbridge serve`: its options and the command (the parser glue lives in torchbridge.cli)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torchbridge.cli import positive_int

__all__ = ["add_arguments", "serve"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Server options (model options come from torchbridge.cli's shared set)."""
    from torchbridge.serve.settings import ServeSettings

    d = ServeSettings(model_id="")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    p.add_argument("--max-batch-tokens", type=positive_int, default=d.max_batch_tokens,
                   help="encoders: input tokens per model call")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="encoders: longest wait for a batch to fill")
    p.add_argument("--max-queue", type=positive_int, default=d.max_queue,
                   help="requests waiting beyond this get 429 with Retry-After")
    p.add_argument("--slots", type=positive_int, default=d.slots,
                   help="causal LMs: sequences decoded together (continuous batching)")
    p.add_argument("--max-model-len", type=positive_int, default=d.max_model_len,
                   help="causal LMs: tokens per sequence, prompt + new (KV cache per slot)")
    p.add_argument("--no-batching", action="store_true",
                   help="one request per model call / one decoder slot (baseline)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (or env TORCHBRIDGE_API_KEY)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the folder or hub name)")
    p.add_argument("--no-normalize", action="store_true",
                   help="embeddings as pooled, not scaled to unit length")


def serve(args: argparse.Namespace, config: Any) -> int:
    """Optimize (or load a saved `torchbridge optimize` folder) once, then serve until stopped."""
    import os

    try:
        import uvicorn
    except ImportError as e:
        raise ImportError("torchbridge serve needs uvicorn: pip install torchbridge[serve]") from e

    from torchbridge.models.text import create_optimized_text_model
    from torchbridge.serve.app import create_app
    from torchbridge.serve.settings import ServeSettings

    if args.max_wait_ms < 0:
        raise ValueError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    settings = ServeSettings(
        model_id=args.served_model_name or Path(args.model).name or args.model,
        max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, api_key=args.api_key or os.environ.get("TORCHBRIDGE_API_KEY"),
        batching=not args.no_batching, slots=args.slots, max_model_len=args.max_model_len,
        normalize=not args.no_normalize)
    print(f"torchbridge serve: optimizing {args.model} ...", file=sys.stderr, flush=True)
    model = create_optimized_text_model(args.model, task=args.task, config=config)
    app = create_app(model, settings)
    print(f"torchbridge serve: {settings.model_id} ({model.task}) on "
          f"http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
