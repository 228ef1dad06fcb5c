"""`torchbridge run` over files: JSONL, CSV, Parquet; bad rows to errors; resume after a crash."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from torchbridge.cli import main
from torchbridge.data import files
from torchbridge.data.run import RunSpec, run_file
from torchbridge.data.table import Options
from torchbridge.models.text import create_optimized_text_model

WORDS = "the movie is great i didn't like it at all film bad good".split()
LONG = " ".join(["movie"] * 200)


def _texts(n):
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 9)) for i in range(n)]


@pytest.fixture(scope="module")
def classifier(tiny_bert_dir):
    return create_optimized_text_model(tiny_bert_dir, task="sequence-classification",
                                       use_torch_compile=False, warmup_steps=1, warmup_seq_len=16,
                                       verify=False, dtype=torch.float32)


def _rows_with_bad_ones(n=23):
    rows = [{"id": i, "text": t} for i, t in enumerate(_texts(n))]
    rows[3]["text"] = ""
    rows[8]["text"] = 42
    rows[15]["text"] = LONG
    del rows[20]["text"]
    return rows


def _read_parts(out, fmt):
    rows = []
    for path in sorted(out.glob(f"part-*.{fmt}")):
        if fmt == "jsonl":
            rows += [json.loads(line) for line in path.read_text().splitlines()]
        elif fmt == "parquet":
            rows += pq.read_table(path).to_pylist()
        else:
            import csv

            rows += list(csv.DictReader(path.open()))
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    return rows, errors


def test_jsonl_bad_rows_go_to_errors_and_every_row_is_there_once(tmp_path, classifier):
    src = tmp_path / "in.jsonl"
    lines = [json.dumps(r) for r in _rows_with_bad_ones()]
    lines.insert(11, "{not json")
    src.write_text("\n".join(lines) + "\n\n")
    spec = RunSpec(input=src, output=tmp_path / "out", shard_rows=5, options=Options(truncation=False))
    summary = run_file(classifier, spec)
    rows, errors = _read_parts(tmp_path / "out", "jsonl")
    assert summary["rows"] == 24 and summary["ok"] == len(rows) == 19 and summary["errors"] == 5
    assert sorted(r["id"] for r in rows) == [r["id"] for r in rows]  # input order kept
    reasons = {e["row"]: e["error"] for e in errors}
    assert reasons[3] == "empty string" and reasons[8] == "not a string (got int)"
    assert "not valid JSON" in reasons[11] and reasons[21] == "no 'text' field"
    assert "202 tokens, more than the model's limit of 128" in reasons[16]
    assert errors[0]["id"] == 3  # the row's other columns come along
    for r in rows:
        assert r["label"] in ("LABEL_0", "LABEL_1") and set(r["scores"]) == {"LABEL_0", "LABEL_1"}
    expected = classifier.predict([r["text"] for r in rows])
    assert [r["label"] for r in rows] == [e["label"] for e in expected]


def test_resume_after_a_crash_redoes_only_unfinished_shards(tmp_path, classifier, monkeypatch):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": i, "text": t} for i, t in enumerate(_texts(40))]), src)
    spec = RunSpec(input=src, output=tmp_path / "out", shard_rows=7)
    real_write, calls = files.write_rows, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(files, "write_rows", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_file(classifier, spec)
    assert len(list((tmp_path / "out" / "_done").glob("*.json"))) == 2
    monkeypatch.setattr(files, "write_rows", real_write)
    summary = run_file(classifier, spec)
    assert summary["this_run"]["rows_skipped_done_before"] == 14
    assert summary["this_run"]["rows_processed"] == 26 and summary["rows"] == 40
    table = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet")))
    assert table.column("id").to_pylist() == list(range(40))
    assert table.schema.field("id").type == pa.int64()  # the input's own types are kept
    assert table.schema.field("scores").type == pa.map_(pa.string(), pa.float64())
    again = run_file(classifier, spec)  # nothing left to do
    assert again["this_run"]["rows_processed"] == 0 and again["ok"] == 40


def test_another_job_in_the_same_folder_is_refused(tmp_path, classifier):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t, "review": t}) + "\n" for t in _texts(4)))
    run_file(classifier, RunSpec(input=src, output=tmp_path / "out"))
    with pytest.raises(ValueError, match="another job .*text_column"):
        run_file(classifier, RunSpec(input=src, output=tmp_path / "out", text_column="review"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a torchbridge run folder"):
        run_file(classifier, RunSpec(input=src, output=tmp_path / "other"))


def test_csv_with_bom_missing_column_and_clashing_results(tmp_path, classifier):
    src = tmp_path / "in.csv"
    src.write_text("\ufeffid,text,label\n1,the movie is great,pos\n2,,neg\n3,\"bad, not good\",neg\n",
                   encoding="utf-8")
    with pytest.raises(ValueError, match="has no column 'review'; its columns are id, text, label"):
        run_file(classifier, RunSpec(input=src, output=tmp_path / "a", text_column="review"))
    with pytest.raises(ValueError, match="already has column.* label.*--prefix pred_"):
        run_file(classifier, RunSpec(input=src, output=tmp_path / "b"))
    summary = run_file(classifier, RunSpec(input=src, output=tmp_path / "c.csv", prefix="pred_"))
    rows, errors = _read_parts(tmp_path / "c.csv", "csv")
    assert [r["id"] for r in rows] == ["1", "3"] and rows[1]["text"] == "bad, not good"
    assert rows[0]["label"] == "pos" and json.loads(rows[0]["pred_scores"])
    assert errors == [{"row": 1, "error": "empty string", "id": "2", "text": "", "label": "neg"}]
    assert summary["errors"] == 1


def test_cli_run_embeddings_to_parquet(tmp_path, tiny_bert_dir, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"doc": i, "text": t}) + "\n" for i, t in enumerate(_texts(9))))
    args = ["run", str(tiny_bert_dir), "--task", "feature-extraction", "--input", str(src),
            "--output", str(tmp_path / "emb.parquet"), "--no-compile", "--dtype", "float32",
            "--shard-rows", "4"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] == 9 and summary["shards"] == 3
    table = pq.read_table(sorted((tmp_path / "emb.parquet").glob("part-*.parquet")))
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert len(table.column("embedding")[0].as_py()) == 32
    assert table.column("doc").to_pylist() == list(range(9))
    assert main([*args[:-2], "--address", "auto"]) == 2
    assert "--address apply to --engine ray" in capsys.readouterr().err


def test_ray_engine_refuses_non_parquet_before_starting_a_cluster(tmp_path, tiny_bert_dir, capsys):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install torchbridge[ray]")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "the movie"}) + "\n")
    args = ["run", str(tiny_bert_dir), "--input", str(src), "--output", str(tmp_path / "out"),
            "--engine", "ray", "--no-compile"]
    assert main(args) == 2
    assert "--engine ray reads and writes Parquet" in capsys.readouterr().err
