import copy
import dataclasses
import pickle

import pytest
import torch

from torchbridge.backends import DeviceInfo
from torchbridge.models.text import OptimizationMode, TextModelConfig, TextModelType
from torchbridge.pipeline.config import MODE_PRESETS
from torchbridge.pipeline.plan import make_plan

CPU_BF16 = DeviceInfo("cpu", None, "test cpu", "cpu", cpu_isa=frozenset({"avx512", "avx512_bf16"}))
CPU_OLD = DeviceInfo("cpu", None, "old cpu", "cpu", cpu_isa=frozenset({"avx2"}))
A100 = DeviceInfo("cuda", 0, "A100", "nvidia", capability=(8, 0))
H100 = DeviceInfo("cuda", 0, "H100", "nvidia", capability=(9, 0))
V100 = DeviceInfo("cuda", 0, "V100", "nvidia", capability=(7, 0))


def test_fields_in_order_with_guide_defaults():
    fields = [(f.name, f.default) for f in dataclasses.fields(TextModelConfig) if f.init][:13]
    assert fields == [
        ("model_name", "bert-base-uncased"), ("model_type", None),
        ("max_sequence_length", 512), ("optimization_mode", OptimizationMode.INFERENCE),
        ("use_torch_compile", True), ("compile_mode", "reduce-overhead"), ("dtype", None),
        ("use_amp", True), ("gradient_checkpointing", False),
        ("enable_memory_efficient_attention", True), ("device", "auto"), ("warmup_steps", 3),
        ("enable_profiling", False),
    ]


def test_enums_have_string_values():
    assert [m.value for m in OptimizationMode] == ["inference", "throughput", "memory", "balanced"]
    assert [t.value for t in TextModelType] == ["bert", "gpt2", "distilbert", "roberta", "albert",
                                               "custom"]
    assert TextModelConfig(optimization_mode="memory").optimization_mode is OptimizationMode.MEMORY


@pytest.mark.parametrize("kwargs, words", [
    (dict(optimization_mode="fastest"), "inference, throughput, memory, balanced"),
    (dict(compile_mode="turbo"), "max-autotune"),
    (dict(device="tpu"), "xpu"),
    (dict(device="cuda:x"), "index"),
    (dict(warmup_steps=-1), ">= 0"),
    (dict(dtype="fp16"), "torch.float16"),
    (dict(dtype=torch.int8), "torch.bfloat16"),
    (dict(quantization="int4"), "int8-weight-only"),
    (dict(model_type="t5"), "distilbert"),
    (dict(max_sequence_length=0), ">= 1"),
])
def test_invalid_values_raise_with_choices(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TextModelConfig(**kwargs)


def test_explicit_fields_are_recorded_including_defaults():
    config = TextModelConfig(optimization_mode="throughput", compile_mode="reduce-overhead")
    assert config.is_explicit("compile_mode") and not config.is_explicit("dtype")
    plan = make_plan(config, device=CPU_BF16)
    assert plan.compile_mode == "reduce-overhead"  # explicit wins even when equal to the default
    assert make_plan(TextModelConfig(optimization_mode="throughput"),
                     device=CPU_BF16).compile_mode == "max-autotune"


def test_every_mode_is_a_different_row():
    rows = {tuple(sorted(p.items())) for p in MODE_PRESETS.values()}
    assert len(rows) == len(OptimizationMode)
    plans = {m: make_plan(TextModelConfig(optimization_mode=m), device=A100) for m in OptimizationMode}
    summary = {m: (p.dtype, p.compile_mode, p.gradient_checkpointing, p.warmup_shape)
               for m, p in plans.items()}
    assert len(set(summary.values())) == 4
    assert plans[OptimizationMode.INFERENCE].compile_mode == "reduce-overhead"
    assert plans[OptimizationMode.THROUGHPUT].compile_mode == "max-autotune"
    inference, throughput = plans[OptimizationMode.INFERENCE], plans[OptimizationMode.THROUGHPUT]
    assert throughput.warmup_shape[0] > inference.warmup_shape[0]
    memory = plans[OptimizationMode.MEMORY]
    assert memory.gradient_checkpointing and memory.compile_mode == "default"
    assert memory.dtype == torch.bfloat16


def test_user_field_wins_over_preset():
    plan = make_plan(TextModelConfig(optimization_mode="memory", gradient_checkpointing=False,
                                     dtype=torch.float32), device=A100)
    assert not plan.gradient_checkpointing and plan.dtype == torch.float32


@pytest.mark.parametrize("device, expected", [
    (CPU_BF16, torch.bfloat16), (CPU_OLD, torch.float32), (A100, torch.bfloat16),
    (V100, torch.float16), (DeviceInfo("xpu", 0, "arc", "intel"), torch.bfloat16),
    (DeviceInfo("cuda", 0, "MI250", "amd"), torch.bfloat16),
])
def test_auto_dtype_per_device(device, expected):
    plan = make_plan(TextModelConfig(), device=device)
    assert plan.dtype == expected and plan.dtype_auto


def test_memory_mode_halves_weights_even_without_native_bf16():
    assert make_plan(TextModelConfig(optimization_mode="memory"), device=CPU_OLD).dtype == torch.bfloat16
    assert make_plan(TextModelConfig(optimization_mode="memory"), device=V100).dtype == torch.float16


def test_fp8_only_where_the_hardware_has_it():
    from torchbridge.precisions import PrecisionNotSupportedError

    plan = make_plan(TextModelConfig(dtype=torch.float8_e4m3fn), device=H100)
    # the guide's dtype=float8 is the fp8 weight format over bf16 compute
    assert (plan.dtype, plan.quantization, plan.precision_name) == (
        torch.bfloat16, "fp8-weight-only", "fp8-weight-only")
    for device in (A100, CPU_BF16):
        with pytest.raises(PrecisionNotSupportedError, match="8.9"):
            make_plan(TextModelConfig(dtype=torch.float8_e4m3fn), device=device)
    with pytest.raises(PrecisionNotSupportedError, match="8.0"):
        make_plan(TextModelConfig(dtype=torch.bfloat16), device=V100)


def test_amp_only_with_half_precision():
    assert make_plan(TextModelConfig(dtype=torch.bfloat16, use_amp=True), device=CPU_BF16).amp
    assert not make_plan(TextModelConfig(dtype=torch.bfloat16, use_amp=False), device=CPU_BF16).amp
    fp32 = make_plan(TextModelConfig(dtype=torch.float32, use_amp=True), device=CPU_BF16)
    assert not fp32.amp and any("use_amp" in n for n in fp32.notes)
    assert not make_plan(TextModelConfig(dtype=torch.float32), device=CPU_BF16).notes


def test_default_amp_follows_the_dtype_and_explicit_values_win():
    """Left at its default, use_amp applies where the dtype needs it (fp16's range), not to bf16."""
    config = TextModelConfig()
    assert config.use_amp and not config.is_explicit("use_amp")
    bf16 = make_plan(config, device=CPU_BF16)
    assert bf16.dtype == torch.bfloat16 and not bf16.amp and "default" in bf16.amp_reason
    fp16 = make_plan(TextModelConfig(dtype=torch.float16), device=A100)
    assert fp16.amp and "65504" in fp16.amp_reason
    # a fallback or a measured choice re-applies the default to the new dtype
    assert bf16.with_precision(torch.float16, None, "test").amp
    assert not bf16.with_precision(torch.float32, None, "test").amp
    forced = make_plan(TextModelConfig(use_amp=True), device=CPU_BF16)
    assert forced.amp and forced.with_precision(torch.float16, None, "test").amp
    off = make_plan(TextModelConfig(dtype=torch.float16, use_amp=False), device=A100)
    assert not off.amp and not off.with_precision(torch.bfloat16, None, "test").amp
    # the default survives the copies a config goes through
    assert not copy.deepcopy(config).is_explicit("use_amp")
    assert not pickle.loads(pickle.dumps(config)).is_explicit("use_amp")


def test_compile_kwargs_per_device():
    cuda = make_plan(TextModelConfig(), device=A100)
    assert cuda.compile and cuda.compile_kwargs() == {"mode": "reduce-overhead"}
    cpu = make_plan(TextModelConfig(), device=CPU_BF16, kind="causal-lm")
    assert cpu.compile and cpu.compile_kwargs() == {"options": {"freezing": True}}
    assert any("CUDA graphs" in n for n in cpu.notes)
    auto = make_plan(TextModelConfig(optimization_mode="throughput"), device=CPU_BF16,
                     kind="causal-lm")
    assert auto.compile_kwargs()["options"]["max_autotune"] is True
    assert not any("cudagraphs" in k for k in auto.compile_kwargs()["options"])


def test_warmup_shape_is_clipped_to_the_model():
    plan = make_plan(TextModelConfig(warmup_seq_len=600), model_max_positions=128, device=CPU_BF16)
    assert plan.warmup_shape == (1, 128) and plan.max_sequence_length == 128


def test_cpu_float_encoders_skip_compile_unless_asked():
    auto = make_plan(TextModelConfig(), device=CPU_BF16)
    assert not auto.compile and "oneDNN" in auto.compile_reason
    assert make_plan(TextModelConfig(use_torch_compile=True), device=CPU_BF16).compile
    assert make_plan(TextModelConfig(compile_mode="max-autotune"), device=CPU_BF16).compile
    assert make_plan(TextModelConfig(quantization="int8-dynamic"), device=CPU_BF16).compile
    assert make_plan(TextModelConfig(), device=CPU_BF16, kind="module").compile


@pytest.mark.parametrize("copier", [
    lambda c: dataclasses.replace(c, verify=False),
    lambda c: __import__("copy").deepcopy(c),
    lambda c: __import__("pickle").loads(__import__("pickle").dumps(c)),
    lambda c: c.replace(warmup_steps=1),
])
def test_replace_copy_and_pickle_keep_the_preset(copier):
    memory = TextModelConfig(optimization_mode="memory")
    copied = copier(memory)
    assert not copied.is_explicit("compile_mode") and not copied.is_explicit("gradient_checkpointing")
    plan = make_plan(copied, device=A100)
    assert plan.compile_mode == "default" and plan.gradient_checkpointing
    # a field the user set stays set through the copy, even equal to the preset
    pinned = copier(TextModelConfig(optimization_mode="memory", compile_mode="default"))
    assert pinned.is_explicit("compile_mode")
    assert make_plan(dataclasses.replace(pinned, optimization_mode="throughput"),
                     device=A100).compile_mode == "default"


def test_changing_the_mode_by_replace_takes_the_new_preset():
    throughput = dataclasses.replace(TextModelConfig(optimization_mode="memory"),
                                     optimization_mode="throughput")
    assert throughput.compile_mode == "max-autotune" and throughput.select_precision == "speed"


def test_unknown_device_type_raises():
    with pytest.raises(ValueError, match="device table"):
        make_plan(TextModelConfig(), device=DeviceInfo("tpu", 0, "tpu", "google"))


def test_plan_round_trips_through_json():
    import json

    from torchbridge.pipeline.plan import Plan

    plan = make_plan(TextModelConfig(warmup_seq_len=48, trim_padding=False, max_sequence_length=200,
                                     quantization="int8-dynamic"), device=CPU_BF16)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())), CPU_BF16)
    assert again == plan


def test_auto_dtype_under_int8_dynamic_is_fp32_on_cpu_only():
    cpu = make_plan(TextModelConfig(quantization="int8-dynamic"), device=CPU_BF16)
    assert cpu.dtype == torch.float32 and "int8 GEMMs" in cpu.dtype_reason
    explicit = make_plan(TextModelConfig(quantization="int8-dynamic", dtype=torch.bfloat16),
                         device=CPU_BF16)
    assert explicit.dtype == torch.bfloat16
    assert make_plan(TextModelConfig(quantization="int8-dynamic"), device=A100).dtype == torch.bfloat16
    # a weight-only format keeps the device's auto dtype
    assert make_plan(TextModelConfig(quantization="int8-weight-only"),
                     device=CPU_BF16).dtype == torch.bfloat16
