"""What a benchmark result was measured on: versions, the device, the machine's load and what
"auto" picks there. Every result JSON carries it, so a number is never read without its context."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

__all__ = ["env_report", "OPTIONAL_PACKAGES"]

OPTIONAL_PACKAGES = ("onnxruntime", "onnx", "openvino", "ctranslate2", "matplotlib", "tqdm")


def env_report(device: str = "auto") -> dict[str, Any]:
    """Versions, the device and what it computes natively, and what "auto" picks on it."""
    import importlib.metadata as md

    import transformers

    import torchbridge
    from torchbridge.backends import describe, detect
    from torchbridge.cpu_threads import openmp_spin
    from torchbridge.models.text import TextModelConfig
    from torchbridge.pipeline.plan import make_plan

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    info = detect(device)
    auto = {}
    for mode in ("inference", "throughput"):
        plan = make_plan(TextModelConfig(optimization_mode=mode, device=device))
        auto[mode] = {"dtype": str(plan.dtype).replace("torch.", ""),
                      "dtype_reason": plan.dtype_reason, "attention": plan.attention,
                      "torch_compile": plan.compile,
                      "compile_mode": plan.compile_mode if plan.compile else None,
                      "quantization": plan.quantization}
    return {
        "torchbridge": torchbridge.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # other processes competing for the cores skew every timing: say how busy the machine was
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "peers": {pkg: version(pkg) for pkg in OPTIONAL_PACKAGES},
        # how CPU threads wait decides how a shared machine's load shows in every timing
        "openmp_spin": openmp_spin(),
        "device": describe(info),
        "auto": auto,
    }
