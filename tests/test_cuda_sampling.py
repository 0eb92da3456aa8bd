"""The sampling loop on a GPU: CUDA-graph replay vs eager, and no host synchronisation inside the loop.
The GPU cases skip without CUDA; the CPU cases check the graph switch's behaviour."""

from __future__ import annotations

import pytest
import torch
from conftest import official_checkpoint

from rdm_fast import RDM, RDMConfig
from rdm_fast.diffusion.graphs import maybe_graphed

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graphs_off_or_cpu():
    fn = lambda x, t: x  # noqa: E731
    x = torch.zeros(2, 4, 8, 8)
    assert maybe_graphed(fn, x, None) is fn and maybe_graphed(fn, x, False) is fn
    with pytest.raises(ValueError, match="CUDA graphs need"):
        maybe_graphed(fn, x, True)


def _model(dtype: torch.dtype) -> tuple[RDM, torch.Tensor, torch.Tensor]:
    cfg = RDMConfig.preset("tiny")
    full, _, _ = official_checkpoint(cfg, seed=21)
    model = RDM.from_state_dict(full, cfg).to("cuda", dtype)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(3, 3, cfg.context_dim, generator=g)
    x_T = torch.randn(3, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    return model, ctx, x_T


@cuda
@pytest.mark.parametrize("sampler", ["ddim", "plms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_matches_eager(sampler, dtype):
    model, ctx, x_T = _model(dtype)
    kw = dict(steps=8, sampler=sampler, guidance_scale=2.0, x_T=x_T)
    eager = model.sample(ctx, cuda_graph=False, **kw)
    graphed = model.sample(ctx, cuda_graph=True, **kw)
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


@cuda
def test_sampling_loop_does_not_synchronise():
    model, ctx, x_T = _model(torch.bfloat16)
    ctx, x_T = ctx.cuda(), x_T.cuda()
    model.sample(ctx, steps=4, guidance_scale=2.0, x_T=x_T)  # warm-up: lazy initialisation may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        for graph in (False, True):
            model.sample(ctx, steps=4, guidance_scale=2.0, x_T=x_T, cuda_graph=graph)
    finally:
        torch.cuda.set_sync_debug_mode("default")
