"""One training step of the UNet (forward, backward and AdamW on float32 weights under bf16 autocast, as
``python -m rdm_fast.train --bf16`` runs it) on CUDA at imagenet and rdm768 shapes; the tiny preset in float32
on the CPU as a smoke run. The first stage and data loading are left out: this times what the kernels change.

Variants, in the same run on the same weights:

* ``rdm_fast``: what the trainer runs (ops mode auto: our Triton attention forward and backward on CUDA; the
  other fused ops are inference-only and fall back to their references under autograd);
* ``rdm_fast-checkpointed``: the same with ``--grad-checkpoint`` (activations recomputed: slower, less memory);
* ``rdm_fast-compiled``: the same through ``torch.compile`` (``--compile``; CUDA only: Inductor takes minutes
  to compile on the CPU);
* ``torch-sdpa``: the plain-PyTorch path (ops mode reference) with PyTorch's ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import pytest
import torch

from rdm_fast import RDM, ops
from rdm_fast.diffusion import eps_losses

from bench_step import ops_ran, with_sdpa

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CASES = {"imagenet": 16, "rdm768": 4} if CUDA else {"tiny": 4}
VARIANTS = ["rdm_fast", "rdm_fast-checkpointed", "rdm_fast-compiled", "torch-sdpa"]


@pytest.fixture(scope="module", params=list(CASES))
def setup(request):
    preset = request.param
    torch.manual_seed(0)
    model = RDM.from_config(preset, device=DEVICE)
    with torch.no_grad():
        for p in model.unet.parameters():  # no zero-initialised layers: every gradient is computed in full
            p.add_(torch.randn_like(p) * 0.02)
    model.unet.train()
    cfg, b = model.config, CASES[preset]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x0 = torch.randn(b, cfg.channels, cfg.image_size, cfg.image_size, device=DEVICE, generator=g)
    ctx = torch.randn(b, cfg.context_tokens, cfg.context_dim, device=DEVICE, generator=g)
    t = torch.randint(0, 1000, (b,), device=DEVICE, generator=g)
    return preset, model, x0, ctx, t, torch.randn(x0.shape, device=DEVICE, generator=g)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step(benchmark, setup, variant):
    preset, model, x0, ctx, t, noise = setup
    if variant == "rdm_fast-compiled" and not CUDA:
        pytest.skip("compiling the training step with Inductor takes minutes on the CPU")
    unet = model.unet
    forward = torch.compile(unet) if variant == "rdm_fast-compiled" else unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA)
    benchmark.group = f"train-{preset}-{x0.shape[0]}img-{'bf16' if CUDA else 'fp32'}-{DEVICE.type}"
    benchmark.extra_info.update(preset=preset, images=x0.shape[0], variant=variant, device=str(DEVICE),
                                fast_backends=ops.available_backends())
    losses = (with_sdpa(eps_losses) if variant == "torch-sdpa" else eps_losses)

    def step():
        with autocast:
            loss = losses(forward, model.schedule, x0, ctx, t, noise).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if CUDA:
            torch.cuda.synchronize()

    unet.gradient_checkpointing = variant == "rdm_fast-checkpointed"
    try:
        with ops.use_mode("reference" if variant == "torch-sdpa" else "auto"):
            with ops_ran() as ran:
                for _ in range(3 if CUDA else 1):  # warm-up: autotuning, allocator
                    step()
            benchmark.extra_info["ops_ran"] = ran
            benchmark.pedantic(step, rounds=10 if CUDA else 3, iterations=1, warmup_rounds=0)
    finally:
        unet.gradient_checkpointing = False
