"""One UNet call (a denoising step without guidance) of the ``tiny`` and ``imagenet`` presets, with the ops
dispatched to the fast kernels ("auto") and to the plain-PyTorch references, in the same run.

Runs on whatever is present: CUDA in bf16 at the anchors' batch (bench/RESULTS.md) (128 = 64 images with guidance) for
imagenet, else the CPU in fp32 at batch 1. Compare the two modes' medians for the speed-up of the ops.
Run: ``pytest bench/ --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

from bench_step import make_case, ops_ran

from rdm_fast import ops

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BATCH = {"tiny": 8 if CUDA else 4, "imagenet": 128 if CUDA else 1}
ROUNDS = {"tiny": 20, "imagenet": 10 if CUDA else 3}


@pytest.fixture(scope="module", params=["tiny", "imagenet"])
def model_and_inputs(request):
    preset = request.param
    b = BATCH[preset]
    model, x, ctx = make_case(preset, b, DEVICE, DTYPE)  # channels-last on CUDA, as RDM.sample runs it
    return preset, model, (x, torch.full((b,), 500, device=DEVICE), ctx)


@pytest.mark.parametrize("mode", ["auto", "reference"])
def test_unet_call(benchmark, model_and_inputs, mode):
    preset, model, (x, t, ctx) = model_and_inputs
    benchmark.group = f"unet-{preset}-b{x.shape[0]}-{str(DTYPE).replace('torch.', '')}-{DEVICE.type}"
    benchmark.extra_info.update(preset=preset, batch=x.shape[0], mode=mode, device=str(DEVICE),
                                fast_backends=ops.available_backends())

    def call():
        with torch.inference_mode():
            out = model.unet(x, t, ctx)
        if CUDA:
            torch.cuda.synchronize()
        return out

    with ops.use_mode(mode):
        with ops_ran() as ran:
            call()  # warm-up: kernel selection, allocator, lazy extension load
        benchmark.extra_info["ops_ran"] = ran
        benchmark.pedantic(call, rounds=ROUNDS[preset], iterations=1, warmup_rounds=1)
