#!/usr/bin/env bash
# Set up (if needed) and run the main job: the guide's two headline workloads (BERT-base
# classification batch 8 x 128; GPT-2 50 new tokens) against the HF eager fp32 baseline and the
# installed peers, in one run. Random weights when the models are not available offline (it says
# so). Writes bench-results/headline/. Extra arguments go to benchmarks/headline.py.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCHBRIDGE_PEERS="${TORCHBRIDGE_PEERS:-1}" bash scripts/setup.sh
. .venv/bin/activate
python benchmarks/headline.py "$@"
