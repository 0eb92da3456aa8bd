"""pytest-benchmark of ops.conv3x3 (the UNet's thin first and last convolutions) against cuDNN (CUDA only).

Shapes of the released models at a guided step (bf16, channels-last): imagenet's output convolution
(128, 192, 64, 64) -> 3 channels and input convolution (64, 3, 64, 64) -> 192 written into both halves of a
skip buffer; rdm768's (32, 448, 48, 48) -> 16 and (16, 16, 48, 48) -> 448, likewise. Implementations:
``triton`` (our kernel, ``fast`` mode), ``cudnn+add_bias`` (cuDNN without its bias, then ``ops.add_bias``:
the fast path's other candidate) and ``cudnn`` (``F.conv2d`` with its bias, then a copy per extra half: plain
PyTorch). A round is ``CALLS`` back-to-back calls and one synchronisation. ``bytes_per_call`` in extra_info
is the minimum memory traffic (x read once, every copy of the output written once).
Run: ``pytest bench/bench_conv.py --benchmark-only --benchmark-group-by=group``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rdm_fast import ops
from rdm_fast.ops.conv import _cudnn, _triton

CUDA = torch.cuda.is_available()
CALLS = 10
# name -> (batch, C_in, C_out, H, W, copies of the output)
SHAPES = {"imagenet-out": (128, 192, 3, 64, 64, 1), "imagenet-in": (64, 3, 192, 64, 64, 2),
          "rdm768-out": (32, 448, 16, 48, 48, 1), "rdm768-in": (16, 16, 448, 48, 48, 2)}


def plain(x, weight, bias, out):
    y = F.conv2d(x, weight, bias, padding=1)
    return out.unflatten(0, (-1, x.shape[0])).copy_(y)


IMPLS = {"triton": _triton, "cudnn+add_bias": _cudnn, "cudnn": plain}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_conv3x3(benchmark, shape, impl):
    b, cin, cout, h, w, copies = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(b, cin, h, w, device="cuda", generator=g).to(torch.bfloat16).contiguous(memory_format=cl)
    weight = torch.randn(cout, cin, 3, 3, device="cuda", generator=g).to(torch.bfloat16).contiguous(memory_format=cl)
    bias = torch.randn(cout, device="cuda", generator=g).to(torch.bfloat16)
    out = torch.empty(copies * b, cout, h, w, dtype=torch.bfloat16, device="cuda", memory_format=cl)
    benchmark.group = f"conv3x3-{shape}-{cin}->{cout}x{copies}"
    benchmark.extra_info.update(calls_per_round=CALLS, bytes_per_call=x.nbytes + out.nbytes)
    fn = IMPLS[impl]

    def run():
        for _ in range(CALLS):
            fn(x, weight, bias, out)
        torch.cuda.synchronize()

    with torch.inference_mode(), ops.use_mode("fast"):
        run()  # warm-up: Triton autotuning, cuDNN's plan
        if impl == "triton":  # the autotuners' choices so far (key -> configuration)
            from rdm_fast.kernels import conv

            for kernel in (conv._conv3x3_kernel, conv._taps_kernel):
                benchmark.extra_info[kernel.fn.__name__] = {str(k): str(v) for k, v in kernel.cache.items()}
        benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
