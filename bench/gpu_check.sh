#!/usr/bin/env bash
# One-shot check on a GPU machine (the device tool's H100/H200), sized to a short lease. Phases, each under its
# own time limit so that one hang cannot eat the rest, results written to $OUT as they come:
#   1. build the C++/CUDA extension in place (background, sm_90), then 4. the tests that need the extension or
#      whole models (CUDA GroupNorm, UNet vs oracle, graph sampling, training steps), while
#   2. the Triton kernels' GPU parity tests run (attention, cross-attention, glue, GroupNorm,
#      kNN search; pytest-xdist when present). Both test runs share the GPU; then the graph timer's own test,
#      alone (it compares timings); nothing is timed until they are done;
#   3. bench/gpu_step.py: parity of a whole guided step (fast and reference bf16 against fp32), CUDA-event
#      timings of rdm_fast (graph / eager) against the eager SDPA peer, a per-kernel and a per-module breakdown,
#      and the first stage's decoder (parity and timings against the NCHW plain-PyTorch decoder);
#      then, with GPU_CHECK_TUNE=1, bench/gpu_tune.py (GroupNorm tunables, attention per level vs SDPA, add_bias
#      tunables, upsample variants: what chose the current defaults, bench/RESULTS.md);
#   5. per-op pytest-benchmark suites with their PyTorch baselines (thin convolutions, cross-attention, glue,
#      GroupNorm; `full` adds self-attention, search and the training step);
#   6. in the time left, the torch.compile peer of the guided step (minutes of compilation per model).
# $OUT gets at most 8 files (what the device tool returns): gpu.txt, log.txt (build, step script, compile peer),
# tests.txt, step.txt, kernels_<preset>.txt (two), tune.txt, bench.txt (the pytest-benchmark table).
# Usage there: bash bench/gpu_check.sh [full|tests|quick] (`tests`: phases 1, 2 and 4 only, with the whole budget;
# `quick`: see below).
# Environment: GPU_CHECK_BUDGET (seconds, default 560) bounds the whole script: in run E (H200, 2026-11-27) the
# tests took 285 s and the step script 137 s of its 200 s limit, before its trajectory, idle-time and decoder-parity
# checks ran (not yet timed on a GPU); GPU_CHECK_TUNE=1 adds phase 3b; OUT (default /tmp/gpu_check), PYTHON
# (default python3), TORCH_CUDA_ARCH_LIST (default 9.0) and MAX_JOBS (default 16, the extension build); `quick`
# only: GPU_CHECK_TESTS, GPU_CHECK_STEP_ARGS, GPU_CHECK_STEP_LIMIT (below). Nothing is downloaded. Test output is
# verbose (one line per test, as it finishes), so that a phase cut off by its limit still names its failures;
# benchmark runs are stopped with SIGINT, on which pytest-benchmark still prints the table of those that finished,
# and the step script with SIGTERM, on which it still writes its closing table.
set -uo pipefail
MODE=${1:-}
case "$MODE" in ""|full|tests|quick) ;; *) echo "unknown mode '$MODE': full, tests or quick (none: the default)"; exit 2;; esac
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout (with the in-place extension) is imported
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-560}
left() { echo $((BUDGET - SECONDS)); }
limit() { local want=$1 l; l=$(left); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 5 ] && want=5; echo "$want"; }

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 6"

# `quick`: after a full run, for the ops changed since: the extension (a failed build ends the run, rc 1), their GPU
# tests (GPU_CHECK_TESTS, default glue, GroupNorm, thin convolution), the two large guided steps (GPU_CHECK_STEP_ARGS,
# GPU_CHECK_STEP_LIMIT seconds, default 200), and the thin convolution's benchmark
if [ "$MODE" = quick ]; then
  timeout "$(limit 150)" $PY setup.py -q build_ext --inplace > "$OUT/log.txt" 2>&1; rc=$?
  echo "build rc=$rc at $SECONDS s" | tee -a "$OUT/log.txt"
  # without the extension, the tests fail at their fixture and the timings are of fallback kernels: stop here
  [ "$rc" = 0 ] || { tail -30 "$OUT/log.txt"; exit 1; }
  timeout "$(limit 120)" $PY -m pytest -v -rfEs $XDIST -p no:cacheprovider \
    ${GPU_CHECK_TESTS:-tests/test_ops_glue.py tests/test_triton_group_norm.py tests/test_ops_conv.py} \
    -k "(gpu or cuda) and not interpreter" > "$OUT/tests.txt" 2>&1
  echo "tests rc=$? at $SECONDS s" >> "$OUT/tests.txt"
  grep -E "FAILED|ERROR| passed| failed|rc=" "$OUT/tests.txt" | grep -v "^\[gw.*PASSED" | sort -u
  # GPU_CHECK_STEP_ARGS replaces the presets (e.g. "--presets rdm768:16,imagenet:64": the first is timed first)
  timeout -k 15 "$(limit "${GPU_CHECK_STEP_LIMIT:-200}")" $PY bench/gpu_step.py --out "$OUT" \
    ${GPU_CHECK_STEP_ARGS:---presets imagenet:64,rdm768:16} >> "$OUT/log.txt" 2>&1
  echo "step rc=$? at $SECONDS s" | tee -a "$OUT/log.txt"
  timeout -s INT -k 15 "$(limit 90)" $PY -m pytest -q -p no:cacheprovider bench/bench_conv.py -k "not cpu" \
    --benchmark-only \
    --benchmark-columns=median,min,rounds --benchmark-group-by=group --benchmark-sort=name \
    --benchmark-json="$OUT/bench.json" > "$OUT/bench.txt" 2>&1
  echo "bench rc=$? at $SECONDS s" | tee -a "$OUT/bench.txt"
  grep -v "^  File\|^Traceback\|^ *\^" "$OUT/step.txt" | tail -40; grep -E "conv3x3 at|group_norm at" "$OUT/log.txt"
  grep -E "^test_conv3x3|^Name" "$OUT/bench.txt"
  echo "done at $SECONDS s"; exit 0
fi
MODEL_LIMIT=280; TRITON_LIMIT=280  # at 240 s, 4 of 337 Triton tests were unfinished (H200, 2026-11-27)
[ "$MODE" = tests ] && { MODEL_LIMIT=$((BUDGET - 20)); TRITON_LIMIT=$((BUDGET - 20)); }
MODEL_XDIST=""; [ -n "$XDIST" ] && MODEL_XDIST="-n 4"

# 1. extension, in place, then 4. the tests that need it or whole models (the float32 graph-vs-eager tests first)
( start=$SECONDS; timeout "$(limit 150)" $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; rc=$?
  echo "build rc=$rc in $((SECONDS - start)) s" >> "$OUT/build.log"
  timeout "$(limit $MODEL_LIMIT)" $PY -m pytest -v -rfEs $MODEL_XDIST -p no:cacheprovider tests/test_cuda_sampling.py \
    tests/test_ops_group_norm.py tests/test_models.py tests/test_train.py tests/test_retrieval_context.py \
    -k "(cuda or graph or sync or reproducible or eager) and not cold_start" > "$OUT/tests_models.log" 2>&1
  echo "model tests rc=$? at $SECONDS s" >> "$OUT/tests_models.log" ) &
MODELS=$!

# 2. Triton kernels on the GPU (the interpreter cases are CI's job); put kernels never yet run on a GPU first,
#    since the limit may cut off the last file. -k matches module names too: "gpu" selects all of test_gpu_search,
#    whose GPU tests are its "cuda" ones
timeout "$(limit $TRITON_LIMIT)" $PY -m pytest -v -rfEs $XDIST -p no:cacheprovider tests/test_triton_group_norm.py \
  tests/test_ops_conv.py tests/test_ops_glue.py tests/test_ops_attention.py tests/test_ops_cross_attention.py \
  tests/test_gpu_search.py \
  -k "(gpu or cuda) and not interpreter and not (test_gpu_search and not cuda)" > "$OUT/tests.txt" 2>&1
echo "triton tests rc=$? at $SECONDS s" >> "$OUT/tests.txt"
wait $MODELS
# the graph timer's test compares timings: alone on the GPU
timeout "$(limit 60)" $PY -m pytest -v -rfEs -p no:cacheprovider tests/test_ops_measured.py -k gpu >> "$OUT/tests.txt" 2>&1
echo "timer test rc=$? at $SECONDS s" >> "$OUT/tests.txt"
cat "$OUT/build.log" >> "$OUT/log.txt"; rm "$OUT/build.log"
cat "$OUT/tests_models.log" >> "$OUT/tests.txt"; rm "$OUT/tests_models.log"
grep "build rc" "$OUT/log.txt"; grep -E "FAILED|ERROR| passed| failed|rc=" "$OUT/tests.txt" | grep -v "^\[gw.*PASSED" | sort -u
[ "$MODE" = tests ] && exit 0

# 3. whole guided step
timeout -k 15 "$(limit 200)" $PY bench/gpu_step.py --out "$OUT" >> "$OUT/log.txt" 2>&1
echo "step rc=$? at $SECONDS s" | tee -a "$OUT/log.txt"

# 3a. the command line end to end (model build, retrieval-free contexts, 2 batches of 8 with CUDA graphs, decoding,
#     PNGs written on background threads): its wall-clock seconds from run.json
if [ "$(left)" -gt 120 ]; then
  rm -rf /tmp/sample_rdm768  # a fresh --out for each run on the same machine
  $PY -c "import numpy as np; np.save('/tmp/ctx768.npy', np.random.randn(16, 11, 768).astype('float32'))"
  timeout "$(limit 90)" $PY -m rdm_fast.sample --random-init --config rdm768 --context-file /tmp/ctx768.npy --bf16 \
    --steps 50 --n-samples 16 --batch-size 8 --out /tmp/sample_rdm768 >> "$OUT/log.txt" 2>&1
  echo "sample CLI rc=$? at $SECONDS s: rdm768, 16 images, 50 steps, batch 8: $($PY -c "import json; \
print(json.load(open('/tmp/sample_rdm768/run.json')).get('seconds'))" 2>/dev/null) s" | tee -a "$OUT/log.txt"
fi

# 3b. tuning measurements (attention per level, upsample variants, GroupNorm tunables), for choosing defaults
if [ "${GPU_CHECK_TUNE:-0}" = 1 ]; then
  timeout "$(limit 150)" $PY bench/gpu_tune.py --out "$OUT" >> "$OUT/log.txt" 2>&1
  echo "tune rc=$? at $SECONDS s" | tee -a "$OUT/log.txt"
fi

# 5. per-op benchmarks (PyTorch baselines in the same run)
BENCHES="bench/bench_conv.py bench/bench_cross_attention.py bench/bench_glue.py bench/bench_ops.py"
[ "$MODE" = full ] && BENCHES="$BENCHES bench/bench_attention.py bench/bench_search.py bench/bench_train.py"
COLS="--benchmark-columns=median,min,rounds --benchmark-group-by=group --benchmark-sort=name"
if [ "$(left)" -gt 60 ]; then
  timeout -s INT -k 15 "$(limit 200)" $PY -m pytest -q -p no:cacheprovider $BENCHES -k "not cpu" --benchmark-only \
    $COLS > "$OUT/bench.txt" 2>&1
  echo "bench rc=$? at $SECONDS s" | tee -a "$OUT/bench.txt"
fi

# 6. the torch.compile peer, in the time left
if [ "$(left)" -gt 90 ]; then
  timeout -k 15 "$(limit 600)" $PY bench/gpu_step.py --out "$OUT" --variants torch-compile --timings-only \
    >> "$OUT/log.txt" 2>&1
  echo "compile peer rc=$? at $SECONDS s" | tee -a "$OUT/log.txt"
fi
echo "=== step ==="; grep -v "^  File\|^Traceback\|^ *\^" "$OUT/step.txt" | tail -70
echo "done at $SECONDS s"
