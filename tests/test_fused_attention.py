"""torchbridge's fused bf16 attention kernel (torchbridge/kernels): what SDPA computes in fp32,
dense, masked and packed back to back, chosen by the packing step where it is fastest."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import no_compile, tiny_model

import torchbridge.pipeline.fusion as fusion
from torchbridge import kernels
from torchbridge.backends import detect, device_ops
from torchbridge.models.text import TextModelOptimizer
from torchbridge.pipeline.attention import fastest_attention, fused_kernel_unavailable, key_bias
from torchbridge.pipeline.fusion import FusedQKVSelfAttention, fuse_qkv
from torchbridge.pipeline.unpadding import removes_padding

WHY = kernels.unavailable()
needs_kernel = pytest.mark.skipif(WHY is not None, reason=f"fused attention unavailable: {WHY}")


def _rows(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def _reference(qkv: torch.Tensor, heads: int, scaling: float, bias=None) -> torch.Tensor:
    """fp32 SDPA over the bf16 inputs: [batch, seq, 3 * heads * d] -> [batch, seq, heads * d]."""
    batch, seq, width = qkv.shape
    q, k, v = qkv.float().view(batch, seq, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    mask = None if bias is None else bias[:, None, None, :].float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).reshape(batch, seq, width // 3)


@needs_kernel
@pytest.mark.parametrize(("batch", "seq", "heads", "head"),
                         [(2, 128, 4, 64), (3, 17, 2, 32), (1, 1, 2, 16), (2, 200, 1, 128)])
def test_dense_batches_match_fp32_attention(batch, seq, heads, head):
    qkv = _rows(batch, seq, 3 * heads * head)
    bias = torch.zeros(batch, seq)
    bias[0, seq // 2 + 1:] = torch.finfo(torch.float32).min  # padding keys of the first sequence
    for b in (None, bias):
        got = kernels.attention(qkv, heads, head ** -0.5, key_bias=b)
        assert got.shape == (batch, seq, heads * head) and got.dtype == torch.bfloat16
        # fp32 scores and softmax; the probabilities and the output are rounded to bf16
        torch.testing.assert_close(got.float(), _reference(qkv, heads, head ** -0.5, b),
                                   atol=1e-2, rtol=1e-2)


@needs_kernel
def test_sequences_packed_back_to_back_attend_only_to_themselves():
    heads, head, lengths = 3, 32, [5, 40, 1, 0, 23]
    rows = _rows(sum(lengths) + 6, 3 * heads * head)  # 6 spare rows, as packed_rows leaves
    got = kernels.attention(rows, heads, 0.2, lengths=torch.tensor(lengths))
    start = 0
    for n in lengths:
        if n:
            want = _reference(rows[start:start + n][None], heads, 0.2)[0]
            torch.testing.assert_close(got[start:start + n].float(), want, atol=1e-2, rtol=1e-2)
        start += n
    assert torch.equal(got[start:], torch.zeros_like(got[start:]))


@needs_kernel
def test_strided_rows_are_read_in_place():
    wide = _rows(2, 9, 3 * 2 * 16 + 8)
    qkv = wide[..., 8:]  # each row starts 8 features in: strided, features contiguous
    torch.testing.assert_close(kernels.attention(qkv, 2, 0.25).float(),
                               _reference(qkv.contiguous(), 2, 0.25), atol=1e-2, rtol=1e-2)


@needs_kernel
def test_compiled_callers_get_it_as_an_opaque_op():
    qkv = _rows(2, 16, 3 * 2 * 16)
    compiled = torch.compile(lambda x: kernels.attention(x, 2, 0.25) * 2, backend="eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(qkv), kernels.attention(qkv, 2, 0.25) * 2)


@needs_kernel
def test_bad_inputs_are_refused_with_what_was_given():
    with pytest.raises(ValueError, match="float32"):
        kernels.attention(torch.zeros(1, 4, 96), 2, 0.1)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.attention(torch.zeros(1, 4, 48, dtype=torch.bfloat16), 2, 0.1)  # d = 8
    with pytest.raises(ValueError, match="key_bias"):
        kernels.attention(torch.zeros(2, 4, 96, dtype=torch.bfloat16), 2, 0.1,
                          key_bias=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="sum 9"):
        kernels.attention(torch.zeros(8, 96, dtype=torch.bfloat16), 2, 0.1,
                          lengths=torch.tensor([4, 5]))
    with pytest.raises(ValueError, match=">= 0"):
        kernels.attention(torch.zeros(8, 96, dtype=torch.bfloat16), 2, 0.1,
                          lengths=torch.tensor([4, -1]))
    with pytest.raises(ValueError, match="no padding to mask"):
        kernels.attention(torch.zeros(8, 96, dtype=torch.bfloat16), 2, 0.1,
                          lengths=torch.tensor([4]), key_bias=torch.zeros(1, 4))


@pytest.mark.parametrize("missing", ["compiler", "writable cache"])
def test_where_it_cannot_be_built_it_says_why_and_is_not_offered(monkeypatch, tmp_path, missing):
    if missing == "compiler":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("TORCHBRIDGE_KERNELS", str(tmp_path))
        words = "no C++ compiler"
    else:
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv("TORCHBRIDGE_KERNELS", str(tmp_path / "a-file"))
        words = "set TORCHBRIDGE_KERNELS to a writable folder"
    kernels._library.cache_clear()
    try:
        why = kernels.unavailable()
        assert why is not None and (words in why or "no AVX512_BF16" in why)
        assert fused_kernel_unavailable(torch.bfloat16, 64) == why
        assert fastest_attention(torch.bfloat16, 2, 2, 16, 16, runs=1) in ("sdpa", "bmm")
        with pytest.raises(RuntimeError, match="cannot run here"):
            kernels.attention(torch.zeros(1, 4, 96, dtype=torch.bfloat16), 2, 0.1)
    finally:
        kernels._library.cache_clear()


def test_only_bf16_with_heads_of_16_features_are_offered():
    assert "bf16 only" in fused_kernel_unavailable(torch.float32, 64)
    assert "multiple of 16" in fused_kernel_unavailable(torch.bfloat16, 8)


def test_padding_masks_become_a_key_bias_and_others_do_not():
    valid = torch.tensor([[True, True, False], [True, True, True]])
    ok, bias = key_bias(valid[:, None, None, :], 2, 3)
    assert ok and bias.shape == (2, 3) and bias[0, 2] < -1e30 and bias[1].eq(0).all()
    expanded = valid[:, None, None, :].expand(2, 1, 3, 3)  # what transformers builds: stride 0
    assert torch.equal(key_bias(expanded, 2, 3)[1], bias)
    assert key_bias(torch.ones(3, 3, dtype=torch.bool).tril().expand(2, 1, 3, 3), 2, 3) == (False,
                                                                                           None)
    assert key_bias(None, 2, 3) == (True, None)


@needs_kernel
@pytest.mark.skipif(not device_ops(detect("cpu")).packs_linear_weights,
                    reason="this torch build has no oneDNN (mkldnn)")
@pytest.mark.parametrize("padding", ["removed", "kept"])
def test_an_optimized_encoder_with_the_fused_kernel_matches_fp32(monkeypatch, padding):
    monkeypatch.setattr(fusion, "fastest_attention", lambda *shape: "fused")
    reference = tiny_model("bert", "feature-extraction", hidden_size=64, num_attention_heads=4,
                           intermediate_size=64)  # heads of 16
    opt = TextModelOptimizer(no_compile(dtype=torch.bfloat16, device="cpu"))
    model = opt.optimize(copy.deepcopy(reference))
    fused = [m for m in model.modules() if isinstance(m, FusedQKVSelfAttention)]
    assert fused and {m.kernel for m in fused} == {"fused"}
    step = next(s for s in opt.report.steps if s.name == "packed weights")
    assert "torchbridge's fused kernel, the fastest of three" in step.detail
    ids = torch.randint(5, 99, (3, 21), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 17:] = 0, 0
    assert removes_padding(model)
    # asking for the hidden states keeps the padding: the dense forward, with a key mask
    kept = {"output_hidden_states": padding == "kept"}
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, **kept).last_hidden_state
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert F.cosine_similarity(got[keep].float(), want[keep], dim=-1).min() > 0.999


def test_a_module_given_the_fused_kernel_computes_other_dtypes_by_the_gemms():
    model = tiny_model("bert", "feature-extraction", hidden_size=64, num_attention_heads=4,
                       intermediate_size=64)
    fuse_qkv(model)
    fused = next(m for m in model.modules() if isinstance(m, FusedQKVSelfAttention))
    fused.kernel = "fused"  # chosen for bf16; the model was cast to fp32 afterwards
    qkv = torch.randn(2, 5, 3 * fused.width, generator=torch.Generator().manual_seed(0))
    out, _ = fused._attend(qkv, None)
    q, k, v = qkv.view(2, 5, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
    want = F.scaled_dot_product_attention(q, k, v, scale=fused.scaling)
    torch.testing.assert_close(out, want.transpose(1, 2).reshape(2, 5, -1), atol=1e-5, rtol=1e-5)
