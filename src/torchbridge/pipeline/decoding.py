"""Causal LMs: route ``generate`` through the static-cache, compiled-decode-step path.

HF's generate on a compiled forward recompiles as the cache grows and pays Python overhead per
token; :class:`torchbridge.generation.FastGenerator` preallocates the KV cache and compiles one
fixed-shape decode step. The optimized model's ``generate`` is replaced by it (HF semantics,
unsupported arguments raise), checked against HF generate on the fp32 eager model by the causal-LM
gate, and warmed up.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .plan import Plan
from .report import OptimizationReport

# The generation check counts every position, near-ties included (the forward gate counts only
# decisive ones), over a few dozen tokens: it may sit this far below the gate's agreement.
GENERATION_SLACK = 0.1
# New tokens per warm-up call: enough to run prefill and the (compiled) decode step.
WARMUP_NEW_TOKENS = 4
# GenerationConfig fields that say nothing about the decoding algorithm.
_BOOKKEEPING = {"transformers_version", "_from_model_config", "cache_implementation"}


def _generation_config_kwargs(generation_config) -> dict[str, Any]:
    """The decoding arguments a pipeline passes as a GenerationConfig, as generate kwargs."""
    from torchbridge.generation.sampling import SUPPORTED_ARGS

    diff = {k: v for k, v in generation_config.to_diff_dict().items() if k not in _BOOKKEEPING}
    unsupported = sorted(k for k in diff if k not in SUPPORTED_ARGS)
    if unsupported:
        raise ValueError(f"generation_config sets {unsupported}, which the fast generation path "
                         f"does not implement; supported: {', '.join(SUPPORTED_ARGS)}")
    return diff


def attach_fast_generate(model: nn.Module, plan: Plan, report: OptimizationReport) -> None:
    """The step: route the model's ``generate`` through the static-cache decoder."""
    from torchbridge.generation import FastGenerator

    if not FastGenerator.supports(model):
        report.step("fast_generate", False, f"no static-cache decoder for {report.model_type}: "
                    "generate is transformers' own")
        return
    generator = FastGenerator(model, compile=plan.compile, compile_mode=plan.compile_mode)

    @functools.wraps(generator.generate)
    def generate(*args: Any, generation_config=None, **kwargs: Any) -> torch.Tensor:
        if generation_config is not None:
            kwargs = {**_generation_config_kwargs(generation_config), **kwargs}
        return generator.generate(*args, **kwargs)

    generate.torchbridge_generator = generator  # type: ignore[attr-defined]
    model.generate = generate
    report.step("fast_generate", True, "static KV cache, prefill + "
                + (f"compiled decode step ({plan.compile_reason}); one sequence: "
                   f"{generator.stats['decode_step']}" if plan.compile
                   else f"eager decode step ({plan.compile_reason})"))


def verify_generation(model: nn.Module, reference: nn.Module, plan: Plan,
                      prompts: dict[str, torch.Tensor]) -> tuple[dict[str, Any], list[str]]:
    """The generation check: greedy tokens of the fast path vs HF generate on the fp32 eager
    model. fp32 must match token for token; lower precisions must keep the teacher-forced
    next-token agreement of their gate (a near-tie may flip, and free-running comparison would
    then count every later token as different)."""
    from torchbridge.generation import verify_greedy

    generator = fast_generator(model)
    if generator is None:
        return {"skipped": "generate is transformers' own"}, []
    device = plan.device.torch_device
    result = verify_greedy(generator, reference, prompts["input_ids"].to(device),
                           prompts["attention_mask"].to(device), max_new_tokens=16)
    summary = {k: result[k] for k in ("agreement", "teacher_forced_agreement", "identical",
                                      "first_divergence", "n_new_tokens")}
    failures = []
    if plan.precision_name == "fp32" and not result["identical"]:
        failures.append(f"fp32 fast generation differs from HF generate at new token "
                        f"{result['first_divergence']}")
    elif result["teacher_forced_agreement"] < plan.gate.min_agreement - GENERATION_SLACK:
        failures.append(f"fast generation: teacher-forced agreement "
                        f"{result['teacher_forced_agreement']:.3f} < "
                        f"{plan.gate.min_agreement - GENERATION_SLACK:.2f}")
    return summary, failures


def warm_up_generate(model: nn.Module, plan: Plan, report: OptimizationReport) -> None:
    """Prefill + a few decode steps at the warm-up batch size, on the KV cache sized for the
    warm-up length: that compiles the decode step real requests of that size use, without
    generating the whole length (on a CPU, 3 x 128 tokens of a 30-layer model took minutes)."""
    from .verify import padded_batch

    generator = fast_generator(model)
    batch, length = plan.warmup_shape
    prompt = padded_batch(model.config, batch, min(8, length),
                          device=plan.device.torch_device)["input_ids"]
    if generator is None:
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=WARMUP_NEW_TOKENS, do_sample=False)
        return
    generator.reserve(batch, max(length, prompt.shape[1] + WARMUP_NEW_TOKENS))
    generator.generate(prompt, max_new_tokens=WARMUP_NEW_TOKENS, do_sample=False)
    report.generation = {**(report.generation or {}), "stats": generator.stats}
    # what "torch_compile" means for a causal LM here: its decode step is compiled
    report.compiled = generator.compile
    report.compiled_graphs += generator.stats["compiles"] + generator.stats["prompt_compiles"]


def left_padded_prompts(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gate batch's first two rows as left-padded prompts of at most 8 tokens."""
    ids, mask = batch["input_ids"][:2], batch["attention_mask"][:2]
    rows_ids, rows_mask = [], []
    width = min(8, int(mask.sum(1).max()))
    for row_ids, row_mask in zip(ids, mask, strict=True):
        real = row_ids[row_mask.bool()][:width]
        pad = width - real.shape[0]
        rows_ids.append(torch.cat([real.new_full((pad,), int(real[0])), real]))
        rows_mask.append(torch.cat([torch.zeros(pad, dtype=torch.long),
                                    torch.ones(real.shape[0], dtype=torch.long)]))
    return {"input_ids": torch.stack(rows_ids), "attention_mask": torch.stack(rows_mask)}


def fast_generator(model: nn.Module):
    """The FastGenerator behind a model's generate, or None (read back for the report)."""
    return getattr(getattr(model, "generate", None), "torchbridge_generator", None)
