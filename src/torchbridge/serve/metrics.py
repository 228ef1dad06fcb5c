"""Prometheus metrics of one server (its own registry, so two apps in one process stay apart)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any

__all__ = ["MetricsMiddleware", "ServeMetrics"]

# Seconds of history behind the tokens/s gauges: long enough to smooth over batch boundaries.
RATE_WINDOW_S = 10.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Rate:
    """Events per second over the last RATE_WINDOW_S (read by a gauge at scrape time)."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append((now, n))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._events and now - self._events[0][0] > RATE_WINDOW_S:
            self._events.popleft()

    def per_second(self) -> float:
        with self._lock:
            self._trim(time.monotonic())
            return sum(n for _, n in self._events) / RATE_WINDOW_S


class ServeMetrics:
    def __init__(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as e:
            raise ImportError("the server's metrics need prometheus-client: "
                              "pip install torchbridge[serve]") from e
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("torchbridge_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("torchbridge_request_latency_seconds",
                                 "time from request to last byte, by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("torchbridge_time_to_first_token_seconds",
                              "completions: time from submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("torchbridge_queue_depth",
                                 "requests waiting for a batch (encoders) or a slot (decoders)",
                                 ["queue"], registry=r)
        self.active = Gauge("torchbridge_active_sequences", "decoder slots in use", registry=r)
        self.batch_size = Histogram(
            "torchbridge_batch_size",
            "requests per model call (encoders) / sequences per decode step (decoders)",
            ["queue"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("torchbridge_batch_tokens", "input tokens per encoder call",
                                      buckets=(16, 64, 256, 1024, 4096, 16384, 65536), registry=r)
        self.tokens = Counter("torchbridge_tokens", "tokens processed, by kind", ["kind"],
                              registry=r)
        self.rejected = Counter("torchbridge_rejected", "requests shed with 429 (queue full)",
                                ["queue"], registry=r)
        self._rates = {kind: _Rate() for kind in ("input", "prompt", "completion")}
        rate = Gauge("torchbridge_tokens_per_second",
                     f"tokens per second over the last {RATE_WINDOW_S:.0f} s, by kind", ["kind"],
                     registry=r)
        for kind, tracker in self._rates.items():
            rate.labels(kind).set_function(tracker.per_second)

    def count_tokens(self, kind: str, n: int) -> None:
        if n:
            self.tokens.labels(kind).inc(n)
            self._rates[kind].add(n)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts every request by endpoint and status and times it to its last byte (pure ASGI, so
    streamed responses are timed to their end, not to their first chunk)."""

    KNOWN = ("/health", "/metrics", "/v1/models", "/v1/embeddings", "/v1/classify",
             "/v1/completions", "/v1/chat/completions")

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.KNOWN else "other"
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            status["code"] = 499  # client closed the request (nginx's code)
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            if endpoint != "/metrics":
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
