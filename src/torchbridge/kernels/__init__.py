"""CPU kernels torch does not have, compiled on first use with the system's C++ compiler.

Encoder attention on a CPU without AMX has no good kernel in torch: SDPA's flash kernel splits
heads into small blocks with a BLAS call each, and two batched GEMMs (pipeline/attention.py)
first copy q, k and v out of the fused projection, then write the scores and read them back three
times for the softmax. ``attention_bf16.cpp`` does a (sequence, head) at a time in one pass, with
AVX512_BF16 dot products, an fp32 softmax and no copies of q/k/v, and takes sequences packed back
to back, so a batch with its padding removed attends in one call. ``layer_norm_bf16.cpp`` ends a
post-LN encoder block: the residual add and the LayerNorm in one pass over the rows.
``decode_step.cpp`` is a GPT-2 or Llama batch-1 decode step in one call
(generation/native_step.py binds it).

It is plain C++ without torch's headers, so it builds in about a second, the way inductor builds
its CPU kernels (same compiler, ``-march=native``, OpenMP). The shared library is cached under
``$TORCHBRIDGE_KERNELS`` (default ``~/.cache/torchbridge/kernels``), named by a hash of its
source, flags, compiler and CPU (a library built for one CPU may not run on another sharing the
cache), and loaded with ctypes after torch, so its OpenMP shares torch's libgomp. Where it cannot
be built (no compiler, no AVX512_BF16), `unavailable` says why and nothing offers it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from torchbridge.backends import cpu_flags, cpu_isa, cpu_name

_SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))  # built together into one library
_HEADERS = sorted(Path(__file__).parent.glob("*.h"))
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


def _cache_dir() -> Path:
    return Path(os.environ.get("TORCHBRIDGE_KERNELS", "~/.cache/torchbridge/kernels")).expanduser()


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The built library, or why it cannot be built here."""
    if "avx512_bf16" not in cpu_isa():
        return "this CPU has no AVX512_BF16"
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return "no C++ compiler found (install g++ or set CXX)"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    texts = [path.read_text() for path in _SOURCES + _HEADERS]
    key = hashlib.sha256("\n".join([*texts, *_FLAGS, version, cpu_name(),
                                    *sorted(cpu_flags())]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"torchbridge_kernels-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                result = subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", str(built)],
                                        capture_output=True, text=True, timeout=300)
                if result.returncode != 0:
                    return (f"{compiler} failed to build {', '.join(s.name for s in _SOURCES)}: "
                            f"{result.stderr.strip()[-400:]}")
                built.replace(target)  # atomic: a concurrent build leaves one whole file
        except (OSError, subprocess.TimeoutExpired) as err:
            return (f"could not build it in {target.parent} ({err}); set TORCHBRIDGE_KERNELS to "
                    f"a writable folder")
    library = ctypes.CDLL(str(target))
    library.tb_attention_bf16.restype = ctypes.c_int
    library.tb_attention_bf16.argtypes = [
        ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_float, ctypes.c_int]
    library.tb_add_layer_norm_bf16.restype = ctypes.c_int
    library.tb_add_layer_norm_bf16.argtypes = [
        ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
        ctypes.c_int, ctypes.c_int]
    library.tb_decode_scratch.restype = ctypes.c_long
    library.tb_decode_scratch.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
    library.tb_decode_tokens.restype = ctypes.c_int
    library.tb_decode_tokens.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
    return library


def unavailable() -> str | None:
    """Why the kernels cannot run on this machine, or None."""
    library = _library()
    return library if isinstance(library, str) else None


def attention(qkv: Tensor, heads: int, scaling: float, *, lengths: Tensor | None = None,
              key_bias: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scaling + key_bias) v per sequence and head of a bf16 fused projection
    (each token's row holds q, k and v side by side, ``heads`` heads of d features, d a multiple
    of 16; rows may be strided, features contiguous):

    * ``qkv`` [batch, seq, 3 * heads * d]: a batch of equal-length sequences; ``key_bias`` an
      additive [batch, seq] (0, or a large negative for padding) or None.
      Returns [batch, seq, heads * d].
    * ``qkv`` [rows, 3 * heads * d] and ``lengths`` [sequences]: sequences packed back to back
      from row 0, no padding. Returns [rows, heads * d], rows past the last sequence zero.
    """
    width = qkv.shape[-1]
    d = width // (3 * heads)
    if qkv.dtype != torch.bfloat16 or qkv.device.type != "cpu" or qkv.stride(-1) != 1 \
            or d * 3 * heads != width or d % 16 or qkv.dim() != (2 if lengths is not None else 3):
        raise ValueError(f"fused attention takes a CPU bf16 [batch, seq, 3 * heads * d] tensor, "
                         f"or [rows, 3 * heads * d] with lengths, with d a multiple of 16; got "
                         f"{qkv.dtype} {tuple(qkv.shape)} on {qkv.device} for {heads} heads")
    if lengths is None:
        batch, seq = qkv.shape[:2]
        if key_bias is not None and tuple(key_bias.shape) != (batch, seq):
            raise ValueError(f"key_bias must be [batch, seq] = {[batch, seq]}, "
                             f"got {list(key_bias.shape)}")
        if batch > 1 and qkv.stride(0) != seq * qkv.stride(1):
            qkv = qkv.contiguous()  # sequences back to back: one row stride for all
        rows = qkv.flatten(0, 1)
        lengths = torch.full((batch,), seq, dtype=torch.int32)
    elif key_bias is not None:
        raise ValueError("key_bias goes with a [batch, seq, ...] qkv; packed sequences (lengths) "
                         "have no padding to mask")
    else:
        rows, lengths = qkv, lengths.to(torch.int32).contiguous()
    if torch.compiler.is_compiling():  # opaque to dynamo; eager calls skip the op's dispatch
        out = _attention_op(rows, lengths, key_bias, heads, scaling)
    else:
        out = _attention(rows, lengths, key_bias, heads, scaling)
    return out if qkv.dim() == 2 else out.view(*qkv.shape[:2], heads * d)


def _loaded(kernel: str) -> ctypes.CDLL:
    """The built library, or a RuntimeError saying why ``kernel`` cannot run here."""
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(f"torchbridge's {kernel} kernel cannot run here: {library}")
    return library


def _attention(rows: Tensor, lengths: Tensor, key_bias: Tensor | None, heads: int,
               scaling: float) -> Tensor:
    library = _loaded("fused attention")
    # checked and summed as Python ints: a handful of sequences, called once a layer, where
    # each torch op on them cost ~50 us
    counts = lengths.tolist()
    used = sum(counts)
    if used > len(rows) or min(counts, default=0) < 0:
        raise ValueError(f"lengths must be >= 0 and fit the {len(rows)} rows of qkv, got "
                         f"{counts[:8]} (sum {used})")
    starts = torch.tensor(list(itertools.accumulate(counts, initial=0))[:-1], dtype=torch.int64)
    out = rows.new_empty(len(rows), rows.shape[1] // 3)
    if used < len(rows):
        out[used:] = 0
    if key_bias is not None:
        key_bias = key_bias.to(torch.float32).contiguous()
    status = library.tb_attention_bf16(
        rows.data_ptr(), rows.stride(0), starts.data_ptr(), lengths.data_ptr(),
        None if key_bias is None else key_bias.data_ptr(),
        0 if key_bias is None else key_bias.stride(0), out.data_ptr(), out.stride(0),
        len(lengths), heads, out.shape[1] // heads, scaling, torch.get_num_threads())
    if status:
        raise RuntimeError(f"fused attention kernel failed (status {status}) on rows "
                           f"{tuple(rows.shape)}, {heads} heads")
    return out


@torch.library.custom_op("torchbridge::attention_bf16", mutates_args=())
def _attention_op(rows: Tensor, lengths: Tensor, key_bias: Tensor | None, heads: int,
                  scaling: float) -> Tensor:
    return _attention(rows, lengths, key_bias, heads, scaling)


@_attention_op.register_fake
def _(rows: Tensor, lengths: Tensor, key_bias: Tensor | None, heads: int,
      scaling: float) -> Tensor:
    return rows.new_empty(rows.shape[0], rows.shape[1] // 3)


def add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                   eps: float) -> Tensor:
    """``layer_norm(x + residual)`` over the last dimension of bf16 CPU tensors of one shape
    (the width a multiple of 16), the add and the statistics in fp32; ``weight`` and ``bias``
    are the LayerNorm's (used in bf16)."""
    width = x.shape[-1]
    if x.dtype != torch.bfloat16 or residual.dtype != torch.bfloat16 or x.device.type != "cpu" \
            or residual.shape != x.shape or width % 16 or weight.shape != (width,) \
            or bias.shape != (width,):
        raise ValueError(f"fused add + LayerNorm takes two CPU bf16 tensors of one shape, the "
                         f"last dimension a multiple of 16, and a weight and bias of that width; "
                         f"got {x.dtype} {tuple(x.shape)} on {x.device}, {residual.dtype} "
                         f"{tuple(residual.shape)}, weight {tuple(weight.shape)}")
    if torch.compiler.is_compiling():
        return _add_layer_norm_op(x, residual, weight, bias, eps)
    return _add_layer_norm(x, residual, weight, bias, eps)


def _add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                    eps: float) -> Tensor:
    library = _loaded("fused add + LayerNorm")
    width = x.shape[-1]
    rows, res = x.reshape(-1, width), residual.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if res.stride(-1) != 1:
        res = res.contiguous()
    gamma = weight.detach().to(torch.bfloat16).contiguous()
    beta = bias.detach().to(torch.bfloat16).contiguous()
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    status = library.tb_add_layer_norm_bf16(
        rows.data_ptr(), rows.stride(0), res.data_ptr(), res.stride(0), gamma.data_ptr(),
        beta.data_ptr(), eps, out.data_ptr(), width, len(rows), width, torch.get_num_threads())
    if status:
        raise RuntimeError(f"fused add + LayerNorm kernel failed (status {status}) on rows "
                           f"{tuple(rows.shape)}")
    return out


@torch.library.custom_op("torchbridge::add_layer_norm_bf16", mutates_args=())
def _add_layer_norm_op(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                       eps: float) -> Tensor:
    return _add_layer_norm(x, residual, weight, bias, eps)


@_add_layer_norm_op.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x)
