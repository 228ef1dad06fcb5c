"""SmoothQuant-style smoothing of activation outliers for int8 with activations, and the calibration
forward both int8 formats read (`input_ranges`).

Transformer activations carry a few channels with ranges 10-100x the others. With per-token
activation scales those channels set the scale of every token, and the ordinary channels lose
most of their resolution. SmoothQuant (Xiao et al., 2023) divides each input channel j of a
projection by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and multiplies the weight's column j by
the same s_j: the product is unchanged, the activation's range is flattened, and the weight
(quantized per output channel) absorbs the difference.

Where the division goes: SmoothQuant folds 1/s into the preceding LayerNorm. That is exact only
when the LayerNorm's output feeds nothing but the smoothed projections, which holds in pre-LN
decoders (GPT-2's ln_1 -> c_attn) but not in post-LN encoders (BERT, MiniLM): there the LayerNorm
output is also the residual stream. So :class:`Int8DynamicLinear` applies 1/s to its own input;
under torch.compile that multiply fuses into the quantize kernel and costs no extra pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from torchbridge.precisions.swap import linear_names, weight_out_in


@torch.no_grad()
def input_ranges(model: nn.Module, inputs: dict[str, torch.Tensor],
                 names: Iterable[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-input-channel (min, max) of each named projection's input over one forward of
    ``inputs``, over every call of the projection (padded positions included: their hidden
    states are real activations the GEMM quantizes). A projection the forward never reaches is
    absent."""
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            low, high = x.amin(dim=0), x.amax(dim=0)
            if name in ranges:
                low, high = torch.minimum(ranges[name][0], low), torch.maximum(ranges[name][1], high)
            ranges[name] = (low, high)
        return record

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def activation_channel_max(model: nn.Module, names: list[str],
                           inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| seen by each named projection on one forward of ``inputs``
    (`input_ranges`); raises when the forward never reaches one of them."""
    ranges = input_ranges(model, inputs, names)
    missing = [n for n in names if n not in ranges]
    if missing:
        raise RuntimeError(f"calibration forward never reached {missing[:3]}: cannot smooth them")
    return {n: torch.maximum(low.abs(), high.abs()) for n, (low, high) in ranges.items()}


def smoothing_scales(act_max: torch.Tensor, module: nn.Module, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), clamped so dead channels keep s = 1."""
    w_max = weight_out_in(module).float().abs().amax(dim=0).to(act_max.device)
    a = act_max.float().clamp_min(1e-5)
    s = a.pow(alpha) / w_max.clamp_min(1e-5).pow(1.0 - alpha)
    dead = (act_max <= 1e-5) | (w_max <= 1e-5)
    return torch.where(dead, torch.ones_like(s), s).clamp(1e-4, 1e4)


def quantize_dynamic_int8_smoothed(model: nn.Module, calibration_inputs: dict[str, torch.Tensor],
                                   alpha: float, *, include_head: bool = True,
                                   skip: Iterable[str] = ()) -> nn.Module:
    """Like ``quantize_dynamic_int8``, each projection smoothed with scales calibrated on one
    forward of ``calibration_inputs`` (model inputs). In place; returns ``model``."""
    from torchbridge.precisions.int8_dynamic import Int8DynamicLinear

    names = linear_names(model, include_head=include_head, skip=skip)
    act_max = activation_channel_max(model, names, calibration_inputs)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        scales = smoothing_scales(act_max[name], old, alpha)
        setattr(parent, child, Int8DynamicLinear(old, smooth=scales).to(old.weight.device))
    return model
