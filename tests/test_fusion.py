"""Query/key/value as one GEMM (pipeline/fusion.py): same outputs, ordinary checkpoints."""

import copy
import re

import pytest
import torch
from conftest import tiny_model

from torchbridge import kernels
from torchbridge.backends import detect, device_ops
from torchbridge.pipeline.fusion import (
    FusedQKVSelfAttention,
    ResidualOutput,
    choose_norm_kernel,
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
    # per output block the faster of the add inside the GEMM and the add + LayerNorm kernel
    assert re.search(r"residual add (inside the GEMM before it|and LayerNorm by torchbridge's "
                     r"kernel) in \d output blocks", step.detail)
    norms = [m.norm for m in optimized.modules() if isinstance(m, ResidualOutput)]
    assert len(norms) == 4 and set(norms) <= {"model", "fused"}


@needs_onednn
@pytest.mark.skipif(kernels.unavailable() is not None, reason=f"{kernels.unavailable()}")
def test_the_add_and_layernorm_kernel_matches_torch_and_either_choice_computes_the_same():
    g = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(2, 5, 48, generator=g).to(torch.bfloat16) for _ in range(2))
    norm = torch.nn.LayerNorm(48).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.uniform_(-0.5, 0.5, generator=g)
        got = kernels.add_layer_norm(x, residual, norm.weight, norm.bias, 1e-5)
    want = torch.nn.functional.layer_norm(x.float() + residual.float(), (48,),
                                          norm.weight.float(), norm.bias.float(), 1e-5)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)  # one bf16 rounding
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.add_layer_norm(x[..., :40], residual[..., :40], norm.weight[:40],
                               norm.bias[:40], 1e-5)
    with pytest.raises(ValueError, match="two CPU bf16 tensors of one shape"):
        kernels.add_layer_norm(x.float(), residual, norm.weight, norm.bias, 1e-5)

    model = tiny_model("bert", "sequence-classification", hidden_size=64,
                       num_attention_heads=4).to(torch.bfloat16)
    pack_linear_weights(model, rows=16)
    fuse_residual_add(model)
    blocks = [m for m in model.modules() if isinstance(m, ResidualOutput)]
    assert choose_norm_kernel(model, rows=16)[1] is None  # a candidate here
    ids, mask = _batch(4)
    logits = {}
    for norm_kernel in ("model", "fused"):
        for block in blocks:
            block.norm = norm_kernel
        with torch.no_grad():
            logits[norm_kernel] = model(input_ids=ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(logits["fused"], logits["model"], atol=3e-2, rtol=2e-2)
    odd = tiny_model("bert", "sequence-classification", hidden_size=40,
                     num_attention_heads=4).to(torch.bfloat16)
    pack_linear_weights(odd, rows=16)
    fuse_residual_add(odd)
    assert choose_norm_kernel(odd, rows=16) == (0, "it needs a width of a multiple of 16, not 40")
