"""`torchbridge serve`: an OpenAI-compatible HTTP server with batching across requests.

Encoders batch queued requests by a token budget and a maximum wait
(:mod:`torchbridge.serve.batching`); causal LMs decode with continuous batching
(:mod:`torchbridge.generation.continuous`, driven by :mod:`torchbridge.serve.engine`).
FastAPI, uvicorn and prometheus-client are imported when used (`pip install torchbridge[serve]`).
"""

from typing import Any

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # lazy: `torchbridge --help` builds the serve parser without importing torch or FastAPI
    if name in __all__:
        from torchbridge.serve import app

        return getattr(app, name)
    raise AttributeError(name)
