"""Encoder requests drained from a queue into batches by a token budget and a maximum wait.

The model runs in one worker thread (a forward pass would block the event loop); handlers put
a request in the queue and await a future. The worker takes the oldest request, then keeps
taking more until the batch holds `max_batch_tokens` input tokens or `max_wait_ms` has passed
since it took the first, and makes one library call for the whole batch (`encode` / `predict`
of `torchbridge.data.inference`, which sorts the texts by length and pads each sub-batch only to
its own longest text). Results are split back by request. If the batch call raises, each
request is retried alone so that only the one at fault gets the error.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["QueueFull", "EncoderBatcher", "resolve_future"]


class QueueFull(Exception):
    """The queue holds `max_queue` requests already: shed load (the handler answers 429)."""

    def __init__(self, queue: str, limit: int, retry_after_s: int) -> None:
        super().__init__(f"the {queue} queue is full ({limit} requests waiting); retry later")
        self.retry_after_s = retry_after_s


def resolve_future(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result: Any = None,
                   error: BaseException | None = None) -> None:
    """Complete `fut` from another thread, unless its handler has gone (client disconnected)."""

    def settle() -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


@dataclass(eq=False)
class _Pending:
    texts: list[str]
    n_tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class EncoderBatcher:
    """One worker thread calling `run(texts) -> results` (one result per text) on batches.

    `max_batch_requests=1` turns batching across requests off (the one-at-a-time baseline):
    each request is then its own call.
    """

    def __init__(self, run: Callable[[list[str]], Sequence[Any]], *, name: str,
                 max_batch_tokens: int = 8192, max_wait_ms: float = 5.0, max_queue: int = 256,
                 max_batch_requests: int | None = None, metrics: Any = None) -> None:
        for label, value in (("max_batch_tokens", max_batch_tokens), ("max_queue", max_queue)):
            if value < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run = run
        self.name = name
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1e3
        self.max_queue = max_queue
        self.max_batch_requests = max_batch_requests
        self.metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"torchbridge-{name}", daemon=True)
        self.batches = 0

    def start(self) -> None:
        self._thread.start()

    def close(self, drain: bool = True) -> None:
        """Stop taking requests; with `drain`, finish the queued ones first."""
        with self._cv:
            self._closing = True
            if not drain:
                dropped = list(self._queue)
                self._queue.clear()
            else:
                dropped = []
            self._cv.notify_all()
        for p in dropped:
            resolve_future(p.loop, p.future, error=RuntimeError("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join()

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, texts: list[str], n_tokens: int) -> list[Any]:
        loop = asyncio.get_running_loop()
        pending = _Pending(texts, n_tokens, loop, loop.create_future())
        with self._cv:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                # a batch takes at most max_wait plus one call; 1 s is an honest lower bound
                raise QueueFull(self.name, self.max_queue, retry_after_s=1)
            self._queue.append(pending)
            self._set_depth()
            self._cv.notify()
        return await pending.future

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.name).set(len(self._queue))

    def _take_batch(self) -> list[_Pending] | None:
        with self._cv:
            while not self._queue:
                if self._closing:
                    return None
                self._cv.wait(0.5)
            batch = [self._queue.popleft()]
            tokens = batch[0].n_tokens
            deadline = time.perf_counter() + self.max_wait_s
            while tokens < self.max_batch_tokens and (
                    self.max_batch_requests is None or len(batch) < self.max_batch_requests):
                if not self._queue:
                    left = deadline - time.perf_counter()
                    if left <= 0 or self._closing:
                        break
                    self._cv.wait(left)
                    continue
                nxt = self._queue[0]
                if tokens + nxt.n_tokens > self.max_batch_tokens:
                    break  # the next request starts the next batch
                batch.append(self._queue.popleft())
                tokens += nxt.n_tokens
            self._set_depth()
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            # a client that went away while queued costs nothing
            batch = [p for p in batch if not p.future.cancelled()]
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[_Pending]) -> None:
        texts = [t for p in batch for t in p.texts]
        if self.metrics is not None:
            self.metrics.batch_size.labels(self.name).observe(len(batch))
            self.metrics.batch_tokens.observe(sum(p.n_tokens for p in batch))
        self.batches += 1
        try:
            results = list(self.run(texts))
            if len(results) != len(texts):
                raise RuntimeError(f"{len(results)} results for {len(texts)} texts")
        except Exception as err:  # noqa: BLE001 - every request must get an answer
            if len(batch) == 1:
                resolve_future(batch[0].loop, batch[0].future, error=err)
                return
            for p in batch:  # isolate the request at fault; its neighbours still succeed
                self._run_batch([p])
            return
        start = 0
        for p in batch:
            resolve_future(p.loop, p.future, result=results[start:start + len(p.texts)])
            start += len(p.texts)
