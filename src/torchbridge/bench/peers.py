"""The peers TorchBridge is measured against, each a small adapter used the way its docs say.

Every adapter turns the same fp32 Hugging Face model (the benchmark's reference weights) into a
:class:`Backend` with three methods: ``feed`` converts a batch to the runtime's native inputs
(outside the timed region), ``run`` is the timed call, ``result`` turns the raw output into a
torch tensor for the fidelity check (logits for encoders, new token ids for decoders).

Optional runtimes are imported inside the adapter; a missing one raises :class:`PeerUnavailable`
with the pip command, and the harness lists the row as skipped.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .backend import Backend, PeerUnavailable, Workload, module_bytes
from .runtimes import build_ct2, build_ct2_int8, build_openvino, build_ort, build_ort_int8

# --- torch-based rows ------------------------------------------------------------------------


def hf_generate_fn(model: nn.Module, new_tokens: int) -> Callable[[dict], torch.Tensor]:
    """Greedy HF generate of exactly ``new_tokens`` tokens (EOS cannot stop it early)."""

    def gen(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():  # as the guide's examples (inference_mode would change guards)
            out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, num_beams=1,
                                 pad_token_id=model.config.eos_token_id)
        return out[:, batch["input_ids"].shape[1]:]

    return gen


def torch_backend(model: nn.Module, wl: Workload, dtype: str, notes: str | None = None,
                  call: Callable[[dict], Any] | None = None) -> Backend:
    dev = wl.device
    if call is None:
        if wl.generation:
            call = hf_generate_fn(model, wl.new_tokens)
        else:
            def call(batch: dict) -> Any:
                # no_grad, as the guide's examples and TorchBridge's own warm-up: a compiled
                # model warmed up under no_grad would recompile under inference_mode
                with torch.no_grad():
                    return model(**batch)
    return Backend(
        dtype=dtype,
        feed=lambda b: {k: v.to(dev) for k, v in b.items()},
        run=call,
        result=lambda out: (out if torch.is_tensor(out) else out[0]).detach().float().cpu(),
        weight_bytes=module_bytes(model),
        notes=notes,
    )


def _sdpa_copy(wl: Workload) -> nn.Module:
    model = copy.deepcopy(wl.model).to(wl.device)
    model.set_attn_implementation("sdpa")
    return model


def build_hf_sdpa(wl: Workload) -> Backend:
    """Plain transformers with its default attention (SDPA), fp32: what most users run."""
    return torch_backend(_sdpa_copy(wl), wl, "float32")


def build_hf_half(wl: Workload) -> Backend:
    """Plain transformers (SDPA) cast to the device's native half precision with ``.to(dtype)``:
    the one-line speedup anyone tries first, so the lead over it is what the library adds."""
    from torchbridge.backends import detect
    from torchbridge.precisions.casting import half_dtype

    dtype = half_dtype(detect(str(wl.device)))
    model = _sdpa_copy(wl).to(dtype)
    return torch_backend(model, wl, str(dtype).replace("torch.", ""), notes=".to(dtype), SDPA")


def build_torch_compile(wl: Workload) -> Backend:
    """torch.compile alone, as each doc says: ``torch.compile(model)`` for a forward (PyTorch
    tutorial); for generation the transformers recipe, a static KV cache and
    ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``."""
    model = _sdpa_copy(wl)
    if wl.generation:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        return torch_backend(model, wl, "float32", notes="static cache, reduce-overhead")
    return torch_backend(torch.compile(model), wl, "float32")




PEERS: dict[str, tuple[Callable[[Workload], Backend], str | None]] = {
    # name -> (builder, the package it needs or None)
    "hf-sdpa": (build_hf_sdpa, None),
    "hf-half": (build_hf_half, None),
    "torch-compile": (build_torch_compile, None),
    "ort": (build_ort, "onnxruntime"),
    "ort-int8": (build_ort_int8, "onnxruntime"),
    "ct2": (build_ct2, "ctranslate2"),
    "ct2-int8": (build_ct2_int8, "ctranslate2"),
    "openvino": (build_openvino, "openvino"),
}


def parse_compare(value: str) -> list[str]:
    """'all', 'none' or a comma list of PEERS names; unknown names raise with the valid ones."""
    value = value.strip().lower()
    if value in ("", "none"):
        return []
    if value == "all":
        return list(PEERS)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEERS)}, "
                         "all, none")
    return names


def installed(name: str) -> bool:
    pkg = PEERS[name][1]
    if pkg is None:
        return True
    return importlib.util.find_spec(pkg) is not None


__all__ = ["PEERS", "Backend", "PeerUnavailable", "Workload", "parse_compare"]
