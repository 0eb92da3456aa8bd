"""pytest-benchmark of the glue ops against the PyTorch code they replace (CUDA only), same run, same inputs.

Shapes of the released models' largest transformer level and sampler state: imagenet tokens (128, 1024, 384)
bf16 with GEGLU hidden 2 x 1536, latents (64, 3, 64, 64) fp32 (64 images, guided batch 128); rdm768 tokens
(32, 2304, 448), hidden 2 x 1792, latents (16, 16, 48, 48); bias + residual on the top-level
channels-last feature maps, (128, 64, 64, 192) and (32, 48, 48, 448) as (B, H, W, C). Implementations:
``fused`` (rdm_fast.ops.glue), ``eager`` (the PyTorch ops they replace: for the sampler steps, the op's own
reference) and ``compiled`` (``torch.compile`` of ``eager``, compiled during warm-up; deselect with
``-k "not compiled"``).

A round is ``CALLS`` back-to-back calls and one synchronisation (launch overheads included, as in eager
sampling). ``bytes_per_call`` in extra_info is the minimum memory traffic, for an effective bandwidth.
Run: ``pytest bench/bench_glue.py --benchmark-only --benchmark-group-by=group``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rdm_fast import ops
from rdm_fast.ops.glue import (
    PLMS_WEIGHTS,
    add_bias,
    add_layer_norm,
    ddim_guided_step,
    geglu,
    layer_norm,
    plms_guided_step,
    sampler_step_reference,
)

CUDA = torch.cuda.is_available()
CALLS = 10
EPS = 1e-5
TOKENS = {"imagenet": (128, 1024, 384), "rdm768": (32, 2304, 448)}
LATENTS = {"imagenet": (64, 3, 64, 64), "rdm768": (16, 16, 48, 48)}
MAPS = {"imagenet": (128, 64, 64, 192), "rdm768": (32, 48, 48, 448)}  # top-level ResBlock outputs, (B, H, W, C)
A_T, A_PREV, SCALE = 0.3, 0.45, 2.0


def eager_layer_norm(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b, EPS)


def eager_add_layer_norm(x, r, w, b):
    s = x + r  # residual add of a block's output (bias already added by its Linear), then the next LayerNorm
    return s, F.layer_norm(s, s.shape[-1:], w, b, EPS)


def eager_add_bias(x, b, r):
    return x + b + r  # what nn.Conv2d's bias add and the residual add cost eagerly: two passes


def eager_geglu(h):
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


def eager_ddim(x, e_u, e_c):  # the sampler step's PyTorch reference: a chain of elementwise ops
    return sampler_step_reference(x, e_u, e_c, SCALE, (), (1.0,), A_T, A_PREV, 0.0, None, False)[:2]


def eager_plms(x, e_u, e_c, h1, h2, h3):
    return sampler_step_reference(x, e_u, e_c, SCALE, (h3, h2, h1), PLMS_WEIGHTS[3], A_T, A_PREV, 0.0, None, True)


FUSED = {
    "layer_norm": lambda x, w, b: layer_norm(x, w, b, EPS),
    "add_layer_norm": lambda x, r, w, b: add_layer_norm(x, r, None, w, b, EPS),
    "add_bias": add_bias,
    "geglu": geglu,
    "ddim_step": lambda x, e_u, e_c: ddim_guided_step(x, e_u, e_c, SCALE, A_T, A_PREV),
    "plms_step": lambda x, e_u, e_c, h1, h2, h3: plms_guided_step(x, e_u, e_c, SCALE, [h3, h2, h1], A_T, A_PREV),
}
EAGER = {"layer_norm": eager_layer_norm, "add_layer_norm": eager_add_layer_norm, "add_bias": eager_add_bias,
         "geglu": eager_geglu, "ddim_step": eager_ddim, "plms_step": eager_plms}
_compiled: dict[str, object] = {}


def _inputs(op: str, model: str):
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape, dtype=torch.bfloat16: torch.randn(shape, device="cuda", generator=g).to(dtype)
    b, n, c = TOKENS[model]
    if op == "layer_norm":
        args = (rand(b, n, c), rand(c), rand(c))
        return args, 2 * args[0].nbytes
    if op == "add_layer_norm":
        args = (rand(b, n, c), rand(b, n, c), rand(c), rand(c))
        return args, 4 * args[0].nbytes
    if op == "add_bias":
        m = MAPS[model]
        args = (rand(*m), rand(m[-1]), rand(*m))
        return args, 3 * args[0].nbytes
    if op == "geglu":
        h = rand(b, n, 8 * c)
        return (h,), h.nbytes * 3 // 2
    lat = LATENTS[model]
    if op == "ddim_step":
        args = tuple(rand(*lat, dtype=torch.float32) for _ in range(3))
        return args, 5 * args[0].nbytes
    args = tuple(rand(*lat, dtype=torch.float32) for _ in range(6))
    return args, 9 * args[0].nbytes


def _impl(op: str, impl: str):
    if impl == "fused":
        return FUSED[op]
    if impl == "eager":
        return EAGER[op]
    if op not in _compiled:
        _compiled[op] = torch.compile(EAGER[op], dynamic=False)
    return _compiled[op]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
@pytest.mark.parametrize("model", list(TOKENS))
@pytest.mark.parametrize("op", list(FUSED))
def test_glue(benchmark, op, model, impl):
    args, nbytes = _inputs(op, model)
    fn = _impl(op, impl)
    benchmark.group = f"{op}-{model}-{tuple(args[0].shape)}-{str(args[0].dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(calls_per_round=CALLS, bytes_per_call=nbytes)

    def run():
        for _ in range(CALLS):
            out = fn(*args)
        torch.cuda.synchronize()
        return out

    with torch.inference_mode(), ops.use_mode("fast" if impl == "fused" else "auto"):
        run()  # warm-up: Triton / Inductor compilation
        benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
