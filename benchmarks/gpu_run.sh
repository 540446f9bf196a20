#!/usr/bin/env bash
# The one prepared GPU run of issue 13 (TrAct per-step cost on GPUs), <= 6 minutes on an H100/H200.
#
# 1. python -m pytest tests/test_gpu.py -v  (no host synchronisation in the backward, closed-form gradient,
#    fp32 / bf16 / fp16 autocast), output saved to $OUT/test_gpu.log (60 s limit);
# 2. benchmarks/overhead.py --mode gpu: ViT-B/16@224, ResNet-50@224, CIFAR ViT, CIFAR ResNet-18 at batch 128,
#    fp32 and bf16 autocast; variants plain / hf_tract / hf_tract_f32 / official torch-tract; the
#    micro-breakdown (Gram alone, solve alone, TF32 and float32-solve accuracy) and torch.profiler deltas;
#    BUDGET_S (default 240 s) of timing, hard stop 60 s later; the JSON is rewritten after every setting.
#
# Writes into $OUT, named as they go into benchmarks/results/:
#   overhead_gpu.json, overhead_gpu.md, overhead_gpu.log, test_gpu.log, env.txt
# then: cp $OUT/{overhead_gpu.json,overhead_gpu.md,test_gpu.log} benchmarks/results/  (test_gpu.log -> overhead_gpu_test_gpu.log)
#
# torch-tract (and pytest, where the machine lacks it) is installed from the wheels carried in .whl/
# (the device machine has no network):  pip download --no-deps torch-tract==1.0.0 -d .whl
#                                        pip download --no-deps pytest iniconfig pluggy packaging pygments -d .whl   (used only where pytest is missing)
#
# Usage on the device (repository root):   HF_TRACT_COMMIT=<sha> bash benchmarks/gpu_run.sh
#   (device tool: run(command="HF_TRACT_COMMIT=<sha> bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=420))
# Logic test on a CPU (tiny models):       TRACT_BENCH_TINY=1 OUT=/tmp/gpu_tiny bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/overhead_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the checkout's hf_tract, not an installed copy
BUDGET_S=${BUDGET_S:-240}   # benchmark timing budget (settings shrink to fit); hard stop at BUDGET_S + 60
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

{
  echo "date: $(date -u)"
  echo "commit: ${HF_TRACT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'gpu', torch.cuda.is_available())"
  "$PY" -c "import torch_tract, importlib.metadata as m; print('torch-tract', m.version('torch-tract'))" 2>&1 | tail -1
  "$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>&1 | tail -1
} | tee "$OUT/env.txt"

export HF_TRACT_COMMIT=${HF_TRACT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

# 1. GPU unit tests (skipped cleanly where there is no CUDA device).
timeout 60 "$PY" -m pytest tests/test_gpu.py -v -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log"
test_status=${PIPESTATUS[0]}
echo "pytest tests/test_gpu.py exit status: $test_status" | tee -a "$OUT/test_gpu.log"

# 2. The overhead benchmark.
EXTRA=()
if [ "${TRACT_BENCH_TINY:-0}" = "1" ]; then
  EXTRA+=(--tiny)
  BUDGET_S=${BUDGET_S_TINY:-60}
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  EXTRA+=(--device cpu)
fi
timeout --signal=INT $((BUDGET_S + 60)) "$PY" benchmarks/overhead.py --mode gpu --tag gpu --out-dir "$OUT" \
  --deadline-s "$BUDGET_S" --note "one prepared run (benchmarks/gpu_run.sh), batch 128" "${EXTRA[@]}" "$@" \
  2>&1 | grep -v "SyncActivityProfilerHandler" | tee "$OUT/overhead_gpu.log"
status=${PIPESTATUS[0]}
echo "overhead.py exit status: $status"
ls -l "$OUT"
if [ "$status" -ne 0 ]; then exit "$status"; fi
exit "$test_status"
