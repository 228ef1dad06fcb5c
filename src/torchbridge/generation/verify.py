"""`verify_greedy`: a FastGenerator's greedy tokens against HF `generate` on a reference model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchbridge.generation.generator import FastGenerator
from torchbridge.generation.sampling import resolve_settings

__all__ = ["verify_greedy"]


def verify_greedy(
    fast: FastGenerator,
    reference_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """Greedy tokens of `fast` vs HF `generate` of `reference_model` (fp32 eager, the caller's
    choice), same prompt. Returns the fraction of new-token positions that agree (free running),
    the first position where they differ, the teacher-forced next-token agreement along the
    reference's continuation, and both token tensors."""
    ref_dev = next(reference_model.parameters()).device
    ids = input_ids.to(ref_dev)
    mask = None if attention_mask is None else attention_mask.to(ref_dev)
    # the eos and pad ids fast.generate itself will use
    settings = resolve_settings(fast.model.generation_config, {"max_new_tokens": max_new_tokens},
                                input_ids.shape[1], None)
    eos_ids = settings.eos_token_ids or []
    with torch.inference_mode():
        ref = reference_model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=settings.pad_token_id,
        )
    got = fast.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                        do_sample=False).to(ref_dev)
    t = input_ids.shape[1]
    ref_new, got_new = ref[:, t:], got[:, t:]
    n = max(ref_new.shape[1], got_new.shape[1])
    pad = -1  # positions one side did not generate count as disagreement
    ref_p = torch.nn.functional.pad(ref_new, (0, n - ref_new.shape[1]), value=pad)
    got_p = torch.nn.functional.pad(got_new, (0, n - got_new.shape[1]), value=pad)
    # a row that ended at EOS is padded after it while others run on: those positions are
    # filler, not predictions, and count on neither side
    ended = torch.isin(ref_p, torch.tensor(eos_ids, dtype=ref_p.dtype, device=ref_dev))
    live = (ended.long().cumsum(1) - ended.long()) == 0
    same = (ref_p == got_p) | ~live
    diff = (~same).any(0).nonzero()
    # Next-token agreement along the reference's own continuation (teacher forcing).
    forced = fast.forced_argmax(input_ids, ref_new, attention_mask).to(ref_dev)
    live_new = live[:, :ref_new.shape[1]]
    forced_same = (forced == ref_new)[live_new]
    return {
        "agreement": float((same & live).sum() / live.sum().clamp(min=1)) if n else 1.0,
        "teacher_forced_agreement": float(forced_same.float().mean()) if forced_same.numel() else 1.0,
        "identical": bool(same.all()),
        "first_divergence": None if len(diff) == 0 else int(diff[0, 0]),
        "n_new_tokens": n,
        "reference_tokens": ref,
        "tokens": got,
    }
