"""The pipeline's contract: any nn.Module, input checks, saved folders, the device table."""

import json

import pytest
import torch
from conftest import no_compile, tiny_model

from torchbridge.backends import DEVICE_TABLE, DeviceInfo, device_ops
from torchbridge.models.text import OptimizedBERT, TextModelConfig, TextModelOptimizer
from torchbridge.pipeline.verify import VerificationError, padded_batch


class TinyNet(torch.nn.Module):
    """A custom module the library knows nothing about."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(12, 40), torch.nn.Linear(40, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize("module", [torch.nn.Linear(10, 2), torch.nn.Sequential(
    torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)), TinyNet()])
def test_any_module_optimizes_without_inputs_and_says_why_verify_was_skipped(module):
    opt = TextModelOptimizer(TextModelConfig(use_torch_compile=False))
    optimized = opt.optimize(module)
    info = opt.get_optimization_info()
    assert info["task"] == "module" and info["verify"] is None
    assert any("example_inputs" in note for note in info["notes"])
    assert not optimized.training and not any(p.requires_grad for p in optimized.parameters())
    assert all(p.dtype == opt.dtype for p in optimized.parameters())


def test_custom_module_with_example_inputs_is_verified_compiled_and_warmed_up():
    module, x = TinyNet(), torch.randn(6, 12, generator=torch.Generator().manual_seed(0))
    opt = TextModelOptimizer(TextModelConfig(dtype=torch.float32, warmup_steps=2))
    optimized = opt.optimize(module, example_inputs=x)
    info = opt.get_optimization_info()
    assert info["verify"]["passed"] and info["verify"]["text"] == "the caller's example inputs"
    assert info["torch_compile"] and info["timings"]["warmup_s"] > 0
    torch.testing.assert_close(optimized(x), module(x), atol=1e-5, rtol=1e-5)
    assert module.up.weight.requires_grad  # the caller's module is untouched


def test_explicit_verify_without_inputs_raises():
    with pytest.raises(ValueError, match="example_inputs"):
        TextModelOptimizer(TextModelConfig(verify=True)).optimize(TinyNet())


def test_info_before_and_after_optimize(tiny_bert):
    opt = TextModelOptimizer(no_compile(dtype=torch.float32))
    before = opt.get_optimization_info()
    assert before["optimized"] is False and before["dtype"] == "float32"
    assert before["torch_compile"] is False and before["compile_reason"] == "use_torch_compile=False"
    opt.optimize(tiny_bert)
    after = opt.get_optimization_info()
    assert after["optimized"] and after["verify"]["passed"] and after["steps"]


def test_optimize_without_a_name_uses_config_model_name(tiny_bert_dir):
    opt = TextModelOptimizer(no_compile(model_name=str(tiny_bert_dir)))
    model = opt.optimize()
    assert type(model).__name__ == "BertForSequenceClassification"
    assert opt.report.model_name == str(tiny_bert_dir)
    # with its tokenizer at hand, the gate runs on real text
    assert opt.report.verify.text == "real text"


def test_model_type_is_checked_when_set(tiny_bert):
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        TextModelOptimizer(no_compile(model_type="gpt2")).optimize(tiny_bert)
    TextModelOptimizer(no_compile(model_type="bert")).optimize(tiny_bert)
    TextModelOptimizer(no_compile(model_type="custom")).optimize(tiny_bert)


@pytest.mark.parametrize("bad, words", [
    (dict(input_ids=torch.randint(5, 90, (2, 200))), "200 tokens is longer than the model's 128 "
                                                    "positions. Fix: tokenize with truncation=True"),
    (dict(input_ids=torch.tensor([[5, 7, 120]])), "token id 120 is outside the model's vocabulary"),
    (dict(input_ids=torch.tensor([[5, -1, 7]])), "token id -1"),
    (dict(input_ids=torch.zeros(0, 5, dtype=torch.long)), "empty batch"),
    (dict(input_ids=torch.rand(2, 5)), "integer token ids; got dtype torch.float32"),
    (dict(input_ids=torch.randint(5, 90, (2, 6)), attention_mask=torch.ones(2, 7, dtype=torch.long)),
     "attention_mask has shape"),
])
def test_bad_inputs_are_refused_in_the_users_terms(tiny_bert, bad, words):
    model = TextModelOptimizer(no_compile()).optimize(tiny_bert)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        model(**bad)


def test_wrapper_refuses_an_overlong_sequence(tiny_bert):
    model = OptimizedBERT(tiny_bert, config=no_compile())
    with pytest.raises(ValueError, match="truncation=True, max_length=128"):
        model(input_ids=torch.randint(5, 90, (1, 600)))


def test_saved_folder_keeps_the_plan(tiny_bert_dir, tmp_path):
    config = no_compile(dtype=torch.bfloat16, trim_padding=False, warmup_batch_size=2,
                        warmup_seq_len=24, max_sequence_length=64, use_amp=False)
    opt = TextModelOptimizer(config)
    model = opt.optimize(str(tiny_bert_dir))
    opt.save_pretrained(model, tmp_path / "saved", source=str(tiny_bert_dir))
    record = json.loads((tmp_path / "saved" / "torchbridge.json").read_text())
    assert record["plan"]["trim_padding"] is False and record["plan"]["warmup_shape"] == [2, 24]

    again = TextModelOptimizer(TextModelConfig(warmup_steps=1))
    reloaded = again.optimize(tmp_path / "saved")
    plan = again.plan
    assert (plan.trim_padding, plan.warmup_shape, plan.max_sequence_length, plan.amp) == (
        False, (2, 24), 64, False)
    assert plan.dtype == torch.bfloat16 and not plan.compile and plan.warmup_steps == 1
    assert again.report.verify is None and any("saved plan" in n for n in again.report.notes)
    batch = padded_batch(model.config, 2, 10)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
    with pytest.raises(ValueError, match="optimized for torch.bfloat16"):
        TextModelOptimizer(TextModelConfig(dtype=torch.float32)).optimize(tmp_path / "saved")


def test_a_saved_folder_can_be_verified_again_on_request(tiny_bert_dir, tmp_path):
    opt = TextModelOptimizer(no_compile(dtype=torch.float32))
    opt.save_pretrained(opt.optimize(str(tiny_bert_dir)), tmp_path / "s", source=str(tiny_bert_dir))
    again = TextModelOptimizer(no_compile(verify=True))
    again.optimize(tmp_path / "s")
    assert again.report.verify.passed


def test_decoder_gate_catches_a_wrong_lm_head(monkeypatch):
    from torchbridge.pipeline import steps

    original = steps.STEPS["cast"]

    def cast_and_break(model, plan, report):
        model = original(model, plan, report)
        model.lm_head.weight.data[:, :8] *= 40  # a planted bug: the head now favours other tokens
        return model

    monkeypatch.setitem(steps.STEPS, "cast", cast_and_break)
    model = tiny_model("gpt2", "causal-lm", tie_word_embeddings=False)
    with pytest.raises(VerificationError, match="KL|agreement"):
        TextModelOptimizer(no_compile(dtype=torch.float32)).optimize(model)


def test_device_table_has_a_row_per_device_and_refuses_others():
    assert set(DEVICE_TABLE) == {"cpu", "cuda", "xpu", "mps"}
    assert device_ops("cuda:1").graph_capture and not device_ops("cpu").graph_capture
    assert device_ops(DeviceInfo("cpu", None, "x", "cpu")).compile_freezing
    with pytest.raises(ValueError, match="known: cpu, cuda, xpu, mps"):
        device_ops(DeviceInfo("tpu", 0, "tpu", "google"))


def test_precision_registry_is_the_one_place():
    from torchbridge.pipeline.config import QUANTIZATION_CHOICES
    from torchbridge.precisions import PRECISIONS, WEIGHT_FORMATS, effective

    assert set(WEIGHT_FORMATS) == {q for q in QUANTIZATION_CHOICES if q}
    for entry in PRECISIONS.values():
        assert 0 < entry.gate.min_cosine <= 1 and 0 < entry.gate.min_agreement <= 1
    assert effective(torch.bfloat16, None).name == "bf16"
    assert effective(torch.bfloat16, "int8-dynamic").bytes_per_param == 1


def test_int8_dynamic_keeps_layers_in_float_until_the_gate_passes():
    from torchbridge.precisions.accuracy_control import Int8AccuracyError

    model = tiny_model("bert", "feature-extraction")
    # a gate tighter than plain int8 reaches on this model (cosine ~0.99997): the accuracy
    # control must put the most sensitive projection(s) back in float, and say which
    opt = TextModelOptimizer(no_compile(dtype=torch.float32, quantization="int8-dynamic",
                                        verify_tolerance=1e-5))
    opt.optimize(model)
    info = opt.get_optimization_info()
    assert info["verify"]["passed"] and info["float_layers"]
    assert info["accuracy_control"]["layers_float"] == info["float_layers"]
    assert "kept in" in opt.report.summary()
    with pytest.raises(Int8AccuracyError, match="fails the accuracy gate"):
        TextModelOptimizer(no_compile(dtype=torch.float32, quantization="int8-dynamic",
                                      verify_tolerance=1e-12)).optimize(model)


@pytest.mark.parametrize("mode, objective", [("throughput", "speed"), ("memory", "size")])
def test_modes_pick_the_precision_by_measurement(tiny_bert, mode, objective):
    opt = TextModelOptimizer(TextModelConfig(optimization_mode=mode, use_torch_compile=False,
                                             warmup_steps=1, warmup_seq_len=16))
    opt.optimize(tiny_bert)
    info = opt.get_optimization_info()
    table = info["precision_search"]
    assert table and info["verify"]["passed"]
    passing = [row for row in table if row["passed"]]
    if objective == "speed":
        assert all("median_ms" in row for row in passing)
        fastest = min(passing, key=lambda row: row["median_ms"])
        assert info["precision"] == fastest["precision"] and "fastest" in info["dtype_reason"]
    else:  # candidates in order of bytes per parameter: the first that passes wins
        assert table[-1]["passed"] and info["precision"] == table[-1]["precision"]
        assert info["precision"] == "int8-dynamic" and "smallest" in info["dtype_reason"]


def test_roberta_positions_start_after_the_padding_rows():
    """RoBERTa numbers positions from padding_idx + 1: a 128-row table takes 126 tokens, and the
    plan, the warm-up and the input check all use that limit."""
    model = tiny_model("roberta", "feature-extraction")  # max_position_embeddings=128, pad id 1
    opt = TextModelOptimizer(TextModelConfig(use_torch_compile=False, warmup_seq_len=512))
    optimized = opt.optimize(model, task="feature-extraction")
    assert opt.plan.max_sequence_length == 126 and opt.plan.warmup_shape[1] == 126
    with pytest.raises(ValueError, match="126"):
        optimized(input_ids=torch.full((1, 127), 5))
