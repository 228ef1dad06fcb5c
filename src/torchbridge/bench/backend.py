"""What every benchmark row is built from and returns: the workload, the backend adapter, and the
helpers the adapters share (optional imports, weight bytes, threads)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

PEERS_EXTRA = "pip install 'torchbridge[peers]'"


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (package missing, device unsupported); the row is skipped."""


@dataclass
class Workload:
    """What every backend is built from and run on."""

    model: nn.Module  # fp32, eager attention, eval: the reference (never modified)
    task: str  # canonical task: "causal-lm" means generation, anything else one forward
    device: torch.device
    workdir: Path  # scratch space for exports and conversions
    new_tokens: int = 0

    @property
    def generation(self) -> bool:
        return self.task == "causal-lm"

    _saved: Path | None = field(default=None, repr=False)

    def saved_dir(self) -> Path:
        """The reference saved with save_pretrained (converters read folders, not modules)."""
        if self._saved is None:
            self._saved = self.workdir / "hf"
            self.model.save_pretrained(self._saved)
        return self._saved


@dataclass
class Backend:
    dtype: str
    feed: Callable[[dict[str, torch.Tensor]], Any]
    run: Callable[[Any], Any]
    result: Callable[[Any], torch.Tensor]
    weight_bytes: int | None = None
    notes: str | None = None


def need(module: str, pip_name: str | None = None) -> Any:
    """Import an optional runtime or raise PeerUnavailable naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pip_name = pip_name or module
        raise PeerUnavailable(
            f"{pip_name} is not installed: pip install {pip_name} (or {PEERS_EXTRA})"
        ) from None


def module_bytes(model: nn.Module) -> int:
    """Bytes of the weights a forward reads (state_dict covers packed/quantized tensors too)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _threads() -> int:
    return torch.get_num_threads()
