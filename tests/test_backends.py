import subprocess
import sys

import pytest
import torch

from torchbridge import backends
from torchbridge.backends import (
    DeviceInfo,
    DeviceNotAvailableError,
    detect,
    supports_bf16,
    supports_fp8,
    supports_fp16,
)


def _dev(type_, vendor, capability=None, isa=()):
    return DeviceInfo(type_, 0 if type_ != "cpu" else None, "made-up", vendor,
                      capability=capability, cpu_isa=frozenset(isa))


@pytest.mark.parametrize("info, bf16, fp16, fp8", [
    (_dev("cuda", "nvidia", (7, 5)), False, True, False),
    (_dev("cuda", "nvidia", (8, 0)), True, True, False),
    (_dev("cuda", "nvidia", (8, 9)), True, True, True),
    (_dev("cuda", "nvidia", (9, 0)), True, True, True),
    (_dev("cuda", "amd"), True, True, False),
    (_dev("xpu", "intel"), True, True, False),
    (_dev("cpu", "cpu", isa={"avx2"}), False, False, False),
    (_dev("cpu", "cpu", isa={"avx512", "avx512_bf16"}), True, False, False),
    (_dev("cpu", "cpu", isa={"amx", "amx_bf16", "amx_fp16"}), True, True, False),
])
def test_capability_predicates(info, bf16, fp16, fp8):
    assert (supports_bf16(info), supports_fp16(info), supports_fp8(info)) == (bf16, fp16, fp8)


def test_backend_names():
    assert _dev("cuda", "amd").backend == "rocm"
    assert _dev("cuda", "nvidia", (9, 0)).backend == "cuda"
    assert _dev("cpu", "cpu").torch_device == torch.device("cpu")


def test_detect_cpu_reads_the_isa():
    info = detect("cpu")
    assert info.type == "cpu" and info.torch_device == torch.device("cpu")
    flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    assert ("avx512_bf16" in info.cpu_isa) == (" avx512_bf16" in flags)
    described = backends.describe(info)
    assert described["bf16"] == supports_bf16(info) and "cpu_isa" in described


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
@pytest.mark.parametrize("request_", ["cuda", "cuda:1", "hip", "rocm"])
def test_absent_gpu_raises_with_what_exists(request_):
    with pytest.raises(DeviceNotAvailableError, match="Devices here: cpu"):
        detect(request_)


@pytest.mark.skipif(hasattr(torch, "xpu") and torch.xpu.is_available(), reason="an XPU is present")
def test_absent_xpu_raises():
    with pytest.raises(DeviceNotAvailableError, match="xpu"):
        detect("xpu")


def test_unknown_device_string():
    with pytest.raises(ValueError, match="valid choices"):
        detect("gpu")


def test_auto_on_this_machine_matches_torch():
    info = detect("auto")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert info.type == expected
    elif not (hasattr(torch, "xpu") and torch.xpu.is_available()) and not torch.backends.mps.is_available():
        assert info.type == "cpu"


def test_import_probes_no_device():
    code = (
        "import torch, torchbridge, torchbridge.models.text as t, torchbridge.backends as b\n"
        "assert b.cpu_isa.cache_info().currsize == 0, 'cpu probed at import'\n"
        "assert not torch.cuda.is_initialized(), 'cuda initialised at import'\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
