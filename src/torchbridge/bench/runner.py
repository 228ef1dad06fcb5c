"""One benchmark run: the fp32 eager baseline, TorchBridge's optimized model and the peers, on
the same weights and the same token ids, timed by :func:`torchbridge.bench.harness.time_callable`.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from torchbridge.pipeline.decoding import fast_generator
from torchbridge.precisions import DTYPE_SPELLINGS

from .ceiling import ceiling_key
from .ceiling import measure as measure_ceiling
from .environment import env_report
from .harness import (
    PeakMemory,
    Row,
    device_sync,
    fill_speedups,
    progress_bar,
    time_callable,
)
from .peers import PEERS, Backend, PeerUnavailable, Workload, torch_backend

DTYPES = DTYPE_SPELLINGS
@dataclass
class BenchSpec:
    model: str
    task: str | None = None
    batch_size: int = 8
    seq_len: int = 128
    new_tokens: int = 50
    mode: str = "inference"
    dtype: str = "auto"
    quantization: str | None = None
    device: str = "auto"
    compare: list[str] = field(default_factory=list)
    random_weights: bool = False
    runs: int = 10  # timed calls per row and round
    rounds: int = 1  # rounds interleaved across the rows (see _time_interleaved)
    warmup: int = 2
    padded: bool = True  # also time the realistic mixed-length batch
    compile: bool | None = None  # None: the mode's preset decides (torchbridge row only)
    threads: int | None = None  # CPU threads for torch and every peer (None: torch's default)
    # more torchbridge rows beside the configured one, each named "torchbridge-<variant>"
    variants: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for name in ("batch_size", "seq_len", "runs", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype {self.dtype!r}; choices: {', '.join(DTYPES)}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown --variants {', '.join(unknown)}; choices: "
                             f"{', '.join(VARIANTS)}")


# Extra torchbridge rows: explicit requests in the default mode, each a row "torchbridge-<name>".
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "fp32"},
    "int8-dynamic": {"quantization": "int8-dynamic"},  # int8 weights and activations, as the peers'
    "int8-static": {"quantization": "int8-static"},  # calibrated activation ranges (encoders, CPU)
    "int8-weight-only": {"quantization": "int8-weight-only"},
}


def make_batch(config: Any, batch: int, seq: int, *, padded: bool, left_pad: bool,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Ordinary-word token ids from the model's vocabulary; the padded variant has rows from full
    length down to about a quarter (the verify step's batch), the full variant all real tokens."""
    from torchbridge.pipeline.verify import padded_batch

    b = padded_batch(config, batch, seq, seed=seed, left_pad=left_pad)
    if not padded:
        from torchbridge.pipeline.verify import token_id_range

        low, high = token_id_range(config)
        gen = torch.Generator().manual_seed(seed)
        b = {"input_ids": torch.randint(low, high, (batch, seq), generator=gen),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    return b


def count_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward, counted by torch (matmuls and attention) on the eager model."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(**batch)
    return int(counter.get_total_flops())


def fidelity(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
             generation: bool) -> tuple[float | None, float | None]:
    """(max abs diff, agreement) against the fp32 eager outputs, on real tokens only."""
    if generation:
        if out.shape != ref.shape:
            return None, 0.0
        return None, float((out == ref).float().mean())
    out, ref = out.float(), ref.float()
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if out.dim() >= 3:  # per-token outputs: padded positions are free to differ
        keep = mask.bool().to(out.device)
        out, ref = out[keep], ref[keep]
    diff = float((out - ref).abs().max())
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    return diff, agree


def _optimized_backend(spec: BenchSpec, wl: Workload, task: str) -> tuple[Backend, dict]:
    from torchbridge.models.text import TextModelConfig, TextModelOptimizer

    cfg = {"optimization_mode": spec.mode, "device": spec.device}
    if DTYPES[spec.dtype] is not None:
        cfg["dtype"] = DTYPES[spec.dtype]
    if spec.quantization:
        cfg["quantization"] = spec.quantization
    if spec.compile is not None:
        cfg["use_torch_compile"] = spec.compile
    # warm up at the shape that will be timed (a decoder: its KV cache, prompt + new tokens),
    # so compile work is not billed to the run
    cfg.update(warmup_batch_size=spec.batch_size,
               warmup_seq_len=spec.seq_len + (spec.new_tokens if wl.generation else 0))
    opt = TextModelOptimizer(TextModelConfig(**cfg))
    model = opt.optimize(wl.model, task=task)
    info = opt.get_optimization_info()
    notes = f"{info['backend']}, compile={info['torch_compile']}"
    if info.get("quantization"):
        notes += f", {info['quantization']}"
    dtype = info.get("amp_dtype") or info.get("dtype")
    if wl.generation:
        fast = fast_generator(model)  # the optimized model's own generate path
        if fast is not None:  # the library's decoding path: static KV cache, its decode step
            # the native step takes one sequence; batches run the compiled (or eager) one
            step = fast.stats["decode_step"] if spec.batch_size == 1 \
                else "compiled" if fast.compile else "eager"
            backend = torch_backend(model, wl, str(dtype), call=fast_generate_fn(
                fast, wl.new_tokens), notes=f"{notes}, FastGenerator, {step} step")
            backend.weight_bytes = fast.stats.get("weight_bytes_per_token") or backend.weight_bytes
            return backend, info
    return torch_backend(model, wl, str(dtype), notes=notes), info


def fast_generate_fn(gen: Any, new_tokens: int) -> Any:
    def call(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = gen.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=gen.model.config.eos_token_id)
        return out[:, batch["input_ids"].shape[1]:]

    return call


def run_benchmark(spec: BenchSpec, workdir: Path | None = None) -> dict[str, Any]:
    """Run every row on every input variant and return the results document."""
    from torchbridge.backends import detect
    from torchbridge.families import canonical_task
    from torchbridge.pipeline.loading import default_task, load_model

    spec.validate()
    if spec.threads:
        torch.set_num_threads(spec.threads)  # peers read the same number (peers._threads)
    env = env_report(spec.device)
    info = detect(spec.device)
    device = info.torch_device
    task = canonical_task(spec.task) if spec.task else default_task(spec.model)
    generation = task == "causal-lm"
    tmp = tempfile.TemporaryDirectory(prefix="torchbridge-bench-") if workdir is None else None
    wdir = Path(tmp.name) if tmp else Path(workdir)

    t0 = time.perf_counter()
    with PeakMemory(device) as mem:
        reference = load_model(spec.model, task, random_weights=spec.random_weights,
                               attn_implementation="eager")
    load_s = time.perf_counter() - t0
    reference = reference.float().eval()
    wl = Workload(model=reference, task=task, device=device, workdir=wdir,
                  new_tokens=spec.new_tokens)

    variants = {"full": make_batch(reference.config, spec.batch_size, spec.seq_len,
                                   padded=False, left_pad=generation)}
    # a mixed-length variant needs more than one row; decoders pad on the left
    if spec.padded and spec.batch_size > 1:
        variants["padded"] = make_batch(reference.config, spec.batch_size, spec.seq_len,
                                        padded=True, left_pad=generation)
    flops = None if generation else count_flops(reference, variants["full"])
    ceiling = measure_ceiling(device, runs=3)
    ref_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())

    names = ["baseline", "torchbridge", *(f"torchbridge-{v}" for v in spec.variants),
             *spec.compare]
    rows: list[Row] = []
    per_call = spec.rounds * (1 + spec.runs) + spec.warmup
    bar = progress_bar(len(names) * len(variants) * per_call, "benchmark")
    setup_peaks: dict[str, int | None] = {}
    optimization_info: dict | None = None
    reference_out: dict[str, torch.Tensor] = {}
    # One row at a time (set up, timed, deleted) unless rounds are interleaved: a runtime that
    # has run in the process slows the torch rows after it (docs/cli.md).
    groups = [[name] for name in names] if spec.rounds == 1 else [names]
    for group in groups:
        ready: list[tuple[Backend, list[Row]]] = []  # set up, a row per input variant
        for name in group:
            kind = "baseline" if name == "baseline" else \
                "optimized" if name.startswith("torchbridge") else "peer"
            bar.set_description(f"{name}: setting up")
            t0 = time.perf_counter()
            try:
                with PeakMemory(device) as setup_mem:
                    if name == "baseline":
                        backend = torch_backend(
                            reference.to(device), wl, "float32",
                            notes="HF eager fp32 (attn_implementation='eager')")
                    elif name == "torchbridge":
                        backend, optimization_info = _optimized_backend(spec, wl, task)
                    elif name.startswith("torchbridge-"):
                        variant = VARIANTS[name.removeprefix("torchbridge-")]
                        backend, _ = _optimized_backend(replace(spec, **variant), wl, task)
                    else:
                        backend = PEERS[name][0](wl)
            except PeerUnavailable as err:
                rows += [Row(name, v, kind, status="skipped", reason=str(err)) for v in variants]
                bar.update(per_call * len(variants))
                continue
            except Exception as err:  # noqa: BLE001 - one row failing must not lose the others
                first = str(err).splitlines()[0][:300] if str(err) else ""
                msg = f"{type(err).__name__}: {first}"
                rows += [Row(name, v, kind, status="error", reason=msg) for v in variants]
                bar.update(per_call * len(variants))
                continue
            setup_s = load_s if name == "baseline" else time.perf_counter() - t0
            setup_peak = mem.value if name == "baseline" else setup_mem.value
            setup_peaks[name] = setup_peak
            ready.append((backend, [Row(name, v, kind, dtype=backend.dtype, setup_s=setup_s,
                                        notes=backend.notes, runs=spec.runs * spec.rounds)
                                    for v in variants]))
        timings = _time_interleaved(ready, variants, spec, device, bar)
        for backend, backend_rows in ready:
            for row in backend_rows:
                timing = timings.get((row.name, row.variant))
                if isinstance(timing, str):  # the error that stopped this row
                    row.status, row.reason = "error", timing
                    rows.append(row)
                    continue
                row.median_ms, row.p90_ms = timing.median_s * 1e3, timing.p90_s * 1e3
                row.first_call_s = timing.first_call_s
                peaks = [v for v in (setup_peaks[row.name], timing.peak_bytes) if v is not None]
                row.peak_mem_mb = max(peaks) / 2**20 if peaks else None
                out = backend.result(timing.last_output)
                if row.name == "baseline":
                    reference_out[row.variant] = out
                if row.variant in reference_out:
                    row.max_abs_diff, row.agreement = fidelity(
                        out, reference_out[row.variant],
                        variants[row.variant]["attention_mask"], generation)
                _rates(row, spec, timing.median_s, flops, backend.weight_bytes or ref_bytes,
                       generation, ceiling)
                rows.append(row)
        ready = timings = backend = None  # this group's runtimes go before the next is set up
        gc.collect()
    bar.close()
    fill_speedups(rows)
    if tmp:
        tmp.cleanup()
    return {
        "env": env,
        "workload": {
            "model": spec.model, "task": task, "random_weights": spec.random_weights,
            "batch_size": spec.batch_size, "seq_len": spec.seq_len,
            "new_tokens": spec.new_tokens if generation else None,
            "runs": spec.runs, "rounds": spec.rounds, "warmup": spec.warmup, "mode": spec.mode,
            "dtype": spec.dtype,
            "quantization": spec.quantization, "device": str(device), "compile": spec.compile,
            "threads": torch.get_num_threads(),
            "compare": spec.compare, "flops_per_call": flops, "parameter_bytes": ref_bytes,
            "variants": {v: {"real_token_fraction": float(b["attention_mask"].float().mean())}
                         for v, b in variants.items()},
            "inputs": "token ids drawn from the model's ordinary vocabulary (seeded); the padded "
                      "variant masks rows down to ~1/4 length" + (" (left padding)"
                                                                  if generation else ""),
        },
        "ceiling": ceiling,
        "rows": [r.to_dict() for r in rows],
        "optimization_info": optimization_info,
    }


def _failure(err: Exception) -> str:
    """What a row that failed while running says, in its reason column."""
    return f"{type(err).__name__}: {err}"[:300]


def _time_interleaved(ready: list[tuple[Backend, list[Row]]], variants: dict[str, dict],
                      spec: BenchSpec, device: torch.device,
                      bar: Any) -> dict[tuple[str, str], Any]:
    """Time every (backend, input variant) in ``spec.rounds`` rounds of ``spec.runs`` calls, the
    rounds interleaved across backends in a rotating order, so that a burst of load from other
    processes on a shared machine lands on every row instead of on whichever ran at that moment.
    The first call of round one is the row's first call and ``spec.warmup`` calls follow it;
    each later round starts with one discarded call (caches go cold while the others run).
    Returns (backend, variant) -> Timing (with ``peak_bytes``), or the error that stopped it."""
    sync = device_sync(device)
    native = {}
    out: dict[tuple[str, str], Any] = {}
    for backend, rows in ready:
        for row in rows:
            try:
                native[row.name, row.variant] = backend.feed(variants[row.variant])
            except Exception as err:  # noqa: BLE001 - recorded on the row
                out[row.name, row.variant] = _failure(err)
    for r in range(spec.rounds):
        shift = r % max(1, len(ready))
        for backend, rows in ready[shift:] + ready[:shift]:
            for row in rows:
                key = (row.name, row.variant)
                if isinstance(out.get(key), str):
                    bar.update(1 + spec.runs + (spec.warmup if r == 0 else 0))
                    continue
                bar.set_description(f"{row.name} [{row.variant}]: round {r + 1}")
                try:
                    with PeakMemory(device) as run_mem:
                        timing = time_callable(
                            lambda b=backend, n=native[key]: b.run(n), runs=spec.runs,
                            warmup=spec.warmup if r == 0 else 0, sync=sync,
                            progress=lambda _s: bar.update(1))
                except Exception as err:  # noqa: BLE001 - recorded on the row
                    out[key] = _failure(err)
                    continue
                if key not in out:
                    timing.peak_bytes = run_mem.value
                    out[key] = timing
                else:  # later rounds add samples; the first call stays round one's
                    kept = out[key]
                    kept.samples_s += timing.samples_s
                    kept.last_output = timing.last_output
                    if run_mem.value is not None:
                        kept.peak_bytes = max(kept.peak_bytes or 0, run_mem.value)
    return out


def _rates(row: Row, spec: BenchSpec, median_s: float, flops: int | None, weight_bytes: int,
           generation: bool, ceiling: dict[str, Any]) -> None:
    if generation:
        tokens = spec.batch_size * spec.new_tokens
        row.throughput, row.throughput_unit = tokens / median_s, "tokens/s"
        row.ms_per_token = median_s * 1e3 / spec.new_tokens
        # every decode step streams all the weights once: the bandwidth the row achieves
        row.gb_per_s = weight_bytes / (median_s / spec.new_tokens) / 1e9
        row.of_ceiling = row.gb_per_s / ceiling["read_gb_per_s"]
    else:
        row.throughput, row.throughput_unit = spec.batch_size / median_s, "sequences/s"
        if flops:
            row.gflops = flops / median_s / 1e9
            best = ceiling["ceiling_gflops"].get(ceiling_key(row.dtype) or "")
            row.of_ceiling = row.gflops / best if best else None
