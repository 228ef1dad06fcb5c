"""``torchbridge optimize MODEL --output DIR``: optimize once, save what makes the next load fast.

What DIR holds:

* ``model.safetensors`` + ``config.json``: the weights already converted to the plan's precision
  (bf16 linear weights, LayerNorms kept fp32 when the plan says so), written by save_pretrained;
* the tokenizer files, when the source has a tokenizer;
* ``torchbridge.json``: the resolved plan (dtype, attention, compile mode, quantization), the
  verify result obtained against the fp32 eager model at save time, and the library versions;
* ``compile_cache.bin`` (when torch.compile ran): torch's portable compile-cache artifacts
  (``torch.compiler.save_cache_artifacts``); they only help on the same torch version and device.

What it does not hold: compiled code itself (inductor output is specific to the torch version,
the device and the input shapes, and is rebuilt on the first call), and int8 packed weights
(torch's dynamic-quant packed parameters are not safetensors: the plan-precision weights are saved
and quantization is re-applied at load, which takes well under a second for these models).

:func:`load_optimized` rebuilds the model from DIR with the saved plan and skips what was done:
no fp32 reference copy, no verify pass (the weights in DIR are the verified ones).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

PLAN_FILE = "torchbridge.json"
CACHE_FILE = "compile_cache.bin"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def save_optimized(model_name: str, out: Path, config: Any, *, task: str | None = None
                   ) -> dict[str, Any]:
    """Optimize ``model_name`` with ``config`` and write DIR; returns a summary with timings."""
    import torchbridge
    from torchbridge.models.text import TextModelOptimizer
    from torchbridge.pipeline.loading import load_model, load_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / PLAN_FILE).exists():
        raise ValueError(f"--output {out} exists and is not a torchbridge folder; choose an "
                         "empty or new folder")
    t0 = time.perf_counter()
    opt = TextModelOptimizer(config)
    model = opt.optimize(model_name, task=task)
    optimize_s = time.perf_counter() - t0
    info = opt.get_optimization_info()
    plan = opt.plan

    out.mkdir(parents=True, exist_ok=True)
    if plan.quantization:
        # packed int8 parameters are not serializable as safetensors: save the plan-precision
        # weights (a fresh load cast like the plan) and quantize again at load
        source = load_model(model_name, info["task"], random_weights=config.random_weights)
        source.save_pretrained(out)
    else:
        model.save_pretrained(out)
    try:
        load_tokenizer(model_name).save_pretrained(out)
        tokenizer = True
    except OSError:
        tokenizer = False

    cache = None
    if info.get("torch_compile"):
        try:
            artifacts = torch.compiler.save_cache_artifacts()
        except Exception:  # noqa: BLE001 - the cache is an optimisation, never a requirement
            artifacts = None
        if artifacts:
            (out / CACHE_FILE).write_bytes(artifacts[0])
            cache = CACHE_FILE
    record = {
        "format": 1,
        "source": model_name,
        "task": info["task"],
        "plan": {
            "optimization_mode": plan.mode.value,
            "dtype": _dtype_name(plan.dtype),
            "use_amp": plan.amp,
            "attention": plan.attention,
            "use_torch_compile": plan.compile,
            "compile_mode": plan.compile_mode,
            "quantization": plan.quantization,
            "warmup_steps": plan.warmup_steps,
        },
        "verify_at_save": info.get("verify"),
        "random_weights": info.get("random_weights"),
        "tokenizer": tokenizer,
        "compile_cache": cache,
        "saved_with": {"torchbridge": torchbridge.__version__, "torch": torch.__version__},
        "device_at_save": info.get("device"),
        "optimize_s": optimize_s,
    }
    (out / PLAN_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    files = sorted(p.name for p in out.iterdir())
    return {"output": str(out), "files": files, "optimize_s": round(optimize_s, 3),
            "plan": record["plan"], "verify_at_save": _verify_line(info.get("verify"))}


def _verify_line(verify: dict | None) -> str | None:
    if not verify:
        return None
    return (f"{'passed' if verify['passed'] else 'FAILED'}: max abs diff "
            f"{verify['max_abs_diff']:.3e}, argmax agreement {verify['argmax_agreement']}")


def is_saved(path: str | Path) -> bool:
    return (Path(path) / PLAN_FILE).is_file()


def saved_config(path: str | Path, user: Any) -> Any:
    """The TextModelConfig for loading DIR: the saved plan for every field the user did not set
    explicitly, and no verify pass unless asked (DIR holds the weights verified at save time)."""
    record = json.loads((Path(path) / PLAN_FILE).read_text())
    plan = record["plan"]
    saved = {
        "optimization_mode": plan["optimization_mode"],
        "dtype": getattr(torch, plan["dtype"]),
        "use_amp": plan["use_amp"],
        "enable_memory_efficient_attention": plan["attention"] == "sdpa",
        "use_torch_compile": plan["use_torch_compile"],
        "compile_mode": plan["compile_mode"],
        "quantization": plan["quantization"],
        "warmup_steps": plan["warmup_steps"],
        "verify": False,
    }
    fields = {k: v for k, v in saved.items() if not user.is_explicit(k)}
    if fields.get("use_torch_compile", user.use_torch_compile) and record.get("compile_cache") \
            and (Path(path) / CACHE_FILE).is_file():
        try:
            torch.compiler.load_cache_artifacts((Path(path) / CACHE_FILE).read_bytes())
        except Exception:  # noqa: BLE001 - a stale cache only costs the compile it would save
            pass
    return user.replace(**fields) if fields else user


def load_optimized(path: str | Path, *, device: str = "auto", use_torch_compile: bool | None = None
                   ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a folder written by :func:`save_optimized`: the saved plan, no verify pass."""
    from torchbridge.models.text import TextModelConfig, TextModelOptimizer

    path = Path(path)
    if not is_saved(path):
        raise ValueError(f"{path} has no {PLAN_FILE}: not written by `torchbridge optimize`")
    fields: dict[str, Any] = {"device": device}
    if use_torch_compile is not None:
        fields["use_torch_compile"] = use_torch_compile
    opt = TextModelOptimizer(TextModelConfig(**fields))
    model = opt.optimize(path)
    record = json.loads((path / PLAN_FILE).read_text())
    return model, {"record": record, "optimization_info": opt.get_optimization_info()}
