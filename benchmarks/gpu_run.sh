#!/usr/bin/env bash
# One prepared GPU run for issue 5 (TrAct per-step overhead), finishing in <= 6 minutes on an H100.
#
# Runs benchmarks/overhead.py --mode gpu: ViT-B/16@224, ResNet-50@224, CIFAR ViT, CIFAR ResNet-18 at
# batch 128, fp32 and bf16 autocast; variants plain / hf_tract / hf_tract_f32 / official torch-tract /
# proto_stream (side-stream prototype); plus the micro-breakdown (Gram alone, solve alone, TF32 and
# float32-solve accuracy) and torch.profiler deltas. Writes into $OUT:
#   overhead_gpu.json, overhead_gpu.md, overhead_gpu.log, env.txt
#
# torch-tract is installed from the wheel carried in .whl/ (no network on the device machine).
#
# Usage on the device (repository root):   HF_TRACT_COMMIT=<sha> bash benchmarks/gpu_run.sh
# Logic test on a CPU (tiny models):       TRACT_BENCH_TINY=1 OUT=/tmp/gpu_tiny bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/overhead_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-270}   # benchmark wall budget (settings shrink to fit); hard stop at BUDGET_S + 60

if ! "$PY" -c "import torch_tract" 2>/dev/null; then
  if ls .whl/torch_tract-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/torch_tract-*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  else
    echo "WARNING: torch-tract not importable and no .whl/torch_tract-*.whl: the official column will be missing"
  fi
fi

{
  echo "date: $(date -u)"
  echo "commit: ${HF_TRACT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'gpu', torch.cuda.is_available())"
  "$PY" -c "import torch_tract, importlib.metadata as m; print('torch-tract', m.version('torch-tract'))" 2>&1 | tail -1
} | tee "$OUT/env.txt"

EXTRA=()
if [ "${TRACT_BENCH_TINY:-0}" = "1" ]; then
  EXTRA+=(--tiny)
  BUDGET_S=${BUDGET_S_TINY:-150}
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  EXTRA+=(--device cpu)
fi

export HF_TRACT_COMMIT=${HF_TRACT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
timeout --signal=INT $((BUDGET_S + 60)) "$PY" benchmarks/overhead.py --mode gpu --tag gpu --out-dir "$OUT" \
  --deadline-s "$BUDGET_S" --note "one prepared run (benchmarks/gpu_run.sh), batch 128" "${EXTRA[@]}" "$@" \
  2>&1 | grep -v "SyncActivityProfilerHandler" | tee "$OUT/overhead_gpu.log"
status=${PIPESTATUS[0]}
echo "overhead.py exit status: $status"
ls -l "$OUT"
exit "$status"
