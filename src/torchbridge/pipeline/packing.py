"""Linear weights packed once into oneDNN's blocked layout (CPU, bf16 and fp32).

An unpacked bf16 ``nn.Linear`` on a CPU hands oneDNN its plain [out, in] weight, and oneDNN
reorders it into the blocked layout its AMX / AVX-512 kernels read on every call: a full pass
over the weight for each GEMM, which at serving sizes costs as much as the GEMM. Packing it once
(what inductor's freezing does for a compiled graph) takes that out of the forward; the
arithmetic is the same kernel's, so the outputs are unchanged.

Which blocked layout matters as much as packing: oneDNN picks it from a row-count hint, and on
an Intel CPU with AMX (2 threads) the layout it picks for 512-1024 rows ran BERT-base's
768-wide outputs at about half the speed of the layout it picks for one row (ad hoc, the
3072 -> 768 projection at 1,024 rows: 855 vs 1615 GFLOP/s), while for MiniLM's 384-wide shapes
the row-count layout is the faster one. So the layout is chosen per weight shape by timing the
candidates at the planned rows (`fastest_rows_hint`). An fp32 weight has one more candidate:
staying plain, on MKL's GEMM. On that Intel CPU MKL ran as fast as oneDNN; on a 2-core Zen 4
oneDNN's packed fp32 GEMM ran ~20% faster (`benchmarks/gemm_ceiling.py`: 206-216 against 176
GFLOP/s), and packing also lets the GELU and residual adds ride on the GEMM (pipeline/fusion.py).
`python benchmarks/packed_linear.py [--dtype fp32]` measures both effects on whole models.

``PackedLinear`` keeps only the packed weight; ``weight`` and the state dict give the plain
tensor back, so ``save_pretrained`` writes an ordinary checkpoint. Under ``torch.compile`` (a user
compiling the optimized model) the kernel is called through a custom op: inductor's own lowering
of the oneDNN linear accepts only weights it froze itself and fails on these.

Tried for decoders and not kept: the one-row layout for GPT-2's bf16 decode step (all 49
projections packed, called through the custom op from the compiled step) ran 16.2 ms/token
against 16.6 for inductor's fused reduction on a quiet hour and 21.2 against 19.8 on a busy one,
interleaved in one process (ad hoc); the kernels alone agree (`python benchmarks/decode_kernels.py`:
12.7 vs 10.8 ms per token of weights): batch-1 decoding is bound by memory reads, which the
layout does not change.

What the packing step fuses on top (q/k/v as one GEMM, the FFN's GELU as a post-op of its
first GEMM) is in `pipeline/fusion.py`.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

K = TypeVar("K")


def pack_weight(weight: Tensor, rows_hint: int) -> Tensor:
    """A [out, in] bf16 or fp32 weight in the oneDNN layout chosen for ``rows_hint`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint)


# The activations oneDNN can apply to the GEMM's output before it is written (post-ops):
# name -> the algorithm argument of mkldnn._linear_pointwise ("none" = erf, the exact GELU).
POST_OPS = {"none": "", "gelu": "none"}


@torch.library.custom_op("torchbridge::onednn_linear", mutates_args=())
def _onednn_linear_op(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int,
                      post_op: str) -> Tensor:
    return _onednn_linear_eager(x, packed, bias, out_features, post_op)


@_onednn_linear_op.register_fake
def _(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int, post_op: str) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _onednn_linear_eager(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int,
                         post_op: str = "none") -> Tensor:
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, post_op,
                                           [], POST_OPS[post_op])
    return y.reshape(*x.shape[:-1], out_features)


def onednn_linear(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int,
                  post_op: str = "none") -> Tensor:
    """y = post_op(x W^T + b) with W packed by `pack_weight`; x and b in W's dtype. Eager calls skip the
    custom op's dispatch (~15 us a call, which a 37-linear MiniLM forward at batch 1 would feel)."""
    if torch.compiler.is_compiling():
        return _onednn_linear_op(x, packed, bias, out_features, post_op)
    return _onednn_linear_eager(x, packed, bias, out_features, post_op)


def fastest(candidates: dict[K, Callable[[], object]], runs: int = 5) -> K:
    """The key of the candidate call that runs fastest: interleaved rounds, the first two as
    warm-up, then the median of ``runs`` (one candidate: returned untimed)."""
    if len(candidates) == 1:
        return next(iter(candidates))
    times: dict[K, list[float]] = {key: [] for key in candidates}
    with torch.inference_mode():
        for i in range(runs + 2):
            for key, call in candidates.items():
                t0 = time.perf_counter()
                call()
                if i >= 2:
                    times[key].append(time.perf_counter() - t0)
    return min(times, key=lambda key: statistics.median(times[key]))


def fastest_rows_hint(weight: Tensor, rows: int, runs: int = 5) -> int | None:
    """The layout that runs ``rows`` rows fastest, by timing: the row-count hint of a oneDNN
    layout (1 or ``rows``), or None for the plain weight through ``F.linear``, a candidate for
    fp32 only (MKL's GEMM, which beats oneDNN's on some CPUs and loses on others)."""
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    candidates: dict[int | None, Callable[[], object]] = {}
    if weight.dtype == torch.float32:
        plain = weight.detach().contiguous()
        candidates[None] = lambda: torch.nn.functional.linear(x, plain)
    for hint in (1, rows) if rows > 1 else (1,):
        packed = pack_weight(weight, hint)
        candidates[hint] = lambda packed=packed: _onednn_linear_eager(x, packed, None,
                                                                      weight.shape[0])
    return fastest(candidates, runs)


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight in a oneDNN layout (see the module docstring)."""

    def __init__(self, linear: nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows_hint = rows_hint
        self.packed = pack_weight(linear.weight, rows_hint)
        self.bias = linear.bias
        self.post_op = "none"  # an activation fused into the GEMM (pipeline/fusion.py sets it)

    @property
    def weight(self) -> Tensor:
        return self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        return onednn_linear(x, self.packed, self.bias, self.out_features, self.post_op)

    def plus(self, x: Tensor, residual: Tensor) -> Tensor:
        """``self(x) + residual`` with the add done by oneDNN on the GEMM's output before it is
        written (a binary post-op; eager only, and only without another post-op). A strided
        residual is copied first: oneDNN takes it only dense (a strided one sent its int8 GEMM
        to a reference kernel, 100 ms for 8 rows)."""
        if self.post_op != "none" or torch.compiler.is_compiling():
            return self(x) + residual
        y = torch.ops.mkldnn._linear_pointwise.binary(
            x.reshape(-1, x.shape[-1]), residual.reshape(-1, self.out_features).contiguous(),
            self.packed, self.bias, "add")
        return y.reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        # an opaque oneDNN tensor has no storage to copy: rebuild from the plain weight
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device="meta")
        plain.weight = nn.Parameter(self.weight, requires_grad=False)
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        clone = PackedLinear(plain, self.rows_hint)
        clone.post_op = self.post_op
        return clone

    def extra_repr(self) -> str:
        post = f", then {self.post_op}" if self.post_op != "none" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"oneDNN-packed for {self.rows_hint} rows{post}")


def swap_modules(model: nn.Module, wanted: Callable[[nn.Module], bool],
                 make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace, in place, every submodule for which ``wanted`` holds by ``make(it)``; returns
    how many were replaced (the packing step's swaps: here and in pipeline/fusion.py)."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if wanted(child):
                setattr(parent, name, make(child))
                swapped += 1
    return swapped


def pack_linear_weights(model: nn.Module, rows: int) -> tuple[int, dict[str, int | None]]:
    """Swap every bf16 or fp32 ``nn.Linear`` whose weight is its own (not tied to an embedding)
    for a PackedLinear, in place, in the layout that runs ``rows`` rows fastest (timed once per
    weight shape); an fp32 shape whose plain weight runs fastest stays a plain linear. Returns
    (linears swapped, {"out x in": the row hint chosen for that shape, None for plain})."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))

    def packable(m: nn.Module) -> bool:
        return type(m) is nn.Linear and m.weight.dtype in (torch.bfloat16, torch.float32) \
            and m.weight.device.type == "cpu" and uses[id(m.weight)] == 1

    hints: dict[tuple[int, int], int | None] = {}
    for m in model.modules():
        if packable(m) and tuple(m.weight.shape) not in hints:
            hints[tuple(m.weight.shape)] = fastest_rows_hint(m.weight, rows)
    swapped = swap_modules(
        model, lambda m: packable(m) and hints[tuple(m.weight.shape)] is not None,
        lambda linear: PackedLinear(linear, hints[tuple(linear.weight.shape)]))
    return swapped, {f"{o}x{i}": hint for (o, i), hint in hints.items()}
