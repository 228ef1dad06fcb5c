"""One module-swap helper shared by every weight format: nn.Linear and transformers' Conv1D.

GPT-2 computes its projections with ``transformers.pytorch_utils.Conv1D`` (``x @ W + b`` with W
stored [in, out]); a walker that only knows ``nn.Linear`` silently converts nothing but GPT-2's LM
head. Every quantizer goes through :func:`swap_linears`, which sees both and hands the factory the
weight in the usual [out, in] layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers missing: there is no Conv1D to handle
        return False
    return isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """A projection a weight format can replace: nn.Linear or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features], whatever layout the module stores."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if is_conv1d(module):
        return module.weight.detach().t()
    raise TypeError(f"cannot convert {type(module).__name__}: expected nn.Linear or Conv1D")


def linear_names(model: nn.Module, *, include_head: bool = True, skip: Iterable[str] = ()) -> list[str]:
    """Names (as in ``named_modules``) of the projections a weight format would replace."""
    skip_set = set(skip)
    head = None
    if not include_head and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    return [name for name, m in model.named_modules()
            if is_linear(m) and name not in skip_set and m is not head]


def swap_linears(model: nn.Module, make: Callable[[nn.Module], nn.Module], *,
                 include_head: bool = True, skip: Iterable[str] = ()) -> list[str]:
    """Replace, in place, every projection of ``model`` by ``make(module)`` (on the module's
    device); returns the names replaced. ``skip`` names modules to leave as they are."""
    names = linear_names(model, include_head=include_head, skip=skip)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, make(old).to(old.weight.device))
    return names
