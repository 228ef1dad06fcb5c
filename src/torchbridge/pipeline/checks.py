"""Input checks before the model runs: a bad batch gets a ValueError in the user's terms.

Without them, 600 tokens into a 512-position BERT surface as torch's "The expanded size of the
tensor (600) must match the existing size (512)", an out-of-vocabulary id as an index error deep in
an embedding, and a float tensor as a dtype error in a kernel. Each message names the limit, the
value and the fix. The checks cost one min/max over the ids, outside any compiled graph.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

# RoBERTa-style embeddings number positions from padding_idx + 1: that many rows of the position
# table are never used by real tokens (roberta-base: 514 rows, 512 usable positions).
_POSITIONS_AFTER_PADDING = frozenset({"roberta", "xlm-roberta", "camembert"})


def max_positions(config: Any) -> int | None:
    """How many positions the model can embed (None: no absolute limit known)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", None) in _POSITIONS_AFTER_PADDING:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None


def check_inputs(input_ids: Any, attention_mask: Any, *, vocab_size: int | None,
                 positions: int | None) -> None:
    """Raise ValueError naming what is wrong with a batch of token ids, and the fix."""
    if not torch.is_tensor(input_ids):
        raise ValueError(f"input_ids must be a tensor of token ids (the tokenizer's output with "
                         f"return_tensors='pt'); got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}. Fix: "
                         "pass the tokenizer's input_ids (torch.long), not embeddings or scores")
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must be [batch, length] (or [length]); got shape "
                         f"{tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"empty batch: input_ids has shape {tuple(input_ids.shape)}. Fix: pass at "
                         "least one non-empty text")
    length = input_ids.shape[-1]
    if positions is not None and length > positions:
        raise ValueError(f"sequence of {length} tokens is longer than the model's {positions} "
                         f"positions. Fix: tokenize with truncation=True, max_length={positions}")
    if vocab_size is not None:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the model's vocabulary (ids 0..{vocab_size - 1})."
                             " Fix: use the tokenizer that belongs to this model")
    if attention_mask is not None and torch.is_tensor(attention_mask) \
            and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}. Fix: pass the mask the tokenizer returned with "
                         "these ids")


def wrap_input_checks(model: nn.Module) -> tuple[nn.Module, str]:
    """Check every call's ids before the (possibly compiled) forward; returns the model and a
    description of the limits for the report."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    positions = max_positions(config)
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is not None:
            check_inputs(input_ids, kwargs.get("attention_mask"), vocab_size=vocab,
                         positions=positions)
        return inner(*args, **kwargs)

    model.forward = forward
    limits = f"ids outside 0..{vocab - 1 if vocab else '?'}, more than {positions} positions, " \
             "float ids, empty batches, mask shape != ids shape"
    return model, limits
