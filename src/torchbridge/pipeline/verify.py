"""Parity check: the optimized model against the fp32 eager model, on the same padded batch.

Every output tensor the task produces (logits, start/end logits, hidden states) is compared on the
positions the attention mask marks real; padded positions are free to differ. The error measure is
the largest absolute difference divided by the largest reference magnitude, so one tolerance per
dtype fits models of any scale. Classification heads must also agree on the argmax wherever the
reference's top-2 margin is larger than the tolerance (near-ties may flip without harm).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

# Normalized max-error tolerance per compute precision. bf16 keeps 8 mantissa bits (rel. 4e-3
# per op), accumulated over a dozen layers; int8 weight/activation quantization is coarser still.
TOLERANCES = {
    torch.float32: 2e-3,
    torch.float16: 2e-2,
    torch.bfloat16: 6e-2,
    torch.float8_e4m3fn: 0.15,
    "int8": 0.15,
}

# Output fields that are not model predictions.
_SKIP_FIELDS = {"hidden_states", "attentions", "past_key_values", "cross_attentions", "loss"}


class VerificationError(AssertionError):
    """The optimized model's outputs differ from the fp32 eager reference beyond tolerance."""


@dataclass
class VerifyResult:
    passed: bool
    tolerance: float
    max_abs_diff: float
    normalized_max_diff: float
    min_cosine: float
    argmax_agreement: float | None  # fraction of decisive positions whose argmax agrees
    batch_shape: tuple[int, int]
    real_token_fraction: float
    failures: list[str]

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        agree = "" if self.argmax_agreement is None else f", argmax agreement {self.argmax_agreement:.1%}"
        return (
            f"verify {verdict}: normalized max diff {self.normalized_max_diff:.2e} "
            f"(tolerance {self.tolerance:.1e}), max abs diff {self.max_abs_diff:.3e}, "
            f"min cosine {self.min_cosine:.5f}{agree} on a padded batch {self.batch_shape} "
            f"({self.real_token_fraction:.0%} real tokens)"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def token_id_range(config) -> tuple[int, int]:
    """Ids that are ordinary vocabulary words: BERT-style vocabularies keep [PAD], [unused*] and
    special tokens below ~1000; GPT-2 keeps its end-of-text token last."""
    vocab = int(config.vocab_size)
    low = 1000 if vocab > 5000 else 1
    return low, vocab - 1


def padded_batch(config, batch: int, seq_len: int, *, seed: int = 0, left_pad: bool = False,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Real token ids from the model's vocabulary in rows of mixed length (the first row full,
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


def _prediction_tensors(output) -> dict[str, torch.Tensor]:
    items = output.items() if hasattr(output, "items") else [("output", output)]
    return {k: v for k, v in items if torch.is_tensor(v) and v.is_floating_point()
            and k not in _SKIP_FIELDS}


def compare_outputs(reference, optimized, attention_mask: torch.Tensor, tolerance: float,
                    *, classification: bool) -> VerifyResult:
    ref_t, opt_t = _prediction_tensors(reference), _prediction_tensors(optimized)
    failures: list[str] = []
    if ref_t.keys() != opt_t.keys():
        failures.append(f"output fields differ: {sorted(ref_t)} vs {sorted(opt_t)}")
    max_abs = norm = 0.0
    min_cos = 1.0
    agree = total = 0
    mask = attention_mask.bool().cpu()
    for key in ref_t.keys() & opt_t.keys():
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
        diff = (opt - ref).abs().max().item()
        scale = max(ref.abs().max().item(), 1e-6)
        max_abs, norm = max(max_abs, diff), max(norm, diff / scale)
        cos = torch.nn.functional.cosine_similarity(opt.double(), ref.double(), dim=-1, eps=1e-12)
        min_cos = min(min_cos, cos.min().item())
        if classification and ref.shape[-1] > 1:
            top2 = ref.topk(2, dim=-1).values
            decisive = (top2[:, 0] - top2[:, 1]) > 2 * tolerance * scale
            agree += (ref.argmax(-1) == opt.argmax(-1))[decisive].sum().item()
            total += int(decisive.sum().item())
    if norm > tolerance:
        failures.append(f"normalized max diff {norm:.3e} > tolerance {tolerance:.1e}")
    argmax = agree / total if total else None
    if argmax is not None and argmax < 1.0:
        failures.append(f"argmax disagrees on {total - agree} of {total} decisive positions")
    return VerifyResult(
        passed=not failures, tolerance=tolerance, max_abs_diff=max_abs, normalized_max_diff=norm,
        min_cosine=min_cos, argmax_agreement=argmax, batch_shape=tuple(attention_mask.shape),
        real_token_fraction=attention_mask.float().mean().item(), failures=failures,
    )


@torch.no_grad()
def verify_model(optimized: nn.Module, reference: nn.Module, inputs: dict[str, torch.Tensor],
                 *, device: torch.device, tolerance: float, classification: bool) -> VerifyResult:
    """Run both models on ``inputs`` (reference on CPU-or-device in fp32) and compare."""
    ref_device = next(reference.parameters()).device
    ref_out = reference(**{k: v.to(ref_device) for k, v in inputs.items()})
    opt_out = optimized(**{k: v.to(device) for k, v in inputs.items()})
    return compare_outputs(ref_out, opt_out, inputs["attention_mask"], tolerance,
                           classification=classification)
