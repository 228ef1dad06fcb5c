"""How CPU worker threads wait between parallel regions (reported; the user chooses).

PyTorch's CPU kernels (ATen, oneDNN, inductor's generated code) run on GNU OpenMP (libgomp).
Between parallel regions its threads spin-wait, by default 300,000 times before sleeping. When
another process shares a core, a thread that spins there uses up its share of the core and then
waits behind the other process at every region, where a thread that slept is woken and runs at
once: with one of the development VM's two cores kept busy, GPT-2's int8 decoding ran 5x faster
and BERT-base 1.9x faster with `GOMP_SPINCOUNT=10000` than with libgomp's default. On the same
machine without the busy core it cost BERT-base ~10% (and decoding 0-16%), so TorchBridge does
not set it: `python benchmarks/cpu_contention.py` measures both cases, docs/cli.md has the
numbers and says when to set it. libgomp reads the variable once, when torch loads it, so it
must be in the environment before `import torch`.
"""

from __future__ import annotations

import os

__all__ = ["SPIN_VARIABLE", "SHARED_CORES_SPIN", "openmp_spin"]

SPIN_VARIABLE = "GOMP_SPINCOUNT"
SHARED_CORES_SPIN = "10000"  # what docs/cli.md recommends where other processes share the cores


def openmp_spin() -> str:
    """The spin-wait in effect, in words (for `torchbridge env` and benchmark results)."""
    value = os.environ.get(SPIN_VARIABLE)
    if value is None:
        return (f"libgomp default (300000); on cores shared with other processes set "
                f"{SPIN_VARIABLE}={SHARED_CORES_SPIN} before starting Python (docs/cli.md)")
    return f"{SPIN_VARIABLE}={value}"
