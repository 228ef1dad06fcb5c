"""Accuracy-controlled int8 (dynamic or static): quantize every projection, keep the gate passing.

Quantizing a projection adds noise to the model's output; how much differs a lot from layer to
layer (a classifier head, or a projection whose inputs carry outlier channels, moves the output
far more than a mid-stack FFN). :func:`accuracy_controlled_int8`

1. measures each projection's sensitivity: the output of the float model with that projection
   alone swapped for its int8 module (:class:`Int8DynamicLinear` or :class:`Int8StaticLinear`),
   against the float output, as the relative error ``||y_q - y|| / ||y||`` over the prediction
   tensors (real tokens only);
2. quantizes every projection and runs the caller's gate;
3. while the gate fails, puts the most sensitive projections back in float (the very modules
   they were, so bf16 stays bf16 and fp32 stays fp32) in growing groups of 1, 2, 4, ... of the
   ranking, then bisects back to the smallest count that passes, up to
   ``max_fallback_fraction`` of the projections;
4. raises :class:`Int8AccuracyError`, with every gate measurement, if even that fails; the
   model is then handed back in float, as it came, so the caller can fall back to it.

This is what OpenVINO's accuracy-controlled quantization does with a maximum drop, with the
caller's own gate (cosine / argmax against the fp32 reference) as the criterion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchbridge.precisions.int8_dynamic import Int8DynamicLinear
from torchbridge.precisions.int8_static import static_modules
from torchbridge.precisions.smoothing import activation_channel_max, smoothing_scales
from torchbridge.precisions.swap import linear_names

Gate = Callable[[nn.Module], tuple[bool, dict]]
# Sensitivities listed in the record (the full ranking of BERT-base has 74 entries).
TOP_SENSITIVITIES = 10
_SKIP_FIELDS = {"hidden_states", "attentions", "past_key_values", "cross_attentions", "loss"}


class Int8AccuracyError(RuntimeError):
    """int8 could not pass the accuracy gate with the allowed share of layers kept in float."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _predictions(output: Any, mask: torch.Tensor | None) -> torch.Tensor:
    """The floating prediction tensors of one output, flattened; per-token ones on real tokens."""
    items = output.items() if hasattr(output, "items") else [("output", output)]
    parts = []
    for key, value in items:
        if not (torch.is_tensor(value) and value.is_floating_point()) or key in _SKIP_FIELDS:
            continue
        value = value.detach().float()
        if mask is not None and value.dim() >= 2 and value.shape[:2] == mask.shape:
            value = value[mask.bool().to(value.device)]
        parts.append(value.reshape(-1))
    if not parts:
        raise ValueError("the model's output has no floating-point tensor to measure")
    return torch.cat(parts)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, quantized: dict[str, nn.Module],
                      inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative output error of the float ``model`` with each projection in ``quantized`` alone
    swapped in (name -> its int8 module); the model is left as it was. Highest first."""
    mask = inputs.get("attention_mask")
    reference = _predictions(model(**inputs), mask)
    norm = reference.norm().clamp_min(1e-12)
    errors = {}
    for name, int8 in quantized.items():
        original = model.get_submodule(name)
        _set(model, name, int8)
        try:
            errors[name] = float((_predictions(model(**inputs), mask) - reference).norm() / norm)
        finally:
            _set(model, name, original)
    return dict(sorted(errors.items(), key=lambda kv: -kv[1]))


def _fallback_counts(limit: int) -> list[int]:
    """Growing groups: 1, 2, 4, ... and the limit itself."""
    counts, k = [], 1
    while k < limit:
        counts.append(k)
        k *= 2
    return [*counts, limit] if limit > 0 else []


def accuracy_controlled_int8(model: nn.Module, gate: Gate, *, sensitivity_inputs: dict,
                             max_fallback_fraction: float = 0.5,
                             smooth_alpha: float | None = None, static: bool = False,
                             calibration_inputs: dict | None = None,
                             min_layers_float: int = 0) -> tuple[nn.Module, dict]:
    """Quantize ``model``'s projections (in place) to dynamic int8 (``static``: static int8,
    int8_static.static_modules), keeping in float the fewest most-sensitive ones that make
    ``gate(model)`` pass. See the module docstring.

    ``gate(model) -> (passed, values)`` runs the caller's accuracy check. ``sensitivity_inputs``
    are model inputs (input_ids, attention_mask, ...) for the per-layer ranking and, with
    ``smooth_alpha``, the calibration of SmoothQuant scales (alpha in [0, 1]: the share of each
    channel's range moved into the weights) and of static ranges, unless ``calibration_inputs``
    are given for those. ``min_layers_float``: start the search there (a caller whose built
    model missed the gate with fewer). Returns the model and a record: layers_int8,
    layers_float (names), sensitivity (the top ones), gate (the last values), smoothing, and
    attempts (every gate run: float layers and its values). Raises Int8AccuracyError when the gate
    still fails with ``max_fallback_fraction`` of the projections in float.
    """
    if not 0.0 <= max_fallback_fraction <= 1.0:
        raise ValueError(f"max_fallback_fraction must be in [0, 1], got {max_fallback_fraction}")
    if smooth_alpha is not None and not 0.0 <= smooth_alpha <= 1.0:
        raise ValueError(f"smooth_alpha must be in [0, 1] or None, got {smooth_alpha}")
    names = linear_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear / Conv1D projection to quantize")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in sensitivity_inputs.items()}
    floats = {name: model.get_submodule(name) for name in names}

    calibration = inputs if calibration_inputs is None else {
        k: v.to(device) if torch.is_tensor(v) else v for k, v in calibration_inputs.items()}
    if static:
        int8: dict[str, nn.Module] = static_modules(model, calibration, names, smooth_alpha)
        if len(int8) < len(names):
            raise ValueError(f"calibration never reached {sorted(set(names) - set(int8))[:3]}")
    else:
        smooth: dict[str, torch.Tensor] = {}
        if smooth_alpha is not None:
            act_max = activation_channel_max(model, names, calibration)
            smooth = {n: smoothing_scales(act_max[n], floats[n], smooth_alpha) for n in names}
        int8 = {n: Int8DynamicLinear(floats[n], smooth=smooth.get(n)).to(device) for n in names}
    sensitivity = layer_sensitivity(model, int8, inputs)
    ranking = list(sensitivity)

    attempts: list[dict[str, Any]] = []

    def apply(k: int) -> None:
        """Every projection int8 but the k most sensitive, which get their float module back."""
        for i, name in enumerate(ranking):
            _set(model, name, floats[name] if i < k else int8[name])

    def run_gate(k: int) -> bool:
        apply(k)
        passed, values = gate(model)
        attempts.append({"layers_float": k, "passed": bool(passed), "gate": values})
        return bool(passed)

    record: dict[str, Any] = {
        "layers_total": len(names),
        "sensitivity": {n: sensitivity[n] for n in ranking[:TOP_SENSITIVITIES]},
        "smoothing": smooth_alpha,
        "attempts": attempts,
    }
    limit = math.floor(max_fallback_fraction * len(names))
    floor = min(min_layers_float, limit)
    passing = floor if run_gate(floor) else None
    failing = floor
    if passing is None:
        for k in _fallback_counts(limit):
            if k <= floor:
                continue
            if run_gate(k):
                passing = k
                break
            failing = k
    if passing is None:
        record.update(layers_int8=len(names) - limit, layers_float=ranking[:limit],
                      gate=attempts[-1]["gate"])
        for name in ranking:  # hand the model back in float, as it came, for a float fallback
            _set(model, name, floats[name])
        raise Int8AccuracyError(
            f"int8-{'static' if static else 'dynamic'} fails the accuracy gate even with the "
            f"{limit} most sensitive of "
            f"{len(names)} projections in float (max_fallback_fraction={max_fallback_fraction}); "
            f"last gate values: {attempts[-1]['gate']}. Use a float precision (bf16/fp32), allow "
            f"more layers in float, or try smooth_alpha (now {smooth_alpha}).", record)
    # bisect between the last failing and the first passing count for the fewest float layers
    while passing - failing > 1:
        mid = (passing + failing) // 2
        if run_gate(mid):
            passing = mid
        else:
            failing = mid
    apply(passing)  # the model ends in the passing configuration, measured above
    passed_values = next(a["gate"] for a in reversed(attempts)
                         if a["passed"] and a["layers_float"] == passing)
    record.update(layers_int8=len(names) - passing, layers_float=ranking[:passing],
                  gate=passed_values)
    return model, record
