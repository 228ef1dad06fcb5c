"""The ``torchbridge`` command on tiny local models: every subcommand, JSON fields, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchbridge.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with a word-level tokenizer, saved as a local folder."""
    from conftest import tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-gpt2")
    model = tiny_model("gpt2", "causal-lm")
    g = torch.Generator().manual_seed(0)  # the same weights whatever ran before
    with torch.no_grad():  # decisive logits: greedy output must not hinge on near-ties
        for p in model.parameters():
            p.normal_(0.0, 0.3, generator=g)
    model.save_pretrained(path)
    words = "the a of to and in is was it for on with as at by an be this that from".split()
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), 98)})
    vocab["<|endoftext|>"] = 98
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(path)
    return path


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_env_json_fields(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(capsys, "env", "--json")
    env = json.loads(out)
    assert code == 0
    assert env["torch"] == torch.__version__ and env["torchbridge"] and env["transformers"]
    assert set(env["peers"]) >= {"onnxruntime", "openvino", "ctranslate2"}
    dev = env["device"]
    for key in ("type", "name", "compute_capability", "bf16", "fp16", "fp8", "cpu_isa",
                "threads"):
        assert key in dev
    assert env["auto"]["inference"]["dtype"] in ("float32", "bfloat16", "float16")
    code, text, _ = run_cli(capsys, "env")
    assert code == 0 and "auto[inference]" in text and "ISA" in text


def test_benchmark_encoder_json_and_files(capsys: pytest.CaptureFixture, tiny_bert_dir: Path,
                                          tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "benchmark", str(tiny_bert_dir), "--batch-size", "4",
                             "--seq-len", "16", "--runs", "2", "--warmup", "1", "--no-compile",
                             "--compare", "hf-sdpa", "--output", str(tmp_path), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["env"]["device"]["type"] == "cpu" and doc["workload"]["batch_size"] == 4
    names = {(r["name"], r["variant"]) for r in doc["rows"]}
    assert names == {(n, v) for n in ("baseline", "torchbridge", "hf-sdpa")
                     for v in ("full", "padded")}
    for r in doc["rows"]:
        assert r["status"] == "ok", r
        assert 0 < r["median_ms"] <= r["p90_ms"]
        for key in ("throughput", "speedup", "first_call_s", "max_abs_diff", "agreement",
                    "gflops"):
            assert r[key] is not None, key
        assert "peak_mem_mb" in r
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == doc["rows"]
    assert "| baseline | full |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == PNG_MAGIC
    assert doc["optimization_info"]["torch_compile"] is False  # --no-compile was honoured


def test_benchmark_generation_table(capsys: pytest.CaptureFixture, tiny_gpt2_dir: Path,
                                    tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "benchmark", str(tiny_gpt2_dir), "--new-tokens", "4",
                             "--runs", "2", "--warmup", "0", "--no-compile", "--compare",
                             "none", "--output", str(tmp_path))
    assert code == 0, err
    assert "ms/token | GB/s" in out and "| torchbridge | full |" in out
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["workload"]["batch_size"] == 1 and doc["workload"]["seq_len"] == 8  # task defaults
    assert [r["variant"] for r in doc["rows"]] == ["full", "full"]  # no padding at batch 1
    for r in doc["rows"]:
        assert r["ms_per_token"] == pytest.approx(r["median_ms"] / 4)
        assert r["gb_per_s"] > 0 and r["throughput_unit"] == "tokens/s"


def test_uninstalled_peer_is_listed_as_skipped(capsys: pytest.CaptureFixture,
                                               tiny_bert_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    code, out, _ = run_cli(capsys, "benchmark", str(tiny_bert_dir), "--batch-size", "2",
                           "--seq-len", "8", "--runs", "1", "--no-compile", "--no-padded",
                           "--compare", "openvino", "--output", str(tmp_path))
    assert code == 0
    assert "| openvino | full | **skipped**: openvino is not installed: pip install openvino" in out


@pytest.mark.parametrize("argv, fragment", [
    (["bogus"], "invalid choice"),
    (["benchmark"], "required: model"),
    (["benchmark", "m", "--runs", "0"], "expected a positive integer"),
    (["benchmark", "m", "--dtype", "fp64"], "invalid choice"),
    (["benchmark", "__no_such_model__"], "not available offline"),
    (["generate", "__no_such_model__", "hi", "--temperature", "-1"], "--temperature"),
    (["env", "--device", "cuda:7"], "cuda"),
])
def test_bad_arguments_one_line_exit_2(capsys: pytest.CaptureFixture, argv: list[str],
                                       fragment: str) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err


def test_compare_unknown_peer_names_the_known_ones(capsys: pytest.CaptureFixture,
                                                   tiny_bert_dir: Path) -> None:
    code, _, err = run_cli(capsys, "benchmark", str(tiny_bert_dir), "--compare", "tensorrt")
    assert code == 2 and "known: hf-sdpa" in err


def test_debug_shows_the_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "torchbridge.cli", "--debug", "benchmark",
                           "__no_such_model__"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_generate_greedy_and_stream(capsys: pytest.CaptureFixture, tiny_gpt2_dir: Path) -> None:
    base = ["generate", str(tiny_gpt2_dir), "the a of", "--max-new-tokens", "5",
            "--no-compile", "--dtype", "float32"]
    code, out, err = run_cli(capsys, *base)
    assert code == 0, err
    words = out.split()
    assert words[:3] == ["the", "a", "of"] and len(words) == 8
    code, streamed, _ = run_cli(capsys, *base, "--stream")
    assert code == 0 and streamed.split() == words  # streaming prints the same greedy text
    code, sampled, _ = run_cli(capsys, *base, "--temperature", "0.8", "--top-p", "0.9")
    assert code == 0 and sampled.split()[:3] == ["the", "a", "of"]


def test_classify_json(capsys: pytest.CaptureFixture, tiny_bert_dir: Path) -> None:
    code, out, err = run_cli(capsys, "classify", str(tiny_bert_dir), "this movie is great",
                             "i didn't like it at all", "--no-compile", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [r["text"] for r in res] == ["this movie is great", "i didn't like it at all"]
    assert all(0.5 <= r["score"] <= 1.0 for r in res)  # 2 labels: the winner has >= 1/2


def test_optimize_saves_and_reloads(capsys: pytest.CaptureFixture, tiny_bert_dir: Path,
                                    tmp_path: Path) -> None:
    from safetensors import safe_open

    from torchbridge.models.text import TextModelConfig, TextModelOptimizer
    from torchbridge.pipeline.loading import load_model
    from torchbridge.pipeline.saved import read_record

    out_dir = tmp_path / "opt"
    code, out, err = run_cli(capsys, "optimize", str(tiny_bert_dir), "--output", str(out_dir),
                             "--dtype", "bfloat16", "--no-compile")
    assert code == 0, err
    summary = json.loads(out)
    assert {"torchbridge.json", "model.safetensors", "config.json"} <= set(summary["files"])
    assert "tokenizer.json" in summary["files"]
    with safe_open(out_dir / "model.safetensors", "pt") as f:  # weights saved converted
        key = next(k for k in f.keys() if k.endswith("query.weight"))
        assert f.get_tensor(key).dtype == torch.bfloat16
    opt = TextModelOptimizer(TextModelConfig(warmup_steps=1, warmup_seq_len=16))
    model = opt.optimize(out_dir)
    assert opt.get_optimization_info()["verify"] is None  # verified at save time, not again
    assert read_record(out_dir)["verify_at_save"]["passed"] is True
    assert opt.plan.dtype == torch.bfloat16 and not opt.report.compiled  # the saved plan
    ref = load_model(tiny_bert_dir, "sequence-classification")
    ids = torch.randint(5, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = model(input_ids=ids).logits.float()
        want = ref(input_ids=ids).logits
    assert (got - want).abs().max() < 0.05  # bf16 weights: close to fp32, not equal
