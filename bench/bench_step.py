"""One guided denoising step (a UNet call on the 2B batch [unconditional; conditional] plus the guidance combine)
at the anchor shapes (bench/RESULTS.md, "Anchors"): imagenet at 64 images (UNet batch 128) and rdm768 at 16
images (batch 32), bf16, on CUDA; the tiny preset on the CPU as a smoke run.

Variants, all in the same run on the same weights (random, every parameter non-zero; channels-last on CUDA):

* ``rdm_fast``: what ``RDM.sample`` does: context keys/values projected once (``prepare_context``), no
  cross-attention for the all-zero unconditional half, fused kernels (ops mode auto), the step replayed from a
  CUDA graph.
* ``rdm_fast-eager``: the same without the CUDA graph.
* ``torch-eager``: the plain-PyTorch path (ops mode reference: unfused norms computed in float32) with attention
  through PyTorch's ``scaled_dot_product_attention``, context tensor with the zeros concatenated, weights in
  bf16. Slower than the anchors' eager "SDPA + bf16 autocast" peer (its norms and bias adds run in float32 with
  extra casts): a baseline for our reference path, not the best eager PyTorch.
* ``torch-compile``: that path through ``torch.compile`` (Inductor fuses those casts away; the anchor peer,
  76.2 ms for imagenet on an H200);
  skipped unless ``RDM_BENCH_COMPILE=1`` (compiling the 400M/1.3B UNets takes minutes).

On the CPU the fast kernels are only the C++ GroupNorm: ``rdm_fast-eager`` runs the plain-PyTorch references of
every other op (float32 attention with explicit scores), against ``torch-eager``'s SDPA. CPU ratios are smoke
figures, not the product's speed; ``extra_info["fast_backends"]`` records what was loaded (Triton and the CUDA
extension load on the CPU too) and ``extra_info["ops_ran"]`` which implementation each op took (:func:`ops_ran`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from rdm_fast import RDM, ops
from rdm_fast.models import unet as unet_module
from rdm_fast.diffusion import guided
from rdm_fast.diffusion.graphs import GraphedEps
from rdm_fast.ops import _dispatch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
CASES = {"imagenet": 64, "rdm768": 16} if CUDA else {"tiny": 2}
VARIANTS = ["rdm_fast", "rdm_fast-eager", "torch-eager", "torch-compile"]


def make_case(preset: str, images: int, device: torch.device, dtype: torch.dtype):
    """(model, x, context) for one guided step: random non-zero weights, channels-last on CUDA."""
    torch.manual_seed(0)
    model = RDM.from_config(preset, device=device, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if device.type == "cuda":  # as RDM.sample does on CUDA, and as the anchor peers ran
        model.unet.to(memory_format=torch.channels_last)
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(images, cfg.channels, cfg.image_size, cfg.image_size, device=device, generator=g)
    ctx = torch.randn(images, cfg.context_tokens, cfg.context_dim, device=device, generator=g)
    return model, x, ctx


@contextlib.contextmanager
def ops_ran() -> Iterator[dict[str, list[str]]]:
    """A dict filled, when the block ends, with the implementations each rdm_fast op took inside it (op -> names):
    an honest label for a variant whose fast path falls back (on the CPU, to the plain-PyTorch references)."""
    ran: dict[str, set[str]] = {}
    first_use = _dispatch.log_first_use

    @_dispatch.eager_constant  # like the function it wraps: called eagerly while torch.compile traces
    def record(op: str, impl: str, *args) -> None:
        ran.setdefault(op, set()).add(impl)
        first_use(op, impl, *args)

    out: dict[str, list[str]] = {}
    _dispatch.log_first_use = record
    try:
        yield out
    finally:
        _dispatch.log_first_use = first_use
        out.update((op, sorted(impls)) for op, impls in sorted(ran.items()))


@pytest.fixture(scope="module", params=list(CASES))
def setup(request):
    preset = request.param
    return (preset, *make_case(preset, CASES[preset], DEVICE, DTYPE))


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The peers' attention: ``scaled_dot_product_attention`` on (B, heads, N, d) views."""
    b, n, _ = q.shape
    qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, n, -1)


def with_sdpa(fn):
    """``fn`` with the UNet's attention (``ops.attention``, self and cross) swapped for :func:`sdpa_attention`
    during each call."""
    def call(*args):
        saved, unet_module.ops.attention = unet_module.ops.attention, sdpa_attention
        try:
            return fn(*args)
        finally:
            unet_module.ops.attention = saved
    return call


def step_fn(variant: str, model: RDM, x: torch.Tensor, ctx: torch.Tensor):
    """The guided-step callable ``(x, t) -> eps`` of one variant (VARIANTS, or ``torch-reference``: the
    plain-PyTorch path with its own attention reference, the parity oracle). The ops mode is the caller's."""
    scale = model.config.sampling.guidance_scale
    if variant.startswith("rdm_fast"):
        eps_fn = guided(model.unet, ctx, scale, prepare=model.unet.prepare_context)
        return GraphedEps(eps_fn, x) if variant == "rdm_fast" else eps_fn
    if variant == "torch-reference":
        return guided(model.unet, ctx, scale)
    unet = model.unet
    if variant == "torch-compile":
        unet = torch.compile(unet)
    return with_sdpa(guided(unet, ctx, scale))


@pytest.mark.parametrize("variant", VARIANTS)
def test_guided_step(benchmark, setup, variant):
    preset, model, x, ctx = setup
    if variant == "rdm_fast" and not CUDA:
        pytest.skip("CUDA graphs need a GPU")
    if variant == "torch-compile" and os.environ.get("RDM_BENCH_COMPILE") != "1":
        pytest.skip("set RDM_BENCH_COMPILE=1 to include the torch.compile baseline (minutes to compile)")
    b = x.shape[0]
    benchmark.group = f"step-{preset}-{b}img-{str(DTYPE).removeprefix('torch.')}-{DEVICE.type}"
    benchmark.extra_info.update(preset=preset, images=b, unet_batch=2 * b, variant=variant, device=str(DEVICE),
                                fast_backends=ops.available_backends())
    mode = "reference" if variant.startswith("torch") else "auto"
    with ops.use_mode(mode), torch.inference_mode():
        with ops_ran() as ran:  # the graph's capture and the warm-up: a replay calls no op
            eps_fn = step_fn(variant, model, x, ctx)

            def step():
                out = eps_fn(x, 500)
                if CUDA:
                    torch.cuda.synchronize()
                return out

            for _ in range(3 if CUDA else 1):  # warm-up: autotuning, compilation, allocator
                step()
        benchmark.extra_info["ops_ran"] = ran
        benchmark.pedantic(step, rounds=20 if CUDA else 3, iterations=1, warmup_rounds=1)
