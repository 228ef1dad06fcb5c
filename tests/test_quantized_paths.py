"""The optimizer's quantization and fp8 options, checked against the fp32 eager model."""

import pytest
import torch
from conftest import no_compile, tiny_model

from torchbridge.models.text import TextModelOptimizer
from torchbridge.pipeline.verify import padded_batch
from torchbridge.precisions.fp8 import Fp8Linear, convert_linears_to_fp8
from torchbridge.precisions.int8_dynamic import Int8DynamicLinear
from torchbridge.precisions.int8_weight_only import sqnr_db


def test_int8_dynamic_linear_is_close_to_float():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 37)
    x = torch.randn(5, 7, 64)
    q = Int8DynamicLinear(linear)
    assert q.weight_t.dtype == torch.int8 and q.weight_t.shape == (64, 37)
    assert sqnr_db(linear(x), q(x)) > 30


@pytest.mark.parametrize("kind", ["int8-dynamic", "int8-weight-only"])
@pytest.mark.parametrize("model_type, task", [("bert", "sequence-classification"),
                                              ("gpt2", "causal-lm")])
def test_quantized_models_pass_verify(kind, model_type, task):
    model = tiny_model(model_type, task)
    opt = TextModelOptimizer(no_compile(dtype=torch.float32, quantization=kind))
    optimized = opt.optimize(model)
    info = opt.get_optimization_info()
    assert info["quantization"] == kind and info["verify"]["passed"]
    assert info["dtype"] == "int8"  # most weight bytes are int8 now, read back from the model
    batch = padded_batch(model.config, 2, 10)
    with torch.no_grad():
        ref, out = model(**batch).logits, optimized(**batch).logits
    mask = batch["attention_mask"].bool()
    real = (lambda t: t[mask]) if ref.dim() == 3 else (lambda t: t)
    assert sqnr_db(real(ref), real(out)) > 20


def test_one_token_through_the_decoder_reduction_is_the_modules_arithmetic():
    from torchbridge.generation.projections import DynamicProj

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    smooth = torch.rand(64) + 0.5
    for module in (Int8DynamicLinear(linear), Int8DynamicLinear(linear, smooth=smooth)):
        proj = DynamicProj(module)
        assert torch.equal(proj.weight.t(), module.weight_t)
        before = set(module.state_dict())
        x = torch.randn(1, 1, 64)
        x[..., 3] = 9.0  # a loud channel, one-sided overall
        with torch.no_grad():
            torch.testing.assert_close(proj(x, gemv=True), module(x), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(proj(x, gemv=False), module(x))
        assert set(module.state_dict()) == before  # the model's module is not modified


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_int8_dynamic_causal_lms_decode_on_the_fast_path(model_type):
    model = tiny_model(model_type, "causal-lm")
    opt = TextModelOptimizer(no_compile(dtype=torch.float32, quantization="int8-dynamic"))
    optimized = opt.optimize(model)
    report = opt.get_optimization_info()
    step = next(s for s in report["steps"] if s["name"] == "fast_generate")
    assert step["applied"] and report["verify"]["passed"]
    prompt = padded_batch(model.config, 1, 6)["input_ids"]
    with torch.no_grad():
        ours = optimized.generate(prompt, max_new_tokens=5, do_sample=False)
        hf = type(model).generate(optimized, prompt, max_new_tokens=5, do_sample=False,
                                  pad_token_id=model.config.eos_token_id)
    assert torch.equal(ours, hf)  # the same int8 arithmetic, static cache or HF's


def test_fp8_weights_halve_bf16_memory_and_stay_close():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 16))
    x = torch.randn(4, 32)
    ref = model(x)
    fp8 = convert_linears_to_fp8(model)
    assert isinstance(fp8[0], Fp8Linear) and fp8[0].weight_fp8.dtype == torch.float8_e4m3fn
    assert sqnr_db(ref, fp8(x).float()) > 15


def test_every_weight_format_converts_gpt2_conv1d_projections():
    """One swap helper for every quantizer: GPT-2's Conv1D projections convert, not just its head."""
    from torchbridge.precisions import PRECISIONS, WEIGHT_FORMATS
    from torchbridge.precisions.swap import is_linear

    for name, calibration in [(n, c) for n in WEIGHT_FORMATS for c in (False, True)]:
        model = tiny_model("gpt2", "causal-lm")
        inputs = padded_batch(model.config, 2, 10) if calibration else None
        if name == "int8-static" and not calibration:  # its ranges come from the calibration
            with pytest.raises(ValueError, match="needs calibration inputs"):
                PRECISIONS[name].quantize(model, (), inputs)
            continue
        converted = PRECISIONS[name].quantize(model, (), inputs)
        left = [n for n, m in converted.named_modules() if is_linear(m)]
        assert left == [], (name, left)
        batch = padded_batch(model.config, 2, 10)
        with torch.no_grad():
            out = converted(**batch).logits
        assert torch.isfinite(out.float()).all()
