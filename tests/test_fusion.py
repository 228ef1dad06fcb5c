"""Query/key/value as one GEMM (pipeline/fusion.py): same outputs, ordinary checkpoints."""

import copy

import pytest
import torch
from conftest import tiny_model

from torchbridge.backends import detect, device_ops
from torchbridge.pipeline.fusion import (
    FusedQKVSelfAttention,
    ResidualOutput,
    fuse_gelu,
    fuse_qkv,
    fuse_residual_add,
)
from torchbridge.pipeline.packing import PackedLinear, pack_linear_weights

needs_onednn = pytest.mark.skipif(not device_ops(detect("cpu")).packs_linear_weights,
                                  reason="this torch build has no oneDNN (mkldnn)")


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row: the mask must reach the attention as before
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_fused_attention_computes_what_the_three_projections_do(model_type):
    model = tiny_model(model_type, "sequence-classification")
    fused = copy.deepcopy(model)
    assert fuse_qkv(fused) == 2  # one per layer
    assert sum(isinstance(m, FusedQKVSelfAttention) for m in fused.modules()) == 2
    assert not fused.training and all(not m.training for m in fused.modules())
    ids, mask = _batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = fused(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_checkpoint_keeps_the_original_names(tmp_path):
    model = tiny_model("bert", "sequence-classification")
    fused = copy.deepcopy(model)
    fuse_qkv(fused)
    before, after = model.state_dict(), fused.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    fused.save_pretrained(tmp_path)
    from transformers import BertForSequenceClassification

    loaded = BertForSequenceClassification.from_pretrained(tmp_path)
    ids, mask = _batch(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)


def test_what_is_not_fused():
    decoder = tiny_model("bert", "sequence-classification", is_decoder=True)
    assert fuse_qkv(decoder) == 0  # its self-attention also updates a KV cache
    mixed = tiny_model("bert", "sequence-classification")
    attn = mixed.bert.encoder.layer[0].attention.self
    attn.key = attn.key.to(torch.bfloat16)  # projections of different dtypes stay apart
    assert fuse_qkv(mixed) == 1
    assert type(mixed.bert.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"
    assert fuse_qkv(tiny_model("albert", "sequence-classification")) == 0  # another forward


@needs_onednn
def test_a_packed_linear_applies_the_exact_gelu_in_its_gemm():
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 48).to(torch.bfloat16)
    packed = PackedLinear(plain, rows_hint=16)
    packed.post_op = "gelu"
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want = torch.nn.functional.gelu(plain(x).float())
        torch.testing.assert_close(packed(x).float(), want, atol=3e-2, rtol=2e-2)
        assert copy.deepcopy(packed).post_op == "gelu"
        compiled = torch.compile(packed, fullgraph=True, backend="inductor")
        torch.testing.assert_close(compiled(x).float(), packed(x).float())


@needs_onednn
@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_the_ffn_gelu_moves_into_the_packed_gemm(model_type):
    model = tiny_model(model_type, "sequence-classification").to(torch.bfloat16)
    pack_linear_weights(model, rows=16)
    fused = copy.deepcopy(model)
    assert fuse_gelu(fused) == 2 and fuse_gelu(fused) == 0  # once per layer, and only once
    assert sum(isinstance(m, PackedLinear) and m.post_op == "gelu" for m in fused.modules()) == 2
    ids, mask = _batch(2)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.float()
        got = fused(input_ids=ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=2e-2)
    tanh = tiny_model("bert", "sequence-classification", hidden_act="gelu_new")
    pack_linear_weights(tanh.to(torch.bfloat16), rows=16)
    assert fuse_gelu(tanh) == 0  # the tanh approximation is another function: left alone


@needs_onednn
def test_the_residual_add_moves_into_the_output_gemm():
    torch.manual_seed(0)
    packed = PackedLinear(torch.nn.Linear(64, 48).to(torch.bfloat16), rows_hint=16)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    residual = torch.randn(3, 7, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(packed.plus(x, residual).float(),
                                   (packed(x) + residual).float(), atol=3e-2, rtol=2e-2)
    model = tiny_model("roberta", "sequence-classification").to(torch.bfloat16)
    pack_linear_weights(model, rows=16)
    fused = copy.deepcopy(model)
    assert fuse_residual_add(fused) == 4  # attention output and FFN output, per layer
    assert sum(isinstance(m, ResidualOutput) for m in fused.modules()) == 4
    assert fused.state_dict().keys() == model.state_dict().keys()
    ids, mask = _batch(3)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.float()
        got = fused(input_ids=ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=2e-2)
    assert fuse_residual_add(tiny_model("bert", "sequence-classification")) == 0  # unpacked


@needs_onednn
def test_the_optimizer_fuses_where_it_packs_bf16_linears():
    from torchbridge.models.text import TextModelConfig, TextModelOptimizer

    opt = TextModelOptimizer(TextModelConfig(use_torch_compile=False, dtype=torch.bfloat16,
                                             device="cpu"))
    optimized = opt.optimize(tiny_model("bert", "sequence-classification"))
    assert opt.report.verify.passed
    assert sum(isinstance(m, FusedQKVSelfAttention) for m in optimized.modules()) == 2
    step = next(s for s in opt.report.steps if s.name == "packed weights")
    assert "query/key/value as one GEMM in 2 self-attention blocks" in step.detail
    assert "GELU inside the GEMM before it in 2 feed-forward blocks" in step.detail
    assert "residual add inside the GEMM before it in 4 output blocks" in step.detail
