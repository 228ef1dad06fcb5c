"""Which kernel computes a fused CPU encoder's attention: SDPA, two batched GEMMs or our own.

torch's CPU SDPA (a flash-attention kernel) splits every head into small query and key blocks
and multiplies them with its own calls to the BLAS. At an encoder's sizes (BERT-base: 12 heads
of 64, sequences of 128) and without AMX that costs more than the arithmetic: on a 2-core Zen 4
it ran [8, 12, 128, 64] in bf16 in 4.3-4.5 ms, where one batched GEMM for the scores (scale and
key mask applied by the GEMM), a softmax and one batched GEMM for the output took 1.8 ms (ad hoc;
the scores are rounded to bf16 before the softmax, as Hugging Face's eager attention does).
torchbridge's own kernel (torchbridge/kernels, bf16 on CPUs with AVX512_BF16) does a sequence's
head in one pass, reads q, k and v where the fused projection wrote them and keeps the scores
and softmax in fp32: 1.3-1.7 ms at that shape (ad hoc). It also takes sequences packed back to
back, so an encoder with its padding removed attends in one call a layer instead of one per
group of lengths. On a CPU with AMX, SDPA's blocks run on the tile units and it can be the
fastest. So the packing step times the candidates at the planned shape (`fastest_attention`)
and keeps the fastest; the report says which, and why the fused kernel was not a candidate
where it was not. It replaces SDPA only: a model set to eager attention keeps it, and training
(dropout) calls the model's own attention. `python benchmarks/attention_kernels.py` measures
the three in whole models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from torchbridge import kernels

from .packing import fastest

# Scores of at most this many bytes per batched GEMM: larger batches of heads are cut into
# pieces, each done before the next starts (on a 2-core Zen 4, [32, 12, 128, 32] in bf16 ran
# 11.5 ms in one piece, with swings of 2x from call to call, and 9.1 ms in 4 MB pieces, against
# SDPA's 10.1; ad hoc).
SCORES_BYTES = 4 << 20


def bmm_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                  scaling: float) -> Tensor:
    """softmax(q k^T * scaling + mask) v for [batch, heads, seq, head] q/k/v (any strides) and an
    additive float or boolean (True attends) mask broadcastable to [batch, heads, q, k];
    returns [batch, q, heads, head] like Hugging Face's attention functions."""
    batch, heads, queries, width = query.shape
    keys = key.shape[2]
    q = query.reshape(batch * heads, queries, width)
    k = key.reshape(batch * heads, keys, width).transpose(1, 2)
    v = value.reshape(batch * heads, keys, width)
    bias, beta = q.new_zeros(()), 0.0
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device) \
                .masked_fill(~mask, torch.finfo(q.dtype).min)
        rows = mask.shape[2]
        bias = mask.to(q.dtype).expand(batch, heads, rows, keys).reshape(batch * heads, rows, keys)
        beta = 1.0
    out = q.new_empty(batch * heads, queries, width)
    step = max(1, SCORES_BYTES // (queries * keys * q.element_size()))
    for i in range(0, batch * heads, step):
        part = slice(i, i + step)
        scores = torch.baddbmm(bias if bias.dim() == 0 else bias[part], q[part], k[part],
                               beta=beta, alpha=scaling)
        torch.bmm(torch.softmax(scores, dim=-1), v[part], out=out[part])
    return out.view(batch, heads, queries, width).transpose(1, 2)


def fused_kernel_unavailable(dtype: torch.dtype, head: int) -> str | None:
    """Why torchbridge's fused kernel cannot run attention of this dtype and head size, or None."""
    if dtype != torch.bfloat16:
        return f"it computes bf16 only, not {dtype}"
    if head % 16:
        return f"it needs heads of a multiple of 16 features, not {head}"
    return kernels.unavailable()


def key_bias(mask: Tensor | None, batch: int, seq: int) -> tuple[bool, Tensor | None]:
    """(True, the [batch, seq] additive fp32 key bias) when ``mask`` (None, or broadcastable to
    [batch, heads, seq, seq]; bool = True attends, or additive) is the same for every head and
    query, which a padding mask is; (False, None) when it is not."""
    if mask is None:
        return True, None
    if mask.dim() != 4 or mask.shape[1] != 1 or (mask.shape[2] != 1 and mask.stride(2) != 0):
        return False, None
    keys = mask[:, 0, 0, :].expand(batch, seq)
    if keys.dtype == torch.bool:
        return True, torch.zeros(keys.shape).masked_fill(~keys, torch.finfo(torch.float32).min)
    return True, keys.float()


def fastest_attention(dtype: torch.dtype, batch: int, heads: int, seq: int, head: int,
                      runs: int = 7) -> str:
    """"sdpa", "bmm" or "fused": the kernel that runs self-attention of this shape fastest on the
    CPU ("fused" only where `fused_kernel_unavailable` says nothing). Timed as the model runs
    them: on q/k/v views of one fused projection, rewritten before every call (in the model the
    projection has just written it, and the kernels differ in how they read it), each giving
    [batch, seq, heads * head] as the output projection takes it."""
    source = torch.randn(batch, seq, 3 * heads * head, dtype=dtype)
    qkv = torch.empty_like(source)
    query, key, value = qkv.view(batch, seq, 3, heads, head).permute(2, 0, 3, 1, 4).unbind(0)
    scaling = head ** -0.5

    def after_projection(attend: Callable[[], Tensor]) -> Callable[[], Tensor]:
        return lambda: (qkv.copy_(source), attend())[1]

    candidates = {
        "sdpa": after_projection(lambda: F.scaled_dot_product_attention(
            query, key, value, scale=scaling).transpose(1, 2).reshape(batch, seq, -1)),
        "bmm": after_projection(
            lambda: bmm_attention(query, key, value, None, scaling).reshape(batch, seq, -1)),
    }
    if fused_kernel_unavailable(dtype, head) is None:
        candidates["fused"] = after_projection(lambda: kernels.attention(qkv, heads, scaling))
    return fastest(candidates, runs)
