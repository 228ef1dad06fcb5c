"""The last encoder layer computes only the rows a first-token classifier reads.

A BERT, RoBERTa or DistilBERT sequence classifier reads one row of the encoder's output: each
sequence's first token (BERT's pooler, RoBERTa's classification head and DistilBERT's
``hidden_state[:, 0]``). Every row of the last layer's input is still needed, as keys and values
of its attention, but after attention nothing mixes tokens: the output projection, the residual
adds, the LayerNorms and the feed-forward block of the other rows compute values nobody reads.
So in such a model the last layer (`FirstTokenLayer`) attends with every token, then keeps only
the first token's row of each sequence: about three quarters of a layer less, some 6% of
BERT-base's 12 layers (`python benchmarks/first_token.py` measures it). Each kept row is the same
arithmetic as before; verify compares the logits with the fp32 eager model as always.

Only the classifier's own forward asks for it (a forward pre-hook passes ``first_token_only``
down to the layers), so the encoder called on its own (``model.bert(...)``), calls that ask for
hidden states or attention weights, and training compute every row. The encoder's
``last_hidden_state`` inside such a call is [batch, 1, hidden]; with padding removed
(pipeline/unpadding.py) it is the first position of each sequence, zeros where that position is
padding, as the unpadded encoder returns it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .fusion import FusedQKVSelfAttention

if TYPE_CHECKING:
    from .unpadding import TokenLayout

# Classifiers whose head reads only the first token of the encoder's last hidden state.
FIRST_TOKEN_HEADS = frozenset({"BertForSequenceClassification",
                               "RobertaForSequenceClassification",
                               "XLMRobertaForSequenceClassification",
                               "DistilBertForSequenceClassification"})
# The keyword the classifier's pre-hook passes down to the encoder's layers.
FLAG = "first_token_only"
# Asking for these computes every row: the last layer's values would be incomplete.
_EVERY_ROW = ("output_hidden_states", "output_attentions")


class FirstTokenLayer(nn.Module):
    """An encoder's last layer (BERT/RoBERTa ``attention``, ``intermediate``, ``output``, or a
    DistilBERT block's ``attention``, ``sa_layer_norm``, ``ffn``, ``output_layer_norm``) under the
    same names, with its self-attention fused; keeps only the first token's rows after attention
    when the call says ``first_token_only``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.distilbert = hasattr(layer, "sa_layer_norm")
        names = ("attention", "sa_layer_norm", "ffn", "output_layer_norm") if self.distilbert \
            else ("attention", "intermediate", "output")
        for name in names:
            self.add_module(name, getattr(layer, name))
        self.train(layer.training)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, **kwargs: Any) -> Tensor:
        decoder_inputs = {"encoder_hidden_states": encoder_hidden_states,
                          **{name: kwargs.pop(name, None)
                             for name in ("encoder_attention_mask", "past_key_values")}}
        given = [name for name, value in decoder_inputs.items() if value is not None]
        if given:
            raise ValueError(f"this is an encoder-only layer (no cross-attention, no cache): "
                             f"{', '.join(given)} must be None")
        first_only = kwargs.pop(FLAG, False)  # the classifier's pre-hook decides, once a call
        attend = self.attention if self.distilbert else self.attention.self
        context, _ = attend(hidden_states, attention_mask=attention_mask, **kwargs)
        residual = hidden_states
        if first_only:
            context, residual = (_first_rows(t, kwargs.get("unpadded")) for t in (context, residual))
        if self.distilbert:
            x = self.sa_layer_norm(context + residual)
            return self.output_layer_norm(self.ffn(x) + x)
        x = self.attention.output(context, residual)
        return self.output(self.intermediate(x), x)


def _first_rows(x: Tensor, layout: TokenLayout | None) -> Tensor:
    """[batch, seq, d] -> [batch, 1, d]; packed rows [1, rows, d] -> [1, sequences whose first
    position is a real token, d] (`TokenLayout.first_rows`)."""
    return x[:, :1].contiguous() if layout is None else x[:, layout.first_rows]


def _ask_first_token(model: nn.Module, args: tuple, kwargs: dict[str, Any]):
    config = model.config
    if not model.training \
            and not any(kwargs.get(name) or getattr(config, name, False) for name in _EVERY_ROW):
        kwargs[FLAG] = True
    return args, kwargs


def _qualifies(layer: nn.Module) -> bool:
    """Whether ``layer`` is a BERT/RoBERTa layer or a DistilBERT block with fused self-attention
    (and no cross-attention)."""
    if hasattr(layer, "sa_layer_norm"):
        return isinstance(getattr(layer, "attention", None), FusedQKVSelfAttention) \
            and hasattr(layer, "ffn") and hasattr(layer, "output_layer_norm")
    return isinstance(getattr(getattr(layer, "attention", None), "self", None),
                      FusedQKVSelfAttention) \
        and hasattr(layer, "intermediate") and hasattr(layer, "output") \
        and not getattr(layer, "add_cross_attention", False)


def first_token_only(model: nn.Module) -> bool:
    """Give a first-token classifier (`FIRST_TOKEN_HEADS`) whose encoder's self-attention is
    fused a `FirstTokenLayer` as its last layer, and the pre-hook that asks for it, in place;
    returns whether it did."""
    if type(model).__name__ not in FIRST_TOKEN_HEADS or getattr(model.config, "is_decoder", False):
        return False
    encoders = [m for m in model.modules() if isinstance(getattr(m, "layer", None), nn.ModuleList)
                and len(m.layer) > 0]
    if len(encoders) != 1 or not _qualifies(encoders[0].layer[-1]):
        return False
    layers = encoders[0].layer
    layers[-1] = FirstTokenLayer(layers[-1])
    model.register_forward_pre_hook(_ask_first_token, with_kwargs=True)
    return True
