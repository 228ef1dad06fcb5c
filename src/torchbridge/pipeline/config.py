"""The user's request: optimization modes, the configuration dataclass, and mode presets as data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from torchbridge.backends import validate_device_string

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
QUANTIZATION_CHOICES = (None, "int8-weight-only", "int8-dynamic")
DTYPE_CHOICES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)


class OptimizationMode(str, Enum):
    INFERENCE = "inference"
    THROUGHPUT = "throughput"
    MEMORY = "memory"
    BALANCED = "balanced"

    @classmethod
    def parse(cls, value: OptimizationMode | str) -> OptimizationMode:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(
                f"unknown optimization_mode {value!r}; valid choices: "
                f"{', '.join(m.value for m in cls)}"
            ) from None


class TextModelType(str, Enum):
    BERT = "bert"
    GPT2 = "gpt2"
    DISTILBERT = "distilbert"
    ROBERTA = "roberta"
    ALBERT = "albert"
    CUSTOM = "custom"


# A mode is a row of concrete settings, not a code path. Each row is applied to every field the
# user did not set explicitly. "half" means bf16 where native, else fp16 on GPUs, else bf16 storage.
MODE_PRESETS: dict[OptimizationMode, dict[str, Any]] = {
    # Lowest latency for one request: native low precision, CUDA graphs on CUDA (per-call launch
    # overhead dominates at batch 1), warm-up at batch 1.
    OptimizationMode.INFERENCE: {
        "dtype": "auto",
        "use_torch_compile": True,
        "compile_mode": "reduce-overhead",
        "gradient_checkpointing": False,
        "enable_memory_efficient_attention": True,
        "warmup_batch_size": 1,
    },
    # Large batches: the most aggressive compile (autotuned GEMM templates), warm-up at batch 32.
    OptimizationMode.THROUGHPUT: {
        "dtype": "auto",
        "use_torch_compile": True,
        "compile_mode": "max-autotune",
        "gradient_checkpointing": False,
        "enable_memory_efficient_attention": True,
        "warmup_batch_size": 32,
    },
    # Smallest footprint: half-precision weights always, no CUDA-graph memory pools,
    # gradient checkpointing on (it only affects training, which the report says).
    OptimizationMode.MEMORY: {
        "dtype": "half",
        "use_torch_compile": True,
        "compile_mode": "default",
        "gradient_checkpointing": True,
        "enable_memory_efficient_attention": True,
        "warmup_batch_size": 1,
    },
    # Between inference and throughput: plain inductor compile, warm-up at batch 8.
    OptimizationMode.BALANCED: {
        "dtype": "auto",
        "use_torch_compile": True,
        "compile_mode": "default",
        "gradient_checkpointing": False,
        "enable_memory_efficient_attention": True,
        "warmup_batch_size": 8,
    },
}


@dataclass
class TextModelConfig:
    """What the user asks for. Fields the user sets explicitly win over the mode's preset."""

    model_name: str = "bert-base-uncased"
    model_type: TextModelType = TextModelType.BERT
    max_sequence_length: int = 512
    optimization_mode: OptimizationMode = OptimizationMode.INFERENCE
    use_torch_compile: bool = True
    compile_mode: str = "reduce-overhead"
    dtype: torch.dtype | None = None  # None = auto: the fastest precision the device computes natively
    use_amp: bool = True  # autocast around the forward (see precision.py for what it does)
    gradient_checkpointing: bool = False
    enable_memory_efficient_attention: bool = True
    device: str = "auto"
    warmup_steps: int = 3
    enable_profiling: bool = False
    # --- extras beyond the guide, each real and tested ---
    random_weights: bool = False  # build the architecture with random weights (benchmarking only)
    quantization: str | None = None  # None, "int8-weight-only" or "int8-dynamic"
    verify: bool = True  # compare against the fp32 eager model after optimizing
    verify_tolerance: float | None = None  # None = per-dtype default (see verify.py)
    warmup_batch_size: int = 1
    warmup_seq_len: int = 128
    trim_padding: bool = True  # encoders: run padded batches in trimmed groups (see padding.py)
    _explicit: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.optimization_mode = OptimizationMode.parse(self.optimization_mode)
        if isinstance(self.model_type, str):
            try:
                self.model_type = TextModelType(self.model_type.lower())
            except ValueError:
                raise ValueError(
                    f"unknown model_type {self.model_type!r}; valid choices: "
                    f"{', '.join(t.value for t in TextModelType)}"
                ) from None
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"unknown compile_mode {self.compile_mode!r}; valid choices: {', '.join(COMPILE_MODES)}"
            )
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise ValueError(
                f"dtype must be None (auto) or one of {', '.join(map(str, DTYPE_CHOICES))}; "
                f"got {self.dtype!r}"
            )
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0'; "
                             f"got {self.device!r}")
        validate_device_string(self.device.strip().lower())
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(
                f"unknown quantization {self.quantization!r}; valid choices: {QUANTIZATION_CHOICES}"
            )
        for name in ("warmup_steps",):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {getattr(self, name)!r}")
        for name in ("max_sequence_length", "warmup_batch_size", "warmup_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {getattr(self, name)!r}")
        if self.verify_tolerance is not None and not self.verify_tolerance > 0:
            raise ValueError(f"verify_tolerance must be > 0; got {self.verify_tolerance!r}")

    def is_explicit(self, name: str) -> bool:
        """True when the user passed this field (then it wins over the mode preset)."""
        return name in self._explicit

    def replace(self, **changes: Any) -> TextModelConfig:
        """A copy with some fields changed; those fields count as explicitly set."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        kwargs.update(changes)
        new = TextModelConfig(**kwargs)
        object.__setattr__(new, "_explicit", self._explicit | frozenset(changes))
        return new


_FIELD_ORDER = [f.name for f in dataclasses.fields(TextModelConfig) if f.init]
_dataclass_init = TextModelConfig.__init__


def _recording_init(self: TextModelConfig, *args: Any, **kwargs: Any) -> None:
    # Record which fields the caller named so that presets never override an explicit choice,
    # even one equal to the default (e.g. compile_mode="reduce-overhead" with THROUGHPUT).
    _dataclass_init(self, *args, **kwargs)
    self._explicit = frozenset(_FIELD_ORDER[: len(args)]) | frozenset(kwargs)


TextModelConfig.__init__ = _recording_init  # type: ignore[method-assign]
