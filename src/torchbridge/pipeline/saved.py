"""The folder written by ``torchbridge optimize MODEL --output DIR``, and how it is read back.

What DIR holds:

* ``model.safetensors`` + ``config.json``: the weights already converted to the plan's precision
  (bf16 linear weights, LayerNorms kept fp32 when the plan says so), written by save_pretrained;
  with a weight format (int8, fp8) the float weights of the plan's dtype are saved and the format
  is applied again at load (well under a second for these models), because packed int8 buffers
  are not transformers checkpoints;
* the tokenizer files, when the source has a tokenizer;
* ``torchbridge.json``: the resolved plan itself (``Plan.to_dict``: every field, so nothing the user
  asked for is lost on the way back), the float layers the int8 accuracy control kept, the verify
  result obtained against the fp32 eager model at save time, and the library versions;
* ``compile_cache.bin`` (when torch.compile ran): torch's portable compile-cache artifacts
  (``torch.compiler.save_cache_artifacts``); they only help on the same torch version and device.

Loading DIR (``optimize(DIR)``) reads this in the load stage: the saved plan applies as it is
(device detected again; compile, warm-up steps and profiling may be changed at load), no fp32
reference copy and no verify pass unless ``verify=True`` is asked.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

PLAN_FILE = "torchbridge.json"
CACHE_FILE = "compile_cache.bin"
FORMAT = 2


def is_saved(path: str | Path) -> bool:
    return (Path(path) / PLAN_FILE).is_file()


def read_record(path: str | Path) -> dict[str, Any]:
    record = json.loads((Path(path) / PLAN_FILE).read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{path} was written by another torchbridge version (format "
                         f"{record.get('format')}, this one reads {FORMAT}). Fix: run "
                         "`torchbridge optimize` again with this version")
    return record


def load_compile_cache(path: str | Path, record: dict[str, Any]) -> str:
    """Load the saved compile cache into torch; returns what happened, for the report."""
    cache = Path(path) / CACHE_FILE
    if not record.get("compile_cache") or not cache.is_file():
        return "no compile cache saved: the first call compiles"
    try:
        torch.compiler.load_cache_artifacts(cache.read_bytes())
    except (RuntimeError, ValueError, OSError) as err:  # a stale cache costs only the compile
        return f"compile cache not usable here ({type(err).__name__}: {err}); the first call compiles"
    return "compile cache loaded (same torch and device as at save time)"


def verify_line(record: dict[str, Any]) -> str:
    verify = record.get("verify_at_save")
    if not verify:
        return "not verified at save time"
    values = ", ".join(f"{k} {v:.5g}" for k, v in verify["measures"].items() if v is not None)
    return f"{'passed' if verify['passed'] else 'FAILED'} ({values})"


def write(model: nn.Module, report: Any, out: str | Path, *, source: str,
          random_weights: bool) -> dict[str, Any]:
    """Write DIR for a model optimized from ``source`` (its report carries the plan)."""
    import torchbridge
    from torchbridge.pipeline.loading import ModelNotAvailableError, load_model, load_tokenizer

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / PLAN_FILE).exists():
        raise ValueError(f"--output {out} exists and is not a torchbridge folder; choose an "
                         "empty or new folder")
    plan = report.plan
    out.mkdir(parents=True, exist_ok=True)
    if plan.quantization:
        # packed int8/fp8 buffers are not a transformers checkpoint: save the float weights
        source_model = load_model(source, report.task, random_weights=random_weights)
        source_model.to(plan.dtype).save_pretrained(out)
    else:
        model.save_pretrained(out)
    try:
        load_tokenizer(source).save_pretrained(out)
        tokenizer = True
    except ModelNotAvailableError:
        tokenizer = False

    cache = None
    if report.compiled:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts:
            (out / CACHE_FILE).write_bytes(artifacts[0])
            cache = CACHE_FILE
    plan_dict = plan.to_dict()
    record = {
        "format": FORMAT,
        "source": source,
        "task": report.task,
        "plan": plan_dict,
        "float_layers": list(report.float_layers),
        "verify_at_save": None if report.verify is None else report.verify.to_dict(),
        "random_weights": random_weights,
        "tokenizer": tokenizer,
        "compile_cache": cache,
        "saved_with": {"torchbridge": torchbridge.__version__, "torch": torch.__version__},
    }
    (out / PLAN_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return {"output": str(out), "files": sorted(p.name for p in out.iterdir()),
            "save_s": round(time.perf_counter() - t0, 3), "plan": plan_dict,
            "verify_at_save": verify_line(record)}
