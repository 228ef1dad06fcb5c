"""Row streams from JSONL, CSV and Parquet files, and shard writers in the same formats.

Rows travel as plain dicts, one shard at a time, so memory holds one shard whatever the file's
size. Parquet is read and written with pyarrow (extra ``torchbridge[data]``); CSV through the
standard library (every field is text, a UTF-8 byte-order mark is dropped); JSONL line by line.
Every write goes to a temporary name first and is renamed into place, so a killed run never leaves
a half-written file under a final name.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "csv", "parquet")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
             ".parquet": "parquet", ".pq": "parquet"}
# The key a JSONL line that is not a JSON object carries instead of its fields.
INVALID_ROW = "__torchbridge_invalid__"


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError("Parquet needs pyarrow: pip install torchbridge[data]") from None
    return pyarrow


def detect_format(path: Path, explicit: str | None = None) -> str:
    if explicit:
        if explicit not in FORMATS:
            raise ValueError(f"format {explicit!r} is not one of {', '.join(FORMATS)}")
        return explicit
    fmt = SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path} from its suffix; name it .jsonl, .csv "
                         "or .parquet, or pass --format")
    return fmt


def columns_of(path: Path, fmt: str) -> list[str] | None:
    """The file's columns (CSV header, Parquet schema); None for JSONL (each line has its own)."""
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), [])
    if fmt == "parquet":
        return list(_pyarrow().parquet.ParquetFile(path).schema_arrow.names)
    return None


def count_rows(path: Path, fmt: str) -> int | None:
    """Rows in the file when that is cheap to know (Parquet metadata), else None."""
    if fmt == "parquet":
        return _pyarrow().parquet.ParquetFile(path).metadata.num_rows
    return None


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue  # a blank line is not a row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield {INVALID_ROW: f"line {number} is not valid JSON ({err.msg})"}
                continue
            yield row if isinstance(row, dict) else {
                INVALID_ROW: f"line {number} is a JSON {type(row).__name__}, not an object"}


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents are legitimate rows
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            row.pop(None, None)  # extra fields past the header have no column to go to
            yield row


def _parquet_rows(path: Path, batch_rows: int) -> Iterator[dict[str, Any]]:
    parquet = _pyarrow().parquet
    for batch in parquet.ParquetFile(path).iter_batches(batch_size=batch_rows):
        yield from batch.to_pylist()


def read_shards(path: Path, fmt: str, shard_rows: int) -> Iterator[list[dict[str, Any]]]:
    """The file's rows in consecutive shards of ``shard_rows`` (the last may be shorter)."""
    rows = {"jsonl": lambda: _jsonl_rows(path), "csv": lambda: _csv_rows(path),
            "parquet": lambda: _parquet_rows(path, min(shard_rows, 65536))}[fmt]()
    shard: list[dict[str, Any]] = []
    for row in rows:
        shard.append(row)
        if len(shard) == shard_rows:
            yield shard
            shard = []
    if shard:
        yield shard


def _json_default(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _replace_atomically(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
    _replace_atomically(tmp, path)


def write_rows(rows: list[dict[str, Any]], results: dict[str, list[Any]], path: Path, fmt: str, *,
               schema: Any = None, types: dict[str, Any] | None = None) -> None:
    """Write one shard: the input rows with the result columns next to them. Parquet keeps the
    input's own column types (``schema``); CSV cells holding lists or dicts are JSON text."""
    tmp = path.with_name(path.name + ".tmp")
    if fmt in ("jsonl", "csv"):
        merged = [{**row, **{k: v[i] for k, v in results.items()}} for i, row in enumerate(rows)]
        if fmt == "jsonl":
            write_jsonl(merged, path)
            return
        names: dict[str, None] = {}
        for row in merged:
            names.update(dict.fromkeys(row))
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(names))
            writer.writeheader()
            for row in merged:
                writer.writerow({k: json.dumps(v, ensure_ascii=False, default=_json_default)
                                 if isinstance(v, (list, dict)) else v for k, v in row.items()})
    else:
        pa = _pyarrow()
        try:
            table = pa.Table.from_pylist(rows, schema=schema)
            for name, values in results.items():
                table = table.append_column(name, pa.array(values, type=(types or {}).get(name)))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ValueError(f"cannot write these rows as Parquet ({err}); the input's columns "
                             "change type between rows: write JSONL instead (--format jsonl)") from err
        pa.parquet.write_table(table, tmp)
    _replace_atomically(tmp, path)
