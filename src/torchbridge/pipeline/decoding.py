"""Causal LMs: route ``generate`` through the static-cache, compiled-decode-step path.

HF's generate on a compiled forward recompiles as the cache grows and pays Python overhead per
token; :class:`torchbridge.generation.FastGenerator` preallocates the KV cache and compiles one
fixed-shape decode step. The optimized model's ``generate`` is replaced by it (HF semantics,
unsupported arguments raise), checked against HF generate on the fp32 eager model, and warmed up.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch import nn

from torchbridge.pipeline.verify import VerificationError, padded_batch

from .plan import Plan
from .report import OptimizationReport

# GenerationConfig fields that say nothing about the decoding algorithm.
_BOOKKEEPING = {"transformers_version", "_from_model_config", "cache_implementation"}
# Teacher-forced next-token agreement required below fp32 (fp32 must match token for token):
# half precision and int8 weights may flip near-ties, nothing more.
MIN_FORCED_AGREEMENT = 0.9


def _generation_config_kwargs(generation_config) -> dict[str, Any]:
    """The decoding arguments a pipeline passes as a GenerationConfig, as generate kwargs."""
    from torchbridge.generation.sampling import SUPPORTED_ARGS

    diff = {k: v for k, v in generation_config.to_diff_dict().items() if k not in _BOOKKEEPING}
    unsupported = sorted(k for k in diff if k not in SUPPORTED_ARGS)
    if unsupported:
        raise ValueError(f"generation_config sets {unsupported}, which the fast generation path "
                         f"does not implement; supported: {', '.join(SUPPORTED_ARGS)}")
    return diff


def fast_generate_applies(model: nn.Module) -> bool:
    from torchbridge.generation import FastGenerator
    from torchbridge.precisions.int8_dynamic import Int8DynamicLinear

    # int8-dynamic is for compute-bound encoders; the decoder path reads float or int8 weights
    return FastGenerator.supports(model) and not any(
        isinstance(m, Int8DynamicLinear) for m in model.modules())


def attach_fast_generate(model: nn.Module, plan: Plan, report: OptimizationReport,
                         reference: nn.Module | None) -> None:
    from torchbridge.generation import FastGenerator, verify_greedy

    if not fast_generate_applies(model):
        report.step("fast_generate", False, f"no static-cache decoder for {report.model_type}"
                    f"{' with int8-dynamic' if plan.quantization == 'int8-dynamic' else ''}: "
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
                + ("compiled decode step" if plan.compile else "eager decode step"))

    device = plan.device.torch_device
    if reference is not None:
        t0 = time.perf_counter()
        prompts = padded_batch(model.config, 2, 8, left_pad=True, device=device)
        result = verify_greedy(generator, reference, prompts["input_ids"],
                               prompts["attention_mask"], max_new_tokens=16)
        summary = {k: result[k] for k in ("agreement", "teacher_forced_agreement", "identical",
                                          "first_divergence", "n_new_tokens")}
        report.generation = {"verify": summary}
        report.timings["verify_generate_s"] = time.perf_counter() - t0
        exact = plan.dtype == torch.float32 and plan.quantization is None
        if (exact and not result["identical"]) or \
                result["teacher_forced_agreement"] < MIN_FORCED_AGREEMENT:
            raise VerificationError(f"fast generation differs from HF generate on the fp32 eager "
                                    f"model: {summary}")
    if plan.warmup_steps:
        t0 = time.perf_counter()
        batch, length = plan.warmup_shape
        prompt = padded_batch(model.config, batch, min(8, length), device=device)["input_ids"]
        generator.generate(prompt, max_length=max(length, prompt.shape[1] + 2), do_sample=False)
        report.timings["warmup_generate_s"] = time.perf_counter() - t0
    report.generation = {**(report.generation or {}), "stats": generator.stats}
    # what "torch_compile" means for a causal LM here: its decode step is compiled
    report.compiled = generator.compile
    report.compiled_graphs += generator.stats["compiles"]


def fast_generator(model: nn.Module):
    """The FastGenerator behind a model's generate, or None (read back for the report)."""
    return getattr(getattr(model, "generate", None), "torchbridge_generator", None)
