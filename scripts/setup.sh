#!/usr/bin/env bash
# One-time set-up, idempotent: a virtual environment in .venv with torch installed first (pinned in
# constraints.txt, so that no requirement pulls another, CUDA, build), then torchbridge and its
# test and benchmark extras. Peers (ONNX Runtime, OpenVINO, CTranslate2) are optional:
# TORCHBRIDGE_PEERS=1 installs them too.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q -c constraints.txt torch
extras="test,bench,data,serve,ray"
if [ "${TORCHBRIDGE_PEERS:-0}" = "1" ]; then extras="$extras,peers"; fi
pip install -q -c constraints.txt -e ".[$extras]"
