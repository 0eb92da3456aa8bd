#!/usr/bin/env bash
# One-shot check on a GPU machine (the device tool's H100/H200): build the extension there, run the GPU parity
# tests (CUDA and Triton GroupNorm in fp32/fp16/bf16, the UNet against the float64 oracle), then the benchmarks.
# Results land in $OUT (default /tmp/gpu_check): gpu.txt, build.txt, tests.txt, bench.txt, bench.json.
# Usage there: bash bench/gpu_check.sh   (about 3-5 minutes; nothing is downloaded)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
start=$SECONDS
$PY -m pip install --no-build-isolation --no-deps --no-index -q . 2>&1 | tail -20 | tee "$OUT/build.txt"
echo "build: $((SECONDS - start)) s" | tee -a "$OUT/build.txt"
$PY -m pytest -q -rs tests/test_ops_group_norm.py tests/test_triton_group_norm.py tests/test_models.py \
  -k "cuda or triton or gpu or models" 2>&1 | tee "$OUT/tests.txt"
$PY -m pytest bench/ --benchmark-only --benchmark-columns=min,median,max,rounds \
  --benchmark-json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
