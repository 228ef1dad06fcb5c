"""Scale-out on Ray Data (extra ``torchbridge[ray]``): the batch job as an actor pool.

:class:`TextBatchPredictor` is a callable class for ``Dataset.map_batches``: each actor loads the
model once (a folder written by ``torchbridge optimize`` loads with its saved plan and no verify
pass), sets torch's threads to the CPUs Ray gave it, and turns a block of rows into the same rows
with result columns, or with a reason in the ``error`` column. :func:`run_ray` is ``torchbridge run
--engine ray``: Parquet in, Parquet out, then the bad rows are moved from the output to
``_errors.jsonl`` so every input row ends up exactly once.

Sizing: Ray's file listing, read and write tasks need CPUs of their own while the actors hold
theirs; a pool that takes every CPU of a node leaves them none and the job hangs (Ray Data's file
listing step asks for a whole CPU). By default the pool leaves ``IO_CPUS`` logical CPU per node
free for them, and the read/write tasks ask for ``IO_TASK_CPUS`` each. When :func:`run_ray` starts
the local cluster itself, it declares that one logical CPU on top of the machine's cores: the I/O
tasks mostly wait on the disk, and the actor can then hold (and run threads on) every core.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchbridge.data.table import Options, arrow_types, result_columns, run_block

# Logical CPUs the default pool leaves to Ray's read and write tasks, and what each such task asks.
IO_CPUS = 1.0
IO_TASK_CPUS = 0.25
ERROR_COLUMN = "error"


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("the Ray engine needs Ray Data: pip install torchbridge[ray]") from None
    return ray


class TextBatchPredictor:
    """``ds.map_batches(TextBatchPredictor, fn_constructor_kwargs={...}, batch_format="pyarrow",
    compute=ActorPoolStrategy(size=N), num_cpus=C)``: one model per actor, rows in, rows out."""

    def __init__(self, model: str, *, task: str | None = None, text_column: str = "text",
                 context_column: str | None = None, prefix: str = "", options: Options | None = None,
                 config: Any = None, threads: int | None = None, verify: bool | None = None) -> None:
        import torch

        from torchbridge.models.text import TextModelConfig, create_optimized_text_model

        if threads is None:  # the CPUs Ray assigned to this actor, rounded up
            try:
                cpus = _ray().get_runtime_context().get_assigned_resources().get("CPU")
            except Exception:  # noqa: BLE001 - outside an actor: torch's own default
                cpus = None
            threads = math.ceil(cpus) if cpus else None
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        config = config or TextModelConfig()
        if verify is not None:  # a saved folder skips verify unless asked (see pipeline.saved)
            config = config.replace(verify=verify)
        self.model = create_optimized_text_model(model, task=task, config=config)
        self.text_column, self.context_column = text_column, context_column
        self.prefix, self.options = prefix, options or Options()
        self.names = result_columns(self.model.task, prefix)
        self.types = arrow_types(self.model.task, prefix)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        n = table.num_rows
        texts = table.column(self.text_column).to_pylist()
        contexts = table.column(self.context_column).to_pylist() if self.context_column else None
        outcome = run_block(self.model, texts, contexts, self.options, self.prefix)
        for name in self.names:
            full: list[Any] = [None] * n
            for i, value in zip(outcome.index, outcome.columns[name], strict=True):
                full[i] = value
            table = table.append_column(name, pa.array(full, type=self.types.get(name)))
        errors = [outcome.errors.get(i) for i in range(n)]
        return table.append_column(self.prefix + ERROR_COLUMN, pa.array(errors, type=pa.string()))


@dataclass
class RaySpec:
    address: str | None = None  # None: start a local cluster with this machine's CPUs
    actors: int | None = None  # default: one per node's worth of CPUs (one on a single machine)
    cpus_per_actor: float | None = None  # default: the node's CPUs minus IO_CPUS, per actor
    gpus_per_actor: float | None = None
    task: str | None = None
    config: Any = None  # TextModelConfig for each actor's model
    batch_rows: int = 1024  # rows per map_batches call; each call batches by tokens inside


def _pool_size(ray: Any, spec: RaySpec) -> tuple[int, float]:
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]
    node_cpus = min(n["Resources"]["CPU"] for n in nodes)
    actors = spec.actors or len(nodes)
    cpus = spec.cpus_per_actor or max(0.5, (node_cpus - IO_CPUS) * len(nodes) / actors)
    if cpus > node_cpus - IO_CPUS:
        raise ValueError(f"--cpus-per-actor {cpus:g} leaves no CPU on a {node_cpus:g}-CPU node for "
                         f"Ray's file listing, read and write tasks (they need {IO_CPUS:g}); the job "
                         f"would hang: ask for at most {node_cpus - IO_CPUS:g}")
    return actors, cpus


def run_ray(model: str, run_spec: Any, spec: RaySpec) -> dict[str, Any]:
    """``torchbridge run --engine ray``: read Parquet, map with an actor pool, write Parquet, then
    move bad rows to ``_errors.jsonl``. ``run_spec`` is the same RunSpec the local engine takes."""
    ray = _ray()
    from ray.data import ActorPoolStrategy

    src, out = Path(run_spec.input), Path(run_spec.output)
    for path, what in ((src, "--input"), (out, "--output")):
        if path.suffix.lower() not in ("", ".parquet") or (what == "--input" and path.is_file()
                                                          and path.suffix.lower() != ".parquet"):
            raise ValueError(f"--engine ray reads and writes Parquet; {what} {path} is not; fix: "
                             "convert it (or use --engine local, which takes JSONL and CSV)")
    if run_spec.output_format not in (None, "parquet"):
        raise ValueError(f"--engine ray writes Parquet, not {run_spec.output_format}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--output {out} is not empty; the Ray engine writes a new folder "
                         "(resuming is a feature of --engine local)")
    t0 = time.perf_counter()
    started = not ray.is_initialized()
    if started:
        # a local cluster: every core for the actors plus one logical CPU for Ray's I/O tasks
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        ray.init(address=spec.address, num_cpus=None if spec.address else int((cores or 1) + IO_CPUS),
                 include_dashboard=False, log_to_driver=False)
    try:
        actors, cpus = _pool_size(ray, spec)
        ds = ray.data.read_parquet(str(src.resolve()), num_cpus=IO_TASK_CPUS)
        kwargs = dict(text_column=run_spec.text_column, context_column=run_spec.context_column,
                      prefix=run_spec.prefix, options=run_spec.options, task=spec.task,
                      config=spec.config)
        mapped = ds.map_batches(TextBatchPredictor, fn_constructor_kwargs={"model": str(model), **kwargs},
                                batch_format="pyarrow", batch_size=spec.batch_rows,
                                compute=ActorPoolStrategy(size=actors), num_cpus=cpus,
                                num_gpus=spec.gpus_per_actor or None)
        mapped.write_parquet(str(out.resolve()), ray_remote_args={"num_cpus": IO_TASK_CPUS})
    finally:
        if started:
            ray.shutdown()
    mapped_s = time.perf_counter() - t0
    counts = split_errors(out, run_spec.prefix + ERROR_COLUMN)
    seconds = time.perf_counter() - t0
    import pyarrow.dataset

    input_rows = pyarrow.dataset.dataset(str(src), format="parquet").count_rows()
    summary = {"rows": counts["ok"] + counts["errors"], **counts, "input_rows": input_rows,
               "missing": input_rows - counts["ok"] - counts["errors"], "engine": "ray",
               "actors": actors, "cpus_per_actor": cpus,
               "this_run": {"rows_processed": counts["ok"] + counts["errors"],
                            "seconds": round(seconds, 3), "map_and_write_s": round(mapped_s, 3),
                            "rows_per_s": round((counts["ok"] + counts["errors"]) / seconds, 1)},
               "output": str(out), "errors_file": str(out / "_errors.jsonl")}
    (out / "_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def split_errors(out: Path, column: str) -> dict[str, int]:
    """Move rows with a non-null ``column`` from the Parquet files in ``out`` to
    ``out/_errors.jsonl``. Reads only that column of files without errors; a file with errors is
    rewritten without them (its error file first, both atomically, so a rerun after a kill
    produces the same result)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from torchbridge.data.files import write_jsonl

    ok = errors = 0
    error_dir = out / "_errors"
    error_dir.mkdir(exist_ok=True)
    for path in sorted(out.glob("*.parquet")):
        flags = pq.read_table(path, columns=[column]).column(column).is_valid()
        bad = pc.sum(flags).as_py() or 0
        if bad:
            table = pq.read_table(path)
            write_jsonl([{"error": r.pop(column), **r} for r in table.filter(flags).to_pylist()],
                        error_dir / f"{path.stem}.jsonl")
            tmp = path.with_name(path.name + ".tmp")
            pq.write_table(table.filter(pc.invert(flags)), tmp)
            os.replace(tmp, path)
        ok += pq.ParquetFile(path).metadata.num_rows
    for part in sorted(error_dir.glob("*.jsonl")):
        errors += sum(1 for _ in part.open())
    with open(out / "_errors.jsonl.tmp", "w", encoding="utf-8") as merged:
        for part in sorted(error_dir.glob("*.jsonl")):
            merged.write(part.read_text(encoding="utf-8"))
    os.replace(out / "_errors.jsonl.tmp", out / "_errors.jsonl")
    return {"ok": ok, "errors": errors}
