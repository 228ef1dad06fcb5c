"""Texts -> token ids -> batches: validation, the model's length limit, token-budget batching.

Inputs are tokenized once without padding; batches are then formed over the inputs sorted by
length, each holding as many rows as fit a token budget (rows x longest row), so a batch pads only
to its own longest row and the padding across the whole input stays near zero.

Right-padded batches also keep the set of (rows, width) shapes small and bounded, whatever the
input: oneDNN builds and keeps kernels per shape, so a long job meeting ever new shapes grows
without end. Widths are rounded up to the length bucket (pipeline/padding.py) and row counts come
from a fixed set: the batch size, or ``pipeline.padding.row_counts`` (see ``plan_batches``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torchbridge.pipeline.checks import max_positions
from torchbridge.pipeline.padding import CALL_OVERHEAD_TOKENS, bucketed, row_count_floor, row_counts

# Tokens per batch (rows x longest row) when the caller gives neither budget nor batch size: large
# enough that per-call overhead is small next to the matmuls, small enough for a laptop's cache.
DEFAULT_BATCH_TOKENS = 8192
# Row cap when only a token budget applies: short texts would otherwise make huge batches.
MAX_ROWS_PER_BATCH = 256


class InputError(ValueError):
    """One input row cannot be processed as asked; ``index`` is its position in the input."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"text {index}: {reason}")
        self.index = index
        self.reason = reason


@dataclass
class Encoded:
    """The valid rows of an input, tokenized; ``errors`` maps bad rows' indices to the reason."""

    index: list[int]  # position of each encoded row in the caller's input
    features: list[dict[str, list[Any]]]  # per row: input_ids, token_type_ids, offset_mapping...
    word_ids: list[list[int | None]] | None = None
    sequence_ids: list[list[int | None]] | None = None
    errors: dict[int, str] = field(default_factory=dict)

    def length(self, row: int) -> int:
        return len(self.features[row]["input_ids"])


def max_tokens(model: Any, tokenizer: Any) -> int:
    """The longest input the model takes: its position table, the tokenizer's own limit, and the
    sentence-transformers ``max_seq_length`` when the folder has one (it trained to that)."""
    from torchbridge.data.pooling import pooling_for

    config = model.config
    # the position table (less RoBERTa's padding rows), sentence_bert_config.json, the tokenizer
    limits = [max_positions(config), pooling_for(model).max_seq_length]
    limit_tok = getattr(tokenizer, "model_max_length", None)
    limits.append(limit_tok if isinstance(limit_tok, int) and limit_tok < 1_000_000 else None)
    usable = [x for x in limits if isinstance(x, int) and x > 0]
    if not usable:
        raise ValueError(f"{type(model.model).__name__}: cannot tell the longest input it takes "
                         "(no max_position_embeddings in its config, no tokenizer model_max_length)")
    return min(usable)


def check_texts(texts: Sequence[Any], what: str = "text") -> dict[int, str]:
    """Reasons for rows that are not non-empty strings, by index."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"expected a list of {what}s, got a single {type(texts).__name__}; "
                        f"fix: pass [{what}]")
    errors = {}
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            errors[i] = f"not a string (got {type(text).__name__})"
        elif not text.strip():
            errors[i] = "empty string"
    return errors


def tokenize(tokenizer: Any, texts: Sequence[Any], limit: int, *, truncation: bool = True,
             pairs: Sequence[Any] | None = None, offsets: bool = False, side: str = "right",
             reserve: int = 0) -> Encoded:
    """Tokenize the valid rows; bad rows (not text, empty, over-long with truncation off) are
    recorded in ``errors`` instead. ``pairs`` makes (text, pair) inputs truncated on the pair
    side; ``reserve`` keeps room for generated tokens; ``side`` is where truncation cuts."""
    errors = check_texts(texts)
    if pairs is not None:
        for i, reason in check_texts(pairs, "context").items():
            errors.setdefault(i, f"context {reason}")
    good = [i for i in range(len(texts)) if i not in errors]
    room = limit - reserve
    if room < 1:
        raise ValueError(f"no room for input: the model takes {limit} tokens and {reserve} are "
                         "reserved for new tokens; fix: ask for fewer new tokens")
    if offsets and not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer: character spans need a "
                         "fast (Rust) tokenizer; fix: save the model with its tokenizer.json")
    encoded = Encoded(index=[], features=[], errors=errors)
    if not good:
        return encoded
    kwargs: dict[str, Any] = {"return_attention_mask": False, "return_offsets_mapping": offsets}
    if truncation:
        kwargs.update(truncation="only_second" if pairs is not None else True, max_length=room)
    old_side = tokenizer.truncation_side
    tokenizer.truncation_side = side
    try:
        first = [texts[i] for i in good]
        batch = tokenizer(first, [pairs[i] for i in good], **kwargs) if pairs is not None \
            else tokenizer(first, **kwargs)
    finally:
        tokenizer.truncation_side = old_side
    keys = [k for k in batch.keys() if k != "overflow_to_sample_mapping"]
    want_words = offsets and batch.encodings is not None
    if want_words:
        encoded.word_ids, encoded.sequence_ids = [], []
    for row, i in enumerate(good):
        n = len(batch["input_ids"][row])
        if n > room:
            errors[i] = (f"{n} tokens, more than the model's limit of {room}"
                         + (f" ({limit} minus {reserve} new tokens)" if reserve else "")
                         + " (truncation=False)")
            continue
        encoded.index.append(i)
        encoded.features.append({k: batch[k][row] for k in keys})
        if want_words:
            encoded.word_ids.append(batch.encodings[row].word_ids)
            encoded.sequence_ids.append(batch.encodings[row].sequence_ids)
    return encoded


def plan_batches(lengths: Sequence[int], *, batch_size: int | None = None,
                 max_batch_tokens: int | None = None, max_width: int | None = None
                 ) -> list[list[int]]:
    """Rows (by position in ``lengths``) grouped into batches, longest first (memory peaks at the
    start, not after an hour), each within ``batch_size`` rows and ``max_batch_tokens`` padded
    tokens. A single row longer than the budget still gets a batch of its own.

    ``max_width`` (right padding, see ``collate``) bounds the shapes: widths count as bucketed and
    every batch has ``batch_size`` rows or one of ``row_counts``. A batch may then end with repeats of
    its last row, filler up to that count (outputs to drop): every row appears once otherwise."""
    for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_batch_tokens is None and batch_size is None:
        max_batch_tokens = DEFAULT_BATCH_TOKENS
    rows_cap = batch_size or MAX_ROWS_PER_BATCH
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if max_width is not None:
        return _bounded_batches([lengths[i] for i in order], order, rows_cap, max_batch_tokens,
                                max_width)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # sorted longest first: the batch's padded width is its first row's length
        width = lengths[current[0]] if current else lengths[i]
        fits = len(current) < rows_cap and (
            max_batch_tokens is None or (len(current) + 1) * width <= max_batch_tokens)
        if current and not fits:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _bounded_batches(lengths: list[int], order: list[int], rows_cap: int, budget: int | None,
                     max_width: int) -> list[list[int]]:
    """``plan_batches`` with bounded shapes, over rows sorted longest first (``lengths`` in that
    order). Full batches hold ``rows_cap`` rows or the budget's rows at the bucketed width, rounded
    down to an allowed row count; the last rows are padded with filler up to the next allowed count
    when that costs less than another call, else cut at the allowed count below them."""
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        # the first row is the longest: the batch's width, as collate will pad it
        width = max(lengths[start], bucketed(lengths[start], max_width))
        full = rows_cap if budget is None else min(rows_cap, row_count_floor(max(1, budget // width)))
        left = len(order) - start
        size = take = full
        if left < full:
            size = take = left
            if left not in row_counts(left):
                size = min(full, min(c for c in row_counts(2 * left) if c > left))
                if (size - left) * width > CALL_OVERHEAD_TOKENS:
                    size = take = row_count_floor(left)
        rows = order[start:start + take]
        batches.append(rows + [rows[-1]] * (size - take))
        start += take
    return batches


_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1}


def collate(features: Sequence[dict[str, list[Any]]], pad_id: int, *, side: str = "right",
            keys: Sequence[str] = ("input_ids", "token_type_ids"),
            device: torch.device | str = "cpu", max_width: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Pad rows to the batch's longest row; ``attention_mask`` marks the real tokens. With
    ``max_width`` (the model's positions), right-padded widths are rounded up to the pipeline's
    length bucket so a long run meets a bounded set of shapes (see pipeline/padding.py)."""
    width = max(len(f["input_ids"]) for f in features)
    if side == "right" and max_width is not None:
        width = max(width, bucketed(width, max_width))
    out: dict[str, torch.Tensor] = {}
    present = [k for k in keys if k in features[0]]
    for key in [*present, "attention_mask"]:
        fill = pad_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
        tensor = torch.full((len(features), width), fill, dtype=torch.long)
        for r, f in enumerate(features):
            n = len(f["input_ids"])
            values = torch.ones(n, dtype=torch.long) if key == "attention_mask" \
                else torch.as_tensor(f[key], dtype=torch.long)
            if side == "right":
                tensor[r, :n] = values
            else:
                tensor[r, width - n:] = values
        out[key] = tensor.to(device)
    return out
