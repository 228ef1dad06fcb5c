"""Static int8 for CPU encoders: int8 weights and int8 activations with calibrated scales.

Dynamic int8 (int8_dynamic.py) measures every activation's range at run time; on a CPU with AMX
that pass plus the int32 round trip of its rescale cost more than the int8 GEMM saves. Static int8
measures each projection's input range once, on calibration inputs (the optimizer's calibration
sentences through the model's tokenizer, not the gate's), so at run time the quantize is one
elementwise pass and the GEMM is oneDNN's own int8 linear (``onednn.qlinear_pointwise``, the
kernel PyTorch's x86 PT2E quantization lowers to): uint8 activations with one scale and zero
point, int8 weights with one scale per output channel, prepacked once; the rescale, the bias and
the output in the model's dtype (bf16 or fp32) are done inside the GEMM, and so are the FFN's GELU
and the residual add of the output projections (pipeline/fusion.py asks for them as it does for
packed bf16 linears), and a feed-forward block's first GEMM can write the second's uint8 input.

Accuracy: one scale per tensor, fixed ahead of time, is coarser than per-token dynamic scales,
and an input outside the calibrated range is clipped. The optimizer's gate checks the result
against the fp32 eager model, and the accuracy control keeps the projections that move the
output most in float until the gate passes (docs/int8.md has the measured values).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from torchbridge.precisions.int8_weight_only import quantize_per_channel
from torchbridge.precisions.smoothing import input_ranges, smoothing_scales
from torchbridge.precisions.swap import linear_names, swap_linears, weight_out_in


def available() -> str | None:
    """Why static int8 cannot run in this torch build, or None."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return "this torch build has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise)"
    return None


# oneDNN chooses the prepacked weight layout for this many rows (qlinear_prepack's shape hint):
# encoder batches are hundreds to thousands of tokens (BERT-base 8 x 128 = 1,024).
ROWS_HINT = 1024


def _to_grid(x: Tensor, inv_scale: Tensor, zero: Tensor) -> Tensor:
    return torch.clamp(torch.round(x.float() * inv_scale) + zero, 0, 255).to(torch.uint8)


@functools.cache
def _quantize() -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """One fused pass from the activations' dtype to uint8 (eager it is four, ~6x slower at
    BERT-base sizes; torch.quantize_per_tensor + int_repr is two, ~2x slower, and deprecated).
    The grid comes in as tensors and shapes are dynamic, so a few compiled variants (input
    dtype, whether it is a view) serve every projection and batch; past dynamo's recompile limit
    it runs eagerly, the same arithmetic. Built on first use: `torch.compile` imports dynamo
    (~2 s), which importing this module should not pay."""
    return torch.compile(_to_grid, dynamic=True)


class Int8StaticLinear(nn.Module):
    """y = (q(x) - z) * s_x @ (W_int8 * s_w)^T + b through oneDNN's int8 GEMM, with q the uint8
    quantization on the calibrated grid (scale s_x, zero point z) of this projection's input."""

    def __init__(self, module: nn.Module, low: Tensor | float, high: Tensor | float,
                 rows_hint: int = ROWS_HINT, smooth: Tensor | None = None) -> None:
        super().__init__()
        weight = weight_out_in(module).to(torch.float32)
        self.out_features, self.in_features = weight.shape
        self.rows_hint = rows_hint
        low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        if smooth is not None:  # SmoothQuant: x / s on the grid, W * s in the int8 weight
            smooth = smooth.detach().to(torch.float32)
            weight = weight * smooth
            low, high = low / smooth, high / smooth
        self.smooth = smooth
        weight_int8, scales = quantize_per_channel(weight)
        self.register_buffer("weight_int8", weight_int8)  # kept plain: deepcopy, weight, repr
        self.register_buffer("weight_scales", scales)
        self.register_buffer("weight_zeros", torch.zeros(self.out_features, dtype=torch.int32))
        bias = getattr(module, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))
        # the grid must hold 0 exactly (padding, ReLU/GELU zeros); a constant input still needs a step
        low, high = min(float(low.min()), 0.0), max(float(high.max()), 0.0)
        self.x_scale = max((high - low) / 255.0, 1e-8)
        self.x_zero = int(round(-low / self.x_scale))
        self.calibrated = (low, high)
        inverse = 1.0 / (self.x_scale * (smooth if smooth is not None else torch.ones(1)))
        self.register_buffer("inv_grid", inverse)  # per input channel when smoothed
        self.register_buffer("zero", torch.tensor(float(self.x_zero)))
        self.packed = torch.ops.onednn.qlinear_prepack(weight_int8, [rows_hint, self.in_features])
        self.post_op = "none"  # an activation fused into the GEMM (pipeline/fusion.py sets it)
        # the next projection's input grid: the GEMM writes its uint8 input directly (fusion.py)
        self.requantize_to: Int8StaticLinear | None = None
        self.out_dtype = weight_out_in(module).dtype  # when the input comes in as uint8

    @property
    def weight(self) -> Tensor:
        """The dequantized [out, in] weight, smoothing undone."""
        weight = self.weight_int8.float() * self.weight_scales[:, None]
        return weight if self.smooth is None else weight / self.smooth

    def _quantize(self, x: Tensor) -> Tensor:
        """x on this projection's uint8 grid, [rows, in]; a uint8 x is already on it (written by
        the projection before, see ``requantize_to``)."""
        x2 = x.reshape(-1, self.in_features)
        if x.dtype == torch.uint8:
            return x2
        return _quantize()(x2.contiguous(), self.inv_grid, self.zero)

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = self.out_dtype if x.dtype == torch.uint8 else x.dtype
        scale, zero = 1.0, 0
        if self.requantize_to is not None:
            out_dtype, scale, zero = torch.uint8, self.requantize_to.x_scale, self.requantize_to.x_zero
        y = torch.ops.onednn.qlinear_pointwise(
            self._quantize(x), self.x_scale, self.x_zero, self.packed, self.weight_scales,
            self.weight_zeros, self.bias, scale, zero, out_dtype, self.post_op, [],
            "none" if self.post_op == "gelu" else "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def plus(self, x: Tensor, residual: Tensor) -> Tensor:
        """``self(x) + residual``, the add done by oneDNN on the GEMM's output (a post-op; a
        strided residual is copied first, see `PackedLinear.plus`)."""
        if self.post_op != "none" or self.requantize_to is not None:
            return self(x) + residual
        y = torch.ops.onednn.qlinear_pointwise.binary(
            self._quantize(x), self.x_scale, self.x_zero, self.packed, self.weight_scales,
            self.weight_zeros, residual.reshape(-1, self.out_features).contiguous(), self.bias,
            1.0, 0, residual.dtype, 1.0, 0, "add", 1.0, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def __deepcopy__(self, memo: dict) -> Int8StaticLinear:
        # the prepacked weight is an opaque oneDNN tensor without storage: repack a shallow copy
        clone = copy.copy(self)
        clone._buffers = {k: None if v is None else v.clone() for k, v in self._buffers.items()}
        clone._modules, clone._parameters = {}, {}
        clone.packed = torch.ops.onednn.qlinear_prepack(clone.weight_int8,
                                                        [self.rows_hint, self.in_features])
        memo[id(self)] = clone
        clone.requantize_to = copy.deepcopy(self.requantize_to, memo)  # the copy's successor
        return clone

    def extra_repr(self) -> str:
        post = f", then {self.post_op}" if self.post_op != "none" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"input grid [{self.calibrated[0]:.3g}, {self.calibrated[1]:.3g}]{post}")


# Feed-forward blocks: (first projection, second projection) under one module, with only the
# first's activation and an eval-mode dropout between them (BERT-style, DistilBERT).
FFN_PAIRS = (("intermediate.dense", "output.dense"), ("lin1", "lin2"))


def feed_forward_pairs(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(name of the second projection, first projection, second projection) of every
    `FFN_PAIRS` block in ``model``."""
    for name, module in model.named_modules():
        for first, second in FFN_PAIRS:
            try:
                pair = module.get_submodule(first), module.get_submodule(second)
            except AttributeError:
                continue
            yield (f"{name}.{second}" if name else second), *pair


def static_modules(model: nn.Module, calibration: dict[str, Tensor], names: list[str],
                   smooth_alpha: float | None) -> dict[str, Int8StaticLinear]:
    """An `Int8StaticLinear` for each named projection that one forward of ``calibration``
    reaches, with SmoothQuant scales (alpha ``smooth_alpha``) where they pay: not on the second
    projection of a feed-forward block, whose input comes out of a GELU (one-sided, no outlier
    channels to flatten) and is best written by the GEMM before it on a per-tensor grid
    (pipeline/fusion.py). On real all-MiniLM-L6-v2 this took the mean per-token cosine to fp32
    on 96 review sentences from 0.9894 to 0.9941 (ad hoc; docs/int8.md)."""
    ranges = input_ranges(model, calibration, names)
    unsmoothed = {name for name, _, _ in feed_forward_pairs(model)}
    made = {}
    for name in names:
        if name not in ranges:
            continue
        module, (low, high) = model.get_submodule(name), ranges[name]
        smooth = None
        if smooth_alpha is not None and name not in unsmoothed:
            smooth = smoothing_scales(torch.maximum(low.abs(), high.abs()), module, smooth_alpha)
        made[name] = Int8StaticLinear(module, low, high, smooth=smooth)
    return made


def quantize_static_int8(model: nn.Module, calibration: dict[str, Tensor], *,
                         smooth_alpha: float | None = None, skip: Iterable[str] = ()) -> list[str]:
    """Calibrate every projection on one forward of ``calibration`` and swap it for its
    `static_modules` entry, in place, heads included; returns the names swapped (a projection
    the forward never reaches stays float)."""
    why = available()
    if why:
        raise RuntimeError(f"int8-static was requested but {why}; use quantization='int8-dynamic'")
    names = linear_names(model, skip=skip)
    made = static_modules(model, calibration, names, smooth_alpha)
    by_module = {id(model.get_submodule(n)): m for n, m in made.items()}
    skip = (*skip, *(n for n in names if n not in made))
    return swap_linears(model, lambda m: by_module[id(m)], skip=skip)
