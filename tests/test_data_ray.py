"""Ray Data engine on a small local cluster (2 CPUs): results, bad rows, an actor killed mid-run."""

from __future__ import annotations

import json
import os

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install torchbridge[ray]")
pa = pytest.importorskip("pyarrow")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from torchbridge.data.ray_engine import RaySpec, TextBatchPredictor, run_ray  # noqa: E402
from torchbridge.data.run import RunSpec  # noqa: E402
from torchbridge.models.text import TextModelConfig, create_optimized_text_model  # noqa: E402

WORDS = "the movie is great i didn't like it at all film bad good".split()


def _config():
    return TextModelConfig(use_torch_compile=False, warmup_steps=1, warmup_seq_len=16, verify=False,
                           dtype=torch.float32)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _input(tmp_path, n, bad=True):
    rows = [{"id": i, "text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(1 + i % 7))}
            for i in range(n)]
    if bad:
        rows[4]["text"], rows[17]["text"] = "", "   "
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=max(1, n // 4))
    return path, rows


def _outputs(out):
    table = pq.read_table(sorted(out.glob("*.parquet")))
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    return table, errors


def test_ray_run_matches_local_and_moves_bad_rows_to_errors(cluster, tmp_path, tiny_bert_dir):
    src, rows = _input(tmp_path, 60)
    summary = run_ray(str(tiny_bert_dir), RunSpec(input=src, output=tmp_path / "out"),
                      RaySpec(task="sequence-classification", config=_config(), batch_rows=16))
    table, errors = _outputs(tmp_path / "out")
    assert summary["ok"] == 58 and summary["errors"] == 2 and summary["missing"] == 0
    assert summary["actors"] == 1 and summary["cpus_per_actor"] == 1.0  # 1 CPU left for I/O
    assert sorted(table.column("id").to_pylist() + [e["id"] for e in errors]) == list(range(60))
    assert {e["id"]: e["error"] for e in errors} == {4: "empty string", 17: "empty string"}
    assert table.column("error").null_count == table.num_rows
    local = create_optimized_text_model(tiny_bert_dir, task="sequence-classification", config=_config())
    by_id = dict(zip(table.column("id").to_pylist(), table.column("score").to_pylist(), strict=True))
    expected = local.predict([rows[i]["text"] for i in sorted(by_id)])
    assert [round(by_id[i], 4) for i in sorted(by_id)] == [round(e["score"], 4) for e in expected]


def test_actor_killed_mid_run_loses_no_row(cluster, tmp_path, tiny_bert_dir):
    from ray.data import ActorPoolStrategy

    src, _ = _input(tmp_path, 80, bad=False)
    marker = tmp_path / "killed-once"

    class CrashingOnce(TextBatchPredictor):
        calls = 0

        def __call__(self, batch):
            CrashingOnce.calls += 1
            if CrashingOnce.calls == 2 and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # the actor process dies in the middle of the run
            return super().__call__(batch)

    ds = ray.data.read_parquet(str(src), num_cpus=0.25)
    out = ds.map_batches(CrashingOnce, fn_constructor_kwargs={
        "model": str(tiny_bert_dir), "task": "sequence-classification", "config": _config()},
        batch_format="pyarrow", batch_size=10, compute=ActorPoolStrategy(size=1), num_cpus=1)
    out.write_parquet(str(tmp_path / "out"), ray_remote_args={"num_cpus": 0.25})
    assert marker.exists()  # an actor really died
    ids = pq.read_table(sorted((tmp_path / "out").glob("*.parquet"))).column("id").to_pylist()
    assert sorted(ids) == list(range(80))  # every row exactly once


def test_pool_that_leaves_no_cpu_for_io_is_refused(cluster, tmp_path, tiny_bert_dir):
    src, _ = _input(tmp_path, 8, bad=False)
    with pytest.raises(ValueError, match="leaves no CPU on a 2-CPU node for Ray's file listing"):
        run_ray(str(tiny_bert_dir), RunSpec(input=src, output=tmp_path / "out"),
                RaySpec(cpus_per_actor=2, config=_config()))
