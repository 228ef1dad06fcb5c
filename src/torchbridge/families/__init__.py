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
    """What an architecture needs from the pipeline, as data: the ordered apply steps (names
    from ``torchbridge.pipeline.steps.STEPS``), the gate that fits its outputs and its warm-up."""

    model_type: str
    decoder: bool  # causal LM (generation) vs bidirectional encoder
    default_task: str
    tasks: frozenset[str]
    steps: tuple[str, ...]
    verify: str  # "encoder" (forward parity), "causal-lm" (next-token gate + generation check),
    #              "module" (a plain nn.Module: parity on the caller's example inputs)
    warmup: str  # "forward" (the shapes users send) or "generate" (prefill + decode steps)


_ENCODER_TASKS = frozenset(
    {"sequence-classification", "token-classification", "question-answering", "masked-lm",
     "feature-extraction"}
)
_DECODER_TASKS = frozenset({"causal-lm", "sequence-classification", "token-classification",
                            "feature-extraction"})

# Casting before the device move moves fewer bytes; input checks go outermost so a bad batch is
# refused before any kernel runs; padding trim sits outside the compiled forward (its groups vary).
ENCODER_STEPS = ("attention", "cast", "quantize", "device", "pack_weights", "autocast",
                 "gradient_checkpointing", "compile", "trim_padding", "input_checks")
# Decoders: generate goes through the static-cache decoder, which compiles its own decode step;
# compiling the full forward (~30 s for GPT-2 on a CPU) would buy nothing generate uses.
DECODER_STEPS = ("attention", "cast", "quantize", "device", "autocast", "gradient_checkpointing",
                 "fast_generate", "input_checks")
MODULE_STEPS = ("cast", "quantize", "device", "autocast", "compile")


def _encoder(model_type: str) -> Family:
    return Family(model_type, False, "feature-extraction", _ENCODER_TASKS, ENCODER_STEPS,
                  "encoder", "forward")


def _decoder(model_type: str) -> Family:
    return Family(model_type, True, "causal-lm", _DECODER_TASKS, DECODER_STEPS, "causal-lm",
                  "generate")


FAMILIES: dict[str, Family] = {
    "bert": _encoder("bert"),
    "distilbert": _encoder("distilbert"),
    "roberta": _encoder("roberta"),
    "albert": _encoder("albert"),
    "gpt2": _decoder("gpt2"),
    "llama": _decoder("llama"),
}
# Any other transformers model: the generic steps and the gate of its task.
UNKNOWN_ENCODER = _encoder("unknown")
UNKNOWN_DECODER = _decoder("unknown")
# A plain nn.Module: eval, no gradients, precision, device, compile; parity and warm-up only on
# the caller's example inputs (the library cannot invent inputs for an arbitrary module).
MODULE = Family("module", False, "module", frozenset({"module"}), MODULE_STEPS, "module", "forward")


def family_for(model_type: str) -> Family | None:
    """The known family, or None: unknown architectures get only the generic steps (and the
    report says so)."""
    return FAMILIES.get(model_type)


def family_of(model: Any, task: str) -> Family:
    """The family for a loaded model: known HF families, other HF models by task, else MODULE."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None or not hasattr(config, "vocab_size"):
        return MODULE
    known = FAMILIES.get(model_type)
    if known is not None:
        return known
    return UNKNOWN_DECODER if task == "causal-lm" else UNKNOWN_ENCODER


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
