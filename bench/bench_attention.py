"""pytest-benchmark of multi-head self-attention at the released RDMs' shapes, bfloat16, CUDA only.

Shapes come from the presets: for every level with a spatial transformer (and the middle block), the token
count is (latent side / downsampling factor)^2 and the heads are channels / 32 (head dim 32): imagenet at batch
128 (64 images with guidance): 1024, 256, 64 tokens with 12, 18, 30 heads; rdm768 at batch 32: 2304, 576, 144,
36 tokens with 14, 28, 42, 56 heads. Inputs are (B, N, heads*32) tensors, as the model's projections give them.

Implementations, same inputs, same run: ``triton`` (``rdm_fast.ops.attention``'s kernels through their custom
op), ``op`` (the public dispatching op in ``auto`` mode: validation and dispatch, then, forward only, whichever of
the Triton kernels and SDPA its graph-replay timing chose for the shape, so it may be timing SDPA),
``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn`` (``scaled_dot_product_attention`` restricted to one
backend, on (B, heads, N, d) views; skipped where the backend refuses the call) and ``reference`` (float32
scores and softmax; forward only). Passes: ``fwd`` and ``fwd+bwd`` (gradients of q, k, v).

A round is ``CALLS`` back-to-back calls then one synchronisation; divide by ``CALLS`` for one call.
``extra_info["gflop_per_call"]`` holds the matrix-product work (4 B H Nq Nk d forward, 2.5x that backward).
The first call of the Triton kernels autotunes them (a few seconds per shape), during the warm-up.
Run: ``pytest bench/bench_attention.py --benchmark-only --benchmark-group-by=group``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from rdm_fast import RDMConfig, ops
from rdm_fast.ops.attention import attention, attention_reference, attention_triton

CUDA = torch.cuda.is_available()
CALLS = 10
BATCH = {"imagenet": 128, "rdm768": 32}


def self_attention_shapes(preset: str, batch: int) -> dict[str, tuple[int, int, int, int]]:
    """name -> (batch, tokens, heads, head dim) of each distinct self-attention call in the preset's UNet."""
    u = RDMConfig.preset(preset).unet_config
    levels = [(2**level, u.model_channels * mult) for level, mult in enumerate(u.channel_mult)]
    used = [lv for lv in levels if lv[0] in u.attention_resolutions] + [levels[-1]]  # + the middle block
    shapes = {}
    for ds, channels in used:
        side = u.image_size // ds
        heads, dim_head = u.heads(channels)
        shapes[f"{preset}-{side}x{side}"] = (batch, side * side, heads, dim_head)
    return shapes


SHAPES = {name: s for preset, b in BATCH.items() for name, s in self_attention_shapes(preset, b).items()}


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The PyTorch baseline: ``scaled_dot_product_attention`` on (B, heads, N, d) views."""
    b, n, _ = q.shape
    qh, kh, vh = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, n, -1)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                                   "cudnn": "CUDNN_ATTENTION"}[name], None)
    if backend is None:
        pytest.skip(f"this torch has no SDPA backend {name}")
    return sdpa_kernel([backend])


IMPLS = {
    "triton": (attention_triton, contextlib.nullcontext),
    "op": (attention, lambda: ops.use_mode("auto")),
    "sdpa-flash": (attention_sdpa, lambda: _sdpa_backend("flash")),
    "sdpa-efficient": (attention_sdpa, lambda: _sdpa_backend("efficient")),
    "sdpa-cudnn": (attention_sdpa, lambda: _sdpa_backend("cudnn")),
    "reference": (attention_reference, contextlib.nullcontext),
}


def _cases():
    for shape in SHAPES:
        for pass_ in ("fwd", "fwd+bwd"):
            for impl in IMPLS:
                if impl == "reference" and pass_ != "fwd":
                    continue  # float32 score tensors of several GB per call: forward only
                yield pytest.param(shape, pass_, impl, id=f"{shape}-{pass_}-{impl}")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape,pass_,impl", list(_cases()))
def test_self_attention(benchmark, shape, pass_, impl):
    b, n, heads, d = SHAPES[shape]
    fn, context = IMPLS[impl]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, n, heads * d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    grad = torch.randn_like(q)
    backward = pass_ == "fwd+bwd"
    for t in (q, k, v):
        t.requires_grad_(backward)
    benchmark.group = f"self-attention-{shape}-b{b}-h{heads}-d{d}-{pass_}-bf16"
    gflop = 4 * b * heads * n * n * d * (3.5 if backward else 1.0) / 1e9
    benchmark.extra_info.update(shape=shape, batch=b, tokens=n, heads=heads, head_dim=d, pass_=pass_,
                                impl=impl, gflop_per_call=gflop)

    def call():
        for _ in range(CALLS):
            out = fn(q, k, v, heads)
            if backward:
                torch.autograd.grad(out, (q, k, v), grad)
        torch.cuda.synchronize()

    with context():
        try:
            with torch.set_grad_enabled(backward):
                call()  # warm-up: Triton autotuning and compilation, cuDNN plans
        except RuntimeError as exc:  # an SDPA backend that refuses this call
            if impl.startswith("sdpa"):
                pytest.skip(f"{impl}: {exc}".splitlines()[0])
            raise
        with torch.set_grad_enabled(backward):
            benchmark.pedantic(call, rounds=10, iterations=1, warmup_rounds=1)
