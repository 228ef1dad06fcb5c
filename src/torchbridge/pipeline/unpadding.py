"""Padding removed inside a packed CPU encoder: the token-wise work runs on real tokens only.

Everything in a BERT-style layer except attention treats each token on its own: the linears,
LayerNorm, GELU and the residual adds (~85% of a BERT-base forward in bf16 on the development
CPU). So once the embeddings are computed, the encoder gathers the real tokens of a padded batch
into one [1, tokens, hidden] block and runs every layer's token-wise work on it. For attention
the sequences are regrouped by their length rounded up to KEY_ALIGN (`AttentionGroup`: a few
calls of the model's attention interface a layer, each with its own key mask), and the outputs
gathered back into the packed rows; torchbridge's fused kernel (pipeline/attention.py) takes the
packed rows as they are, one call a layer with each sequence's length. The last hidden state is
scattered back to [batch, seq, hidden] with zeros at padded positions (meaningless before too,
and what the padding trimmer returns there). Values at real positions are the same arithmetic
as before, on GEMMs of fewer rows. `python benchmarks/unpadded_encoder.py` measures it.

It needs the attention modules to know the layout, so it applies to encoders whose every
self-attention is a `FusedQKVSelfAttention` (pipeline/fusion.py), and is done by two hooks on the
encoder module (the model's classes, names and state dict are unchanged). A call runs padded as
before when there is nothing to remove, when the mask is not a padding mask (every query row the
same), or when hidden states or attention weights are asked for (they would be packed).

The packed row count is rounded up (at most 1/16 more rows, `packed_rows`) with copies of a real
token, because oneDNN builds and keeps kernels for every new row count.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .first_token import FLAG as FIRST_TOKEN_ONLY
from .fusion import FusedQKVSelfAttention

# Encoder classes whose forward runs its layers on (hidden_states, attention_mask, **kwargs) and
# returns an output with ``last_hidden_state`` (DistilBERT's is named Transformer).
_ENCODERS = {("bert", "BertEncoder"), ("roberta", "RobertaEncoder"),
             ("distilbert", "Transformer")}
# For attention the sequences are grouped by their length rounded up to a multiple of this (the
# positions past a sequence's end masked as keys, dropped as queries): a few calls per layer
# instead of one per sequence, and torch's CPU flash attention ran unaligned lengths slower than
# the next multiple of 16 with a key mask (ad hoc, 12 heads of 64, bf16: 115 tokens 210 us, 128
# with the mask 135 us; 74: 149 vs 90 us).
KEY_ALIGN = 16
# Asking for these keeps the padded layout: their per-layer values would come back packed.
_PADDED_OUTPUTS = ("output_hidden_states", "output_attentions")


def packed_rows(tokens: int) -> int:
    """``tokens`` rounded up to one of 16 steps per power of two (at least multiples of 16)."""
    step = max(16, 1 << max(tokens.bit_length() - 5, 0))
    return -(-tokens // step) * step


@dataclass
class AttentionGroup:
    """Sequences whose lengths round up to the same multiple of KEY_ALIGN, attending together."""

    rows: Tensor  # [count * width] packed row of each position (past a sequence's end: its first)
    mask: Tensor | None  # [count, 1, 1, width] keys' mask in the model's kind; None: no padding
    count: int
    width: int


@dataclass
class TokenLayout:
    """Where the real tokens of a [batch, seq] batch sit, how many packed rows carry them, and
    how their sequences are grouped for attention."""

    index: Tensor  # flat positions in [batch * seq] of the real tokens, row by row
    padded_index: Tensor  # ``index`` extended to the packed row count with copies of its first
    groups: list[AttentionGroup]
    regroup: Tensor  # per packed row, its position in the groups' concatenated outputs
    lengths: Tensor  # int32 [sequences]: each non-empty sequence's length, as packed
    batch: int
    seq: int

    @functools.cached_property
    def first_rows(self) -> Tensor:
        """The packed rows at the first position of a sequence (pipeline/first_token.py)."""
        return (self.index % self.seq == 0).nonzero().squeeze(1)

    @classmethod
    def from_mask(cls, real: Tensor, mask: Tensor) -> TokenLayout:
        """The layout of ``real`` ([batch, seq] bool); ``mask`` is the model's 4-D mask, whose
        kind (bool, or additive float) the groups' key masks take."""
        index = real.reshape(-1).nonzero().squeeze(1)
        rows = packed_rows(len(index))
        lengths = real.sum(1).tolist()
        starts = [0, *itertools.accumulate(lengths)]  # each row's first packed row
        widths = {}  # aligned width -> the rows (sequences) of that width
        for row, n in enumerate(lengths):
            if n:
                widths.setdefault(-(-n // KEY_ALIGN) * KEY_ALIGN, []).append(row)
        groups, regroup, offset = [], torch.zeros(rows, dtype=torch.long), 0
        for width, members in sorted(widths.items()):
            positions = torch.arange(width)
            group_rows = []
            for j, row in enumerate(members):
                n, start = lengths[row], starts[row]
                group_rows.append(start + torch.where(positions < n, positions, 0))
                regroup[start:start + n] = offset + j * width + positions[:n]
            valid = torch.tensor([lengths[r] for r in members])[:, None] > positions
            groups.append(AttentionGroup(torch.cat(group_rows).to(index.device),
                                         _key_mask(valid, mask), len(members), width))
            offset += len(members) * width
        return cls(index, torch.cat([index, index[:1].expand(rows - len(index))]), groups,
                   regroup.to(index.device), torch.tensor([n for n in lengths if n],
                                                          dtype=torch.int32), *real.shape)

    def pack(self, x: Tensor) -> Tensor:
        """[batch, seq, ...] -> [1, packed rows, ...]."""
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.padded_index)[None]

    def unpack_first(self, x: Tensor) -> Tensor:
        """[1, `first_rows`, ...] -> [batch, 1, ...], zeros where the first position is padding."""
        full = x.new_zeros(self.batch, 1, *x.shape[2:])
        full[self.index[self.first_rows] // self.seq, 0] = x[0]
        return full

    def unpack(self, x: Tensor) -> Tensor:
        """[1, packed rows, ...] -> [batch, seq, ...], zeros at padded positions."""
        real = x[0, : len(self.index)]
        full = real.new_zeros(self.batch * self.seq, *real.shape[1:])
        full[self.index] = real
        return full.view(self.batch, self.seq, *real.shape[1:])

    def grouped(self, x: Tensor, group: AttentionGroup) -> Tensor:
        """Packed rows [packed rows, d] -> the group's [count, width, d]."""
        return x.index_select(0, group.rows).view(group.count, group.width, -1)

    def ungrouped(self, outputs: list[Tensor]) -> Tensor:
        """The groups' outputs (each [count, width, d], in `groups` order) -> [packed rows, d]."""
        flat = torch.cat([out.reshape(-1, out.shape[-1]) for out in outputs])
        return flat.index_select(0, self.regroup)


def _key_mask(valid: Tensor, like: Tensor) -> Tensor | None:
    """[count, width] bool -> [count, 1, 1, width] in the kind of ``like`` (bool: True attends;
    float: 0 attends), on its device; None when every key is valid."""
    if bool(valid.all()):
        return None
    valid = valid.to(like.device)[:, None, None, :]
    if like.dtype == torch.bool:
        return valid
    return torch.zeros(valid.shape, dtype=like.dtype, device=like.device) \
        .masked_fill(~valid, torch.finfo(like.dtype).min)


def _real_tokens(mask: Tensor | None) -> Tensor | None:
    """[batch, seq] bool of the real tokens when ``mask`` is the model's 4-D padding mask
    (bool: True attends; float: 0 attends) with every query row alike; otherwise None."""
    if mask is None or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    attends = mask if mask.dtype == torch.bool else mask == 0
    if not bool((attends == attends[:, :, :1]).all()):
        return None
    return attends[:, 0, 0]


def _pack_tokens(config: Any, encoder: nn.Module, args: tuple, kwargs: dict[str, Any]):
    if args:  # BERT passes hidden_states by position, DistilBERT by keyword
        kwargs = {"hidden_states": args[0], **kwargs}
        if len(args) > 1:
            kwargs["attention_mask"] = args[1]
        args = ()
    if any(kwargs.get(name) or getattr(config, name, False) for name in _PADDED_OUTPUTS) \
            or kwargs.get("encoder_hidden_states") is not None:
        return args, kwargs
    real = _real_tokens(kwargs.get("attention_mask"))
    if real is None or packed_rows(int(real.sum())) >= real.numel():
        return args, kwargs
    layout = TokenLayout.from_mask(real, kwargs["attention_mask"])
    kwargs["hidden_states"] = layout.pack(kwargs["hidden_states"])
    kwargs["unpadded"] = layout
    return args, kwargs


def _unpack_tokens(encoder: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
    layout = kwargs.get("unpadded")
    if layout is not None:
        last = output.last_hidden_state
        # the last layer kept only the first rows when the classifier asked (first_token.py)
        output.last_hidden_state = layout.unpack_first(last) if kwargs.get(FIRST_TOKEN_ONLY) \
            else layout.unpack(last)
    return output


def _encoder(module: nn.Module) -> bool:
    family = type(module).__module__.rsplit(".", 1)[-1].removeprefix("modeling_")
    if (family, type(module).__name__) not in _ENCODERS:
        return False
    attentions = [m for m in module.modules() if isinstance(m, FusedQKVSelfAttention)]
    return len(attentions) == len(module.layer) > 0


def remove_padding(model: nn.Module) -> int:
    """Make every encoder of ``model`` whose self-attention is fused (`FusedQKVSelfAttention`)
    run its layers on real tokens only (see the module docstring), in place; returns how many."""
    encoders = [m for m in model.modules() if _encoder(m)]
    for encoder in encoders:
        config = next(m for m in encoder.modules() if isinstance(m, FusedQKVSelfAttention)).config
        encoder.register_forward_pre_hook(functools.partial(_pack_tokens, config), with_kwargs=True)
        encoder.register_forward_hook(_unpack_tokens, with_kwargs=True)
    return len(encoders)


def removes_padding(model: nn.Module) -> bool:
    """Read back whether an encoder of ``model`` removes padding."""
    return any(getattr(hook, "func", None) is _pack_tokens
               for m in model.modules() for hook in m._forward_pre_hooks.values())
