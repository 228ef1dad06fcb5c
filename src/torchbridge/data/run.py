"""``torchbridge run MODEL --input FILE --text-column COL --output DIR``: a model over a file.

The input is read as a stream of shards (``--shard-rows`` rows each). Each shard's results are
written to ``DIR/part-NNNNN.<fmt>`` (the input's columns with the result columns next to them) and
its bad rows to ``DIR/_errors/NNNNN.jsonl`` (row number, reason, the row's other columns); then a
marker ``DIR/_done/NNNNN.json`` records the shard as finished. A rerun after a kill skips the
shards with a marker and redoes the rest, so every input row ends up exactly once: in a part or in
an errors file. At the end, ``DIR/_errors.jsonl`` gathers all errors and ``DIR/_summary.json`` the
counts and rows/s.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchbridge.data import files
from torchbridge.data.table import Options, arrow_types, result_columns, run_block

JOB_FILE = "_job.json"
DONE_DIR = "_done"
SUMMARY_FILE = "_summary.json"
ERRORS_FILE = "_errors.jsonl"
ERRORS_DIR = "_errors"  # per-shard error files; names starting with _ are skipped by Parquet readers
# Fields of the job that decide which rows land in which shard: a rerun must match them.
_JOB_KEYS = ("input", "input_bytes", "text_column", "context_column", "shard_rows", "task", "format")


@dataclass
class RunSpec:
    input: Path
    output: Path
    text_column: str = "text"
    context_column: str | None = None
    input_format: str | None = None
    output_format: str | None = None
    shard_rows: int = 10_000
    prefix: str = ""
    options: Options = field(default_factory=Options)
    progress: bool | None = None


def _check_columns(spec: RunSpec, fmt: str, task: str) -> None:
    if task == "question-answering" and not spec.context_column:
        raise ValueError("question answering reads a question and a context per row: pass "
                         "--context-column (the --text-column is the question)")
    if task != "question-answering" and spec.context_column:
        raise ValueError(f"--context-column applies to question answering; this model's task is {task}")
    columns = files.columns_of(spec.input, fmt)
    if columns is None:
        return
    for col in filter(None, (spec.text_column, spec.context_column)):
        if col not in columns:
            raise ValueError(f"{spec.input} has no column {col!r}; its columns are "
                             f"{', '.join(columns)}")
    clash = set(result_columns(task, spec.prefix)) & set(columns)
    if clash:
        raise ValueError(f"the input already has column(s) {', '.join(sorted(clash))}, which the "
                         f"results would overwrite; fix: --prefix pred_ (names results pred_...)")


def _job(spec: RunSpec, fmt_in: str, fmt_out: str, task: str, model_name: str) -> dict[str, Any]:
    return {"input": str(spec.input.resolve()), "input_bytes": spec.input.stat().st_size,
            "text_column": spec.text_column, "context_column": spec.context_column,
            "shard_rows": spec.shard_rows, "task": task, "format": fmt_out,
            "input_format": fmt_in, "model": model_name}


def _claim_output(out: Path, job: dict[str, Any]) -> None:
    """Start a job in ``out`` or continue the same job there; refuse to mix two jobs."""
    job_file = out / JOB_FILE
    if job_file.is_file():
        before = json.loads(job_file.read_text())
        changed = [k for k in _JOB_KEYS if before.get(k) != job.get(k)]
        if changed:
            raise ValueError(f"{out} holds a run of another job ({', '.join(changed)} differ: "
                             f"{ {k: before.get(k) for k in changed} }); choose a new --output or "
                             "delete that folder")
        return
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--output {out} exists and is not a torchbridge run folder; choose an "
                         "empty or new folder")
    (out / DONE_DIR).mkdir(parents=True, exist_ok=True)
    (out / ERRORS_DIR).mkdir(exist_ok=True)
    files.write_jsonl([job], job_file)  # one line of JSON, written atomically


def _split_rows(shard: list[dict[str, Any]], spec: RunSpec) -> tuple[list[Any], list[Any] | None,
                                                                      dict[int, str]]:
    texts, contexts, errors = [], [] if spec.context_column else None, {}
    for i, row in enumerate(shard):
        if files.INVALID_ROW in row:
            errors[i] = row[files.INVALID_ROW]
        elif spec.text_column not in row:
            errors[i] = f"no {spec.text_column!r} field"
        texts.append(row.get(spec.text_column))
        if contexts is not None:
            contexts.append(row.get(spec.context_column))
    return texts, contexts, errors


def _error_rows(shard: list[dict[str, Any]], start: int, errors: dict[int, str]) -> list[dict]:
    return [{"row": start + i, "error": reason,
             **{k: v for k, v in shard[i].items() if k != files.INVALID_ROW}}
            for i, reason in sorted(errors.items())]


def run_file(model: Any, spec: RunSpec) -> dict[str, Any]:
    """Run ``model`` over ``spec.input`` into ``spec.output`` (see the module docstring)."""
    t0 = time.perf_counter()
    fmt_in = files.detect_format(spec.input, spec.input_format)
    # --format, else the output folder's suffix (out.parquet/), else the input's format
    fmt_out = files.detect_format(spec.output, spec.output_format) \
        if spec.output_format or Path(spec.output).suffix.lower() in files.SUFFIXES else fmt_in
    task = model.task
    _check_columns(spec, fmt_in, task)
    out = Path(spec.output)
    _claim_output(out, _job(spec, fmt_in, fmt_out, task,
                            str(getattr(getattr(model, "report", None), "model_name", ""))))
    schema = None
    if fmt_in == "parquet" and fmt_out == "parquet":
        import pyarrow.parquet as pq

        schema = pq.ParquetFile(spec.input).schema_arrow
    types = arrow_types(task, spec.prefix) if fmt_out == "parquet" else None
    bar = _bar(spec, fmt_in)
    done_rows = processed = new_errors = skipped = 0
    start = 0
    for k, shard in enumerate(files.read_shards(spec.input, fmt_in, spec.shard_rows)):
        marker = out / DONE_DIR / f"{k:05d}.json"
        if marker.is_file():
            skipped += len(shard)
        else:
            texts, contexts, errors = _split_rows(shard, spec)
            valid = [i for i in range(len(shard)) if i not in errors]
            outcome = run_block(model, [texts[i] for i in valid],
                                None if contexts is None else [contexts[i] for i in valid],
                                spec.options, spec.prefix)
            errors.update({valid[i]: reason for i, reason in outcome.errors.items()})
            ok_rows = [shard[valid[i]] for i in outcome.index]
            if ok_rows:
                files.write_rows(ok_rows, outcome.columns, out / f"part-{k:05d}.{fmt_out}", fmt_out,
                                 schema=schema, types=types)
            if errors:
                files.write_jsonl(_error_rows(shard, start, errors), out / ERRORS_DIR / f"{k:05d}.jsonl")
            files.write_jsonl([{"shard": k, "first_row": start, "rows": len(shard),
                                "ok": len(ok_rows), "errors": len(errors)}], marker)
            processed += len(shard)
            new_errors += len(errors)
        done_rows += len(shard)
        start += len(shard)
        if bar is not None:
            bar.update(len(shard))
    if bar is not None:
        bar.close()
    return _finish(out, t0, rows=done_rows, processed=processed, new_errors=new_errors,
                   skipped=skipped)


def _bar(spec: RunSpec, fmt: str):
    show = spec.progress if spec.progress is not None else (
        sys.stderr.isatty() and not os.environ.get("TORCHBRIDGE_NO_PROGRESS"))
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=files.count_rows(spec.input, fmt), unit="row", desc="run")


def _finish(out: Path, t0: float, **counts: int) -> dict[str, Any]:
    markers = [json.loads(p.read_text()) for p in sorted((out / DONE_DIR).glob("*.json"))]
    error_files = sorted((out / ERRORS_DIR).glob("*.jsonl"))
    with open(out / (ERRORS_FILE + ".tmp"), "w", encoding="utf-8") as merged:
        for path in error_files:
            merged.write(path.read_text(encoding="utf-8"))
    os.replace(out / (ERRORS_FILE + ".tmp"), out / ERRORS_FILE)
    seconds = time.perf_counter() - t0
    summary = {
        "rows": counts["rows"], "ok": sum(m["ok"] for m in markers),
        "errors": sum(m["errors"] for m in markers), "shards": len(markers),
        "this_run": {"rows_processed": counts["processed"], "errors": counts["new_errors"],
                     "rows_skipped_done_before": counts["skipped"], "seconds": round(seconds, 3),
                     "rows_per_s": round(counts["processed"] / seconds, 1) if seconds else None},
        "output": str(out), "errors_file": str(out / ERRORS_FILE),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
