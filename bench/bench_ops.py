"""pytest-benchmark benchmarks of the fused GroupNorm: reference vs compiled implementations.

Run against the installed package, e.g. ``pytest bench/bench_ops.py --benchmark-only`` (add
``--benchmark-group-by=group`` to read ratios: each group holds every implementation of one
configuration; ``extra_info`` says which implementation ``dispatch`` picked). CPU: (8, 192, 64, 64) float32,
NCHW and NHWC, plain and with add + SiLU (the UNet ResBlock case). CUDA (when available): float32 and bfloat16 at
batch 32, also the Triton kernel, 20 calls per timed round; and an inner level of the imagenet UNet at 64 guided
images, (128, 384, 32, 32) bfloat16 channels_last with add + SiLU, through the channels_last Triton kernels
(``triton-nhwc``: three passes) and the dispatch.
"""

from __future__ import annotations

import pytest
import torch

import rdm_fast.ops as ops
from rdm_fast.ops import group_norm_reference
from rdm_fast.ops.group_norm import GROUP_NORM

GROUPS = 32
EPS = 1e-5
CUDA_CALLS = 20  # per timed round (the times reported are per round)


def _inputs(shape, dtype, device, channels_last):
    x = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    return x, torch.randn(c, device=device), torch.randn(c, device=device), torch.randn(shape[0], c, device=device)


def torch_unfused(x, weight, bias, num_groups, eps, *, add=None, silu=False):
    """What a model would do without the fused op: native-dtype PyTorch ops, one per step."""
    h = x if add is None else x + add.to(x.dtype)[:, :, None, None]
    h = torch.nn.functional.group_norm(h, num_groups, weight.to(x.dtype), bias.to(x.dtype), eps)
    return torch.nn.functional.silu(h) if silu else h


IMPLS = {
    "cpu": ["torch-unfused", "reference", "cpu-ext", "dispatch"],
    "cuda": ["torch-unfused", "reference", "cuda-ext", "triton", "dispatch"],
}


def _fn(device: str, name: str):
    if name == "torch-unfused":
        return torch_unfused
    if name == "reference":
        return group_norm_reference
    if name == "dispatch":
        return ops.group_norm
    impl = GROUP_NORM.impl(name)
    return impl.fn if impl.unavailable() is None else None


def _configs():
    for device, batch, dtypes in (("cpu", 8, [torch.float32]), ("cuda", 32, [torch.float32, torch.bfloat16])):
        mark = pytest.mark.skipif(device == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
        for dtype in dtypes:
            for layout in ("nchw", "nhwc"):
                for fused in (False, True):
                    for impl in IMPLS[device]:
                        name = f"{device}-{str(dtype)[6:]}-{layout}-{'add_silu' if fused else 'plain'}"
                        yield pytest.param(
                            device, (batch, 192, 64, 64), dtype, layout, fused, impl, id=f"{name}-{impl}", marks=mark
                        )
    mark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    for impl in ("torch-unfused", "triton-nhwc", "dispatch"):
        yield pytest.param("cuda", (128, 384, 32, 32), torch.bfloat16, "nhwc", True, impl,
                           id=f"cuda-bfloat16-nhwc-add_silu-inner-{impl}", marks=mark)


@pytest.mark.parametrize("device,shape,dtype,layout,fused,impl", list(_configs()))
def test_group_norm(benchmark, device, shape, dtype, layout, fused, impl):
    fn = _fn(device, impl)
    if fn is None:
        pytest.skip(f"{impl} is not available")
    x, w, b, add = _inputs(shape, dtype, device, layout == "nhwc")
    kwargs = {"add": add, "silu": True} if fused else {}
    benchmark.group = f"{device}-{str(dtype)[6:]}-{layout}-{'add_silu' if fused else 'plain'}-{tuple(shape)}"
    # CUDA: calls queued back to back, one synchronisation per round, so that the GPU's time is measured rather
    # than the host's launch overhead (still included where a call's launch takes longer than its kernels)
    calls = CUDA_CALLS if device == "cuda" else 1
    benchmark.extra_info.update(bytes_per_call=2 * x.numel() * x.element_size(), calls_per_round=calls)
    if impl == "dispatch":  # which implementation auto mode picked for this call
        benchmark.extra_info["dispatched_to"] = GROUP_NORM.select(device, x, w, b, GROUPS, EPS, **kwargs).name

    def run():
        for _ in range(calls):
            out = fn(x, w, b, GROUPS, EPS, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        run()  # warm-up: extension load, Triton compile
        benchmark(run)
