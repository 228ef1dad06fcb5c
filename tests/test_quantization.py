"""Weight-only int8: per-channel scales, Linear and Conv1D, LM head included, measured by SQNR."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from torchbridge.precisions.int8_weight_only import (
    Int8WeightOnlyLinear,
    quantize_per_channel,
    quantize_weights_int8,
    sqnr_db,
)


def test_per_channel_scales_follow_each_row():
    w = torch.randn(5, 37)
    w[2] *= 100.0  # an outlier row must not flatten the resolution of the others
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.shape == (5,)
    assert int(q.abs().max()) == 127
    torch.testing.assert_close(s, w.abs().amax(1) / 127)
    deq = q.float() * s[:, None]
    for r in range(5):
        assert sqnr_db(w[r], deq[r]) > 38
    zero_q, zero_s = quantize_per_channel(torch.zeros(3, 4))
    assert torch.equal(zero_q, torch.zeros(3, 4, dtype=torch.int8)) and (zero_s > 0).all()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_int8_module_matches_float_module(kind):
    torch.manual_seed(0)
    if kind == "linear":
        ref = torch.nn.Linear(37, 29)
    else:
        ref = Conv1D(29, 37)  # nf=out, nx=in; weight [in, out]
        torch.nn.init.normal_(ref.weight, std=0.05)
        torch.nn.init.normal_(ref.bias, std=0.05)
    q = Int8WeightOnlyLinear.from_float(ref)
    x = torch.randn(3, 7, 37)
    want = ref(x)
    got = q(x)
    assert got.shape == want.shape
    assert sqnr_db(want, got) > 35
    # The bf16-activation kernel (CPU int8 path) agrees with the fp32 dequant path.
    got_bf16 = q(x.to(torch.bfloat16)).float()
    assert sqnr_db(want, got_bf16) > 30
    # Dequantized weight is close to the original [out, in] weight.
    w = ref.weight if kind == "linear" else ref.weight.t()
    assert sqnr_db(w, q.dequantize()) > 35


def _tiny(kind: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99,
                                      n_positions=64)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=99)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_quantize_model_in_place_lm_head_included(kind):
    model = _tiny(kind)
    ids = torch.randint(0, 99, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    emb_before = model.get_input_embeddings().weight.clone()
    out = quantize_weights_int8(model)
    assert out is model
    float_proj = [n for n, m in model.named_modules()
                  if isinstance(m, (torch.nn.Linear, Conv1D))]
    assert float_proj == []
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)
    n_int8 = sum(isinstance(m, Int8WeightOnlyLinear) for m in model.modules())
    assert n_int8 == (4 if kind == "gpt2" else 7) * 2 + 1
    # Embedding lookups stay float and untouched (GPT-2's head was tied to them).
    assert torch.equal(model.get_input_embeddings().weight, emb_before)
    with torch.no_grad():
        got = model(ids).logits
    assert sqnr_db(ref, got) > 25


def test_quantize_can_keep_lm_head_and_skip_modules():
    model = _tiny("gpt2")
    quantize_weights_int8(model, include_lm_head=False, skip=["transformer.h.0.mlp.c_fc"])
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)
    assert isinstance(model.transformer.h[1].mlp.c_fc, Int8WeightOnlyLinear)


def test_quantized_weights_are_a_quarter_of_fp32_bytes():
    lin = torch.nn.Linear(256, 512, bias=False)
    q = Int8WeightOnlyLinear.from_float(lin)
    fp32 = lin.weight.numel() * 4
    int8 = q.weight_int8.numel() + q.scales.numel() * 4
    assert int8 < 0.26 * fp32


@pytest.mark.parametrize("k", [768, 37])  # 37: not a multiple of the bf16 kernel's block of 16
def test_many_rows_take_the_two_term_int8_gemm_and_are_more_exact(k):
    """From TWO_TERM_MIN_ROWS rows on, the activations enter the int8 GEMM as two int8 terms per
    row: the weights stay exactly int8 and the product is within ~1e-4 of the exact fp32 one,
    where rounding the activations to bf16 (fewer rows) costs ~3e-3."""
    from torchbridge.precisions.int8_weight_only import TWO_TERM_MIN_ROWS, int8_weight_matmul

    torch.manual_seed(0)
    w, s = quantize_per_channel(torch.randn(96, k) * 0.02)
    exact_w = (w.double() * s.double()[:, None]).t()

    def rel_err(rows: int) -> float:
        x = torch.randn(rows, k) * 3
        x[:, 5] *= 20  # an outlier channel sets the row's scale
        ref = x.double() @ exact_w
        got = int8_weight_matmul(x, w, s)
        assert got.dtype == x.dtype and got.shape == (rows, 96)
        return float((got.double() - ref).norm() / ref.norm())

    assert rel_err(TWO_TERM_MIN_ROWS) < 2e-4 and rel_err(4 * TWO_TERM_MIN_ROWS) < 2e-4
    if k % 16 == 0:  # the bf16-activation kernel serves fewer rows
        assert rel_err(TWO_TERM_MIN_ROWS - 1) > 1e-3
