"""The OpenMP spin-wait bound (cpu_threads.py): set before torch loads, never over the user's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from torchbridge import cpu_threads

PROBE = ("import os, sys; from torchbridge.cpu_threads import bound_openmp_spin; "
         "bound_openmp_spin(); import torch; "
         "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != cpu_threads.SPIN_VARIABLE}
    return {**env, **extra}


def _python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_set_before_torch_loads():
    assert _python(PROBE, _env()) == f"{cpu_threads.SPIN_COUNT} True"


def test_the_users_value_is_kept():
    assert _python(PROBE, _env(GOMP_SPINCOUNT="123")) == "123 True"


def test_too_late_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch):
    import torch  # noqa: F401  (loaded, as in any test process)

    monkeypatch.delenv(cpu_threads.SPIN_VARIABLE, raising=False)
    cpu_threads.bound_openmp_spin()
    assert cpu_threads.SPIN_VARIABLE not in os.environ
    assert cpu_threads.openmp_spin().startswith("libgomp default")
    monkeypatch.setenv(cpu_threads.SPIN_VARIABLE, "500")
    assert cpu_threads.openmp_spin() == "GOMP_SPINCOUNT=500"


def test_the_command_sets_it_and_reports_it():
    code = "import sys; from torchbridge.cli import main; sys.exit(main(['env', '--json']))"
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                          text=True, timeout=300, check=True)
    assert json.loads(done.stdout)["openmp_spin"] == f"GOMP_SPINCOUNT={cpu_threads.SPIN_COUNT}"
