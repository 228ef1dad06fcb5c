"""The apply steps, each ``(model, plan, report) -> model``, by name. Families list which run and
in what order (``torchbridge.families``); every step records what it did in the report."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from torchbridge.precisions import INT8_SMOOTH_ALPHA, precision
from torchbridge.precisions.casting import cast_model, wrap_autocast

from .checks import wrap_input_checks
from .decoding import attach_fast_generate
from .padding import PER_TOKEN_FIELDS, wrap_trim_padding
from .plan import Plan
from .report import OptimizationReport

Step = Callable[[nn.Module, Plan, OptimizationReport], nn.Module]


def set_attention(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    if not hasattr(model, "set_attn_implementation"):
        report.step("attention", False, "not a transformers model: attention left as is")
        return model
    model.set_attn_implementation(plan.attention)
    report.step("attention", plan.attention == "sdpa", f"attn_implementation={plan.attention!r}")
    return model


def cast(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    model = cast_model(model, plan.dtype, fp32_norms=plan.amp)
    report.step("precision", plan.dtype != torch.float32, plan.dtype_reason)
    return model


def prepare_for_quantization(model: nn.Module, plan: Plan) -> nn.Module:
    """int8-static: query, key and value as one projection first, so one calibrated grid and one
    activation quantize serve the three (they read the same hidden states)."""
    if plan.quantization == "int8-static":
        from .fusion import fuse_qkv

        fuse_qkv(model)
    return model


def quantize(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    if plan.quantization is None:
        report.step("quantization", False, "none requested")
        return model
    entry = precision(plan.quantization)
    skip = tuple(report.float_layers)  # layers the accuracy control kept in float, if any
    calibration = report.calibration_inputs
    if calibration is not None:  # on the model's device: it runs one forward for the statistics
        device = next(model.parameters()).device
        calibration = {k: v.to(device) for k, v in calibration.items()}
    with torch.no_grad():
        model = entry.quantize(prepare_for_quantization(model, plan), skip, calibration)
    detail = f"{entry.name}: {entry.describe}"
    if calibration is not None and plan.quantization == "int8-dynamic":
        detail += f"; activation outliers smoothed (SmoothQuant, alpha {INT8_SMOOTH_ALPHA})"
    elif plan.quantization == "int8-static":
        detail += (f"; activation outliers smoothed (SmoothQuant, alpha {INT8_SMOOTH_ALPHA}) "
                   "except at the feed-forward blocks' second projection")
    if skip:
        detail += f"; {len(skip)} layer(s) kept in {plan.dtype} to pass the gate"
    report.step("quantization", True, detail)
    return model


def to_device(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    model = model.to(plan.device.torch_device)
    report.step("device", True, str(plan.device.torch_device))
    return model


def pack_weights(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    pack, reason = plan.pack_weights
    if pack:
        from .fusion import fuse_gelu, fuse_qkv, fuse_residual_add
        from .packing import pack_linear_weights

        rows, seq = plan.warmup_shape
        fused = fuse_qkv(model)
        swapped, hints = pack_linear_weights(model, rows * seq)
        gelus, adds = fuse_gelu(model), fuse_residual_add(model)
        layouts = ", ".join(f"{shape}: {'plain (unpacked)' if hint is None else hint}"
                            for shape, hint in hints.items())
        candidates = f"the 1-row and {rows * seq}-row ones"
        if plan.dtype == torch.float32:
            candidates += " and the plain weight (MKL's GEMM)"
        reason += (f" ({swapped} linears; layout per weight shape, the faster at "
                   f"{rows * seq} rows of {candidates}: {layouts})")
        if fused:
            reason += f"; query/key/value as one GEMM in {fused} self-attention blocks"
        if gelus:
            reason += f"; GELU inside the GEMM before it in {gelus} feed-forward blocks"
        reason += _residual_kernel(model, adds, rows * seq) + _encoder_work(model, plan)
    elif plan.quantization == "int8-static":
        from .fusion import fuse_gelu, fuse_requantize, fuse_residual_add

        pack = True
        gelus, adds = fuse_gelu(model), fuse_residual_add(model)
        linked = fuse_requantize(model)
        reason = (f"int8-static: int8 weights prepacked for oneDNN's int8 GEMM by the quantize "
                  f"step; GELU inside the GEMM in {gelus} feed-forward blocks ({linked} of them "
                  f"writing the next projection's uint8 input), residual add in {adds} output "
                  "blocks")
        reason += _encoder_work(model, plan)
    report.step("packed weights", pack, reason)
    return model


def _encoder_work(model: nn.Module, plan: Plan) -> str:
    """What a fused encoder computes, and with which attention kernel: the fastest kernel, real
    tokens only (pipeline/unpadding.py), a first-token classifier's last layer on those rows
    only (pipeline/first_token.py); the report's words for what was done."""
    from .first_token import first_token_only
    from .unpadding import remove_padding

    reason = _attention_kernel(model, plan)
    if plan.trim_padding and remove_padding(model):
        reason += "; " + _UNPADDED
    if first_token_only(model):
        reason += "; " + _FIRST_TOKEN
    return reason


def _residual_kernel(model: nn.Module, blocks: int, rows: int) -> str:
    """Give each residual output block the faster of the add inside its GEMM and torchbridge's
    add + LayerNorm kernel after it (pipeline/fusion.py); the report's words for the choice."""
    from .fusion import choose_norm_kernel

    if not blocks:
        return ""
    fused, why_not = choose_norm_kernel(model, rows)
    inside = f"residual add inside the GEMM before it in {blocks - fused} output blocks"
    if why_not:
        return f"; {inside} (not torchbridge's add + LayerNorm kernel: {why_not})"
    kernel = f"residual add and LayerNorm by torchbridge's kernel in {fused} output blocks"
    parts = [part for part, n in ((kernel, fused), (inside, blocks - fused)) if n]
    return f"; {'; '.join(parts)} (the faster at {rows} rows, timed)"


def _attention_kernel(model: nn.Module, plan: Plan) -> str:
    """Give the fused self-attention modules the fastest attention kernel at the planned shape
    (pipeline/attention.py); the report's words for the choice."""
    from .attention import fused_kernel_unavailable
    from .fusion import FusedQKVSelfAttention, choose_attention_kernel

    rows, seq = plan.warmup_shape
    kernel = choose_attention_kernel(model, plan.dtype, rows, seq)
    if kernel is None:
        return ""
    names = {"sdpa": "SDPA", "bmm": "two batched GEMMs and a softmax",
             "fused": "torchbridge's fused kernel"}
    head = next(m.head_size for m in model.modules() if isinstance(m, FusedQKVSelfAttention))
    why_not = fused_kernel_unavailable(plan.dtype, head)
    if why_not is None:
        return f"; attention by {names[kernel]}, the fastest of three at {rows} x {seq} (timed)"
    return (f"; attention by {names[kernel]}, the faster of two at {rows} x {seq} (timed; "
            f"not torchbridge's fused kernel: {why_not})")


_FIRST_TOKEN = ("the last layer computes only each sequence's first token after attention (the "
                "classifier reads nothing else)")
_UNPADDED = ("padding removed inside the encoder (token-wise work on the real tokens only, "
             "attention sequence by sequence)")


def autocast(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    if not plan.amp:
        report.step("autocast", False, plan.amp_reason or "use_amp off")
        return model
    report.step("autocast", True, f"forward under torch.autocast({plan.device.type}, {plan.dtype}),"
                f" LayerNorms in fp32 ({plan.amp_reason})")
    return wrap_autocast(model, plan.device.type, plan.dtype)


def gradient_checkpointing(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    if not plan.gradient_checkpointing:
        report.step("gradient_checkpointing", False, "off")
    elif not getattr(model, "supports_gradient_checkpointing", False):
        report.step("gradient_checkpointing", False, "the architecture does not support it")
    else:
        # transformers 5 renamed it; the old name still works but warns
        (getattr(model, "activation_checkpointing_enable", None)
         or model.gradient_checkpointing_enable)()
        report.step("gradient_checkpointing", True,
                    "on: affects training only (inference keeps no activations to recompute)")
    return model


def compile_forward(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    if not plan.compile:
        report.step("torch.compile", False, plan.compile_reason)
        return model
    kwargs = plan.compile_kwargs()
    # The forward is compiled, not the module: the model keeps its class (pipelines,
    # save_pretrained) and the padding trimmer can stay outside the graph.
    model.forward = torch.compile(model.forward, **kwargs)
    report.step("torch.compile", True, f"{plan.compile_mode}: {kwargs} ({plan.compile_reason})")
    return model


def trim_padding(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    if not plan.trim_padding:
        report.step("trim_padding", False, "trim_padding=False")
    elif report.task not in PER_TOKEN_FIELDS:
        report.step("trim_padding", False, f"not for the {report.task} task")
    else:
        from .unpadding import removes_padding  # imports transformers' attention registry

        if removes_padding(model):  # the rest of the padding never reaches a GEMM: one call
            model = wrap_trim_padding(model, report.task, split=False)
            detail = "right-padded batches trimmed to their longest row (the encoder removes " \
                     "the rest of the padding itself)"
        else:
            model = wrap_trim_padding(model, report.task)
            detail = "right-padded batches run in groups of similar length, each trimmed to its " \
                     "longest row"
        report.step("trim_padding", True, detail)
    return model


def input_checks(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    model, limits = wrap_input_checks(model)
    report.step("input_checks", True, f"refused before the model runs: {limits}")
    return model


def fast_generate(model: nn.Module, plan: Plan, report: OptimizationReport) -> nn.Module:
    attach_fast_generate(model, plan, report)
    return model


STEPS: dict[str, Step] = {
    "attention": set_attention,
    "cast": cast,
    "quantize": quantize,
    "device": to_device,
    "pack_weights": pack_weights,
    "autocast": autocast,
    "gradient_checkpointing": gradient_checkpointing,
    "compile": compile_forward,
    "trim_padding": trim_padding,
    "input_checks": input_checks,
    "fast_generate": fast_generate,
}
