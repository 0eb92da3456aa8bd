"""The first stage's decoder, latents to images, as sampling ends: rdm768's KL-f16 at 4 latents (48x48x16 -> 768x768
images, the anchors' decoder case, bench/RESULTS.md) and imagenet's VQ-f4 at 16 latents (64x64x3 -> 256x256), bf16
on CUDA; the tiny preset on the CPU as a smoke run.

Variants, in the same run on the same weights (random, every parameter non-zero):

* ``rdm_fast``: ``RDM.decode`` (ops mode auto: on CUDA the first stage in the channels-last layout, biases
  folded into the GroupNorm and residual passes, attention through the Triton kernels or, for the decoders'
  single 512-channel head, PyTorch's SDPA).
* ``torch-eager``: a copy of the first stage in NCHW through the plain-PyTorch path (ops mode reference) with
  attention through ``scaled_dot_product_attention``, as for the step's ``torch-eager`` (bench_step.py).

On the CPU only the C++ GroupNorm is a fast kernel: the variants compare reference paths there.
Run: ``pytest bench/ --benchmark-only``; ``bench/gpu_step.py`` times the same variants with CUDA events.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bench_step import make_case, ops_ran, sdpa_attention

from rdm_fast import RDM, ops
from rdm_fast.models import autoencoder as autoencoder_module

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
CASES = {"rdm768": 4, "imagenet": 16} if CUDA else {"tiny": 2}
VARIANTS = ["rdm_fast", "torch-eager"]


def decode_fn(variant: str, model: RDM, z: torch.Tensor):
    """The ``() -> images`` callable of one variant; run it in the variant's ops mode (``reference`` for
    ``torch-eager``, else ``auto``). ``torch-eager`` works on its own NCHW copy of the first stage."""
    if variant == "rdm_fast":
        return lambda: model.decode(z)
    first_stage = copy.deepcopy(model.first_stage).to(memory_format=torch.contiguous_format)
    latent = (z / model.config.scale_factor).to(model.dtype)

    def call():
        saved, autoencoder_module.ops.attention = autoencoder_module.ops.attention, sdpa_attention
        try:
            return first_stage.decode(latent).float().clamp(-1.0, 1.0)
        finally:
            autoencoder_module.ops.attention = saved
    return call


@pytest.fixture(scope="module", params=list(CASES))
def setup(request):
    preset = request.param
    model, x, _ = make_case(preset, CASES[preset], DEVICE, DTYPE)
    return preset, model, x


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode(benchmark, setup, variant):
    preset, model, z = setup
    b = z.shape[0]
    benchmark.group = f"decode-{preset}-{b}img-{str(DTYPE).removeprefix('torch.')}-{DEVICE.type}"
    benchmark.extra_info.update(preset=preset, images=b, variant=variant, device=str(DEVICE),
                                fast_backends=ops.available_backends())
    with ops.use_mode("reference" if variant == "torch-eager" else "auto"), torch.inference_mode():
        fn = decode_fn(variant, model, z)

        def decode():
            out = fn()
            if CUDA:
                torch.cuda.synchronize()
            return out

        with ops_ran() as ran:
            decode()  # warm-up: layout conversion, kernel selection, allocator
        benchmark.extra_info["ops_ran"] = ran
        benchmark.pedantic(decode, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=1)
