"""The guide's public API for small text models (BERT, DistilBERT, GPT-2 and relatives)."""

from torchbridge.pipeline.config import OptimizationMode, TextModelConfig, TextModelType
from torchbridge.pipeline.optimizer import TextModelOptimizer

from .wrappers import (
    OptimizedBERT,
    OptimizedDistilBERT,
    OptimizedGPT2,
    OptimizedTextModel,
    create_optimized_text_model,
)

__all__ = [
    "OptimizationMode",
    "OptimizedBERT",
    "OptimizedDistilBERT",
    "OptimizedGPT2",
    "OptimizedTextModel",
    "TextModelConfig",
    "TextModelOptimizer",
    "TextModelType",
    "create_optimized_text_model",
]
