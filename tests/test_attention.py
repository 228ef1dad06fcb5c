"""Attention by two batched GEMMs (pipeline/attention.py): what SDPA computes, chosen by timing."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import no_compile, tiny_model

import torchbridge.pipeline.attention as attention
import torchbridge.pipeline.fusion as fusion
from torchbridge.backends import detect, device_ops
from torchbridge.models.text import TextModelOptimizer
from torchbridge.pipeline.attention import bmm_attention, fastest_attention
from torchbridge.pipeline.fusion import FusedQKVSelfAttention, choose_attention_kernel, fuse_qkv


def _qkv(batch=3, heads=4, seq=9, head=8, dtype=torch.float32):
    """q/k/v as the strided views of one fused projection, as the model's are."""
    qkv = torch.randn(batch, seq, 3, heads, head, generator=torch.Generator().manual_seed(0))
    return qkv.to(dtype).permute(2, 0, 3, 1, 4).unbind(0)


def _masks(batch=3, seq=9):
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[1, 5:], valid[2, 2:] = False, False
    additive = torch.zeros(batch, 1, 1, seq).masked_fill(~valid[:, None, None], -1e9)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril().expand(batch, 1, seq, seq)
    return {"none": None, "additive keys": additive, "bool keys": valid[:, None, None],
            "bool per query": causal}


@pytest.mark.parametrize("pieces", [1, 3])
@pytest.mark.parametrize("kind", list(_masks()))
def test_bmm_attention_computes_what_sdpa_does(monkeypatch, kind, pieces):
    if pieces > 1:  # 12 heads' scores cut into pieces of 5, 5 and 2
        monkeypatch.setattr(attention, "SCORES_BYTES", 5 * 9 * 9 * 4)
    query, key, value = _qkv()
    mask = _masks()[kind]
    want = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3)
    got = bmm_attention(query, key, value, mask, 0.3)
    assert got.shape == (3, 9, 4, 8)  # [batch, seq, heads, head], as HF's attention returns
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_bmm_attention_in_bf16_stays_close_to_fp32():
    query, key, value = _qkv(dtype=torch.bfloat16)
    mask = _masks()["bool keys"]
    want = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask)
    got = bmm_attention(query, key, value, mask, 8 ** -0.5).float().transpose(1, 2)
    assert got.dtype == torch.float32
    assert F.cosine_similarity(got.flatten(2), want.flatten(2), dim=-1).min() > 0.999


def test_the_timing_returns_one_of_the_kernels():
    assert fastest_attention(torch.float32, 2, 4, 16, 8, runs=2) in ("sdpa", "bmm")


@pytest.mark.skipif(not device_ops(detect("cpu")).packs_linear_weights,
                    reason="this torch build has no oneDNN (mkldnn)")
@pytest.mark.parametrize("kernel", ["bmm", "sdpa"])
def test_the_optimizer_gives_the_timed_kernel_to_every_fused_attention(monkeypatch, kernel):
    monkeypatch.setattr(fusion, "fastest_attention", lambda *shape: kernel)
    reference = tiny_model("bert", "feature-extraction")
    opt = TextModelOptimizer(no_compile(dtype=torch.float32, device="cpu"))
    model = opt.optimize(copy.deepcopy(reference))
    fused = [m for m in model.modules() if isinstance(m, FusedQKVSelfAttention)]
    assert fused and {m.kernel for m in fused} == {"bmm" if kernel == "bmm" else "model"}
    step = next(s for s in opt.report.steps if s.name == "packed weights")
    words = "two batched GEMMs" if kernel == "bmm" else "attention by SDPA"
    assert words in step.detail and opt.report.verify.passed
    ids = torch.randint(5, 99, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)


def test_eager_attention_and_training_keep_the_models_own_attention():
    model = tiny_model("bert", "feature-extraction")
    fuse_qkv(model)
    model.set_attn_implementation("eager")
    assert choose_attention_kernel(model, torch.float32, 2, 16) is None
    fused = next(m for m in model.modules() if isinstance(m, FusedQKVSelfAttention))
    assert fused.kernel == "model"
    fused.kernel = "bmm"
    fused.train()
    qkv = torch.randn(2, 5, 3 * fused.width)
    _, weights = fused._attend(qkv, None)  # eager: the model's function returns the weights
    assert weights is not None
