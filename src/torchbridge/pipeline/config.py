"""The user's request: optimization modes, the configuration dataclass, and mode presets as data."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from torchbridge.backends import validate_device_string
from torchbridge.precisions import DTYPE_ALIASES, DTYPE_NAMES, WEIGHT_FORMATS

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
QUANTIZATION_CHOICES = (None, *WEIGHT_FORMATS)
DTYPE_CHOICES = (*DTYPE_NAMES, *DTYPE_ALIASES)
SELECT_PRECISION_CHOICES = (None, "speed", "size")


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
        "select_precision": None,
    },
    # Large batches: the most aggressive compile (autotuned GEMM templates), warm-up at batch 32, and
    # the precision chosen by measurement: the fastest candidate that passes the gate.
    OptimizationMode.THROUGHPUT: {
        "dtype": "auto",
        "use_torch_compile": True,
        "compile_mode": "max-autotune",
        "gradient_checkpointing": False,
        "enable_memory_efficient_attention": True,
        "warmup_batch_size": 32,
        "select_precision": "speed",
    },
    # Smallest footprint: the smallest weights that pass the gate (int8 weight-only, else half
    # precision), no CUDA-graph memory pools, gradient checkpointing on (training only, as the
    # report says).
    OptimizationMode.MEMORY: {
        "dtype": "half",
        "use_torch_compile": True,
        "compile_mode": "default",
        "gradient_checkpointing": True,
        "enable_memory_efficient_attention": True,
        "warmup_batch_size": 1,
        "select_precision": "size",
    },
    # Between inference and throughput: plain inductor compile, warm-up at batch 8.
    OptimizationMode.BALANCED: {
        "dtype": "auto",
        "use_torch_compile": True,
        "compile_mode": "default",
        "gradient_checkpointing": False,
        "enable_memory_efficient_attention": True,
        "warmup_batch_size": 8,
        "select_precision": None,
    },
}


class _Preset:
    """Marks a field value that came from the mode preset, not from the user.

    The markers are ordinary ``str``/``int`` values (a config reads as it behaves), so they survive
    ``dataclasses.replace``, ``copy`` and ``pickle`` and keep meaning "not set": a replace that
    changes the mode re-resolves them, while a value the user passed (a plain ``str``/``int``/
    ``bool``) always wins, even when it equals the preset's.
    """


class _PresetStr(_Preset, str):
    pass


class _PresetInt(_Preset, int):
    pass


class _PresetFlag(_Preset, int):
    """A preset boolean (``bool`` cannot be subclassed); equal to True/False, prints as them."""

    def __repr__(self) -> str:
        return repr(bool(self))

    __str__ = __repr__


class _PresetNone(_Preset):
    """The preset's ``None`` (for fields whose preset value may be None)."""

    def __repr__(self) -> str:
        return "None"

    def __eq__(self, other: object) -> bool:
        return other is None or isinstance(other, _PresetNone)

    def __hash__(self) -> int:
        return hash(None)

    def __bool__(self) -> bool:
        return False


def _mark(value: Any) -> Any:
    if isinstance(value, bool):
        return _PresetFlag(value)
    if isinstance(value, int):
        return _PresetInt(value)
    if isinstance(value, str):
        return _PresetStr(value)
    if value is None:
        return _PresetNone()
    raise TypeError(f"no preset marker for {value!r}")


def _plain(value: Any) -> Any:
    """A preset marker as the plain value it stands for."""
    if isinstance(value, _PresetFlag):
        return bool(value)
    if isinstance(value, _PresetInt):
        return int(value)
    if isinstance(value, _PresetStr):
        return str(value)
    if isinstance(value, _PresetNone):
        return None
    return value


# Fields a preset fills when the user leaves them unset (dtype: None means "the mode's choice",
# resolved by the plan with the device in hand).
PRESET_FIELDS = tuple(k for k in MODE_PRESETS[OptimizationMode.INFERENCE] if k != "dtype")
_INFERENCE = MODE_PRESETS[OptimizationMode.INFERENCE]


@dataclass
class TextModelConfig:
    """What the user asks for. Fields the user sets explicitly win over the mode's preset; the
    others read as the preset's values for the chosen mode."""

    model_name: str = "bert-base-uncased"  # what optimize() loads when given no name
    model_type: TextModelType | None = None  # when set (not CUSTOM): checked against the loaded model
    max_sequence_length: int = 512
    optimization_mode: OptimizationMode = OptimizationMode.INFERENCE
    use_torch_compile: bool = _mark(True)
    compile_mode: str = _mark(_INFERENCE["compile_mode"])
    dtype: torch.dtype | None = None  # None = the mode's choice (auto: fastest native precision)
    # mixed precision (see precisions/casting.py). Left at its default, the plan applies it where
    # the dtype needs it (fp16); True or False passed explicitly always wins.
    use_amp: bool = _mark(True)
    gradient_checkpointing: bool = _mark(False)
    enable_memory_efficient_attention: bool = _mark(True)
    device: str = "auto"
    warmup_steps: int = 3
    enable_profiling: bool = False
    # --- extras beyond the guide, each real and tested ---
    random_weights: bool = False  # build the architecture with random weights (benchmarking only)
    quantization: str | None = None  # a weight format: see torchbridge.precisions
    verify: bool | None = None  # None: verify a fresh optimize, trust a saved folder's check
    verify_tolerance: float | None = None  # largest 1 - cosine allowed; None = the precision's gate
    warmup_batch_size: int = _mark(_INFERENCE["warmup_batch_size"])
    warmup_seq_len: int = 128
    trim_padding: bool = True  # encoders: run padded batches in trimmed groups (see padding.py)
    select_precision: str | None = _mark(None)  # "speed" / "size": measure candidates, keep the best

    def __post_init__(self) -> None:
        self.optimization_mode = OptimizationMode.parse(self.optimization_mode)
        preset = MODE_PRESETS[self.optimization_mode]
        for name in PRESET_FIELDS:
            if isinstance(getattr(self, name), _Preset):
                object.__setattr__(self, name, _mark(preset[name]))
        self._validate()

    def _validate(self) -> None:
        if self.model_type is not None and not isinstance(self.model_type, TextModelType):
            try:
                self.model_type = TextModelType(str(self.model_type).lower())
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
        if self.select_precision not in SELECT_PRECISION_CHOICES:
            raise ValueError(f"unknown select_precision {self.select_precision!r}; valid choices: "
                             f"{SELECT_PRECISION_CHOICES}")
        if self.quantization and self.dtype in DTYPE_ALIASES:
            raise ValueError(f"dtype={self.dtype} already names a weight format; drop "
                             f"quantization={self.quantization!r} or use a float dtype")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {self.warmup_steps!r}")
        for name in ("max_sequence_length", "warmup_batch_size", "warmup_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {getattr(self, name)!r}")
        if self.verify_tolerance is not None and not 0 < self.verify_tolerance < 1:
            raise ValueError(f"verify_tolerance is a cosine distance in (0, 1); got "
                             f"{self.verify_tolerance!r}")

    def is_explicit(self, name: str) -> bool:
        """True when the user set this field (then it wins over the mode preset)."""
        value = getattr(self, name)
        if isinstance(value, _Preset):
            return False
        if name in ("dtype", "verify", "model_type"):
            return value is not None
        return True

    def setting(self, name: str) -> Any:
        """The field's value as a plain Python value (preset markers unwrapped)."""
        return _plain(getattr(self, name))

    def replace(self, **changes: Any) -> TextModelConfig:
        """A copy with some fields changed (the same as ``dataclasses.replace``)."""
        import dataclasses

        return dataclasses.replace(self, **changes)
