"""How `FastGenerator` compiles: private code copies per generator, the prompt's layers as one
graph for every layer and length, and the inductor options of its graphs."""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from torchbridge.generation.decoders import CausalDecoder


def own_method(fn: Any, obj: nn.Module) -> types.MethodType:
    """``fn`` bound to ``obj`` through a private copy of its code. Dynamo keeps compiled graphs
    (and its recompile limit of 8) per code object, so each generator gets its own cache:
    several generators (fp32 / bf16 / int8, other models) never evict or exhaust each other's."""
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    return types.MethodType(own, obj)


def compiled_prompt_layer(decoder: CausalDecoder, backend: Any) -> Any:
    """`CausalDecoder.prompt_layer` compiled once for every layer and prompt length: the layer's
    weights are arguments and the prompt length is symbolic. Guards on the layer modules stay:
    the accuracy control can leave layers in different formats, each with its own graph. On a
    CPU only: there the eager prompt pays ~20 op dispatches and ~4 projection calls per layer,
    which at short prompts cost more than the arithmetic (GPT-2 int8-weight-only, 8 tokens:
    time to first token 22.5 vs 36.8 ms eager, `benchmarks/bench_generate.py`); on
    accelerators it is a few large kernels, not measured."""
    compiled = torch.compile(own_method(CausalDecoder.prompt_layer, decoder), backend=backend,
                             fullgraph=True)

    def run(m: nn.Module, scale: float, h: torch.Tensor, positions: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if h.shape[1] > 1:  # the prompt length: one graph for all (length 1 is its own)
            for t, dim in ((h, 1), (positions, 1), (allowed, 1)):
                torch._dynamo.maybe_mark_dynamic(t, dim)
        return compiled(m, scale, h, positions, k_cache, v_cache, allowed)

    return run


def inductor_options(mode: str | None, device: torch.device) -> dict[str, Any]:
    import torch._inductor

    opts: dict[str, Any] = dict(torch._inductor.list_mode_options(mode, False)) if mode else {}
    if device.type != "cuda":
        # CUDA graphs do not exist elsewhere; "reduce-overhead" keeps only its meaning of
        # "cut per-call overhead", which the fixed-shape single-graph decode step already gives.
        opts.pop("triton.cudagraphs", None)
    # The step's inputs are the generator's own cache tensors (their shapes guarded by dynamo)
    # and the decoder's buffers, which never change: inductor's check of every input's size,
    # stride and alignment on every call (~230 inputs for GPT-2) cost ~0.2 ms of a ~6 ms int8
    # step on the development CPU (5.99 vs 6.22 ms/token, interleaved, ad hoc).
    opts.update(size_asserts=False, alignment_asserts=False)
    return opts
