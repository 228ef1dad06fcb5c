"""The gates: the optimized model against the fp32 eager model, on the same padded batch.

Two measures, chosen by what the model is for (thresholds per precision live in the registry,
``torchbridge.precisions``):

* encoders (hidden states, logits of classifiers, taggers, QA heads): the cosine of every output
  vector at real positions (padded positions are free to differ), and, for heads with several
  classes, argmax agreement where the reference's top-2 margin is decisive (near-ties may flip
  without harm);
* causal LMs: teacher-forced next-token agreement on decisive positions and the mean KL divergence
  of the next-token distributions. A max-logit difference is the wrong measure for a 50k-way head:
  it grows with the vocabulary while the predictions stay the same.

The batch is real text when the model's tokenizer is at hand (``CALIBRATION_TEXT``), otherwise ids
drawn from the ordinary vocabulary; the result says which.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from torchbridge.precisions import Gate

# Output fields that are not model predictions.
_SKIP_FIELDS = {"hidden_states", "attentions", "past_key_values", "cross_attentions", "loss"}
# Outputs narrower than this are class scores, not vectors: one cosine over the whole batch.
_MIN_VECTOR_DIM = 8
# A reference top-2 margin (in logits) below which a flipped argmax is a near-tie, not an error.
DECISIVE_MARGIN = 0.5

# Real sentences of mixed length for the gates (written for this project).
CALIBRATION_TEXT = [
    "The film opens slowly, but the last hour is some of the best work the director has done.",
    "I would not recommend this hotel to anyone.",
    "Shares of the company rose four percent after the quarterly report beat expectations.",
    "She moved to Berlin in 2019 and now teaches physics at a secondary school.",
    "Add the onions and cook until soft, then stir in the tomatoes and simmer for twenty minutes.",
    "The committee will meet again on Thursday to discuss the budget.",
    "What time does the last train to Manchester leave?",
    "Battery life is excellent, although the screen is hard to read in direct sunlight.",
]
# Other sentences for what an optimization calibrates on its inputs (int8 activation ranges and
# smoothing scales): the gate then measures it on text the calibration never saw.
CALIBRATION_ONLY_TEXT = [
    "The bridge was closed for repairs after engineers found cracks in two of its supports.",
    "Honestly, the soup was cold and the waiter never came back to our table.",
    "Researchers measured the temperature of the lake every hour for three years.",
    "Can you send me the report by Friday afternoon?",
    "The sequel keeps the humour of the first book but the plot drags in the middle.",
    "Prices for fresh vegetables fell sharply in October as the harvest came in.",
    "He scored twice in the second half, and the crowd would not stop singing.",
    "Unplug the device before cleaning it with a dry cloth.",
]


class VerificationError(AssertionError):
    """The optimized model's outputs differ from the fp32 eager reference beyond its gate."""


@dataclass
class VerifyResult:
    passed: bool
    kind: str  # "encoder" or "causal-lm"
    gate: dict[str, float]
    measures: dict[str, float | None]
    batch_shape: tuple[int, int]
    real_token_fraction: float
    text: str  # "real text" or "vocabulary ids (no tokenizer)"
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        values = ", ".join(f"{k} {_fmt(v)}" for k, v in self.measures.items() if v is not None)
        limits = ", ".join(f"{k} {_fmt(v)}" for k, v in self.gate.items())
        return (f"verify {verdict} ({self.kind} gate: {limits}): {values} on a padded batch "
                f"{self.batch_shape} of {self.text} ({self.real_token_fraction:.0%} real tokens)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: float) -> str:
    return f"{value:.6f}" if 1e-3 <= abs(value) <= 1 else f"{value:.2e}"


def token_id_range(config) -> tuple[int, int]:
    """Ids that are ordinary vocabulary words: BERT-style vocabularies keep [PAD], [unused*] and
    special tokens below ~1000; GPT-2 keeps its end-of-text token last."""
    vocab = int(config.vocab_size)
    low = 1000 if vocab > 5000 else 1
    return low, vocab - 1


def padded_batch(config, batch: int, seq_len: int, *, seed: int = 0, left_pad: bool = False,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Ids from the model's ordinary vocabulary in rows of mixed length (the first row full,
    the shortest about a quarter), padded with the model's pad id and masked."""
    gen = torch.Generator().manual_seed(seed)
    low, high = token_id_range(config)
    ids = torch.randint(low, high, (batch, seq_len), generator=gen)
    lengths = [max(1, seq_len - (seq_len * 3 * i) // (4 * max(batch - 1, 1))) for i in range(batch)]
    mask = torch.zeros(batch, seq_len, dtype=torch.long)
    pad_id = getattr(config, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    for row, length in enumerate(lengths):
        real = slice(seq_len - length, seq_len) if left_pad else slice(0, length)
        mask[row, real] = 1
    ids = ids.masked_fill(mask == 0, pad_id)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def text_batch(tokenizer, max_length: int, *, rows: int = 8,
               texts: list[str] = CALIBRATION_TEXT) -> dict[str, torch.Tensor]:
    """``texts`` (the gate's CALIBRATION_TEXT) through the model's own tokenizer, right-padded."""
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none: any id works, it is masked
        tokenizer = _with_pad(tokenizer)
    enc = tokenizer(texts[:rows], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    # every input the tokenizer makes (BERT's token_type_ids too): the compiled graph is then
    # traced with the keyword arguments that the data path and users pass, not a second set
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _with_pad(tokenizer):
    import copy

    tokenizer = copy.copy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _prediction_tensors(output) -> dict[str, torch.Tensor]:
    items = output.items() if hasattr(output, "items") else [("output", output)]
    return {k: v for k, v in items if torch.is_tensor(v) and v.is_floating_point()
            and k not in _SKIP_FIELDS}


def _result(kind, gate_values, measures, mask, text, failures) -> VerifyResult:
    return VerifyResult(passed=not failures, kind=kind, gate=gate_values, measures=measures,
                        batch_shape=tuple(mask.shape), real_token_fraction=mask.float().mean().item(),
                        text=text, failures=failures)


def compare_encoder(reference, optimized, attention_mask: torch.Tensor, gate: Gate, *,
                    text: str = "vocabulary ids") -> VerifyResult:
    """Cosine of every output vector at real positions + argmax agreement of class scores."""
    ref_t, opt_t = _prediction_tensors(reference), _prediction_tensors(optimized)
    failures: list[str] = []
    if ref_t.keys() != opt_t.keys():
        failures.append(f"output fields differ: {sorted(ref_t)} vs {sorted(opt_t)}")
    min_cos, max_abs, agree, total = 1.0, 0.0, 0, 0
    mask = attention_mask.bool().cpu()
    for key in sorted(ref_t.keys() & opt_t.keys()):
        ref, opt = ref_t[key].float().cpu(), opt_t[key].float().cpu()
        if ref.shape != opt.shape:
            failures.append(f"{key}: shape {tuple(opt.shape)} != reference {tuple(ref.shape)}")
            continue
        if ref.dim() >= 2 and ref.shape[:2] == mask.shape:  # per-token output: real positions only
            ref, opt = ref[mask], opt[mask]
        ref, opt = ref.reshape(ref.shape[0], -1), opt.reshape(opt.shape[0], -1)
        if not torch.isfinite(opt).all():
            failures.append(f"{key}: non-finite values (overflow?)")
            continue
        max_abs = max(max_abs, (opt - ref).abs().max().item())
        if ref.shape[-1] >= _MIN_VECTOR_DIM:
            cos = torch.nn.functional.cosine_similarity(opt.double(), ref.double(), dim=-1, eps=1e-12)
        else:  # a few scores per row: one cosine over the batch (class logits made shift-free)
            centered = [t.double() - t.double().mean(-1, keepdim=True) if t.shape[-1] > 1
                        else t.double() for t in (opt, ref)]
            cos = torch.nn.functional.cosine_similarity(*(t.reshape(1, -1) for t in centered),
                                                        dim=-1, eps=1e-12)
        min_cos = min(min_cos, cos.min().item())
        if ref.shape[-1] > 1 and key != "last_hidden_state" and key != "pooler_output":
            top2 = ref.topk(2, dim=-1).values
            decisive = (top2[:, 0] - top2[:, 1]) > DECISIVE_MARGIN * _spread(ref)
            agree += (ref.argmax(-1) == opt.argmax(-1))[decisive].sum().item()
            total += int(decisive.sum().item())
    agreement = agree / total if total else None
    if min_cos < gate.min_cosine:
        failures.append(f"min cosine {min_cos:.5f} < {gate.min_cosine}")
    if agreement is not None and agreement < gate.min_agreement:
        failures.append(f"argmax agrees on {agreement:.1%} of {total} decisive positions "
                        f"(< {gate.min_agreement:.0%})")
    return _result("encoder", {"min_cosine": gate.min_cosine, "min_agreement": gate.min_agreement},
                   {"min_cosine": min_cos, "argmax_agreement": agreement, "max_abs_diff": max_abs},
                   attention_mask, text, failures)


def _spread(ref: torch.Tensor) -> float:
    """The reference's typical logit scale, so "decisive" means the same for any head."""
    return max(ref.std().item(), 1e-6)


def compare_causal(ref_logits: torch.Tensor, opt_logits: torch.Tensor, attention_mask: torch.Tensor,
                   gate: Gate, *, text: str = "vocabulary ids") -> VerifyResult:
    """Teacher-forced next-token agreement (decisive positions), mean KL and top-5 overlap."""
    mask = attention_mask.bool().cpu()
    ref = ref_logits.float().cpu()[mask]
    opt = opt_logits.float().cpu()[mask]
    failures: list[str] = []
    if not torch.isfinite(opt).all():
        failures.append("non-finite logits (overflow?)")
        opt = torch.nan_to_num(opt)
    ref_logp, opt_logp = ref.log_softmax(-1), opt.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - opt_logp)).sum(-1).mean().item()
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > DECISIVE_MARGIN
    same = ref.argmax(-1) == opt.argmax(-1)
    agreement = same[decisive].float().mean().item() if decisive.any() else None
    k = min(5, ref.shape[-1])
    ref_top, opt_top = ref.topk(k, -1).indices, opt.topk(k, -1).indices
    overlap = (ref_top.unsqueeze(-1) == opt_top.unsqueeze(-2)).any(-1).float().mean().item()
    if agreement is not None and agreement < gate.min_agreement:
        failures.append(f"next-token agreement {agreement:.3f} < {gate.min_agreement} on "
                        f"{int(decisive.sum())} decisive positions")
    if kl > gate.max_kl:
        failures.append(f"mean KL {kl:.2e} > {gate.max_kl}")
    return _result("causal-lm", {"min_agreement": gate.min_agreement, "max_kl": gate.max_kl},
                   {"next_token_agreement": agreement, "all_positions_agreement": same.float().mean().item(),
                    "mean_kl": kl, "top5_overlap": overlap}, attention_mask, text, failures)


@torch.no_grad()
def run_both(optimized: nn.Module, reference: nn.Module, inputs: dict[str, torch.Tensor],
             device: torch.device) -> tuple[Any, Any]:
    """Reference (fp32 eager, on its own device) and optimized outputs for the same inputs."""
    ref_device = next(reference.parameters()).device
    ref_out = reference(**{k: v.to(ref_device) for k, v in inputs.items()})
    opt_out = optimized(**{k: v.to(device) for k, v in inputs.items()})
    return ref_out, opt_out


def _values(output: Any) -> list:
    if torch.is_tensor(output):
        return [output]
    if hasattr(output, "values"):
        return list(output.values())
    if isinstance(output, (tuple, list)):
        return list(output)
    return [output]


def flat_outputs(output: Any) -> dict[str, torch.Tensor]:
    """A plain module's outputs as named [batch, -1] tensors, for the encoder gate."""
    tensors = [v for v in _values(output) if torch.is_tensor(v) and v.is_floating_point()]
    return {f"output{i}": t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
            for i, t in enumerate(tensors)}


