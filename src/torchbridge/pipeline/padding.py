"""Padding trimming for encoders: do not spend matmuls on pad tokens.

Real batches mix lengths: half of a typical batch's tokens are padding, and every runtime that
keeps the padded rectangle pays for them. An encoder's outputs at real positions do not depend on
how much padding follows them (the attention mask hides it), so a right-padded batch can be cut
into groups of similar length, each trimmed to its own longest row, and run group by group. The
grouping minimizes tokens computed plus a per-call overhead, so a full-length batch stays one call.
Outputs are reassembled in the caller's row order and padded back to the input length; values at
padded positions are zeros (they were meaningless before too).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

# Fields that hold one value per token, per task; the other fields hold one value per row.
PER_TOKEN_FIELDS = {
    "token-classification": {"logits"},
    "masked-lm": {"logits"},
    "question-answering": {"start_logits", "end_logits"},
    "feature-extraction": {"last_hidden_state"},
    "sequence-classification": set(),
}
# Inputs with one value per token, trimmed along with input_ids.
_PER_TOKEN_INPUTS = ("token_type_ids", "position_ids")
# Token-equivalents one extra forward call costs (dispatch, and GEMMs of fewer rows running
# further below the peak), at BERT-base's width. Re-measured when the packed bf16 linears made
# whole batches faster (BERT-base 8 rows of 128..32 tokens, 2 threads, ad hoc): split three ways
# (at 48) 172 ms, two ways (at 96-192) 152-170 ms, one call (at 256) 149 ms; 8 rows of which 7
# have 16 tokens: 134 ms whole, 73-84 ms split. 256 keeps the second split and not the first.
# (A group of 4 x 80 = 320 rows is one reason: ad hoc, oneDNN ran 320 rows at ~60% of the
# rate of 256 or 512.)
CALL_OVERHEAD_TOKENS = 256

# Widths are rounded up to a multiple of this: every new (rows, length) shape makes oneDNN build
# and keep kernels, and a run over many texts of every length grew the process by ~750 MiB over
# 400 shapes in bf16 (measured: a 6-layer MiniLM-size BERT, 400 calls of batch 1-7 x length
# 5-124: 440 -> 1189 MiB; lengths rounded to 16: flat at 544 MiB).
LENGTH_BUCKET = 16


def call_overhead_tokens(config: Any) -> int:
    """CALL_OVERHEAD_TOKENS scaled to the model: the fixed cost of a call is per layer, a token's
    cost per layer grows with hidden_size squared, so a narrower model pays more tokens per call
    (all-MiniLM-L6-v2, hidden 384: 4x). At BERT-base's count, random batches of review sentences
    on MiniLM were split into more calls than paid."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None) or 768
    return max(CALL_OVERHEAD_TOKENS, round(CALL_OVERHEAD_TOKENS * (768 / hidden) ** 2))


def bucketed(length: int, limit: int) -> int:
    """``length`` rounded up to a multiple of LENGTH_BUCKET, at most ``limit``."""
    return min(limit, -(-length // LENGTH_BUCKET) * LENGTH_BUCKET)


def row_counts(limit: int) -> list[int]:
    """The row counts a batch or a trim group may have, up to ``limit``: powers of two and three
    times powers of two (1, 2, 3, 4, 6, 8, 12, 16, ...). A bounded set keeps oneDNN's per-shape
    kernel caches bounded; the threes keep the plans close to unconstrained ones (BERT-base bf16,
    8 rows of 128 to 32 tokens, 2 threads: groups of 3+3+2 ran in 240 ms, powers of two only
    2+2+2+2 in 286 ms)."""
    counts = []
    for k in range(limit.bit_length()):
        counts += [c for c in (1 << k, 3 << k) if c <= limit and c not in counts]
    return sorted(counts)


def row_count_floor(n: int) -> int:
    """The largest allowed row count (``row_counts``) not above ``n`` (n >= 1)."""
    return row_counts(n)[-1]


def plan_groups(lengths: list[int], overhead: int = CALL_OVERHEAD_TOKENS) -> list[list[int]]:
    """Split rows (by index) into groups minimizing sum(rows * longest + overhead), by dynamic
    programming over the rows sorted by length (groups of consecutive lengths are optimal).

    A group's row count is one of ``row_counts`` or the whole batch (the caller's shape already),
    so that trimming adds few shapes (see LENGTH_BUCKET). (Costing groups at their bucketed widths
    instead keeps same-bucket rows whole: calls of ~8k tokens, measured 7% slower on MiniLM.)"""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j rows (longest first)
    cut = [0] * (n + 1)
    allowed = row_counts(n)
    for j in range(1, n + 1):
        sizes = [c for c in allowed if c <= j] + ([n] if j == n else [])
        for size in sizes:  # group = order[j - size:j], its longest row is order[j - size]
            i = j - size
            cost = best[i] + size * lengths[order[i]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _right_padded(mask: torch.Tensor) -> bool:
    # every row is ones then zeros: the cumulative minimum along the row equals the row
    return bool((mask.cummin(dim=1).values == mask).all())


def wrap_trim_padding(model: nn.Module, task: str, overhead: int | None = None, *,
                      split: bool = True) -> nn.Module:
    """Run the model's forward group by group on trimmed rows (see module docstring);
    ``overhead``: tokens one more call costs (default: ``call_overhead_tokens`` of the model);
    ``split=False``: one group, only trimmed (an encoder that removes padding itself,
    pipeline/unpadding.py, runs a mixed-length batch best as one call)."""
    inner = model.forward
    overhead = call_overhead_tokens(model.config) if overhead is None else overhead
    per_token = PER_TOKEN_FIELDS[task]

    @functools.wraps(inner)
    def forward(input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any):
        passthrough = (
            input_ids is None or attention_mask is None or input_ids.dim() != 2
            or attention_mask.shape != input_ids.shape or input_ids.shape[0] < 2
            or kwargs.get("return_dict") is False
            # anything else (labels, hidden states, attentions, head masks) runs untrimmed
            or any(k not in _PER_TOKEN_INPUTS and k != "return_dict" and v is not None and v is not False
                   for k, v in kwargs.items())
            or not _right_padded(attention_mask)
        )
        if passthrough:
            return inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        lengths = attention_mask.sum(dim=1).clamp(min=1).tolist()
        groups = plan_groups(lengths, overhead) if split else [list(range(len(lengths)))]
        seq_len = input_ids.shape[1]
        if len(groups) == 1 and bucketed(max(lengths), seq_len) == seq_len:
            return inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        outputs = []
        for rows in groups:
            index = torch.tensor(rows, device=input_ids.device)
            width = bucketed(max(lengths[r] for r in rows), seq_len)
            # contiguous: a compiled forward guards on strides, and slices would recompile
            trimmed = {k: v.index_select(0, index)[:, :width].contiguous() for k, v in kwargs.items()
                       if torch.is_tensor(v)}
            outputs.append(inner(input_ids=input_ids.index_select(0, index)[:, :width].contiguous(),
                                 attention_mask=attention_mask.index_select(0, index)[:, :width].contiguous(),
                                 **trimmed))
        return _merge(outputs, groups, input_ids.shape[0], seq_len, per_token)

    forward.torchbridge_trim_padding = True  # type: ignore[attr-defined]
    model.forward = forward
    return model


def _merge(outputs: list, groups: list[list[int]], batch: int, seq_len: int, per_token: set[str]):
    first = outputs[0]
    merged = {}
    for key, value in first.items():
        if not torch.is_tensor(value):
            merged[key] = value
            continue
        shape = (batch, seq_len, *value.shape[2:]) if key in per_token else (batch, *value.shape[1:])
        full = value.new_zeros(shape)
        for rows, out in zip(groups, outputs, strict=True):
            part = out[key]
            index = torch.tensor(rows, device=part.device)
            if key in per_token:
                full[index, : part.shape[1]] = part
            else:
                full[index] = part
        merged[key] = full
    return type(first)(**merged)


def trims_padding(model: nn.Module) -> bool:
    """Read back whether the model's forward trims padding."""
    forward = model.forward
    while forward is not None:
        if getattr(forward, "torchbridge_trim_padding", False):
            return True
        forward = getattr(forward, "__wrapped__", None)
    return False
