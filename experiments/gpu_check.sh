#!/usr/bin/env bash
# The accelerator check, for a lent H100/H200 (Python 3.12, jax 0.11.x, flax, optax, orbax, chex, torch and
# triton preinstalled, no network): at most 8 minutes (the steps' time limits add up to 480 s). Writes one results file (default
# $OUT/gpu_check.md when $OUT is set, else ./gpu_check.md) with the machine, versions, and every step's output.
#
#   bash experiments/gpu_check.sh [results.md]
#
# 1. the Pallas kernels compiled for real against float64 / reference results (tests/test_accelerator.py);
# 2. the float32 numerics of tests/test_model.py on the GPU (JAX_PLATFORMS=cuda; matmul_precision "highest");
# 3. the grouped matmul, lightning attention and train-step benchmarks (MFU against the bf16 peak).
# Packages the image lacks (ml-collections, grain, transformers, ...) are installed from ./.gpu_wheels when that
# folder was carried along (pip download --python-version 3.12 --only-binary=:all: -d .gpu_wheels ..., and
# flash-linear-attention for the fla row of the lightning benchmark);
# without them, the steps that need them report the import error and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}/gpu_check.md}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .gpu_wheels ]; then
  python -m pip install -q --no-index --find-links .gpu_wheels -r requirements.txt 2>&1 | tail -3
  python -m pip install -q --no-index --find-links .gpu_wheels flash-linear-attention 2>&1 | tail -1
fi

step() {  # step <seconds> <title> <command...>: run with a time limit, record its output and status
  local limit=$1 title=$2
  shift 2
  echo
  echo "## $title"
  echo
  echo '```'
  echo "\$ $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -e "^I[0-9]\{4\}" -e "^W[0-9]\{4\}" | tail -60
  echo "(exit ${PIPESTATUS[0]}, $((SECONDS - start)) s)"
  echo '```'
}

{
  echo "# gpu_check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python -c "import sys, jax; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())" 2>&1
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1
  echo '```'
  step 120 "Pallas kernels compiled (not interpreted)" python -m pytest -q -x -p no:cacheprovider tests/test_accelerator.py
  step 75 "tests/test_model.py on the GPU" env JAX_PLATFORMS=cuda python -m pytest -q -p no:cacheprovider \
    tests/test_model.py -k "not full_m1"
  step 45 "grouped matmul, slice-1b's MoE shape (bf16)" python experiments/bench_grouped_matmul.py
  step 75 "lightning attention, M1 heads (bf16)" python experiments/bench_lightning.py --N=4096,16384,32768 \
    --impls=pallas_gpu,pallas_gpu_parallel,fla,softmax --repeats=5
  step 120 "train step, slice-1b at 4 x 4096 (bf16)" python experiments/bench_train.py --presets=slice-1b --batch=4 \
    --seq=4096 --rounds=1 --repeats=5
  step 45 "train step, cpu-100m at 8 x 2048 (bf16)" python experiments/bench_train.py --presets=cpu-100m --batch=8 \
    --seq=2048 --dtype=bfloat16 --rounds=1 --repeats=5
} | tee "$out"
echo "results: $out"
