"""Linear weights packed once into oneDNN's blocked layout (CPU, bf16, uncompiled encoders).

An uncompiled bf16 ``nn.Linear`` on a CPU hands oneDNN its plain [out, in] weight, and oneDNN
reorders it into the blocked layout its AMX / AVX-512 kernels read on every call: a full pass
over the weight for each GEMM, which at serving sizes costs as much as the GEMM. Packing it once
(what inductor's freezing does for a compiled graph) takes that out of the forward; the
arithmetic is the same kernel's, so the outputs are unchanged. Measured on the development CPU
(AMX), bf16, interleaved in one process (`python benchmarks/packed_linear.py`): all-MiniLM-L6-v2
1.16x at 1 x 16 tokens, 1.20x at 4 x 32, 1.21x at 32 x 32; BERT-base 1.09x at 1 x 16, 1.17x at
8 x 128; min cosine to the unpacked model's outputs 0.99997-1.0.

The module keeps only the packed weight; ``weight`` and the state dict give the plain tensor
back, so ``save_pretrained`` writes an ordinary checkpoint.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight in oneDNN's layout, for batches of about ``rows_hint`` rows."""

    def __init__(self, linear: nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows_hint = rows_hint
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed,
                                               self.bias, "none", [], "")
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
        return PackedLinear(plain, self.rows_hint)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def pack_linear_weights(model: nn.Module, rows_hint: int) -> int:
    """Swap every bf16 ``nn.Linear`` whose weight is its own (not tied to an embedding) for a
    PackedLinear, in place; returns how many."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 \
                    and child.weight.device.type == "cpu" and uses[id(child.weight)] == 1:
                setattr(parent, name, PackedLinear(child, rows_hint))
                swapped += 1
    return swapped

