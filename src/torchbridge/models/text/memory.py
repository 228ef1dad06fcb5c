"""The guide's model table (parameters, weight memory per precision), computed from configs."""

from __future__ import annotations

from typing import Any

import torch

from torchbridge.families import BUILTIN_CONFIGS
from torchbridge.pipeline.loading import TASK_AUTO_CLASS, load_config
from torchbridge.precisions import PRECISIONS


def count_parameters(config, task: str = "feature-extraction") -> int:
    """Parameters of the architecture, counted on the meta device (no memory, no weights)."""
    import transformers

    auto_cls = getattr(transformers, TASK_AUTO_CLASS[task])
    with torch.device("meta"):
        model = auto_cls.from_config(config)
    # tied weights (GPT-2's LM head) appear once in parameters()
    return sum(p.numel() for p in model.parameters())


def estimate_memory(name_or_path: str, task: str = "feature-extraction", *,
                    random_weights: bool = True) -> dict[str, Any]:
    """Parameters and weight memory (MiB) in fp32/fp16/bf16/int8 for one model.

    int8 counts one byte per weight (weight-only int8 keeps norms, biases and the per-channel
    scales in higher precision, a fraction of a percent more). Activations and the KV cache come
    on top and depend on batch and length.
    """
    config = load_config(name_or_path, random_weights=random_weights)
    params = count_parameters(config, task)
    row: dict[str, Any] = {"model": name_or_path, "model_type": config.model_type,
                           "parameters": params}
    for name, entry in PRECISIONS.items():  # bytes per parameter from the precision registry
        row[f"{name}_mib"] = round(params * entry.bytes_per_param / 2**20, 1)
    return row


def memory_table(names: list[str] | None = None) -> str:
    """A markdown table like the guide's, for the built-in models or the given ones."""
    rows = [estimate_memory(n) for n in (names or list(BUILTIN_CONFIGS))]
    lines = ["| Model | Parameters | FP32 | FP16/BF16 | INT8 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['fp32_mib']:.0f} MiB | "
                     f"{r['fp16_mib']:.0f} MiB | {r['int8-weight-only_mib']:.0f} MiB |")
    return "\n".join(lines)
