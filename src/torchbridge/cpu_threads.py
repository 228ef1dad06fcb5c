"""How CPU worker threads wait between parallel regions, chosen before torch starts them.

PyTorch's CPU kernels (ATen, oneDNN, inductor's generated code) run on GNU OpenMP (libgomp).
Between parallel regions its threads spin-wait, by default 300,000 times before sleeping. When
another process shares a core, a thread that spins there uses up its share of the core and then
waits behind the other process at every region, where a thread that slept is woken and runs at
once: with one of the development VM's two cores kept busy, GPT-2's int8 decoding ran 5x faster
and BERT-base 1.9x faster with a spin of 10,000 than with libgomp's default, for no clear cost on
the machine as it was (`python benchmarks/cpu_contention.py`; numbers in docs/cli.md). Shorter
spins help the busy case more but cost decoding ~25% on a quiet machine: threads then fall
asleep between decode steps.

libgomp reads its environment once, when torch loads it, so the setting only takes effect when
made before `import torch`: the `torchbridge` command makes it first thing; a program that uses
the library sets `GOMP_SPINCOUNT` itself. A value already in the environment is never changed.
This module imports nothing heavy so that it can run first.
"""

from __future__ import annotations

import os
import sys

__all__ = ["SPIN_VARIABLE", "SPIN_COUNT", "bound_openmp_spin", "openmp_spin"]

SPIN_VARIABLE = "GOMP_SPINCOUNT"
SPIN_COUNT = "10000"


def bound_openmp_spin() -> None:
    """Set GOMP_SPINCOUNT to SPIN_COUNT for this process (and the processes it starts) unless it
    is already set or torch is already loaded (then libgomp has read its environment)."""
    if SPIN_VARIABLE not in os.environ and "torch" not in sys.modules:
        os.environ[SPIN_VARIABLE] = SPIN_COUNT


def openmp_spin() -> str:
    """The spin-wait in effect, in words (for `torchbridge env` and benchmark results)."""
    value = os.environ.get(SPIN_VARIABLE)
    if value is None:
        return "libgomp default (300000); set GOMP_SPINCOUNT before importing torch to bound it"
    return f"{SPIN_VARIABLE}={value}"
