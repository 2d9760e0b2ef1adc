#!/usr/bin/env bash
# The benchmark table on a CUDA machine: eager vs the fast path in float32 (cuDNN TF32 as PyTorch
# ships it, and strict float32), bf16 autocast, torch.compile, channels_last vs NCHW.
# About 4 minutes on one modern GPU; every part has its own time limit, so the whole stays under 5.
#
#   bash benchmarks/gpu_check.sh            # tables on stdout, JSON + text under $OUT or benchmarks/results
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}

$PY - <<'PYEOF' || { echo "gpu_check: no usable CUDA GPU" >&2; exit 1; }
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| bf16:", torch.cuda.is_bf16_supported())
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true

run() {  # name, time limit (s), bench arguments...
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name (limit ${limit}s): bench.py $*"
  timeout --signal=INT "$limit" $PY benchmarks/bench.py --device cuda "$@" --json "$OUT_DIR/$name.json" \
    2>&1 | tee "$OUT_DIR/$name.txt"
  local status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || echo "gpu_check: $name ended with status $status (124/130 = time limit)" >&2
}

# 1. all three configurations: eager / fast / fast without channels_last / fast+bf16 (default TF32)
run cuda_table 110 --amp bf16 --nchw --repeats 5
# 2. strict float32 (no TF32): the fast path's bits/dim against eager within 1e-5, and its speed
run cuda_strict_fp32 50 --no-tf32 --configs 1x32x32,cifar --repeats 3
# 3. the paper's CIFAR-10 model at a batch that fills a GPU better
run cuda_cifar_b64 40 --configs cifar --cifar-batch 64 --amp bf16 --repeats 3
# 4. torch.compile (compile time printed) on the default configuration
run cuda_compile 90 --configs 1x32x32 --compile --repeats 5
echo; echo "gpu_check: results in $OUT_DIR"
