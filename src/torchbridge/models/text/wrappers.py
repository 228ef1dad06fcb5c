"""The guide's model classes: an optimized HF model behind the HF model's own calling convention."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from torchbridge.families import canonical_task
from torchbridge.pipeline.config import OptimizationMode, TextModelConfig
from torchbridge.pipeline.optimizer import TextModelOptimizer

_LABEL_TASKS = ("sequence-classification", "token-classification")


class OptimizedTextModel(nn.Module):
    """Holds the optimized HF model (``.model``) and its report. Calls, attributes and methods not
    defined here go to the HF model, so it works where a HF model is expected (pipelines too)."""

    _default_name = "bert-base-uncased"
    _default_task: str | None = None  # None: the optimizer infers it from the checkpoint

    def __init__(self, model_name: str | nn.Module | None = None, task: str | None = None,
                 config: TextModelConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        model_name = self._default_name if model_name is None else model_name
        task = canonical_task(task) if task else self._default_task
        if config is None:
            config = TextModelConfig(
                model_name=model_name if isinstance(model_name, str) else type(model_name).__name__)
        self.optimizer = TextModelOptimizer(config)
        self.model = self.optimizer.optimize(model_name, task=task, **kwargs)
        self.report = self.optimizer.report
        self.task = self.report.task
        # a name or folder has its tokenizer next to it; a module given as such may not
        self._tokenizer_source = str(model_name) if isinstance(model_name, (str, os.PathLike)) else None
        self._tokenizer: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def config(self):
        return self.model.config

    def get_optimization_info(self) -> dict[str, Any]:
        return self.report.info()

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded on first use from the model's name or folder; settable."""
        if self._tokenizer is None:
            if self._tokenizer_source is None:
                raise ValueError(
                    f"this {type(self.model).__name__} was given as a module, not a name or folder, "
                    "so torchbridge cannot tell which tokenizer goes with it; fix: "
                    "model.tokenizer = AutoTokenizer.from_pretrained(NAME_OR_FOLDER)")
            from torchbridge.pipeline.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer_source)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    # Batch API over lists of texts; the work is in torchbridge.data.inference.
    def encode(self, texts: Sequence[str], **kwargs: Any) -> Any:
        """Sentence embeddings in input order (see torchbridge.data.inference.encode)."""
        from torchbridge.data.inference import encode

        return encode(self, texts, **kwargs)

    def predict(self, texts: Sequence[Any], **kwargs: Any) -> list:
        """Labels, entities or answers per input (see torchbridge.data.inference.predict)."""
        from torchbridge.data.inference import predict

        return predict(self, texts, **kwargs)

    def generate_text(self, prompts: Sequence[str], **kwargs: Any) -> list[str]:
        """Continuations of a list of prompts (see torchbridge.data.inference.generate_text)."""
        from torchbridge.data.inference import generate_text

        return generate_text(self, prompts, **kwargs)


class _EncoderModel(OptimizedTextModel):
    _default_task = "sequence-classification"

    def __init__(self, model_name: str | nn.Module | None = None,
                 task: str = "sequence-classification", num_labels: int = 2,
                 config: TextModelConfig | None = None, **kwargs: Any) -> None:
        if canonical_task(task) in _LABEL_TASKS and isinstance(model_name, (str, type(None))):
            kwargs["num_labels"] = num_labels
        elif num_labels != 2:
            raise ValueError(f"num_labels={num_labels} applies to classification tasks, not {task!r}")
        super().__init__(model_name, task, config, **kwargs)


class OptimizedBERT(_EncoderModel):
    _default_name = "bert-base-uncased"


class OptimizedDistilBERT(_EncoderModel):
    _default_name = "distilbert-base-uncased"


class OptimizedGPT2(OptimizedTextModel):
    _default_name = "gpt2"
    _default_task = "causal-lm"

    def __init__(self, model_name: str | nn.Module | None = "gpt2", task: str = "causal-lm",
                 config: TextModelConfig | None = None, **kwargs: Any) -> None:
        super().__init__(model_name, task, config, **kwargs)

    def generate(self, input_ids: torch.Tensor | None = None, max_length: int = 100,
                 **kwargs: Any) -> torch.Tensor:
        """HF generate semantics (see generation hook in the optimizer's report)."""
        return self.model.generate(input_ids=input_ids, max_length=max_length, **kwargs)


_WRAPPERS: dict[str, type[OptimizedTextModel]] = {
    "bert": OptimizedBERT,
    "distilbert": OptimizedDistilBERT,
    "gpt2": OptimizedGPT2,
}


def create_optimized_text_model(model_name: str | nn.Module, task: str | None = None,
                                optimization_mode: OptimizationMode | str = "inference",
                                **kwargs: Any) -> OptimizedTextModel:
    """Load and optimize any supported text model; TextModelConfig fields may be passed as
    keyword arguments, the rest go to from_pretrained (e.g. num_labels)."""
    mode = OptimizationMode.parse(optimization_mode)
    config_fields = {k: kwargs.pop(k) for k in list(kwargs)
                     if k in TextModelConfig.__dataclass_fields__ and not k.startswith("_")}
    config = kwargs.pop("config", None)
    if config is not None and config_fields:
        raise ValueError("pass either config= or TextModelConfig fields, not both")
    if config is None:
        config = TextModelConfig(optimization_mode=mode, **config_fields)
    elif config.optimization_mode != mode and optimization_mode != "inference":
        raise ValueError(f"optimization_mode={mode.value!r} conflicts with config's "
                         f"{config.optimization_mode.value!r}")
    from torchbridge.pipeline.loading import default_task, load_config, task_of

    if isinstance(model_name, nn.Module):
        model_type = getattr(getattr(model_name, "config", None), "model_type", "custom")
        task = task or task_of(model_name)
    else:
        model_type = load_config(model_name, random_weights=config.random_weights).model_type
        task = task or default_task(model_name)
    cls = _WRAPPERS.get(model_type, OptimizedTextModel)
    if cls is not _EncoderModel and not issubclass(cls, _EncoderModel):
        return cls(model_name, task, config, **kwargs)
    num_labels = kwargs.pop("num_labels", 2)
    return cls(model_name, task, num_labels=num_labels, config=config, **kwargs)
