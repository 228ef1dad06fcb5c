"""Server settings (no heavy imports: the CLI reads the defaults to build its parser)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServeSettings"]


@dataclass
class ServeSettings:
    model_id: str
    max_batch_tokens: int = 8192
    max_wait_ms: float = 5.0
    max_queue: int = 256
    api_key: str | None = None
    batching: bool = True  # False: one request per model call / one decoder slot
    slots: int = 16  # decoder sequences decoded together
    max_model_len: int = 1024  # decoder slot length (prompt + new tokens)
    normalize: bool = True  # unit-length embeddings, as OpenAI's are
