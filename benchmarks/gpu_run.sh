#!/usr/bin/env bash
# The prepared GPU runs of issues 13 and 18 (TrAct on GPUs: correctness, then per-step cost). Two parts, one call each.
#
# Part 1 (default, GPU_RUN_PART=1), <= 6 minutes on an H100/H200:
# 1. python -m pytest tests/test_gpu.py -m "gpu and not slow" -v (no host synchronisation in the backward,
#    closed-form gradient, fp32 / bf16 / fp16 autocast, plain bits under autocast, sync_gram over NCCL),
#    output saved to $OUT/test_gpu.log (60 s limit);
# 2. benchmarks/overhead.py --mode gpu: ViT-B/16@224, ResNet-50@224, CIFAR ViT, CIFAR ResNet-18 at batch 128,
#    fp32 and bf16 autocast; variants plain / hf_tract / hf_tract_f32 / hf_tract_f32r / official torch-tract;
#    the micro-breakdown (Gram alone, solves alone, TF32, float32 and refined-solve accuracy, the fp32 weight
#    gradient of the autocast path) and torch.profiler deltas; BUDGET_S (default 240 s) of timing, hard stop 60 s
#    later; the JSON is rewritten after every setting.
#    Writes overhead_gpu.json, overhead_gpu.md, overhead_gpu.log, test_gpu.log, env.txt into $OUT
#    then: cp $OUT/{overhead_gpu.json,overhead_gpu.md,test_gpu.log} benchmarks/results/  (test_gpu.log -> overhead_gpu_test_gpu.log)
#
# Part 2 (GPU_RUN_PART=2), <= 5 minutes: what a user's run depends on, and the levers of issue 18.
# 1. python -m pytest tests/test_gpu.py -m gpu -v: part 1's tests plus whole TrActTrainer runs of
#    examples/train_image_classification.py (100 steps, --bf16; again with --torch_compile, inductor), every
#    backward after the first two under CUDA sync-debug "error"; output in $OUT/test_gpu_2.log (180 s limit);
# 2. overhead.py --mode gpu --dtypes bf16 --no-profile, variants plain / hf_tract / hf_tract_f32 / hf_tract_f32r
#    (bf16 hf_tract now forms the first layer's weight gradient in fp32), BUDGET_S (default 80 s) of timing,
#    hard stop 60 s later;
#    writes overhead_gpu_2.{json,md,log} (into benchmarks/results/ as they are) and test_gpu_2.log, env.txt.
#
# torch-tract (and pytest, datasets and evaluate, where the machine lacks them: the lent H200 image has no datasets
# nor evaluate, which part 2's example runs import) is installed from the wheels carried in .whl/ (the device
# machine has no network):  pip download --no-deps torch-tract==1.0.0 -d .whl
#   pip download --no-deps pytest iniconfig pluggy packaging pygments -d .whl   (used only where pytest is missing)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --platform any \
#       datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 -d .whl   (part 2; py312: the device's python)
#
# Usage on the device (repository root):   HF_TRACT_COMMIT=<sha> bash benchmarks/gpu_run.sh
#                                          HF_TRACT_COMMIT=<sha> GPU_RUN_PART=2 bash benchmarks/gpu_run.sh
#   (device tool: run(command="HF_TRACT_COMMIT=<sha> bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=420),
#    then the same with GPU_RUN_PART=2 and timeout_s=360)
# Logic test on a CPU (tiny models):       TRACT_BENCH_TINY=1 OUT=/tmp/gpu_tiny bash benchmarks/gpu_run.sh
#                                          TRACT_BENCH_TINY=1 GPU_RUN_PART=2 OUT=/tmp/gpu_tiny2 bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/overhead_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the checkout's hf_tract, not an installed copy
PART=${GPU_RUN_PART:-1}
case "$PART" in
  1) BUDGET_S=${BUDGET_S:-240}; TEST_LIMIT_S=60; MARKS="gpu and not slow"; SUFFIX=""
     BENCH=(--tag gpu) ;;
  2) BUDGET_S=${BUDGET_S:-80}; TEST_LIMIT_S=180; MARKS="gpu"; SUFFIX="_2"
     BENCH=(--tag gpu_2 --dtypes bf16 --no-profile --variants plain hf_tract hf_tract_f32 hf_tract_f32r) ;;
  *) echo "GPU_RUN_PART must be 1 or 2, not $PART"; exit 2 ;;
esac
# BUDGET_S: benchmark timing budget (settings shrink to fit); hard stop at BUDGET_S + 60
SITE=/tmp/gpu_run_site

install_from_wheels() {  # $1: import name, $2...: wheel globs in .whl/; no network, no dependency resolution
  local name=$1; shift
  if ! "$PY" -c "import $name" 2>/dev/null; then
    local wheels=()
    for glob in "$@"; do wheels+=($(ls .whl/$glob 2>/dev/null | head -1)); done
    if [ "${#wheels[@]}" -eq "$#" ] && "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "${wheels[@]}"; then
      export PYTHONPATH="$PYTHONPATH:$SITE"
    else
      echo "WARNING: $name not importable and not installable from .whl/ ($*)"
    fi
  fi
}
install_from_wheels torch_tract "torch_tract-*.whl"
install_from_wheels pytest "pytest-*.whl" "iniconfig-*.whl" "pluggy-*.whl" "packaging-*.whl" "pygments-*.whl"
install_from_wheels datasets "datasets-*.whl" "dill-*.whl" "multiprocess-*.whl"
install_from_wheels evaluate "evaluate-*.whl"

{
  echo "date: $(date -u)"
  echo "commit: ${HF_TRACT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'gpu', torch.cuda.is_available())"
  "$PY" -c "import torch_tract, importlib.metadata as m; print('torch-tract', m.version('torch-tract'))" 2>&1 | tail -1
  "$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>&1 | tail -1
  "$PY" -c "import datasets, evaluate; print('datasets', datasets.__version__, 'evaluate', evaluate.__version__)" 2>&1 | tail -1
} | tee "$OUT/env.txt"

export HF_TRACT_COMMIT=${HF_TRACT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

# 1. GPU tests (skipped cleanly where there is no CUDA device).
TEST_LOG="$OUT/test_gpu$SUFFIX.log"
timeout "$TEST_LIMIT_S" "$PY" -m pytest tests/test_gpu.py -m "$MARKS" -v -p no:cacheprovider 2>&1 | tee "$TEST_LOG"
test_status=${PIPESTATUS[0]}
echo "pytest tests/test_gpu.py -m \"$MARKS\" exit status: $test_status" | tee -a "$TEST_LOG"

# 2. The overhead benchmark.
EXTRA=()
if [ "${TRACT_BENCH_TINY:-0}" = "1" ]; then
  EXTRA+=(--tiny)
  BUDGET_S=${BUDGET_S_TINY:-60}
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  EXTRA+=(--device cpu)
fi
timeout --signal=INT $((BUDGET_S + 60)) "$PY" benchmarks/overhead.py --mode gpu "${BENCH[@]}" --out-dir "$OUT" \
  --deadline-s "$BUDGET_S" --note "prepared run, part $PART (benchmarks/gpu_run.sh), batch 128" "${EXTRA[@]}" "$@" \
  2>&1 | grep -v "SyncActivityProfilerHandler" | tee "$OUT/overhead_gpu$SUFFIX.log"
status=${PIPESTATUS[0]}
echo "overhead.py exit status: $status"
ls -l "$OUT"
if [ "$status" -ne 0 ]; then exit "$status"; fi
exit "$test_status"
