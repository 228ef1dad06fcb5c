"""Dynamic int8 (Int8DynamicLinear): fidelity to float, Conv1D coverage, smoothing, compile."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers.pytorch_utils import Conv1D

from torchbridge.precisions.int8_dynamic import Int8DynamicLinear, quantize_dynamic_int8
from torchbridge.precisions.int8_weight_only import sqnr_db
from torchbridge.precisions.smoothing import (
    activation_channel_max,
    quantize_dynamic_int8_smoothed,
    smoothing_scales,
)
from torchbridge.precisions.swap import is_linear


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_matches_float_within_sqnr(kind, dtype):
    torch.manual_seed(0)
    ref = torch.nn.Linear(48, 40) if kind == "linear" else Conv1D(40, 48)  # Conv1D(out, in)
    if kind == "conv1d":
        torch.nn.init.normal_(ref.weight, std=0.05)
        torch.nn.init.normal_(ref.bias, std=0.05)
    ref = ref.to(dtype)
    x = torch.randn(3, 17, 48, dtype=dtype)
    q = Int8DynamicLinear(ref)
    assert q.weight_t.dtype == torch.int8 and q.weight_t.shape == (48, 40)
    got = q(x)
    assert got.dtype == dtype and got.shape == (3, 17, 40)
    # per-token x per-channel int8 on a random Gaussian layer: ~35 dB; bf16 inputs cost a little
    assert sqnr_db(ref(x).float(), got.float()) > (30 if dtype == torch.float32 else 26)


def test_one_sided_activations_keep_all_256_levels():
    """After a GELU nearly every input is >= 0: the asymmetric per-token grid (zero point) has
    twice the resolution of a symmetric one there, so the error of the int8 GEMM halves."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.nn.functional.gelu(torch.randn(50, 64) * 2)
    ref = lin(x)
    got = sqnr_db(ref, Int8DynamicLinear(lin)(x))
    # the same GEMM with symmetric per-token activations (absmax / 127), computed here
    q = Int8DynamicLinear(lin)
    s = x.abs().amax(1, keepdim=True) / 127
    symmetric = (torch.round(x / s) * s) @ (q.weight_t.float() * q.scales) + lin.bias
    assert got > sqnr_db(ref, symmetric) + 3  # +6 dB in theory: one more bit


def test_swap_covers_gpt2_conv1d_and_keeps_outputs_close():
    model = tiny_model("gpt2", "causal-lm")
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    quantize_dynamic_int8(model, include_head=False)
    assert not any(isinstance(m, Conv1D) for m in model.modules())  # every c_attn/c_proj/c_fc
    n_int8 = sum(isinstance(m, Int8DynamicLinear) for m in model.modules())
    assert n_int8 == 4 * 2  # 4 projections per block, 2 blocks; the head stays float
    assert isinstance(model.lm_head, torch.nn.Linear)
    with torch.no_grad():
        got = model(ids).logits
    assert sqnr_db(ref, got) > 20


def test_smoothing_is_exact_before_rounding_and_flattens_outlier_channels():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(4, 10, 64)
    x[..., 3] *= 60.0  # one outlier channel, as in real transformer activations
    act_max = x.reshape(-1, 64).abs().amax(0)
    s = smoothing_scales(act_max, lin, 0.5)
    # (x / s) @ (W * s)^T == x @ W^T exactly in real arithmetic
    torch.testing.assert_close((x / s) @ (lin.weight * s).t(), x @ lin.weight.t(), rtol=1e-4,
                               atol=1e-4)
    ref = lin(x)
    plain = sqnr_db(ref, Int8DynamicLinear(lin)(x))
    smoothed = sqnr_db(ref, Int8DynamicLinear(lin, smooth=s)(x))
    assert smoothed > plain + 3  # the outlier no longer sets every token's scale


def test_activation_channel_max_records_each_projection_input():
    model = tiny_model("bert", "sequence-classification")
    names = ["bert.encoder.layer.0.attention.self.query", "classifier"]
    ids = torch.randint(5, 99, (2, 7))
    stats = activation_channel_max(model, names, {"input_ids": ids})
    assert stats[names[0]].shape == (32,) and (stats[names[0]] > 0).all()
    assert not model.get_submodule(names[0])._forward_pre_hooks  # hooks removed


def test_bad_smooth_scales_are_rejected():
    with pytest.raises(ValueError, match="positive per-input-channel"):
        Int8DynamicLinear(torch.nn.Linear(8, 4), smooth=torch.zeros(8))


def test_compiled_equals_eager():
    model = tiny_model("bert", "sequence-classification", num_labels=3).to(torch.bfloat16)
    quantize_dynamic_int8(model)
    assert not any(is_linear(m) for m in model.modules())
    ids = torch.randint(5, 99, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits.float()
        compiled = torch.compile(model.forward, options={"freezing": True})
        got = compiled(input_ids=ids, attention_mask=mask).logits.float()
    # inductor may round bf16 intermediates differently, which can move a token's int8 rounding
    assert sqnr_db(eager, got) > 25
    torch.testing.assert_close(got, eager, atol=0.05, rtol=0.05)


def test_smoothed_quantization_of_a_whole_model_stays_close():
    model = tiny_model("bert", "sequence-classification", num_labels=3)
    ids = torch.randint(5, 99, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    quantize_dynamic_int8_smoothed(model, {"input_ids": ids}, alpha=0.5)
    mods = [m for m in model.modules() if isinstance(m, Int8DynamicLinear)]
    assert mods and all(m.inv_smooth is not None for m in mods)
    with torch.no_grad():
        assert sqnr_db(ref, model(input_ids=ids).logits) > 20
