"""OpenAI-shaped request bodies (pydantic): what a field may hold is checked before any work.

Unknown fields are refused (422 naming the field) rather than silently dropped: a client that
sends `logprobs` or `n=3` should learn that this server does not do them, not get something else.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["EmbeddingRequest", "ClassifyRequest", "CompletionRequest", "ChatCompletionRequest",
           "ChatMessage", "StreamOptions"]

# OpenAI's own bound on stop sequences.
MAX_STOP = 4


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _texts(value: str | list[str], field: str) -> str | list[str]:
    items = [value] if isinstance(value, str) else value
    if not items:
        raise ValueError(f"{field} is an empty list: send at least one text")
    for i, text in enumerate(items):
        if not text.strip():
            where = field if isinstance(value, str) else f"{field}[{i}]"
            raise ValueError(f"{where} is an empty string")
    return value


class EmbeddingRequest(_Body):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, v: str | list[str]) -> str | list[str]:
        return _texts(v, "input")


class ClassifyRequest(_Body):
    input: str | list[str]
    model: str | None = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, v: str | list[str]) -> str | list[str]:
        return _texts(v, "input")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per prompt (n > 1 is not supported)")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(items)}")
        if any(s == "" for s in items):
            raise ValueError("a stop sequence is an empty string")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: str | list[str]) -> str | list[str]:
        return _texts(v, "prompt")


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
