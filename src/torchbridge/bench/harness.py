"""Timing harness and result records, shared by the CLI and ``benchmarks/``.

What makes a number honest here (and what the tests check):

* the first call is timed on its own and reported as ``first_call_s`` (it carries compilation,
  lazy initialisation, kernel selection), then ``warmup`` more calls are made and thrown away;
* the device is synchronised before the clock starts and before it stops, on every backend
  (a no-op on CPU, a real barrier on cuda/xpu/mps, where kernels run asynchronously);
* every timed call is kept, so the median and p90 come from the samples, never from a mean;
* peak memory is measured around the timed calls of one row only.

The heavier orchestration (workloads, peers, fidelity) lives in :mod:`torchbridge.bench.runner`;
the writers (JSON, markdown, PNG) live in :mod:`torchbridge.bench.report`.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

Clock = Callable[[], float]


def _no_sync() -> None:
    return None


def device_sync(device: Any) -> Callable[[], None]:
    """A zero-argument barrier for ``device`` (a ``torch.device``, its string, or ``None``), from
    the device table (``torchbridge.backends.device_ops``)."""
    if device is None:
        return _no_sync
    import torch

    from torchbridge import backends

    dev = torch.device(device)
    if dev.type == "cpu":
        return _no_sync
    return lambda: backends.synchronize(dev)


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    if not samples:
        raise ValueError("percentile of no samples")
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    """Wall-clock samples of one callable; all times in seconds."""

    first_call_s: float
    samples_s: list[float]
    warmup: int
    last_output: Any = field(default=None, repr=False)
    peak_bytes: int | None = None  # peak memory over the timed calls, where measured

    @property
    def median_s(self) -> float:
        return percentile(self.samples_s, 50)

    @property
    def p90_s(self) -> float:
        return percentile(self.samples_s, 90)


def time_callable(
    fn: Callable[[], T],
    *,
    runs: int,
    warmup: int = 1,
    sync: Callable[[], None] = _no_sync,
    clock: Clock = time.perf_counter,
    progress: Callable[[str], None] | None = None,
) -> Timing:
    """Time ``fn`` as first call, ``warmup`` discarded calls, then ``runs`` timed calls.

    ``sync`` is called before reading the clock on both sides of every call, so queued device
    work from earlier calls is never billed to (or hidden from) the call being measured.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")

    def once() -> tuple[float, T]:
        sync()
        t0 = clock()
        out = fn()
        sync()
        return clock() - t0, out

    first, out = once()
    if progress:
        progress("first")
    for _ in range(warmup):
        once()
        if progress:
            progress("warmup")
    samples = []
    for _ in range(runs):
        dt, out = once()
        samples.append(dt)
        if progress:
            progress("timed")
    return Timing(first_call_s=first, samples_s=samples, warmup=warmup, last_output=out)


# --- peak memory --------------------------------------------------------------------------


class PeakMemory:
    """Peak memory over a block, in bytes, relative to the start of the block.

    Accelerators with a peak counter in the device table: the allocator's high-water mark. CPU:
    the process resident-set high-water mark
    (``VmHWM``), reset through ``/proc/self/clear_refs`` so each block is measured on its own;
    where that file is not writable (not Linux) ``value`` stays ``None`` rather than reporting
    the lifetime peak of the process as if it belonged to this block.
    """

    def __init__(self, device: Any = None) -> None:
        import torch

        self.device = torch.device(device or "cpu")
        self.start: int | None = None
        self.value: int | None = None

    def __enter__(self) -> PeakMemory:
        from torchbridge.backends import device_ops

        ops = device_ops(self.device)
        if ops.max_memory_allocated is not None and ops.reset_peak_memory is not None:
            ops.reset_peak_memory(self.device)
            self.start = ops.memory_allocated(self.device)
        elif self.device.type == "cpu" and _reset_rss_peak():
            self.start = _read_status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start is None:
            return
        from torchbridge.backends import device_ops

        ops = device_ops(self.device)
        if ops.max_memory_allocated is not None:
            peak = ops.max_memory_allocated(self.device)
        else:
            peak = _read_status_kb("VmHWM") * 1024
        self.value = max(0, peak - self.start)


def time_rounds(calls: dict[str, Callable[[], Any]], *, rounds: int, runs: int
                ) -> dict[str, dict[str, float]]:
    """Time the calls against each other in one process: ``rounds`` rounds of ``runs`` calls
    each (one warm-up call per round), the order rotating every round, so that load from other
    jobs lands on every call alike. Per call: median of the rounds' medians and of their p90s
    (ms) and the first round's first call (s)."""
    names = list(calls)
    timings: dict[str, list[Timing]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            timings[k].append(time_callable(calls[k], runs=runs, warmup=1))
    return {k: {"median_ms": statistics.median(t.median_s for t in v) * 1e3,
                "p90_ms": statistics.median(t.p90_s for t in v) * 1e3,
                "first_call_s": v[0].first_call_s} for k, v in timings.items()}


def round_timings(timed: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """`time_rounds`' result as a JSON row's fields: per measure, {call: value} rounded."""
    return {"median_ms": {k: round(t["median_ms"], 2) for k, t in timed.items()},
            "p90_ms": {k: round(t["p90_ms"], 2) for k, t in timed.items()},
            "first_call_s": {k: round(t["first_call_s"], 3) for k, t in timed.items()}}


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS counter (see proc(5))
        return True
    except OSError:
        return False


def _read_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


# --- records ------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table: one backend on one input variant."""

    name: str
    variant: str  # "full" or "padded"
    kind: str  # "baseline" | "optimized" | "peer"
    status: str = "ok"  # "ok" | "skipped" | "error"
    reason: str | None = None
    dtype: str | None = None
    median_ms: float | None = None
    p90_ms: float | None = None
    runs: int | None = None
    throughput: float | None = None
    throughput_unit: str | None = None
    speedup: float | None = None
    setup_s: float | None = None  # load / convert / export / optimize, before the first call
    first_call_s: float | None = None
    peak_mem_mb: float | None = None
    max_abs_diff: float | None = None
    agreement: float | None = None  # argmax (encoders) or greedy-token (decoders) agreement
    gflops: float | None = None
    ms_per_token: float | None = None
    gb_per_s: float | None = None
    # gflops over the best GEMM rate of the row's precision, or gb_per_s over the memory read
    # rate, both measured at the start of the run (bench/ceiling.py)
    of_ceiling: float | None = None
    notes: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fill_speedups(rows: Iterable[Row]) -> None:
    """speedup = baseline median / row median, within the same input variant."""
    rows = list(rows)
    base = {r.variant: r.median_ms for r in rows if r.kind == "baseline" and r.status == "ok"}
    for r in rows:
        b = base.get(r.variant)
        if r.status == "ok" and b and r.median_ms:
            r.speedup = b / r.median_ms


# --- progress -----------------------------------------------------------------------------


def progress_bar(total: int, desc: str) -> Any:
    """A tqdm bar on stderr, or a silent stand-in when stderr is not a terminal (CI, pipes)."""
    enabled = sys.stderr.isatty() and os.environ.get("TORCHBRIDGE_NO_PROGRESS") is None
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
        except ImportError:
            pass
    return _NullBar()


class _NullBar:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: object) -> None: ...

