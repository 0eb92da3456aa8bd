#!/usr/bin/env bash
# One-shot check on a GPU machine (the device tool's H100/H200): build the extension there, run the GPU parity
# tests (GroupNorm, attention, cross-attention, glue ops, exact kNN search, the UNet against the float64 oracle,
# CUDA-graph sampling without host sync), then the benchmarks (each with its PyTorch baselines in the same run).
# Results land in $OUT (default /tmp/gpu_check): gpu.txt, build.txt, tests.txt, bench_*.txt/json.
# Usage there: bash bench/gpu_check.sh [full]   (default: parity tests + the per-op, UNet and guided-step
# benchmarks without torch.compile baselines, about 4-6 minutes; full: every benchmark, incl. torch.compile
# baselines (RDM_BENCH_COMPILE=1), 10+ minutes; nothing is downloaded)
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
# GPU cases only (-k): the interpreter cases of these files are CI's job
$PY -m pytest -q -rs -x tests/test_ops_group_norm.py tests/test_triton_group_norm.py \
  tests/test_ops_attention.py tests/test_ops_cross_attention.py tests/test_ops_glue.py tests/test_gpu_search.py \
  tests/test_cuda_sampling.py tests/test_models.py -k "cuda or gpu or triton or models or graph or sync" \
  2>&1 | tail -40 | tee "$OUT/tests.txt"
COLS="--benchmark-columns=min,median,max,rounds --benchmark-group-by=group"
if [ "${1:-}" = full ]; then
  RDM_BENCH_COMPILE=1 $PY -m pytest bench/ --benchmark-only $COLS --benchmark-json "$OUT/bench.json" \
    2>&1 | tail -120 | tee "$OUT/bench.txt"
else
  $PY -m pytest bench/bench_step.py bench/bench_unet.py bench/bench_attention.py bench/bench_cross_attention.py \
    bench/bench_glue.py bench/bench_search.py bench/bench_ops.py --benchmark-only $COLS -k "not compiled" \
    --benchmark-json "$OUT/bench.json" 2>&1 | tail -100 | tee "$OUT/bench.txt"
fi
