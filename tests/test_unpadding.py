"""Padding removed inside a packed bf16 encoder (pipeline/unpadding.py): the same values at real
positions as the padded forward, zeros at padded ones, and the padded forward where it must."""

import copy

import pytest
import torch
from conftest import tiny_model

from torchbridge.backends import detect, device_ops
from torchbridge.pipeline.fusion import fuse_gelu, fuse_qkv, fuse_residual_add
from torchbridge.pipeline.packing import pack_linear_weights
from torchbridge.pipeline.unpadding import (
    KEY_ALIGN,
    TokenLayout,
    packed_rows,
    remove_padding,
    removes_padding,
)

needs_onednn = pytest.mark.skipif(not device_ops(detect("cpu")).packs_linear_weights,
                                  reason="this torch build has no oneDNN (mkldnn)")

MODEL_TYPES = ["bert", "roberta", "distilbert"]


def _packed(model_type: str, task: str = "feature-extraction", **overrides):
    """A tiny bf16 encoder as the packing step leaves it: (padded forward, unpadded forward)."""
    model = tiny_model(model_type, task, **overrides).to(torch.bfloat16)
    fuse_qkv(model)
    pack_linear_weights(model, rows=16)
    fuse_gelu(model)
    fuse_residual_add(model)
    unpadded = copy.deepcopy(model)
    assert remove_padding(unpadded) == 1 and removes_padding(unpadded)
    assert not removes_padding(model)
    return model, unpadded


def _mask(*rows: str) -> torch.Tensor:
    return torch.tensor([[int(c) for c in row] for row in rows])


def _run(model, mask, **kwargs):
    ids = torch.randint(5, 99, mask.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs)


def test_packed_rows_round_up_by_at_most_a_sixteenth():
    for tokens in range(1, 5000):
        rows = packed_rows(tokens)
        assert tokens <= rows <= max(tokens + 15, tokens * 17 // 16)
    assert len({packed_rows(t) for t in range(1, 4097)}) < 120  # few shapes for oneDNN to keep


def test_layout_packs_unpacks_and_groups_real_tokens():
    real = _mask("1110", "0000", "1011").bool()
    layout = TokenLayout.from_mask(real, torch.ones(3, 1, 4, 4, dtype=torch.bool))
    assert len(layout.padded_index) == packed_rows(6)
    x = torch.arange(12.0).view(3, 4, 1)
    packed = layout.pack(x)
    assert packed[0, :6, 0].tolist() == [0, 1, 2, 8, 10, 11]
    assert torch.equal(layout.unpack(packed), x * real[..., None])  # zeros at padded positions
    (group,) = layout.groups  # both sequences round up to KEY_ALIGN positions
    assert (group.count, group.width) == (2, KEY_ALIGN)
    assert group.mask.shape == (2, 1, 1, KEY_ALIGN) and group.mask.sum() == 6
    grouped = layout.grouped(packed[0], group)
    assert grouped[:, :3, 0].tolist() == [[0, 1, 2], [8, 10, 11]]
    assert torch.equal(layout.ungrouped([grouped])[:6], packed[0, :6])
    additive = TokenLayout.from_mask(real, torch.zeros(3, 1, 4, 4)).groups[0].mask
    assert additive.dtype == torch.float32 and (additive == 0).sum() == 6


@needs_onednn
@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_real_positions_match_the_padded_forward(model_type, attention):
    padded, unpadded = _packed(model_type)
    for model in (padded, unpadded):
        model.set_attn_implementation(attention)
    # right padding, left padding, a hole, a row of padding only
    mask = _mask("1" * 12, "1" * 7 + "0" * 5, "0" * 9 + "111", "110111000000", "0" * 12)
    want = _run(padded, mask).last_hidden_state.float()
    got = _run(unpadded, mask).last_hidden_state.float()
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-2, rtol=2e-2)
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))


@needs_onednn
def test_the_encoder_gemms_see_real_tokens_only():
    padded, unpadded = _packed("bert")
    rows = []
    unpadded.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
    _run(unpadded, _mask("1" * 40, "1" * 8 + "0" * 32, "1" * 8 + "0" * 32))
    _run(unpadded, _mask("1" * 40, "1" * 40))  # no padding: the padded layout, nothing to gather
    assert rows == [packed_rows(56), 80]


@needs_onednn
def test_hidden_states_and_attentions_keep_the_padded_layout():
    padded, unpadded = _packed("bert")
    mask = _mask("1" * 10, "1" * 4 + "0" * 6)
    want = _run(padded, mask, output_hidden_states=True, output_attentions=True)
    got = _run(unpadded, mask, output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(want.hidden_states)
    for g, w in zip(got.hidden_states + got.attentions, want.hidden_states + want.attentions,
                    strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)


@needs_onednn
def test_classifier_outputs_and_checkpoint_are_unchanged():
    padded, unpadded = _packed("bert", "sequence-classification")
    mask = _mask("1" * 16, "1" * 5 + "0" * 11, "1" * 9 + "0" * 7)
    torch.testing.assert_close(_run(unpadded, mask).logits.float(),
                               _run(padded, mask).logits.float(), atol=2e-2, rtol=2e-2)
    assert unpadded.state_dict().keys() == padded.state_dict().keys()


@needs_onednn
def test_the_optimizer_removes_padding_unless_trimming_is_off():
    from conftest import no_compile

    from torchbridge.models.text import TextModelOptimizer

    opt = TextModelOptimizer(no_compile(dtype=torch.bfloat16, device="cpu"))
    model = opt.optimize(tiny_model("distilbert", "token-classification"))
    assert removes_padding(model) and opt.report.verify.passed
    step = next(s for s in opt.report.steps if s.name == "packed weights")
    assert "padding removed inside the encoder" in step.detail
    trim = next(s for s in opt.report.steps if s.name == "trim_padding")
    assert "the encoder removes the rest of the padding itself" in trim.detail
    off = TextModelOptimizer(no_compile(dtype=torch.bfloat16, device="cpu", trim_padding=False))
    assert not removes_padding(off.optimize(tiny_model("distilbert", "token-classification")))


@needs_onednn
@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_an_fp32_encoder_packs_where_timed_faster_and_removes_padding(monkeypatch, layout):
    """fp32 linears are packed where oneDNN's GEMM beat MKL's in the timing (here: forced either
    way), q/k/v fused and padding removed: the padded batch's real positions equal the plain
    fp32 model's to fp32 rounding."""
    from conftest import no_compile

    import torchbridge.pipeline.packing as packing
    from torchbridge.models.text import TextModelOptimizer
    from torchbridge.pipeline.packing import PackedLinear

    monkeypatch.setattr(packing, "fastest_rows_hint",
                        lambda weight, rows: None if layout == "plain" else rows)
    reference = tiny_model("bert", "feature-extraction")
    opt = TextModelOptimizer(no_compile(dtype=torch.float32, device="cpu"))
    model = opt.optimize(copy.deepcopy(reference))
    assert removes_padding(model) and opt.report.verify.passed
    packed = any(isinstance(m, PackedLinear) for m in model.modules())
    assert packed == (layout == "packed")
    step = next(s for s in opt.report.steps if s.name == "packed weights")
    assert step.applied and "query/key/value as one GEMM" in step.detail
    assert ("plain (unpacked)" in step.detail) == (layout == "plain")
    mask = _mask("1" * 16, "1" * 5 + "0" * 11, "1" * 9 + "0" * 7)
    got, want = _run(model, mask).last_hidden_state, _run(reference, mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
