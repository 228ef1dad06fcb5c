"""Sentence embeddings from token states: the pooling a sentence-transformers folder declares.

A sentence-transformers folder says how its embeddings are made: ``modules.json`` lists the modules
(Transformer, Pooling, Normalize) and ``1_Pooling/config.json`` the pooling mode; the model was
trained with that pooling, so another one gives vectors that do not match its training. Without
those files, encoders use mean pooling (what most embedders use) and decoders the last token.
The choice and where it came from are kept on the model as ``model.pooling``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

POOLING_MODES = ("mean", "cls", "max", "lasttoken", "mean_sqrt_len")
_ST_KEYS = {  # sentence-transformers' Pooling config keys -> our mode names
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class Pooling:
    mode: str  # one of POOLING_MODES
    source: str  # where the choice came from, e.g. ".../1_Pooling/config.json" or "default"
    normalize_in_config: bool = False  # the folder lists a Normalize module (see encode's normalize)
    max_seq_length: int | None = None  # sentence_bert_config.json's max_seq_length

    def __str__(self) -> str:
        return f"{self.mode} pooling ({self.source})"


def _folders(model: Any) -> list[Path]:
    """The model's folder and, for a `torchbridge optimize` folder, the folder it was made from
    (the optimize step saves weights and tokenizer, not sentence-transformers' module files)."""
    name = getattr(getattr(model, "report", None), "model_name", None)
    folders = []
    if name and Path(str(name)).is_dir():
        folder = Path(str(name))
        folders.append(folder)
        plan = folder / "torchbridge.json"
        if plan.is_file():
            source = json.loads(plan.read_text()).get("source")
            if source and Path(str(source)).is_dir():
                folders.append(Path(str(source)))
    return folders


def read_pooling(folder: Path) -> Pooling | None:
    """The pooling a sentence-transformers folder declares, or None when it declares none."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    pooling_path = next((m.get("path") for m in modules if str(m.get("type", "")).endswith(".Pooling")),
                        None)
    if pooling_path is None:
        return None
    config_file = folder / pooling_path / "config.json"
    config = json.loads(config_file.read_text())
    modes = [mode for key, mode in _ST_KEYS.items() if config.get(key)]
    if len(modes) != 1:
        raise ValueError(f"{config_file} asks for pooling {modes or 'none'}; torchbridge supports "
                         f"exactly one of {', '.join(POOLING_MODES)}")
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    st_config = folder / "sentence_bert_config.json"
    max_len = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
    return Pooling(modes[0], str(config_file), normalize, max_len)


def pooling_for(model: Any) -> Pooling:
    """The model's pooling, resolved once and kept as ``model.pooling`` (settable to override)."""
    found = getattr(model, "__dict__", {}).get("pooling")
    if isinstance(found, Pooling):
        return found
    pooling = None
    for folder in _folders(model):
        pooling = read_pooling(folder)
        if pooling:
            break
    if pooling is None:
        decoder = getattr(model, "task", None) == "causal-lm"
        pooling = Pooling("lasttoken" if decoder else "mean",
                          "default: no sentence-transformers modules.json with a Pooling module")
    model.pooling = pooling
    return pooling


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[batch, seq, dim] token states -> [batch, dim], over the real tokens only (in fp32)."""
    hidden = hidden.float()
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    if mode in ("mean", "mean_sqrt_len"):
        counts = weights.sum(1).clamp(min=1e-9)
        summed = (hidden * weights).sum(1)
        return summed / (counts if mode == "mean" else counts.sqrt())
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(1).values
    if mode == "lasttoken":
        # the last real token of each row, for right or left padding alike
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling mode {mode!r} is not one of {', '.join(POOLING_MODES)}")
