"""Facts about the torch device a model runs on, probed once and lazily.

A backend here is not a code path: it is a frozen :class:`DeviceInfo` read off torch, plus pure
predicates over it. AMD GPUs are ``cuda`` devices in a ROCm build (``torch.version.hip`` set);
Intel GPUs are ``xpu``. Nothing in this module runs at import time.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "hip", "rocm", "xpu", "xpu:N", "mps")


class DeviceNotAvailableError(RuntimeError):
    """An explicitly requested device does not exist on this machine."""


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # torch.device type: "cpu", "cuda", "xpu" or "mps"
    index: int | None
    name: str
    vendor: str  # "nvidia", "amd", "intel", "apple" or "cpu"
    capability: tuple[int, int] | None = None  # CUDA compute capability (NVIDIA only)
    cpu_isa: frozenset[str] = field(default_factory=frozenset)
    total_memory: int | None = None  # bytes of device memory, None on CPU
    arch: str | None = None  # e.g. the ROCm gfx name

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index) if self.index is not None else torch.device(self.type)

    @property
    def backend(self) -> str:
        """The software stack: cuda, rocm, xpu, mps or cpu."""
        if self.type == "cuda":
            return "rocm" if self.vendor == "amd" else "cuda"
        return self.type


# --- capability predicates: pure functions of DeviceInfo, unit-tested on made-up devices -------


def supports_bf16(info: DeviceInfo) -> bool:
    """True where bf16 matmuls run natively (not emulated through fp32)."""
    if info.type == "cuda":
        if info.vendor == "amd":
            return True  # every ROCm-supported Instinct/RDNA3 GPU computes bf16
        return info.capability is not None and info.capability >= (8, 0)
    if info.type == "xpu":
        return True
    if info.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & info.cpu_isa)
    return False  # mps: bf16 exists on recent macOS but is not faster than fp16


def supports_fp16(info: DeviceInfo) -> bool:
    """True where fp16 matmuls run natively at tensor-core / matrix-engine speed."""
    if info.type == "cuda":
        return info.vendor == "amd" or (info.capability is not None and info.capability >= (7, 0))
    return info.type in ("xpu", "mps") or (info.type == "cpu" and "amx_fp16" in info.cpu_isa)


def supports_fp8(info: DeviceInfo) -> bool:
    """True where fp8 (e4m3) matmuls exist: NVIDIA compute capability 8.9+ (Ada, Hopper, ...)."""
    return info.type == "cuda" and info.vendor == "nvidia" and (info.capability or (0, 0)) >= (8, 9)


# --- probing ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """Every feature flag the kernel reports for the CPU (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass  # not Linux: cpu_isa falls back to what torch reports
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_isa() -> frozenset[str]:
    """The CPU vector and matrix extensions that decide precision choices on CPU."""
    flags = cpu_flags()
    isa = set()
    for flag, name in [
        ("avx2", "avx2"),
        ("avx512f", "avx512"),
        ("avx512_bf16", "avx512_bf16"),
        ("avx512_vnni", "avx512_vnni"),
        ("avx_vnni", "avx_vnni"),
        ("amx_tile", "amx"),
        ("amx_bf16", "amx_bf16"),
        ("amx_int8", "amx_int8"),
        ("amx_fp16", "amx_fp16"),
        ("avx512_fp16", "avx512_fp16"),
    ]:
        if flag in flags:
            isa.add(name)
    if not flags:
        capability = torch.backends.cpu.get_cpu_capability()  # e.g. "AVX512", "AVX2", "DEFAULT"
        if capability == "AVX512":
            isa.update({"avx2", "avx512"})
        elif capability == "AVX2":
            isa.add("avx2")
    if platform.machine().lower() in ("arm64", "aarch64"):
        isa.add("neon")
    return frozenset(isa)


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (for reports and bug reports), e.g. 'AMD EPYC 9R45'."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_info() -> DeviceInfo:
    return DeviceInfo(type="cpu", index=None, name=cpu_name(), vendor="cpu", cpu_isa=cpu_isa())


def _cuda_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    amd = torch.version.hip is not None
    return DeviceInfo(
        type="cuda",
        index=index,
        name=props.name,
        vendor="amd" if amd else "nvidia",
        capability=None if amd else (props.major, props.minor),
        cpu_isa=cpu_isa(),
        total_memory=props.total_memory,
        arch=getattr(props, "gcnArchName", None) if amd else None,
    )


def _xpu_info(index: int) -> DeviceInfo:
    props = torch.xpu.get_device_properties(index)
    return DeviceInfo(type="xpu", index=index, name=props.name, vendor="intel",
                      cpu_isa=cpu_isa(), total_memory=getattr(props, "total_memory", None))


def _xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _mps_available() -> bool:
    return torch.backends.mps.is_available()


def available_devices() -> list[str]:
    """Every device torch can use here, as strings for error messages."""
    found = ["cpu"]
    if torch.cuda.is_available():
        kind = "hip" if torch.version.hip else "cuda"
        found += [f"cuda:{i} ({kind})" for i in range(torch.cuda.device_count())]
    if _xpu_available():
        found += [f"xpu:{i}" for i in range(torch.xpu.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def _absent(requested: str, why: str) -> DeviceNotAvailableError:
    return DeviceNotAvailableError(
        f"device {requested!r} was requested but {why}. Devices here: "
        f"{', '.join(available_devices())}. Fix: pass one of those, or device='auto'."
    )


def _parse_index(requested: str, kind: str) -> int:
    _, _, idx = requested.partition(":")
    if not idx:
        return 0
    if not idx.isdigit():
        raise ValueError(f"device {requested!r}: the index must be a number, e.g. '{kind}:0'")
    return int(idx)


def validate_device_string(requested: str) -> None:
    """Raise ValueError for a device string that names no known kind (without probing)."""
    kind = requested.split(":", 1)[0]
    if kind not in ("auto", "cpu", "cuda", "hip", "rocm", "xpu", "mps") or (
        ":" in requested and kind not in ("cuda", "hip", "rocm", "xpu")
    ):
        raise ValueError(
            f"unknown device {requested!r}; valid choices: {', '.join(DEVICE_CHOICES)}"
        )
    if ":" in requested:
        _parse_index(requested, kind)


def detect(requested: str = "auto") -> DeviceInfo:
    """Resolve a device request to a :class:`DeviceInfo`.

    "auto" picks the first accelerator present (CUDA/ROCm, then XPU, then MPS) else the CPU.
    Any explicit request that cannot be met raises :class:`DeviceNotAvailableError`.
    """
    requested = requested.strip().lower()
    validate_device_string(requested)
    kind = requested.split(":", 1)[0]
    if kind == "auto":
        if torch.cuda.is_available():
            return _cuda_info(torch.cuda.current_device())
        if _xpu_available():
            return _xpu_info(0)
        if _mps_available():
            return DeviceInfo(type="mps", index=None, name="Apple GPU", vendor="apple",
                              cpu_isa=cpu_isa())
        return _cpu_info()
    if kind == "cpu":
        return _cpu_info()
    if kind in ("cuda", "hip", "rocm"):
        index = _parse_index(requested, kind)
        if kind in ("hip", "rocm") and torch.version.hip is None:
            raise _absent(requested, "this PyTorch is not a ROCm build (torch.version.hip is None)")
        if kind == "cuda" and torch.version.cuda is None and torch.version.hip is None:
            raise _absent(requested, "this PyTorch was built without CUDA")
        if not torch.cuda.is_available():
            raise _absent(requested, "no GPU is visible to PyTorch")
        if index >= torch.cuda.device_count():
            raise _absent(requested, f"only {torch.cuda.device_count()} GPU(s) exist")
        return _cuda_info(index)
    if kind == "xpu":
        index = _parse_index(requested, kind)
        if not _xpu_available():
            raise _absent(requested, "no Intel GPU is visible through torch.xpu")
        if index >= torch.xpu.device_count():
            raise _absent(requested, f"only {torch.xpu.device_count()} XPU(s) exist")
        return _xpu_info(index)
    if not _mps_available():  # kind == "mps"
        raise _absent(requested, "the Apple MPS backend is not available")
    return DeviceInfo(type="mps", index=None, name="Apple GPU", vendor="apple", cpu_isa=cpu_isa())


# --- the device table: what differs per torch device type, in one place ----------------------


@dataclass(frozen=True)
class DeviceOps:
    """Per-device-type operations. Every device branch of the library reads this table; a device
    type without a row raises instead of silently taking the CPU's branches."""

    synchronize: Callable[[torch.device], None]
    memory_allocated: Callable[[torch.device], int] | None  # bytes held by tensors; None: no counter
    max_memory_allocated: Callable[[torch.device], int] | None
    reset_peak_memory: Callable[[torch.device], None] | None
    profiler_activity: str | None  # torch.profiler.ProfilerActivity name beside CPU
    graph_capture: bool  # "reduce-overhead" replays captured graphs (CUDA graphs) here
    compile_freezing: bool  # inductor freezing: weights folded into constants, prepacked GEMMs
    # bf16 linears can hold their weights in oneDNN's blocked layout (pipeline/packing.py): oneDNN
    # is built in and the CPU computes bf16 natively (otherwise oneDNN emulates it)
    packs_linear_weights: bool = False


def _no_sync(device: torch.device) -> None:
    """CPU ops run synchronously: nothing is queued."""


DEVICE_TABLE: dict[str, DeviceOps] = {
    "cpu": DeviceOps(_no_sync, None, None, None, None, graph_capture=False, compile_freezing=True,
                     packs_linear_weights=torch.backends.mkldnn.is_available()
                     and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    "cuda": DeviceOps(
        torch.cuda.synchronize, torch.cuda.memory_allocated, torch.cuda.max_memory_allocated,
        torch.cuda.reset_peak_memory_stats, "CUDA", graph_capture=True, compile_freezing=False),
    "xpu": DeviceOps(
        lambda d: torch.xpu.synchronize(d), lambda d: torch.xpu.memory_allocated(d),
        lambda d: torch.xpu.max_memory_allocated(d), lambda d: torch.xpu.reset_peak_memory_stats(d),
        "XPU", graph_capture=False, compile_freezing=False),
    "mps": DeviceOps(
        lambda d: torch.mps.synchronize(), lambda d: torch.mps.current_allocated_memory(), None, None,
        None, graph_capture=False, compile_freezing=False),
}


def device_ops(device: torch.device | str | DeviceInfo) -> DeviceOps:
    """The table row for a device (a DeviceInfo, torch.device or string such as 'cuda:0')."""
    kind = device.type if isinstance(device, (DeviceInfo, torch.device)) else torch.device(device).type
    try:
        return DEVICE_TABLE[kind]
    except KeyError:
        raise ValueError(f"device type {kind!r} has no entry in torchbridge's device table; known: "
                         f"{', '.join(DEVICE_TABLE)}") from None


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on the device; a no-op on CPU, where ops run synchronously."""
    device = torch.device(device)
    device_ops(device).synchronize(device)


def describe(info: DeviceInfo) -> dict:
    """A JSON-ready description of the device and what it computes natively."""
    return {
        "type": info.type,
        "index": info.index,
        "backend": info.backend,
        "name": info.name,
        "vendor": info.vendor,
        "compute_capability": ".".join(map(str, info.capability)) if info.capability else None,
        "arch": info.arch,
        "total_memory_gb": round(info.total_memory / 2**30, 2) if info.total_memory else None,
        "bf16": supports_bf16(info),
        "fp16": supports_fp16(info),
        "fp8": supports_fp8(info),
        "cpu_isa": sorted(info.cpu_isa),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
