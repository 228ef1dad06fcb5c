"""Model families. Text models live in :mod:`torchbridge.models.text`."""

from .text import (
    OptimizedBERT,
    OptimizedDistilBERT,
    OptimizedGPT2,
    TextModelOptimizer,
    create_optimized_text_model,
)

__all__ = [
    "OptimizedBERT",
    "OptimizedDistilBERT",
    "OptimizedGPT2",
    "TextModelOptimizer",
    "create_optimized_text_model",
]
