"""The sampling loop on a GPU: CUDA-graph replay vs eager, and no host synchronisation inside the loop.
The GPU cases skip without CUDA; the CPU cases check the graph switch's behaviour."""

from __future__ import annotations

import pytest
import torch
from conftest import official_checkpoint

from rdm_fast import RDM, RDMConfig, ops
from rdm_fast.diffusion.graphs import maybe_graphed

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graphs_off_or_cpu():
    fn = lambda x, t: x  # noqa: E731
    x = torch.zeros(2, 4, 8, 8)
    assert maybe_graphed(fn, x, None) is fn and maybe_graphed(fn, x, False) is fn
    with pytest.raises(ValueError, match="CUDA graphs need"):
        maybe_graphed(fn, x, True)


def test_graph_cache_reuses_the_capture_with_the_next_batchs_context(monkeypatch, fresh_dispatch):
    """A following trajectory with the same shapes, guidance and weights replays the last capture with its own
    context copied in, and gets what eager sampling gives; other guidance, shapes or changed weights capture
    anew. (CPU: a stand-in for the CUDA graph that, like one, keeps running the captured function on its own
    static input buffer.)"""
    from rdm_fast.diffusion import graphs

    captures = []

    class Captured:
        def __init__(self, eps_fn, x):
            self.eps_fn, self.static_x = eps_fn, x.clone()
            captures.append(self)

        def __call__(self, x, t):
            self.static_x.copy_(x)
            return self.eps_fn(self.static_x, t).clone()

    monkeypatch.setattr(graphs, "GraphedEps", Captured)
    monkeypatch.setattr(graphs, "maybe_graphed", lambda fn, x, enabled: Captured(fn, x) if enabled else fn)
    cfg = RDMConfig.preset("tiny")
    model = RDM.from_state_dict(official_checkpoint(cfg, seed=5)[0], cfg)
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(2, 3, cfg.context_dim, generator=g) for _ in range(2))
    x_T = torch.randn(2, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    kw = dict(steps=4, guidance_scale=2.0, x_T=x_T)
    first = model.sample(a, cuda_graph=True, **kw)
    second = model.sample(b, cuda_graph=True, **kw)
    assert len(captures) == 1
    torch.testing.assert_close(second, model.sample(b, cuda_graph=False, **kw), rtol=0, atol=0)
    torch.testing.assert_close(first, model.sample(a, cuda_graph=False, **kw), rtol=0, atol=0)
    model.sample(b, cuda_graph=True, steps=4, guidance_scale=3.0, x_T=x_T)  # other guidance: a new capture
    model.sample(b[:1], cuda_graph=True, steps=4, guidance_scale=3.0, x_T=x_T[:1])  # another batch size: too
    model.sample(a, cuda_graph=True, **kw)
    assert len(captures) == 4
    longer = torch.randn(2, 4, cfg.context_dim, generator=g)  # another context length: its own keys/values
    torch.testing.assert_close(model.sample(longer, cuda_graph=True, **kw),
                               model.sample(longer, cuda_graph=False, **kw), rtol=0, atol=0)
    size = (cfg.image_size // 2,) * 2  # another latent size (x's shape, with the same context)
    model.sample(a, cuda_graph=True, steps=4, guidance_scale=2.0, size=size)
    model.sample(a, cuda_graph=True, **kw)
    assert len(captures) == 7
    with torch.no_grad():
        model.unet.out_conv.bias.add_(0.5)  # weights changed in place (a real graph would read stale copies)
    changed = model.sample(b, cuda_graph=True, **kw)
    assert len(captures) == 8
    torch.testing.assert_close(changed, model.sample(b, cuda_graph=False, **kw), rtol=0, atol=0)
    model.release_cuda_graph()  # the kept graph goes: the next call captures again
    model.sample(b, cuda_graph=True, **kw)
    assert len(captures) == 9
    with ops.use_mode("reference"):  # another ops mode runs other kernels: a new capture
        model.sample(b, cuda_graph=True, **kw)
    assert len(captures) == 10
    with pytest.raises(ValueError, match="contexts differ"):
        model.unet.prepare_context(a, 2).load_(model.unet.prepare_context(a[:1], 1))


def test_a_failed_capture_is_not_tried_again_for_the_same_shapes(monkeypatch, caplog):
    """A capture that fails (sampling goes on eagerly) was tried again at every batch of the same shapes: one more
    warm-up call and one more "CUDA graph capture failed" warning per batch. Other shapes or guidance try again.
    (CPU: a stand-in for a failing capture.)"""
    from rdm_fast.diffusion import graphs

    def failing(fn, x, enabled):
        graphs.logger.warning("CUDA graph capture failed (RuntimeError: stand-in); sampling eagerly")
        return fn

    monkeypatch.setattr(graphs, "maybe_graphed", failing)
    cfg = RDMConfig.preset("tiny")
    model = RDM.from_state_dict(official_checkpoint(cfg, seed=5)[0], cfg)
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(2, 3, cfg.context_dim, generator=g) for _ in range(2))
    x_T = torch.randn(2, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    with caplog.at_level("WARNING", logger="rdm_fast"):
        for context in (a, b, a):
            model.sample(context, cuda_graph=True, steps=2, guidance_scale=2.0, x_T=x_T)
        assert caplog.text.count("capture failed") == 1
        model.sample(a, cuda_graph=True, steps=2, guidance_scale=3.0, x_T=x_T)
        model.release_cuda_graph()
        model.sample(a, cuda_graph=True, steps=2, guidance_scale=3.0, x_T=x_T)
    assert caplog.text.count("capture failed") == 3


def test_float32_eager_default_is_said_once_per_model(monkeypatch, caplog):
    """float32 models on CUDA sample eagerly unless asked for graphs; the log line saying so came at every
    batch (a line per batch of python -m rdm_fast.sample without --bf16 on a GPU). (CPU: a model that says it
    is on CUDA.)"""
    model = RDM(RDMConfig.preset("tiny"))
    monkeypatch.setattr(RDM, "device", property(lambda self: torch.device("cuda")))
    with caplog.at_level("INFO", logger="rdm_fast"):
        assert [model._graph_default(None) for _ in range(3)] == [False] * 3
        assert model._graph_default(True) is True and model.to(torch.bfloat16)._graph_default(None) is None
    assert caplog.text.count("float32 sampling on CUDA runs eagerly by default") == 1


def test_sample_hands_the_graph_cache_the_resolved_default(monkeypatch):
    """sample passes cuda_graph through _graph_default to the graph cache (on CUDA a float32 model's None becomes
    False). Off CUDA the default changes nothing, so a sample that passed cuda_graph on unresolved passed every CPU
    test. (CPU: a stand-in default that marks what it resolved, and a cache that records what it is given.)"""
    model = RDM.from_config("tiny")
    seen = []

    def record(eps_fn, x, enabled, key):
        seen.append(enabled)
        return eps_fn

    monkeypatch.setattr(RDM, "_graph_default", lambda self, cuda_graph: ("resolved", cuda_graph))
    monkeypatch.setattr(model, "_graphs", record)
    model.sample(torch.randn(1, 4, 64), steps=1)
    model.sample(torch.randn(1, 4, 64), steps=1, cuda_graph=True)
    assert seen == [("resolved", None), ("resolved", True)]


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
    """Same kernels, same inputs: the replayed trajectory equals the eager one. The float32 PLMS case failed at
    1e-5 on an H200 with default cuDNN settings (cause not established; a per-run choice of a TF32 or
    non-deterministic convolution algorithm is the suspect), so cuDNN runs deterministic and TF32-free here."""
    model, ctx, x_T = _model(dtype)
    kw = dict(steps=8, sampler=sampler, guidance_scale=2.0, x_T=x_T)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        eager = model.sample(ctx, cuda_graph=False, **kw)
        graphed = model.sample(ctx, cuda_graph=True, **kw)
    assert model._graphs._last is not None, "the capture failed: the 'graphed' trajectory ran eagerly"
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


@cuda
def test_graph_cache_replays_the_next_batch_on_the_gpu(caplog):
    """The second batch of the same shapes replays the first batch's capture with its own context (no new
    capture) and matches eager sampling of that batch."""
    model, ctx, x_T = _model(torch.bfloat16)
    other = torch.randn(ctx.shape, generator=torch.Generator().manual_seed(9))
    kw = dict(steps=8, guidance_scale=2.0, x_T=x_T)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        model.sample(ctx, **kw)
        assert model._graphs._last is not None, "the first batch's capture failed"
        with caplog.at_level("DEBUG", logger="rdm_fast"):
            graphed = model.sample(other, **kw)
        eager = model.sample(other, cuda_graph=False, **kw)
    assert "captured in a CUDA graph" not in caplog.text and "replaying the captured denoising step" in caplog.text
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_sampling_is_reproducible(dtype):
    """Same model, same noise, default cuDNN settings: two eager trajectories are identical (a user's seed gives
    the same sample twice). If this fails, the float32 graph-vs-eager difference of bench/RESULTS.md is
    run-to-run non-determinism of the kernels, not the graphs."""
    model, ctx, x_T = _model(dtype)
    kw = dict(steps=8, sampler="ddim", guidance_scale=2.0, x_T=x_T, cuda_graph=False)
    first, second = model.sample(ctx, **kw), model.sample(ctx, **kw)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_follows_new_inputs(dtype):
    """Replays at inputs other than the capture's (as along a trajectory) equal eager calls at those inputs: a
    graph that kept reading a buffer filled at capture would pass a fixed-input check and fail here."""
    from rdm_fast.diffusion import guided
    from rdm_fast.diffusion.graphs import GraphedEps

    model, ctx, x_T = _model(dtype)
    model.unet.to(memory_format=torch.channels_last)
    ctx, x_T = ctx.cuda(), x_T.cuda()
    with torch.no_grad():
        eps_fn = guided(model.unet, ctx, 2.0, prepare=model.unet.prepare_context)
        graphed = GraphedEps(eps_fn, x_T)
        for seed, t in ((1, 999), (2, 500), (3, 17)):
            x = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(seed)).to("cuda")
            torch.testing.assert_close(graphed(x, t), eps_fn(x, t), rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_and_eager_agree_along_a_trajectory(dtype):
    """At every step of an 8-step DDIM trajectory (followed eagerly), the replayed eps equals the eager eps at
    that step's x: names the first step where they part, if they do (float32 trajectories differed on an
    H200; see bench/RESULTS.md)."""
    from rdm_fast.diffusion import guided
    from rdm_fast.diffusion.graphs import GraphedEps

    model, ctx, x_T = _model(dtype)
    model.unet.to(memory_format=torch.channels_last)
    ctx, x = ctx.cuda(), x_T.cuda()
    coeffs = model.schedule.ddim(8, 0.0)
    with torch.no_grad():
        eps_fn = guided(model.unet, ctx, 2.0, prepare=model.unet.prepare_context)
        graphed = GraphedEps(eps_fn, x)
        for i in range(len(coeffs)):
            t = int(coeffs.timesteps[i])
            eager = eps_fn(x, t)
            torch.testing.assert_close(graphed(x, t), eager, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {i}: {m}")
            x, _ = ops.ddim_guided_step(x, None, eager, 1.0, float(coeffs.alphas[i]), float(coeffs.alphas_prev[i]))


@cuda
def test_sampling_loop_does_not_synchronise():
    model, ctx, x_T = _model(torch.bfloat16)
    ctx, x_T = ctx.cuda(), x_T.cuda()
    model.sample(ctx, steps=4, guidance_scale=2.0, x_T=x_T)  # warm-up: lazy initialisation, autotuning and the
    # ops' one-time timing of each shape synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        for graph in (False, True):
            model.sample(ctx, steps=4, guidance_scale=2.0, x_T=x_T, cuda_graph=graph)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_retrieval_and_sampling_loop_in_one_stream_without_sync(tmp_path):
    """Pseudo-query gather, Triton search, neighbour gather, context assembly and guided sampling of two batches
    on the GPU under sync-debug mode "error"; the contexts equal the CPU path's (torch backend, same ids)."""
    import numpy as np

    from rdm_fast.retrieval.context import model_context
    from rdm_fast.retrieval.database import Database, write_database

    model, _, x_T = _model(torch.bfloat16)
    cfg = model.config
    emb = np.random.default_rng(0).standard_normal((1000, cfg.context_dim)).astype(np.float16)
    path = write_database(tmp_path / "db", emb, {"name": "test", "dim": cfg.context_dim, "normalized": False})
    gpu_db = Database.open(path, backend="triton", device="cuda")
    cpu_db = Database.open(path, backend="torch", device="cpu")
    ids = torch.tensor([3, 141, 592, 65, 358, 979]).cuda()
    x_T = x_T.cuda()
    # warm-up at the loop's shapes: autotuning and the ops' one-time timing per shape synchronise
    model_context(gpu_db, cfg, gpu_db.embeddings(ids[:3]), query_ids=ids[:3])
    model.sample(model_context(gpu_db, cfg, gpu_db.embeddings(ids[:3]), query_ids=ids[:3]), steps=2,
                 guidance_scale=2.0, x_T=x_T)
    torch.cuda.set_sync_debug_mode("error")
    try:
        contexts = []
        for start in (0, 3):
            batch_ids = ids[start:start + 3]
            ctx = model_context(gpu_db, cfg, gpu_db.embeddings(batch_ids), query_ids=batch_ids)
            model.sample(ctx, steps=4, guidance_scale=2.0, x_T=x_T)
            contexts.append(ctx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_ids = ids.cpu()
    ref = model_context(cpu_db, cfg, cpu_db.embeddings(cpu_ids), query_ids=cpu_ids)
    torch.testing.assert_close(torch.cat(contexts).cpu(), ref, rtol=2e-3, atol=2e-3)


@cuda
def test_float32_sampling_defaults_to_eager(caplog):
    """Until float32 graph replay is verified along a trajectory, float32 models sample eagerly by default
    (16-bit models replay graphs)."""
    model, ctx, x_T = _model(torch.float32)
    with caplog.at_level("INFO", logger="rdm_fast"):
        model.sample(ctx, steps=2, guidance_scale=2.0, x_T=x_T)
        model.sample(ctx, steps=2, guidance_scale=2.0, x_T=x_T)  # a second batch: not said again
    assert caplog.text.count("runs eagerly by default") == 1 and "captured in a CUDA graph" not in caplog.text
    caplog.clear()
    model, ctx, x_T = _model(torch.bfloat16)
    with caplog.at_level("INFO", logger="rdm_fast"):
        model.sample(ctx, steps=2, guidance_scale=2.0, x_T=x_T)
    assert "captured in a CUDA graph" in caplog.text
