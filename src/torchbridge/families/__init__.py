"""Per-architecture facts, keyed by Hugging Face ``model_type``, and the task vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Canonical task -> the aliases users write (the guide uses both spellings).
TASK_ALIASES: dict[str, tuple[str, ...]] = {
    "sequence-classification": ("text-classification", "sentiment-analysis"),
    "token-classification": ("ner",),
    "question-answering": ("qa",),
    "masked-lm": ("fill-mask",),
    "causal-lm": ("text-generation",),
    "feature-extraction": ("embeddings",),
}
_ALIAS_TO_TASK = {alias: task for task, aliases in TASK_ALIASES.items() for alias in (task, *aliases)}

# The transformers pipeline name for each canonical task (for pipeline(...) compatibility).
PIPELINE_TASK = {
    "sequence-classification": "text-classification",
    "token-classification": "token-classification",
    "question-answering": "question-answering",
    "masked-lm": "fill-mask",
    "causal-lm": "text-generation",
    "feature-extraction": "feature-extraction",
}


def canonical_task(task: str) -> str:
    try:
        return _ALIAS_TO_TASK[task.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown task {task!r}; valid tasks: {', '.join(sorted(_ALIAS_TO_TASK))}"
        ) from None


@dataclass(frozen=True)
class Family:
    model_type: str
    decoder: bool  # causal LM (generation) vs bidirectional encoder
    default_task: str
    tasks: frozenset[str]


_ENCODER_TASKS = frozenset(
    {"sequence-classification", "token-classification", "question-answering", "masked-lm",
     "feature-extraction"}
)
_DECODER_TASKS = frozenset({"causal-lm", "sequence-classification", "token-classification",
                            "feature-extraction"})

FAMILIES: dict[str, Family] = {
    "bert": Family("bert", False, "feature-extraction", _ENCODER_TASKS),
    "distilbert": Family("distilbert", False, "feature-extraction", _ENCODER_TASKS),
    "roberta": Family("roberta", False, "feature-extraction", _ENCODER_TASKS),
    "albert": Family("albert", False, "feature-extraction", _ENCODER_TASKS),
    "gpt2": Family("gpt2", True, "causal-lm", _DECODER_TASKS),
    "llama": Family("llama", True, "causal-lm", _DECODER_TASKS),
}


def family_for(model_type: str) -> Family | None:
    """The known family, or None: unknown architectures get only the generic steps (and the
    report says so)."""
    return FAMILIES.get(model_type)


# Configs of the guide's models, so that an explicit random-weights request can build them with no
# download. Values are those of the published config.json files.
BUILTIN_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert-base-uncased": ("bert", {}),
    "bert-large-uncased": (
        "bert",
        {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
         "intermediate_size": 4096},
    ),
    "distilbert-base-uncased": ("distilbert", {}),
    "gpt2": ("gpt2", {}),
    "gpt2-medium": ("gpt2", {"n_embd": 1024, "n_layer": 24, "n_head": 16}),
}


def builtin_config(name: str):
    """A transformers config for one of the guide's models, or None if the name is not built in."""
    from transformers import AutoConfig

    entry = BUILTIN_CONFIGS.get(name.split("/")[-1])
    if entry is None:
        return None
    model_type, overrides = entry
    return AutoConfig.for_model(model_type, **overrides)
