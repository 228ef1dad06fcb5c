"""What `torchbridge env` and benchmark results say about OpenMP's spin-wait (cpu_threads.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from torchbridge import cpu_threads


def test_reports_the_default_with_the_advice(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(cpu_threads.SPIN_VARIABLE, raising=False)
    said = cpu_threads.openmp_spin()
    assert said.startswith("libgomp default")
    assert f"GOMP_SPINCOUNT={cpu_threads.SHARED_CORES_SPIN}" in said


def test_the_command_reports_what_the_environment_set():
    env = {**os.environ, cpu_threads.SPIN_VARIABLE: "500"}
    code = "import sys; from torchbridge.cli import main; sys.exit(main(['env', '--json']))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    assert json.loads(done.stdout)["openmp_spin"] == "GOMP_SPINCOUNT=500"
