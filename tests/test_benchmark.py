"""The timing harness (fake clock, known sleeps), the result records and the peers' fidelity."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
import torch

from torchbridge.bench import harness as bm
from torchbridge.bench.peers import PEERS, Workload, parse_compare
from torchbridge.bench.runner import BenchSpec, fidelity, run_benchmark


class FakeClock:
    """A clock that advances only when the code under test 'does work'."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_first_call_warmup_and_samples_are_apart() -> None:
    clock = FakeClock()
    durations = iter([5.0, 0.5, 0.5, 0.1, 0.3, 0.2, 0.4, 0.9])  # first, 2 warm-up, 5 timed
    calls = []

    def fn() -> int:
        clock.now += next(durations)
        calls.append(clock.now)
        return len(calls)

    t = bm.time_callable(fn, runs=5, warmup=2, clock=clock)
    assert t.first_call_s == pytest.approx(5.0)  # compile-like first call, reported apart
    assert t.samples_s == pytest.approx([0.1, 0.3, 0.2, 0.4, 0.9])  # warm-up excluded
    assert t.median_s == pytest.approx(0.3)
    assert t.p90_s == pytest.approx(0.4 + 0.6 * (0.9 - 0.4))  # numpy's linear percentile
    assert t.last_output == 8 and len(calls) == 8


def test_sync_brackets_every_call() -> None:
    clock, events = FakeClock(), []

    def fn() -> None:
        events.append("call")
        clock.now += 1.0

    def sync() -> None:
        events.append("sync")
        clock.now += 0.25  # pending device work: billed to the call before, never after

    t = bm.time_callable(fn, runs=3, warmup=1, sync=sync, clock=clock)
    assert events == ["sync", "call", "sync"] * 5
    # each sample is call + trailing sync (the queued work it launched), not the leading sync
    assert t.samples_s == pytest.approx([1.25, 1.25, 1.25])


def test_known_sleep_real_clock() -> None:
    state = {"n": 0}

    def fn() -> None:
        state["n"] += 1
        time.sleep(0.15 if state["n"] == 1 else 0.02)

    t = bm.time_callable(fn, runs=4, warmup=1)
    assert t.first_call_s >= 0.15
    assert 0.02 <= t.median_s < 0.1  # the slow first call never reaches the samples
    assert len(t.samples_s) == 4


def test_bad_run_counts() -> None:
    with pytest.raises(ValueError, match="runs"):
        bm.time_callable(lambda: None, runs=0)
    with pytest.raises(ValueError, match="warmup"):
        bm.time_callable(lambda: None, runs=1, warmup=-1)


def test_percentile_matches_numpy() -> None:
    import numpy as np

    xs = [3.0, 1.0, 7.0, 2.0, 9.0, 4.0]
    for q in (0, 50, 90, 100):
        assert bm.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_device_sync_uses_backend_synchronize(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr("torchbridge.backends.synchronize", lambda d: seen.append(str(d)))
    bm.device_sync(torch.device("cuda", 1))()
    bm.device_sync("xpu")()
    assert seen == ["cuda:1", "xpu"]
    bm.device_sync("cpu")()  # CPU ops are synchronous: no call
    assert len(seen) == 2


def test_peak_memory_cpu_sees_an_allocation() -> None:
    with bm.PeakMemory("cpu") as small:
        pass
    with bm.PeakMemory("cpu") as big:
        x = torch.ones(64 * 2**20 // 4 * 3)  # 192 MiB, touched
        del x
    if big.value is None:
        pytest.skip("no /proc/self/clear_refs on this system")
    assert big.value >= 150 * 2**20
    assert small.value < big.value


def test_speedups_per_variant() -> None:
    rows = [bm.Row("baseline", "full", "baseline", median_ms=100.0),
            bm.Row("baseline", "padded", "baseline", median_ms=80.0),
            bm.Row("x", "full", "peer", median_ms=25.0),
            bm.Row("x", "padded", "peer", median_ms=40.0),
            bm.Row("y", "full", "peer", status="skipped")]
    bm.fill_speedups(rows)
    assert [r.speedup for r in rows] == [1.0, 1.0, 4.0, 2.0, None]


def test_fidelity_ignores_padding_and_counts_agreement() -> None:
    ref = torch.zeros(2, 3, 4)
    ref[..., 1] = 1.0
    out = ref.clone()
    out[1, 2] = torch.tensor([9.0, 0, 0, 0])  # garbage at a padded position
    out[0, 0, 1] = 1.5
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    diff, agree = fidelity(out, ref, mask, generation=False)
    assert diff == pytest.approx(0.5) and agree == 1.0
    out[0, 1] = torch.tensor([2.0, 0, 0, 0])  # a flipped argmax at a real position
    assert fidelity(out, ref, mask, generation=False)[1] == pytest.approx(4 / 5)
    toks = torch.tensor([[1, 2, 3, 4]])
    assert fidelity(torch.tensor([[1, 2, 0, 4]]), toks, mask, generation=True) == (None, 0.75)


def test_parse_compare() -> None:
    assert parse_compare("all") == list(PEERS)
    assert parse_compare("none") == []
    assert parse_compare("ort, ct2") == ["ort", "ct2"]
    with pytest.raises(ValueError, match="unknown peer.*known: hf-sdpa"):
        parse_compare("ort,tensorrt")


def _tiny_dir(model_type: str, task: str, tmp: Path, scale: float | None = None) -> Path:
    from conftest import tiny_model

    model = tiny_model(model_type, task)
    if scale:  # spread the logits so greedy decoding has no near-ties to flip
        g = torch.Generator().manual_seed(0)  # the same weights whatever ran before
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, scale, generator=g)
    path = tmp / model_type
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dirs() -> dict[str, Path]:
    tmp = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    return {"bert": _tiny_dir("bert", "sequence-classification", tmp),
            "gpt2": _tiny_dir("gpt2", "causal-lm", tmp, scale=0.3)}


def _ok(doc: dict, name: str) -> list[dict]:
    rows = [r for r in doc["rows"] if r["name"] == name]
    assert rows and all(r["status"] == "ok" for r in rows), rows
    return rows


def test_encoder_peers_match_fp32(tiny_dirs: dict[str, Path]) -> None:
    installed = [p for p in ("ort", "ort-int8", "ct2", "openvino") if _installed(p)]
    doc = run_benchmark(BenchSpec(model=str(tiny_dirs["bert"]), batch_size=4, seq_len=16,
                                  compare=["hf-sdpa", "hf-half", *installed], runs=2,
                                  warmup=1, compile=False))
    for row in _ok(doc, "baseline"):
        assert row["speedup"] == 1.0 and row["max_abs_diff"] == 0.0
        assert row["gflops"] > 0 and row["throughput_unit"] == "sequences/s"
        # against the fp32 GEMM ceiling measured in the same run
        best = doc["ceiling"]["ceiling_gflops"]["fp32"]
        assert row["of_ceiling"] == pytest.approx(row["gflops"] / best)
    for name in ("hf-sdpa", "ort", "ct2"):
        if name == "hf-sdpa" or name in installed:
            for row in _ok(doc, name):  # fp32 runtimes: the same numbers, padded rows included
                assert row["max_abs_diff"] < 1e-4 and row["agreement"] == 1.0
    for name in ("ort-int8", "openvino", "hf-half"):  # int8 / bf16: close, not equal
        if name in installed or name == "hf-half":
            for row in _ok(doc, name):
                assert 0 < row["max_abs_diff"] < 0.05
    assert {r["variant"] for r in doc["rows"]} == {"full", "padded"}
    assert doc["workload"]["variants"]["padded"]["real_token_fraction"] < 1.0


def test_decoder_peers_match_greedy(tiny_dirs: dict[str, Path]) -> None:
    peers = [p for p in ("ort", "ct2", "openvino") if _installed(p)]
    doc = run_benchmark(BenchSpec(model=str(tiny_dirs["gpt2"]), batch_size=3, seq_len=6,
                                  new_tokens=6, compare=["hf-sdpa", *peers], runs=2, warmup=0,
                                  compile=False))
    for name in ("baseline", "hf-sdpa", *peers):
        for row in _ok(doc, name):
            if name == "openvino":  # bf16 on CPUs that have it: a near-tie may flip, then all after
                assert row["agreement"] > 0.5, row
            else:  # fp32 runtimes: greedy tokens equal, padded prompts included
                assert row["agreement"] == 1.0, row
            assert row["ms_per_token"] == pytest.approx(row["median_ms"] / 6)
            assert row["gb_per_s"] > 0 and row["throughput_unit"] == "tokens/s"
            assert row["of_ceiling"] == pytest.approx(
                row["gb_per_s"] / doc["ceiling"]["read_gb_per_s"])


def test_the_ceiling_of_a_precision_is_its_best_path() -> None:
    from torchbridge.bench.ceiling import ceiling_key, measure

    result = measure(torch.device("cpu"), runs=1)
    for path, rate in result["gemm_gflops"].items():
        assert 0 < rate <= result["ceiling_gflops"][path.split("_")[0]]
    assert result["read_gb_per_s"] > 0
    assert [ceiling_key(d) for d in ("int8 dynamic", "int8", "bfloat16", "float32", "fp8", None)] \
        == ["int8", "int8", "bf16", "fp32", None, None]


def test_extra_torchbridge_rows(tiny_dirs: dict[str, Path]) -> None:
    doc = run_benchmark(BenchSpec(model=str(tiny_dirs["bert"]), batch_size=2, seq_len=16,
                                  runs=1, warmup=0, padded=False,
                                  variants=["fp32", "int8-static"]))
    (row,) = _ok(doc, "torchbridge-fp32")
    assert row["kind"] == "optimized" and row["dtype"] == "float32"
    assert row["max_abs_diff"] < 1e-4
    (row,) = _ok(doc, "torchbridge-int8-static")
    assert row["dtype"] == "int8" and row["notes"].endswith("int8-static")
    assert row["agreement"] == 1.0 and row["max_abs_diff"] < 0.05
    choices = "fp32, int8-dynamic, int8-static, int8-weight-only"
    with pytest.raises(ValueError, match=f"unknown --variants fp64; choices: {choices}"):
        BenchSpec(model="x", variants=["fp64"]).validate()


def test_rounds_are_interleaved_across_rows(tiny_dirs: dict[str, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import torchbridge.bench.runner as runner

    order, real = [], runner.time_callable

    def recording(fn, **kw):
        order.append((id(fn.__defaults__[0]), kw["warmup"]))  # (which backend, warm-up calls)
        return real(fn, **kw)

    monkeypatch.setattr(runner, "time_callable", recording)
    doc = run_benchmark(BenchSpec(model=str(tiny_dirs["bert"]), batch_size=2, seq_len=8,
                                  compare=["hf-sdpa"], runs=2, rounds=3, warmup=1,
                                  padded=False, compile=False))
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {"baseline", "torchbridge", "hf-sdpa"}
    assert all(r["status"] == "ok" and r["runs"] == 6 for r in rows.values())
    # three rows x three rounds, each round starting one row later; warm-up in round one only
    a, b, c = (backend for backend, _ in order[:3])
    assert [backend for backend, _ in order] == [a, b, c, b, c, a, c, a, b]
    assert [warmup for _, warmup in order] == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert doc["workload"]["rounds"] == 3
    with pytest.raises(ValueError, match="--rounds must be >= 1"):
        BenchSpec(model="x", rounds=0).validate()


def test_missing_peer_is_skipped_with_install_hint(tiny_dirs: dict[str, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module

    def fake_import(name: str, *a, **k):
        if name.startswith("ctranslate2"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    doc = run_benchmark(BenchSpec(model=str(tiny_dirs["bert"]), batch_size=2, seq_len=8,
                                  compare=["ct2"], runs=1, warmup=0, compile=False))
    rows = [r for r in doc["rows"] if r["name"] == "ct2"]
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert "pip install ctranslate2" in rows[0]["reason"]
    assert "torchbridge[peers]" in rows[0]["reason"]


def _installed(name: str) -> bool:
    from torchbridge.bench.peers import installed

    return installed(name)


def test_workload_saves_once(tmp_path: Path) -> None:
    from conftest import tiny_model

    wl = Workload(tiny_model("bert"), "sequence-classification", torch.device("cpu"), tmp_path)
    assert wl.saved_dir() == wl.saved_dir() and (wl.saved_dir() / "config.json").is_file()


def test_compile_time_is_billed_to_the_first_call(tiny_dirs: dict[str, Path]) -> None:
    """The one compile case: torch.compile's work shows up in first_call_s, not in the samples."""
    doc = run_benchmark(BenchSpec(model=str(tiny_dirs["bert"]), batch_size=2, seq_len=8,
                                  compare=["torch-compile"], runs=3, warmup=1, compile=False,
                                  padded=False))
    (row,) = _ok(doc, "torch-compile")
    assert row["first_call_s"] > 0.5  # dynamo + inductor: seconds, even for a tiny model
    assert row["median_ms"] / 1e3 < row["first_call_s"] / 10
    assert row["max_abs_diff"] < 1e-4


def test_missing_matplotlib_is_named_where_the_chart_is_skipped(tmp_path, monkeypatch, capsys):
    from torchbridge.bench import report

    def no_matplotlib(doc, path):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report, "write_chart", no_matplotlib)
    doc = {"rows": [], "workload": {}, "env": {}}
    monkeypatch.setattr(report, "markdown_table", lambda d: "")
    paths = report.write_results(doc, tmp_path)
    assert "chart" not in paths
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert "matplotlib" in json.loads(paths["json"].read_text())["notes"][0]


def test_time_rounds_rotates_the_order_and_reports_every_call():
    from torchbridge.bench.harness import time_rounds

    order = []
    calls = {k: (lambda k=k: order.append(k)) for k in "abc"}
    timed = time_rounds(calls, rounds=3, runs=1)
    # each round calls every entry 3 times (first, warm-up, timed), starting one later each round
    assert "".join(order[::3]) == "abcbcacab"
    assert set(timed) == set("abc")
    assert all(set(t) == {"median_ms", "p90_ms", "first_call_s"} for t in timed.values())
