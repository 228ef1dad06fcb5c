"""Name, local folder or loaded module -> a Hugging Face model, offline-first."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchbridge.families import BUILTIN_CONFIGS, builtin_config, canonical_task, family_for

TASK_AUTO_CLASS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "feature-extraction": "AutoModel",
}

# Suffixes of HF architecture class names -> our task, to infer the task of a loaded model.
_ARCH_SUFFIX_TASK = [
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "masked-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForCausalLM", "causal-lm"),
    ("Model", "feature-extraction"),
]


class ModelNotAvailableError(OSError):
    """The named model is neither a local folder nor in the local Hugging Face cache."""


def not_available(name: str, what: str = "model") -> ModelNotAvailableError:
    builtin = ", ".join(BUILTIN_CONFIGS)
    return ModelNotAvailableError(
        f"{what} {name!r} is not available offline: it is not a local folder and not in the "
        f"Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}). Three ways out: "
        f"(1) pass a local folder saved with save_pretrained; (2) download it into the HF cache on a "
        f"machine with access (huggingface-cli download {name}) and copy the cache here; (3) for "
        f"benchmarking only, ask for random weights (TextModelConfig(random_weights=True) or "
        f"--random-weights), built in for: {builtin}."
    )


def task_of(model: nn.Module) -> str | None:
    """Infer our task name from a loaded HF model's class."""
    name = type(model).__name__
    for suffix, task in _ARCH_SUFFIX_TASK:
        if name.endswith(suffix):
            return task
    return None


def default_task(name_or_path: str) -> str:
    """The task to load when the caller gave none: from the checkpoint's own architectures, else
    the family's default (feature extraction for encoders, causal LM for decoders)."""
    config = load_config(name_or_path, random_weights=True)
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in _ARCH_SUFFIX_TASK:
            if arch.endswith(suffix):
                return task
    family = family_for(config.model_type)
    return family.default_task if family else "feature-extraction"


def load_config(name_or_path: str, *, random_weights: bool = False, **overrides: Any):
    """The model's config from a folder or the HF cache; the built-in config only when random
    weights were asked for."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(name_or_path), local_files_only=True, **overrides)
    except (OSError, ValueError) as err:
        config = builtin_config(str(name_or_path)) if random_weights else None
        if config is None:
            raise not_available(str(name_or_path)) from err
        for key, value in overrides.items():
            setattr(config, key, value)
        return config


def load_model(
    name_or_path: str | os.PathLike,
    task: str,
    *,
    random_weights: bool = False,
    attn_implementation: str | None = None,
    **kwargs: Any,
):
    """Load a HF model for ``task`` in fp32 from a local folder or the HF cache, never the network.

    With ``random_weights=True`` the architecture is built from its config with seeded random
    weights (for benchmarking: speed does not depend on the values). Checkpoints load through
    safetensors (transformers 5 refuses pickled weights unless torch.load's weights_only applies).
    """
    import transformers

    task = canonical_task(task)
    auto_cls = getattr(transformers, TASK_AUTO_CLASS[task])
    name = str(name_or_path)
    kwargs.setdefault("dtype", torch.float32)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if random_weights:
        dtype = kwargs.pop("dtype")
        attn = kwargs.pop("attn_implementation", None)
        config = load_config(name, random_weights=True, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = auto_cls.from_config(config, attn_implementation=attn, dtype=dtype)
        model.name_or_path = name
        return model.eval()
    path = Path(name).expanduser()
    source = str(path) if path.is_dir() else name
    try:
        model = auto_cls.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError as err:
        if path.is_dir():
            raise  # a real folder that fails to load: the HF error says why
        raise not_available(name) from err
    return model.eval()


def load_tokenizer(name_or_path: str | os.PathLike):
    """The model's tokenizer from a local folder or the HF cache (never the network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise not_available(str(name_or_path), "tokenizer for") from err


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy, so that optimizing never modifies the caller's model."""
    return copy.deepcopy(model)


def calibration_tokenizer(name: str, model: nn.Module):
    """The model's tokenizer for the gates' real text, or None when there is none offline (the
    gates then use ids from the vocabulary, and the report says so)."""
    for candidate in (name, getattr(getattr(model, "config", None), "name_or_path", None)):
        if not candidate:
            continue
        try:
            tokenizer = load_tokenizer(candidate)
        except ModelNotAvailableError:
            continue
        if len(tokenizer) <= int(model.config.vocab_size):
            return tokenizer  # a tokenizer whose ids the model can embed
    return None
