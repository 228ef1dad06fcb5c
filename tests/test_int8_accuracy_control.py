"""Accuracy-controlled int8: sensitivity ranking, float fallback until the gate passes, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from transformers.pytorch_utils import Conv1D

from torchbridge.precisions.accuracy_control import (
    Int8AccuracyError,
    accuracy_controlled_int8,
    layer_sensitivity,
)
from torchbridge.precisions.int8_dynamic import Int8DynamicLinear
from torchbridge.precisions.int8_weight_only import sqnr_db
from torchbridge.precisions.swap import is_linear, linear_names


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 99, (3, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _float_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if is_linear(m)]


def _gate_needing(k: int, calls: list):
    """Passes once at least k projections are float; records what it saw."""
    def gate(model):
        n = len(_float_names(model))
        calls.append(n)
        return n >= k, {"float_layers": n, "min_cosine": 0.9 + 0.01 * n}
    return gate


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_falls_back_to_the_fewest_most_sensitive_layers(k):
    model = tiny_model("bert", "sequence-classification", num_labels=3)
    total = len(linear_names(model))
    calls: list[int] = []
    out, record = accuracy_controlled_int8(model, _gate_needing(k, calls),
                                           sensitivity_inputs=_inputs())
    assert out is model
    floats = _float_names(model)
    assert len(floats) == k
    assert sorted(record["layers_float"]) == sorted(floats)
    assert record["layers_int8"] == total - k
    assert sum(isinstance(m, Int8DynamicLinear) for m in model.modules()) == total - k
    assert record["gate"] == {"float_layers": k, "min_cosine": pytest.approx(0.9 + 0.01 * k)}
    # the layers kept in float are the top of the sensitivity ranking
    ranking = list(record["sensitivity"])
    assert record["layers_float"] == ranking[:k]
    assert calls[0] == 0  # all-int8 is tried first
    assert len(calls) <= 2 * total.bit_length() + 1
    assert [a["layers_float"] for a in record["attempts"]] == calls


def test_kept_float_layers_keep_their_dtype():
    model = tiny_model("bert", "sequence-classification").to(torch.bfloat16)
    accuracy_controlled_int8(model, _gate_needing(2, []), sensitivity_inputs=_inputs())
    floats = [m for m in model.modules() if is_linear(m)]
    assert len(floats) == 2 and all(m.weight.dtype == torch.bfloat16 for m in floats)


def test_raises_with_measured_values_when_the_gate_cannot_pass():
    model = tiny_model("bert", "sequence-classification")
    total = len(linear_names(model))
    ids = _inputs()
    with torch.no_grad():
        before = model(**ids).logits
    with pytest.raises(Int8AccuracyError, match="min_cosine") as info:
        accuracy_controlled_int8(model, _gate_needing(total, []), sensitivity_inputs=ids,
                                 max_fallback_fraction=0.25)
    record = info.value.record
    assert len(record["layers_float"]) == total // 4
    assert record["gate"]["float_layers"] == total // 4
    assert not any(a["passed"] for a in record["attempts"])
    # handed back in float, as it came
    assert len(_float_names(model)) == total
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, before)


def test_sensitivity_ranks_the_layer_that_moves_the_output_most_first():
    model = tiny_model("bert", "sequence-classification", num_labels=3)
    target = "bert.encoder.layer.0.intermediate.dense"
    names = linear_names(model)
    int8 = {n: Int8DynamicLinear(model.get_submodule(n)) for n in names}
    # a replacement that is far worse than int8 for one layer: it must rank first
    noisy = copy.deepcopy(model.get_submodule(target))
    with torch.no_grad():
        noisy.weight.add_(torch.randn_like(noisy.weight))
    int8[target] = noisy
    ranking = layer_sensitivity(model, int8, _inputs())
    assert list(ranking)[0] == target
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)  # restored


def test_gpt2_conv1d_projections_are_controlled_too():
    model = tiny_model("gpt2", "causal-lm")
    ids = {"input_ids": torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        ref = model(**ids).logits

    def gate(m):
        with torch.no_grad():
            db = sqnr_db(ref, m(**ids).logits)
        return db > 30, {"sqnr_db": db}

    _, record = accuracy_controlled_int8(model, gate, sensitivity_inputs=ids, smooth_alpha=0.5)
    assert record["smoothing"] == 0.5 and record["gate"]["sqnr_db"] > 30
    kinds = {type(m) for m in model.modules() if is_linear(m) or isinstance(m, Int8DynamicLinear)}
    assert Int8DynamicLinear in kinds
    conv1d_left = sum(isinstance(m, Conv1D) for m in model.modules())
    assert conv1d_left <= len(record["layers_float"]) < record["layers_total"]


def test_rejects_bad_arguments():
    model = tiny_model("bert", "sequence-classification")
    with pytest.raises(ValueError, match="max_fallback_fraction"):
        accuracy_controlled_int8(model, _gate_needing(0, []), sensitivity_inputs=_inputs(),
                                 max_fallback_fraction=1.5)
    with pytest.raises(ValueError, match="no nn.Linear"):
        accuracy_controlled_int8(torch.nn.Sequential(torch.nn.ReLU()), _gate_needing(0, []),
                                 sensitivity_inputs={})


def test_encoder_int8_is_smoothed_on_the_gate_batch_and_a_saved_folder_smooths_alike(
        tmp_path, tiny_bert_dir):
    """Dynamic int8 for encoders calibrates SmoothQuant scales on the (deterministic) gate batch:
    the report says so, every projection carries its scales, and the model a saved folder
    rebuilds gives the same outputs."""
    from conftest import no_compile

    from torchbridge.models.text import TextModelOptimizer
    from torchbridge.pipeline.verify import padded_batch
    from torchbridge.precisions.int8_dynamic import Int8DynamicLinear

    opt = TextModelOptimizer(no_compile(quantization="int8-dynamic"))
    model = opt.optimize(str(tiny_bert_dir), task="feature-extraction")
    step = next(s for s in opt.report.steps if s.name == "quantization")
    assert "SmoothQuant" in step.detail, step
    int8 = [m for m in model.modules() if isinstance(m, Int8DynamicLinear)]
    assert int8 and all(m.inv_smooth is not None for m in int8)
    assert opt.report.calibration_inputs is None  # not kept after optimize
    folder = tmp_path / "saved"
    opt.save_pretrained(model, str(folder), source=str(tiny_bert_dir))
    again = TextModelOptimizer(no_compile()).optimize(str(folder), task="feature-extraction")
    batch = padded_batch(model.config, 3, 12)
    with torch.no_grad():
        assert torch.allclose(model(**batch)[0], again(**batch)[0], atol=1e-5)
