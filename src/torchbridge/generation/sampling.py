"""Generation settings resolved like HF `generate`, and the logits processing of one step.

The processors themselves are transformers' own classes (repetition penalty, min length,
temperature, top-k, top-p), built in the order `GenerationMixin._get_logits_processor` builds
them: semantics (including the corner cases: repetition penalty ignoring left padding, top-k/top-p
keeping at least one token, min_new_tokens counting from the prompt end) then match HF exactly.
They run eagerly on [batch, vocab] fp32 logits, which costs well under a millisecond per token
next to the decode step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

__all__ = ["GenSettings", "SUPPORTED_ARGS", "resolve_settings", "build_processors", "select_next",
           "MIN_LENGTH_RULES", "eos_banned_below"]

# Arguments of HF `generate` this path implements (beyond input_ids / attention_mask).
SUPPORTED_ARGS = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature",
    "top_k", "top_p", "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id",
    "num_return_sequences", "generator", "streamer", "use_cache",
)

# HF's library-wide defaults (GenerationConfig._get_default_generation_params), for the fields
# this path reads: a value left None by the model's generation_config falls back to these.
_HF_DEFAULTS = {
    "max_length": 20, "min_length": 0, "do_sample": False, "temperature": 1.0, "top_k": 50,
    "top_p": 1.0, "repetition_penalty": 1.0, "num_return_sequences": 1,
}

# Generation-config fields that change HF's output and that this path does not implement, with
# the values meaning "off". A model whose generation_config turns one on is refused, not ignored.
_MUST_BE_OFF = {
    "num_beams": (None, 1), "num_beam_groups": (None, 1), "penalty_alpha": (None,),
    "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "force_words_ids": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "typical_p": (None, 1.0), "min_p": (None,),
    "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "guidance_scale": (None, 1.0),
    "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False), "remove_invalid_values": (None, False),
    "top_h": (None,), "stop_strings": (None,), "max_time": (None,),
    "encoder_repetition_penalty": (None, 1.0), "watermarking_config": (None,),
    "assistant_model": (None,), "prompt_lookup_num_tokens": (None,),
}


@dataclass
class GenSettings:
    max_new_tokens: int
    min_length: int
    min_new_tokens: int | None
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float
    repetition_penalty: float
    eos_token_ids: list[int] | None
    pad_token_id: int | None
    num_return_sequences: int


def _as_list(x: int | list[int] | torch.Tensor | None) -> list[int] | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    return [int(x)] if isinstance(x, int) else [int(i) for i in x]


def resolve_settings(
    generation_config: GenerationConfig | None,
    kwargs: dict,
    input_length: int,
    max_positions: int | None = None,
) -> GenSettings:
    """Merge HF defaults <- the model's generation_config <- the call's kwargs, like HF."""
    base: dict = dict(_HF_DEFAULTS)
    model_max_length = None
    if generation_config is not None:
        gc = generation_config.to_dict()
        for name, off in _MUST_BE_OFF.items():
            if gc.get(name) not in off:
                raise ValueError(
                    f"the model's generation_config sets {name}={gc.get(name)!r}, which the fast "
                    f"generation path does not implement; supported: {', '.join(SUPPORTED_ARGS)}"
                )
        for key in (*_HF_DEFAULTS, "max_new_tokens", "min_new_tokens", "eos_token_id",
                    "pad_token_id"):
            if gc.get(key) is not None:
                base[key] = gc[key]
        model_max_length = gc.get("max_length")
    for key, value in kwargs.items():
        if value is not None:
            base[key] = value
    # HF's `_prepare_generated_length`: max_new_tokens (from the call or the model) wins; else an
    # explicit max_length (call or model) is the total length; else 20 new tokens, capped by
    # the model's position limit.
    if base.get("max_new_tokens") is not None:
        max_new = int(base["max_new_tokens"])
    elif kwargs.get("max_length") is not None or model_max_length is not None:
        max_new = int(base["max_length"]) - input_length
    else:
        total = _HF_DEFAULTS["max_length"] + input_length
        if max_positions is not None:
            total = min(total, max_positions)
        max_new = total - input_length
    if max_new < 1:
        raise ValueError(
            f"nothing to generate: the prompt has {input_length} tokens and max_length is "
            f"{base.get('max_length')}; pass max_new_tokens or a larger max_length"
        )
    eos = _as_list(base.get("eos_token_id"))
    pad = base.get("pad_token_id")
    if pad is None and eos:
        pad = eos[0]  # HF does the same (and warns)
    do_sample = bool(base["do_sample"])
    if not do_sample:
        set_warpers = [k for k in ("temperature", "top_k", "top_p") if kwargs.get(k) is not None]
        if set_warpers:
            warnings.warn(
                f"do_sample=False: {set_warpers} only apply to sampling and are unused, as in HF",
                UserWarning, stacklevel=3)
    s = GenSettings(
        max_new_tokens=max_new,
        min_length=int(base.get("min_length") or 0),
        min_new_tokens=base.get("min_new_tokens"),
        do_sample=do_sample,
        temperature=float(base["temperature"]),
        top_k=None if base["top_k"] is None else int(base["top_k"]),
        top_p=float(base["top_p"]),
        repetition_penalty=float(base["repetition_penalty"]),
        eos_token_ids=eos,
        pad_token_id=None if pad is None else int(pad),
        num_return_sequences=int(base["num_return_sequences"]),
    )
    if s.num_return_sequences > 1 and not s.do_sample:
        raise ValueError("greedy decoding gives identical sequences: num_return_sequences > 1 "
                         "needs do_sample=True (HF raises the same)")
    return s


def build_processors(
    s: GenSettings, prompt_length: int, attention_mask: torch.Tensor, device: torch.device
) -> LogitsProcessorList:
    """The processors HF would build for these settings, in HF's order."""
    procs = LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        padding_lengths = (attention_mask != 0).int().argmax(dim=1)
        procs.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty,
                                                      prompt_ignore_length=padding_lengths))
    if s.eos_token_ids is not None:
        eos = torch.tensor(s.eos_token_ids, device=device)
        if s.min_length > 0:
            procs.append(MinLengthLogitsProcessor(s.min_length, eos, device=device))
        if s.min_new_tokens is not None and s.min_new_tokens > 0:
            procs.append(MinNewTokensLengthLogitsProcessor(prompt_length, s.min_new_tokens, eos,
                                                           device=device))
    if s.do_sample:
        if s.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k is not None and s.top_k != 0:
            procs.append(TopKLogitsWarper(top_k=s.top_k, min_tokens_to_keep=1))
        if s.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=s.top_p, min_tokens_to_keep=1))
    return procs


# HF's processors that only ban EOS below a length: greedy decoding with nothing else is the
# decode step's own argmax with those tokens banned (FastGenerator passes the ban to the step).
MIN_LENGTH_RULES = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)


def eos_banned_below(procs: LogitsProcessorList) -> int:
    """The sequence length (prompt included) below which the min-length rules among ``procs``
    ban EOS (0: none), read from the processors themselves so the two cannot disagree."""
    return max((p.min_length if isinstance(p, MinLengthLogitsProcessor)
                else p.prompt_length_to_skip + p.min_new_tokens
                for p in procs if isinstance(p, MIN_LENGTH_RULES)), default=0)


def select_next(
    scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """argmax, or one multinomial draw from softmax(scores) (HF's `_sample`), seeded by
    `generator` when given and by the global RNG otherwise."""
    if not do_sample:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
