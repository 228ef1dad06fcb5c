"""Static int8 (Int8StaticLinear, quantization="int8-static"): fidelity, fusions, the pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import no_compile, tiny_model

from torchbridge.backends import DeviceInfo
from torchbridge.models.text import TextModelConfig, TextModelOptimizer
from torchbridge.pipeline.verify import padded_batch
from torchbridge.precisions import PrecisionNotSupportedError, check_supported
from torchbridge.precisions.accuracy_control import accuracy_controlled_int8
from torchbridge.precisions.int8_static import Int8StaticLinear, available, input_ranges
from torchbridge.precisions.int8_weight_only import sqnr_db
from torchbridge.precisions.smoothing import smoothing_scales
from torchbridge.precisions.swap import linear_names

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


def _linear(n_in: int, n_out: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_matches_float_and_fuses_gelu_and_the_residual(dtype):
    lin = _linear(48, 40)
    x = torch.randn(3, 17, 48)
    q = Int8StaticLinear(lin, float(x.min()), float(x.max()))
    got = q(x.to(dtype))
    assert got.dtype == dtype and got.shape == (3, 17, 40)
    ref = lin(x)
    # per-tensor x per-channel int8 on a random Gaussian layer; bf16 output costs a little
    assert sqnr_db(ref, got.float()) > (28 if dtype == torch.float32 else 25)
    q.post_op = "gelu"
    assert sqnr_db(torch.nn.functional.gelu(ref), q(x.to(dtype)).float()) > 25
    q.post_op = "none"
    residual = torch.randn(3, 17, 40)
    assert sqnr_db(ref + residual, q.plus(x.to(dtype), residual.to(dtype)).float()) > 25


def test_smoothing_flattens_an_outlier_channel_and_keeps_the_weight():
    """One loud input channel sets a per-tensor grid; SmoothQuant scales move its range into the
    weight, so the other channels keep their resolution (and ``weight`` undoes the scaling)."""
    lin = _linear(32, 16)
    x = torch.randn(64, 32)
    x[:, 3] *= 50
    low, high = x.amin(0), x.amax(0)
    plain = Int8StaticLinear(lin, low, high)
    smooth = smoothing_scales(torch.maximum(low.abs(), high.abs()), lin, 0.5)
    smoothed = Int8StaticLinear(lin, low, high, smooth=smooth)
    ref = lin(x)
    assert sqnr_db(ref, smoothed(x)) > sqnr_db(ref, plain(x)) + 6
    assert sqnr_db(lin.weight, smoothed.weight) > 30 and sqnr_db(lin.weight, plain.weight) > 30


def test_inputs_outside_the_calibrated_range_are_clipped():
    lin = _linear(16, 8)
    q = Int8StaticLinear(lin, -1.0, 1.0)
    inside = torch.full((1, 16), 0.99)
    assert torch.allclose(q(inside), lin(inside), atol=0.05)
    # 5.0 is read as the grid's top (1.0): the layer sees a clipped input, as calibrated
    assert torch.allclose(q(torch.full((1, 16), 5.0)), lin(torch.full((1, 16), 1.0)), atol=0.05)


def test_requantized_output_is_the_next_projections_input():
    """With ``requantize_to`` the GEMM writes the next projection's uint8 input itself; the
    chain gives what quantizing the float output would (up to one rounding step)."""
    first, second = _linear(32, 64, 1), _linear(64, 24, 2)
    x = torch.randn(10, 32)
    hidden = torch.nn.functional.gelu(first(x)).detach()
    a = Int8StaticLinear(first, float(x.min()), float(x.max()))
    b = Int8StaticLinear(second, float(hidden.min()), float(hidden.max()))
    a.post_op = "gelu"
    unfused = b(a(x))
    a.requantize_to = b
    handed = a(x)
    assert handed.dtype == torch.uint8
    fused = b(handed)
    assert fused.dtype == torch.float32
    assert sqnr_db(unfused, fused) > 30
    assert sqnr_db(second(hidden), fused) > 20


def test_deepcopy_keeps_levels_and_the_link():
    a, b = Int8StaticLinear(_linear(8, 16), -1, 1), Int8StaticLinear(_linear(16, 4), 0, 2)
    a.post_op, a.requantize_to = "gelu", b
    pair = torch.nn.ModuleDict({"a": a, "b": b})
    clone = copy.deepcopy(pair)
    assert clone["a"].requantize_to is clone["b"]
    assert torch.equal(clone["a"].weight_int8, a.weight_int8)
    x = torch.randn(5, 8)
    assert torch.equal(clone["b"](clone["a"](x)), b(a(x)))


def test_input_ranges_record_each_projection():
    model = tiny_model("bert")
    batch = padded_batch(model.config, 3, 12)
    names = linear_names(model)
    ranges = input_ranges(model, batch, names)
    assert set(ranges) == set(names)
    for name, (low, high) in ranges.items():  # per input channel
        assert low.shape == high.shape == (model.get_submodule(name).in_features,)
        assert bool((low <= high).all())
    assert not model._forward_pre_hooks and all(
        not model.get_submodule(n)._forward_pre_hooks for n in names)  # hooks removed


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_pipeline_quantizes_fuses_and_passes_the_gate(model_type):
    model = tiny_model(model_type, "feature-extraction")
    opt = TextModelOptimizer(TextModelConfig(quantization="int8-static", warmup_steps=1))
    fast = opt.optimize(model, task="feature-extraction")
    assert opt.report.verify.passed, opt.report.verify.summary()
    assert not opt.report.compiled
    int8 = [m for m in fast.modules() if isinstance(m, Int8StaticLinear)]
    layers = model.config.num_hidden_layers if model_type == "bert" else model.config.n_layers
    assert len(int8) >= 4 * layers  # q/k/v as one, out, FFN in, FFN out in each layer
    assert sum(m.requantize_to is not None for m in int8) == layers
    assert sum(m.post_op == "gelu" for m in int8) == layers
    # SmoothQuant everywhere but on the GELU outputs, which the GEMM before writes as uint8
    handed = {id(m.requantize_to) for m in int8 if m.requantize_to is not None}
    assert all((m.smooth is None) == (id(m) in handed) for m in int8)
    step = next(s for s in opt.report.steps if s.name == "packed weights")
    assert "int8-static" in step.detail and "uint8 input" in step.detail, step
    batch = padded_batch(model.config, 4, 20)
    with torch.no_grad():
        ref, got = model(**batch)[0], fast(**batch)[0]
    real = batch["attention_mask"].bool()
    cosine = torch.nn.functional.cosine_similarity(got[real].float(), ref[real], dim=-1)
    assert cosine.min().item() > 0.98


def test_a_saved_folder_calibrates_alike(tmp_path, tiny_bert_dir):
    opt = TextModelOptimizer(no_compile(quantization="int8-static"))
    model = opt.optimize(str(tiny_bert_dir), task="feature-extraction")
    folder = tmp_path / "saved"
    opt.save_pretrained(model, str(folder), source=str(tiny_bert_dir))
    again = TextModelOptimizer(TextModelConfig()).optimize(str(folder), task="feature-extraction")
    assert any(isinstance(m, Int8StaticLinear) for m in again.modules())
    batch = padded_batch(model.config, 3, 12)
    with torch.no_grad():
        assert torch.allclose(model(**batch)[0], again(**batch)[0], atol=1e-5)


def test_accuracy_control_keeps_the_most_sensitive_static_layers_in_float():
    model = tiny_model("bert")
    batch = padded_batch(model.config, 3, 12)
    calls = []

    def gate(m):  # passes once at least 2 projections are float again
        floats = sum(isinstance(x, torch.nn.Linear) for x in m.modules())
        calls.append(floats)
        return floats >= 2, {"float": floats}

    _, record = accuracy_controlled_int8(model, gate, sensitivity_inputs=batch, static=True)
    assert len(record["layers_float"]) == 2
    kept = [model.get_submodule(n) for n in record["layers_float"]]
    assert all(type(m) is torch.nn.Linear for m in kept)
    assert sum(isinstance(m, Int8StaticLinear) for m in model.modules()) == record["layers_int8"]


def test_requests_it_cannot_serve_raise_with_the_fix():
    with pytest.raises(ValueError, match="int8-weight-only"):
        TextModelOptimizer(TextModelConfig(quantization="int8-static")).optimize(
            tiny_model("gpt2", "causal-lm"), task="causal-lm")
    with pytest.raises(ValueError, match="use_torch_compile unset"):
        TextModelOptimizer(TextModelConfig(quantization="int8-static", use_torch_compile=True)
                           ).optimize(tiny_model("bert"), task="sequence-classification")
    gpu = DeviceInfo(type="cuda", index=0, name="NVIDIA H200", vendor="nvidia", capability=(9, 0))
    with pytest.raises(PrecisionNotSupportedError, match="int8-dynamic"):
        check_supported("int8-static", gpu)
