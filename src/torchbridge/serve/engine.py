"""Decoder requests: one worker thread runs a `ContinuousBatcher` and streams text back.

Between two decode steps the worker admits queued requests into free slots (each is prefilled
and yields its first token), drops the ones whose client has gone, then runs one step for all
active sequences. Token ids become text here, incrementally: the text of all new tokens is
decoded again after each token (cheap next to a decode step, and correct for tokenizers whose
pieces only make sense together), and what was not sent yet is sent, minus
- a trailing incomplete character (U+FFFD from a split multi-byte sequence), and
- a tail that could be the start of a stop sequence, held back until it is decided.
A matched stop sequence ends the request there and frees its slot at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from torchbridge.generation.continuous import ContinuousBatcher, GenerationRequest, TokenEvent
from torchbridge.serve.batching import QueueFull

__all__ = ["Chunk", "Stream", "GenerationEngine"]


@dataclass
class Chunk:
    text: str
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Stream:
    """One request's side of the engine: the handler reads `chunks` (an asyncio.Queue)."""

    request: GenerationRequest
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue
    submitted: float = field(default_factory=time.perf_counter)
    text: str = ""  # decoded text of the new tokens, up to a stop sequence
    sent: int = 0  # characters of `text` already delivered
    completion_tokens: int = 0
    first_token_s: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    def cancel(self) -> None:
        self.request.cancel()

    def _put(self, chunk: Chunk) -> None:
        try:
            self.loop.call_soon_threadsafe(self.chunks.put_nowait, chunk)
        except RuntimeError:  # loop closed: the client is gone
            self.request.cancel()


class GenerationEngine:
    def __init__(self, model: Any, tokenizer: Any, *, slots: int = 8, max_length: int = 1024,
                 max_queue: int = 256, metrics: Any = None) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.batcher = ContinuousBatcher(model, slots=slots, max_length=max_length)
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: deque[Stream] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._streams: dict[int, Stream] = {}  # id(request) -> stream, for active sequences
        self._thread = threading.Thread(target=self._loop, name="torchbridge-generate",
                                        daemon=True)

    @property
    def max_length(self) -> int:
        return self.batcher.max_length

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._thread.start()

    def close(self, drain: bool = True) -> None:
        with self._cv:
            self._closing = True
            if not drain:
                for s in list(self._queue) + list(self._streams.values()):
                    s.cancel()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, prompt_ids: list[int], max_new_tokens: int, generate_kwargs: dict[str, Any],
               *, seed: int | None, stops: list[str]) -> Stream:
        """Queue a request (raises ValueError if it cannot fit a slot, QueueFull when full)."""
        self.batcher.check(len(prompt_ids), max_new_tokens)
        loop = asyncio.get_running_loop()
        req = GenerationRequest(list(prompt_ids), max_new_tokens, dict(generate_kwargs), seed=seed)
        stream = Stream(req, stops, loop, asyncio.Queue())
        with self._cv:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull("generate", self.max_queue, retry_after_s=1)
            self._queue.append(stream)
            self._gauges()
            self._cv.notify()
        return stream

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels("generate").set(len(self._queue))
            self.metrics.active.set(self.batcher.active)

    # -- worker --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self.batcher.active:
                    if self._closing:
                        return
                    self._cv.wait(0.5)
                admit = []
                while self._queue and len(admit) < self.batcher.free_slots:
                    admit.append(self._queue.popleft())
                self._gauges()
            for stream in admit:
                self._admit(stream)
            if self.batcher.active:
                self._step()

    def _admit(self, stream: Stream) -> None:
        if stream.request.cancelled:
            self._finish(stream, "cancelled")
            return
        if self.metrics is not None:
            self.metrics.count_tokens("prompt", stream.prompt_tokens)
        try:
            events = self.batcher.add(stream.request)
        except Exception as err:  # noqa: BLE001 - this request fails, the others go on
            stream._put(Chunk("", "error", error=f"{type(err).__name__}: {err}"))
            return
        self._streams[id(stream.request)] = stream
        self._deliver(events)

    def _step(self) -> None:
        try:
            events = self.batcher.step()
        except Exception as err:  # noqa: BLE001 - the model failed: end every active request
            for stream in list(self._streams.values()):
                self.batcher.finish(stream.request, "error")
                stream._put(Chunk("", "error", error=f"{type(err).__name__}: {err}"))
            self._streams.clear()
            return
        if self.metrics is not None and self.batcher.last_step_rows:
            self.metrics.batch_size.labels("generate").observe(self.batcher.last_step_rows)
        self._deliver(events)

    def _deliver(self, events: list[TokenEvent]) -> None:
        for ev in events:
            stream = self._streams.get(id(ev.request))
            if stream is None:
                continue
            if ev.token is not None:
                stream.completion_tokens += 1
                if self.metrics is not None:
                    self.metrics.count_tokens("completion", 1)
                if stream.first_token_s is None:
                    stream.first_token_s = time.perf_counter() - stream.submitted
                    if self.metrics is not None:
                        self.metrics.ttft.observe(stream.first_token_s)
            reason = ev.finish_reason
            if reason is None and self._detokenize(stream):
                reason = "stop"
                self.batcher.finish(ev.request, "stop")
            elif reason is not None and reason != "cancelled":
                self._detokenize(stream)
            if reason is not None:
                self._finish(stream, reason)
            else:
                self._flush(stream, final=False)

    def _detokenize(self, stream: Stream) -> bool:
        """Update `stream.text` from its tokens; True when a stop sequence matched."""
        text = self.tokenizer.decode(stream.request.tokens, skip_special_tokens=True)
        for stop in stream.stops:
            # a stop can only have appeared in the part not searched before
            at = text.find(stop, max(0, stream.sent - len(stop)))
            if at != -1:
                stream.text = text[:at]
                return True
        stream.text = text
        return False

    def _flush(self, stream: Stream, *, final: bool) -> None:
        text = stream.text
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end -= 1
            held = max((k for s in stream.stops for k in range(1, len(s))
                        if text[:end].endswith(s[:k])), default=0)
            end -= held
        if end > stream.sent:
            stream._put(Chunk(text[stream.sent:end]))
            stream.sent = end

    def _finish(self, stream: Stream, reason: str) -> None:
        self._streams.pop(id(stream.request), None)
        if reason != "cancelled":
            self._flush(stream, final=True)
        stream._put(Chunk("", reason))
        self._gauges()
