"""The models against the independent float64 oracle (tests/oracle.py) fed the same official-layout weights,
half-precision closeness, and the extension path against the plain-PyTorch path."""

from __future__ import annotations

import math
import warnings

import numpy as np
import oracle
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from conftest import mini_vq_config, official_checkpoint

from rdm_fast import RDM, RDMConfig, ops
from rdm_fast.models.layers import cached_names, refresh_cached
from rdm_fast.rdm import to_channels_last
from rdm_fast.diffusion import guided


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def inputs(cfg: RDMConfig, batch: int = 2, tokens: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([999, 1, 500, 37][:batch])
    ctx = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    return x, t, ctx


CONFIGS = {"tiny": lambda: RDMConfig.preset("tiny"), "mini_vq": mini_vq_config}


def nonzero(model: RDM, channels_last: bool = False) -> RDM:
    """``model`` with every parameter perturbed to non-zero values (from_config zero-initialises the residual
    outputs, which would hide whole branches from a comparison), optionally converted to channels-last."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    if channels_last:
        model.unet.to(memory_format=torch.channels_last)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_oracle(name):
    """fp32 UNet vs the float64 oracle on the same official weights: agreement to float32 rounding (the
    timestep embedding is computed in float32 like the reference, the oracle in float64: ~1e-5 in eps)."""
    cfg = CONFIGS[name]()
    full, unet_sd, _ = official_checkpoint(cfg, seed=3)
    model = RDM.from_state_dict(full, cfg)
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        ours = model.unet(x, t, ctx)
    ref = oracle.unet_forward(unet_sd, x, t, ctx, num_head_channels=cfg.unet_config.num_head_channels)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    assert ref.abs().mean() > 0.1  # weights are well conditioned: the comparison is not trivially small
    assert rel_err(ours, ref) < 2e-5
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_autoencoder_matches_oracle(name, channels_last):
    """Encode and decode against the float64 oracle; also with channels-last weights and inputs (as ``RDM`` lays
    the first stage out on CUDA), where the outputs still leave in NCHW memory."""
    cfg = CONFIGS[name]()
    full, _, ae_sd = official_checkpoint(cfg, seed=5)
    model = RDM.from_state_dict(full, cfg)
    kind = cfg.first_stage_config.kind
    g = torch.Generator().manual_seed(1)
    f = cfg.first_stage_config.ddconfig.downsample_factor
    images = torch.rand(2, 3, cfg.image_size * f, cfg.image_size * f, generator=g) * 2 - 1
    if channels_last:
        model.first_stage.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        if kind == "kl":
            mean, _ = oracle.encoder_forward(ae_sd, images, kind="kl")
            torch.testing.assert_close(model.encode(images, sample=False).double(), mean * cfg.scale_factor,
                                       rtol=1e-4, atol=1e-4)
            z = mean.float()
        else:
            z = oracle.encoder_forward(ae_sd, images, kind="vq")
            torch.testing.assert_close(model.encode(images).double(), z * cfg.scale_factor, rtol=1e-4, atol=1e-4)
            z = z.float()
        if channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
            assert model.encode_moments(images).is_contiguous()
        ours = model.decode(z * cfg.scale_factor)
    ref = oracle.decoder_forward(ae_sd, z, kind=kind).clamp(-1, 1)
    assert ours.shape == images.shape and ours.is_contiguous() and ref.std() > 0.05
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)


def test_vq_quantize_in_blocks_matches_the_reference_formula(monkeypatch):
    """Codebook lookup in blocks of rows (the distance matrix bounded whatever the batch) picks the indices of
    the reference's one-matrix formula ``(|z|^2 + |e|^2) - 2 z.e`` in float32, and the float64 oracle's nearest
    codes."""
    from rdm_fast.models import autoencoder

    model = RDM.from_config(mini_vq_config())
    ae = model.first_stage
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        ae.codebook.weight.copy_(torch.randn(ae.codebook.weight.shape, generator=g))
    z = torch.randn(3, 3, 8, 8, generator=g) * 1.5
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    codes = ae.codebook.weight
    reference = ((flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1)) - 2 * torch.einsum("bd,dn->bn", flat,
                                                                                             codes.t())).argmin(1)
    monkeypatch.setattr(autoencoder, "QUANTIZE_BLOCK", 5 * codes.shape[0])  # blocks of 5 rows, the last short
    with torch.no_grad():
        snapped = ae.quantize(z)
    assert torch.equal(snapped, codes[reference].view(3, 8, 8, 3).permute(0, 3, 1, 2))
    assert torch.equal(reference.view(3, 8, 8), oracle.nearest_codes(z.double(), codes.double()))


def test_kl_encode_samples_with_generator():
    cfg = RDMConfig.preset("tiny")
    full, _, ae_sd = official_checkpoint(cfg, seed=2)
    model = RDM.from_state_dict(full, cfg)
    g = torch.Generator().manual_seed(3)
    images = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        a = model.encode(images, generator=torch.Generator().manual_seed(0))
        b = model.encode(images, generator=torch.Generator().manual_seed(0))
        c = model.encode(images, generator=torch.Generator().manual_seed(1))
    mean, logvar = oracle.encoder_forward(ae_sd, images, kind="kl")
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32).double()
    torch.testing.assert_close(a.double(), (mean + (0.5 * logvar).exp() * noise) * cfg.scale_factor,
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # one generator per image: each image's draw is its own, whatever the batch (as in sample)
    pair = torch.cat([images, torch.rand(1, 3, 32, 32, generator=g) * 2 - 1])
    with torch.no_grad():
        both = model.encode(pair, generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(7)])
    # float32 convolutions of a batch of 2 and of 1 differ by a few 1e-6 (their algorithms depend on the batch);
    # another noise draw would differ by O(1)
    torch.testing.assert_close(both[:1], a, rtol=1e-4, atol=1e-5)
    # the posterior mean draws no noise: a generator given with sample=False keeps its state for the caller's next
    # draws (drawing and discarding a sample advanced it, though the latents were the same)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.encode(images, sample=False, generator=g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(5).get_state())


def test_encode_and_unet_input_errors(caplog):
    model = RDM.from_config("tiny")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with pytest.raises(ValueError, match="give noise or generator, not both"):
        model.encode(images, generator=torch.Generator(), noise=torch.zeros(2, 4, 16, 16))
    with pytest.raises(ValueError, match="1 generators for 2 samples"):
        model.encode(images, generator=[torch.Generator()])
    with pytest.raises(ValueError, match=r"images must be floats in \[-1, 1\], got torch.uint8"):
        model.encode((images * 127).to(torch.uint8))
    model.encode(images * 127.5 + 127.5)
    assert "encode: the images reach 255" in caplog.text
    x, ctx = torch.zeros(1, 4, 16, 16, dtype=torch.long), torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="unet: x must be a float tensor, got torch.int64"):
        model.unet(x, 500, ctx)
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        for p in model.parameters():  # from_config zero-inits the output: eps would be 0 whatever t
            p.add_(torch.randn_like(p) * 0.05)
        half = model.unet(x, 500.5, ctx)  # a float timestep stays a float, as in a tensor
        torch.testing.assert_close(half, model.unet(x, torch.tensor([500.5]), ctx))
        assert not torch.allclose(half, model.unet(x, 500, ctx))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 4e-2), (torch.float16, 1.5e-2)])
def test_half_precision_unet_stays_close_to_fp32(dtype, tol):
    """Weights converted once to bf16/fp16, GroupNorm statistics in fp32: relative L2 error of eps against
    the fp32 model below 4e-2 (bf16) / 1.5e-2 (fp16) at high and low noise levels, never NaN (observed on
    the CPU over seeds: bf16 1.5-1.6e-2, fp16 0.2-0.9e-2)."""
    cfg = RDMConfig.preset("tiny")
    full, _, _ = official_checkpoint(cfg, seed=7)
    model = RDM.from_state_dict(full, cfg)
    x, t, ctx = inputs(cfg, batch=4)
    with torch.no_grad():
        ref = model.unet(x, t, ctx)
        half = model.to(dtype).unet(x, t, ctx)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert rel_err(half, ref) < tol


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("dtype,eps_tol,min_psnr", [(torch.bfloat16, 5e-2, 35.0), (torch.float16, 1e-2, 50.0)])
def test_half_precision_sampling_tracks_fp32(dtype, eps_tol, min_psnr, device):
    """Guided 10-step DDIM in bf16/fp16 with weights converted once: at every state of the fp32 trajectory the
    half-precision guided eps is within a relative L2 error of 5e-2 (bf16, 8 mantissa bits) / 1e-2 (fp16); the
    decoded images of the two runs from the same noise agree to >= 35 dB / 50 dB PSNR (range [-1, 1]; measured
    ~47 / ~64 dB on the CPU); the half-precision images are finite and not blank. The float32 run is on the CPU;
    on CUDA the half-precision UNet runs as ``RDM.sample`` runs it there (fast kernels, channels-last weights; the
    whole trajectory from its CUDA graph)."""
    cfg = RDMConfig.preset("tiny")
    full, _, _ = official_checkpoint(cfg, seed=11)
    ref_model, half_model = RDM.from_state_dict(full, cfg), RDM.from_state_dict(full, cfg).to(device, dtype)
    assert all(p.dtype == dtype for p in half_model.parameters())
    if device == "cuda":  # as RDM.sample converts it there: the per-step check runs the channels-last path too
        to_channels_last(half_model.unet)
    _, _, ctx = inputs(cfg, batch=2)
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    coeffs = ref_model.schedule.ddim(10)
    eps_ref = guided(ref_model.unet, ctx, 3.0, prepare=ref_model.unet.prepare_context)
    eps_half = guided(half_model.unet, ctx.to(device), 3.0, prepare=half_model.unet.prepare_context)
    x = x_T
    with torch.no_grad():
        for i in range(len(coeffs)):
            t = int(coeffs.timesteps[i])
            e = eps_ref(x, t)
            assert rel_err(eps_half(x.to(device), t).cpu(), e) < eps_tol, f"step {i}"
            x, _ = oracle.ddim_step(x, e, float(coeffs.alphas[i]), float(coeffs.alphas_prev[i]), 0.0)
        images_ref = ref_model.decode(ref_model.sample(ctx, steps=10, guidance_scale=3.0, x_T=x_T))
        latents = half_model.sample(ctx.to(device), steps=10, guidance_scale=3.0, x_T=x_T.to(device))
        images = half_model.decode(latents).float().cpu()
    assert torch.isfinite(images).all() and images.std() > 1e-2
    psnr = 10 * torch.log10(4.0 / (images - images_ref).pow(2).mean()).item()
    assert psnr > min_psnr


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("zero_rows", [0, 2])
def test_prepared_context_matches_plain_context(zero_rows, depth, channels_last):
    """Keys/values projected once (and skipped for the all-zero unconditional rows) give the same eps as the
    plain context tensor with the zeros concatenated (fp32 rounding only: the same ops on row subsets, the
    biases carried: self-attention's into norm2/norm3, the feed-forward's to the next block's LayerNorm (depth
    2) or through the output projection; channels-last, the transformer's output bias added by the ResBlock
    before it and the residual added in place). The carried biases follow in-place weight updates."""
    tree = RDMConfig.preset("tiny").to_dict()
    tree["model"]["params"]["unet_config"]["params"]["transformer_depth"] = depth
    cfg = RDMConfig.from_dict(tree)
    model = nonzero(RDM.from_config(cfg) if depth > 1 else RDM.from_state_dict(official_checkpoint(cfg, seed=17)[0],
                                                                               cfg), channels_last)
    x, t, ctx = inputs(cfg, batch=2)
    x, t = torch.cat([x] * (1 + (zero_rows > 0))), torch.cat([t] * (1 + (zero_rows > 0)))
    plain = torch.cat([torch.zeros(zero_rows, *ctx.shape[1:]), ctx])
    with torch.no_grad():
        ref = model.unet(x, t, plain)
        prepared = model.unet.prepare_context(ctx, zero_rows=zero_rows)
        out = model.unet(x, t, prepared)
    assert prepared.batch == x.shape[0] and len(prepared.kv) == sum(
        1 for m in model.unet.modules() if type(m).__name__ == "TransformerBlock")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # every bias that is carried changes in place: the cached sums must follow
        for name, p in model.unet.named_parameters():
            if name.endswith(("proj_out.bias", "ff.out.bias", "to_out.bias", "conv2.bias")):
                p.add_(0.1)
        ref = model.unet(x, t, plain)
        out = model.unet(x, t, model.unet.prepare_context(ctx, zero_rows=zero_rows))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prepared context takes x of"):
        model.unet(x[:1], t[:1], prepared)
    with pytest.raises(ValueError, match="context must be"):
        model.unet.prepare_context(ctx[..., :-1])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("attention_resolutions", [[1, 2], [2]])
def test_shared_input_matches_duplicated_rows(attention_resolutions, channels_last):
    """Guidance evaluates both halves at the same x and t: with ``shared_input`` the UNet runs the layers before
    the first cross-attention once on those rows (a longer prefix when the first transformer is at level 1) and
    duplicates them there; eps equals that of the explicit [x; x] batch. Channels-last inference writes the
    duplicated skips into the up stages' buffers, NCHW concatenates them."""
    tree = RDMConfig.preset("tiny").to_dict()
    tree["model"]["params"]["unet_config"]["params"]["attention_resolutions"] = attention_resolutions
    cfg = RDMConfig.from_dict(tree)
    model = nonzero(RDM.from_config(cfg), channels_last)
    x, _, ctx = inputs(cfg, batch=2)
    t = torch.tensor([500, 37])
    with torch.no_grad():
        shared = model.unet.prepare_context(ctx, zero_rows=2, shared_input=True)
        assert shared.shared_input and shared.input_rows == 2
        out = model.unet(x, t, shared)
        ref = model.unet(torch.cat([x, x]), torch.cat([t, t]), model.unet.prepare_context(ctx, zero_rows=2))
    assert out.shape == ref.shape == (4, *x.shape[1:])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="takes x of 2 rows"):
        model.unet(torch.cat([x, x]), torch.cat([t, t]), shared)
    with pytest.raises(ValueError, match="as many zero rows"):
        model.unet.prepare_context(ctx, zero_rows=1, shared_input=True)


def test_timestep_adds_match_per_block_projections_and_follow_weight_changes(fresh_dispatch):
    """Inference projects every ResBlock's timestep embedding in one GEMM (weights concatenated once, conv1's bias
    folded in); it equals the per-block projections of the plain path and follows in-place weight updates."""
    from rdm_fast.models.unet import TimestepAdds

    cfg = RDMConfig.preset("tiny")
    model = RDM.from_state_dict(official_checkpoint(cfg, seed=29)[0], cfg)
    x, t, ctx = inputs(cfg)
    seen = set()  # what the ResBlocks get as emb
    for block in model.unet.modules():
        if type(block).__name__ == "ResBlock":
            block.forward = lambda x, emb, *a, f=block.forward, **k: (seen.add(type(emb)), f(x, emb, *a, **k))[1]
    with torch.no_grad():
        for _ in range(2):
            fast = model.unet(x, t, ctx)
            with ops.use_mode("reference"):
                ref = model.unet(x, t, ctx)
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
            for name, p in model.unet.named_parameters():  # the cached concatenation must be rebuilt
                if name.endswith(("emb_proj.weight", "emb_proj.bias", "conv1.bias")):
                    p.mul_(1.5).add_(0.01)
    assert seen == {TimestepAdds, torch.Tensor}


def test_fused_qkv_inference_path_matches_and_follows_weight_changes():
    """Inference projects q, k, v with one concatenated weight (cached); it equals the separate projections of
    the autograd path and is rebuilt after an in-place weight update."""
    cfg = RDMConfig.preset("tiny")
    full, _, _ = official_checkpoint(cfg, seed=23)
    model = RDM.from_state_dict(full, cfg)
    x, t, ctx = inputs(cfg)
    for _ in range(2):
        with torch.no_grad():
            fused = model.unet(x, t, ctx)
        separate = model.unet(x, t, ctx).detach()
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for block in model.unet.modules():
                if type(block).__name__ == "TransformerBlock":
                    block.self_attn.to_k.weight.mul_(1.5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 8, 1, 3)])
def test_upsample_transposed_conv_matches_definition(shape, channels_last):
    """The fast Upsample (one stride-2 transposed convolution with summed taps) equals nearest x2 + 3x3 conv,
    computed here in float64 by PyTorch's own ops; its cached weight follows in-place weight updates, and
    gradients flow to the 3x3 weight under autograd."""
    from rdm_fast.models.layers import Upsample

    torch.manual_seed(0)
    up = Upsample(shape[1])
    x = torch.randn(shape)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    up, x = up.to(memory_format=fmt), x.contiguous(memory_format=fmt)

    def definition(m, x):
        w, b = m.conv.weight.double(), m.conv.bias.double()
        return torch.nn.functional.conv2d(torch.nn.functional.interpolate(x.double(), scale_factor=2.0), w, b,
                                          padding=1)

    for _ in range(2):
        with torch.no_grad():
            out = up(x)
            assert out.shape == (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
            torch.testing.assert_close(out.double(), definition(up, x), rtol=1e-5, atol=1e-5)
            with ops.use_mode("reference"):
                torch.testing.assert_close(up(x).double(), definition(up, x), rtol=1e-5, atol=1e-5)
            up.conv.weight.mul_(-1.5)  # the cached transposed weight must be rebuilt
    up(x).square().sum().backward()
    w = up.conv.weight.detach().double().requires_grad_()
    torch.nn.functional.conv2d(torch.nn.functional.interpolate(x.double(), scale_factor=2.0), w,
                               up.conv.bias.detach().double(), padding=1).square().sum().backward()
    torch.testing.assert_close(up.conv.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-4)


def test_channels_last_sampling_matches_and_tokens_are_views():
    """Sampling with the UNet converted to channels-last gives the same latents (fp32: conv algorithms differ
    by rounding); a spatial transformer's tokens are then a view of the feature map and its output stays
    channels-last."""
    cfg = RDMConfig.preset("tiny")
    full, _, _ = official_checkpoint(cfg, seed=19)
    model = RDM.from_state_dict(full, cfg)
    _, _, ctx = inputs(cfg, batch=2)
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    ref = model.sample(ctx, steps=4, guidance_scale=2.0, x_T=x_T, channels_last=False)
    out = model.sample(ctx, steps=4, guidance_scale=2.0, x_T=x_T, channels_last=True)
    assert model.unet.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) < 1e-4
    block = next(m for m in model.unet.modules() if type(m).__name__ == "SpatialTransformer")
    x = torch.randn(2, block.proj_in.in_channels, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # the channels-last norm output is the token matrix: (B, H, W, C) is a dense view
        assert block.norm(x).permute(0, 2, 3, 1).is_contiguous()
        assert block(x, ctx).is_contiguous(memory_format=torch.channels_last)


def test_cpu_extension_path_matches_reference_path():
    """The whole model with the C++ CPU extension (the CPU's auto path) vs the plain-PyTorch references."""
    if not ops.available_backends().get("cpu-ext"):
        pytest.fail("the C++ extension is not built: pip install --no-build-isolation .")
    cfg = RDMConfig.preset("tiny")
    full, _, _ = official_checkpoint(cfg, seed=13)
    model = RDM.from_state_dict(full, cfg)
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        with ops.use_mode("reference"):
            ref = model.unet(x, t, ctx), model.decode(x)
        with ops.use_mode("auto"):
            fast = model.unet(x, t, ctx), model.decode(x)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unet_input_errors():
    model = RDM.from_config("tiny")
    x, t, ctx = inputs(model.config)
    with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
        model.unet(x[:, :3], t, ctx)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.unet(x[..., :15, :15], t, ctx)
    with pytest.raises(ValueError, match=r"context must be \(2, k, 64\)"):
        model.unet(x, t, ctx[..., :32])
    with pytest.raises(ValueError, match="one timestep per sample"):
        model.unet(x, t[:1].expand(3), ctx)
    assert model.unet(x, 10, ctx).shape == x.shape  # a scalar timestep is broadcast


def test_constructors_return_models_in_eval_mode(tmp_path):
    """from_config, from_state_dict and from_pretrained give models ready to sample: every module in eval mode (a
    config with dropout would otherwise drop activations while sampling)."""
    model = RDM.from_config("tiny", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    for m in (model, RDM.from_state_dict(model.state_dict(), model.config), RDM.from_pretrained(tmp_path / "m")):
        assert not any(module.training for module in m.modules())


def test_from_config_starts_like_training():
    """Residual branches and the output conv start at zero (as in the reference training code): eps == 0."""
    model = RDM.from_config("tiny")
    x, t, ctx = inputs(model.config)
    with torch.no_grad():
        assert torch.count_nonzero(model.unet(x, t, ctx)) == 0
    assert model.unet.up[0].res.conv2.weight.abs().sum() == 0
    assert model.unet.down[0].attn.proj_out.weight.abs().sum() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 4e-2), (torch.float16, 1.5e-2)])
def test_first_stage_on_cuda_matches_oracle(dtype, tol, caplog, fresh_dispatch):
    """The KL first stage on the GPU (channels-last, fast ops by default) against the float64 oracle; its
    attention has one head of 96 channels, which the Triton kernels lack: SDPA runs it (logged)."""
    tree = RDMConfig.preset("tiny").to_dict()
    tree["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"] = [1, 3]
    cfg = RDMConfig.from_dict(tree)
    full, _, ae_sd = official_checkpoint(cfg, seed=19)
    model = RDM.from_state_dict(full, cfg).to("cuda", dtype)
    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    mean, _ = oracle.encoder_forward(ae_sd, images, kind="kl")
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad(), caplog.at_level("INFO", logger="rdm_fast.ops"):
            z = model.encode(images.cuda(), sample=False).cpu()
            decoded = model.decode(mean.float().cuda() * cfg.scale_factor).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    assert not model.first_stage.decoder.conv_in.weight.is_contiguous()  # converted to channels-last
    assert decoded.is_contiguous() and torch.isfinite(decoded).all()
    assert rel_err(z, mean * cfg.scale_factor) < tol
    assert rel_err(decoded, oracle.decoder_forward(ae_sd, mean, kind="kl").clamp(-1, 1)) < tol
    assert any("attention: sdpa" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 4e-2), (torch.float16, 1.5e-2)])
def test_unet_on_cuda_matches_oracle(dtype, tol):
    """The model on the GPU (fast ops by default) against the float64 oracle on the CPU; TF32 off for fp32."""
    cfg = mini_vq_config()
    full, unet_sd, _ = official_checkpoint(cfg, seed=17)
    model = RDM.from_state_dict(full, cfg).to("cuda", dtype)
    x, t, ctx = inputs(cfg, batch=4)
    ref = oracle.unet_forward(unet_sd, x, t, ctx, num_head_channels=cfg.unet_config.num_head_channels)
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            out = model.unet(x.cuda(), t.cuda(), ctx.cuda()).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    assert torch.isfinite(out).all() and rel_err(out, ref) < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 1.5e-2)])
def test_guided_step_on_cuda_matches_oracle(dtype, tol):
    """The guided step as ``RDM.sample`` runs it on CUDA (channels-last weights, the context prepared once, one
    input for both halves, cross-attention on the conditional half only, skips written into slices, the fast
    kernels) against the float64 oracle's eps_u + s (eps_c - eps_u); TF32 off for fp32. On the CPU the same path
    in bf16 / fp16 is 2.3e-2 / 2.9e-3 off (scale 2)."""
    assert ops.available_backends() == {"cpu-ext": True, "cuda-ext": True, "triton": True}
    cfg = mini_vq_config()
    full, unet_sd, _ = official_checkpoint(cfg, seed=19)
    model = RDM.from_state_dict(full, cfg).to("cuda", dtype)
    model.unet.to(memory_format=torch.channels_last)
    x, _, ctx = inputs(cfg, batch=4)
    t, scale, heads = 500, 2.0, cfg.unet_config.num_head_channels
    e_u = oracle.unet_forward(unet_sd, x, torch.full((4,), t), torch.zeros_like(ctx), num_head_channels=heads)
    e_c = oracle.unet_forward(unet_sd, x, torch.full((4,), t), ctx, num_head_channels=heads)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), torch.no_grad(), ops.use_mode("auto"):
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            out = guided(model.unet, ctx.cuda(), scale, prepare=model.unet.prepare_context)(x.cuda(), t).cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    assert torch.isfinite(out).all() and rel_err(out.float(), e_u + scale * (e_c - e_u)) < tol


def test_channels_last_inference_writes_skips_into_slices(monkeypatch, fresh_dispatch):
    """Channels-last inference builds no [h, skip] concatenation (producers write into the up stages' input
    buffers) and gives the same eps as the concatenating autograd path."""
    cfg = RDMConfig.preset("tiny")
    full, _, _ = official_checkpoint(cfg, seed=29)
    model = RDM.from_state_dict(full, cfg)
    model.unet.to(memory_format=torch.channels_last)
    x, t, ctx = inputs(cfg)
    with torch.enable_grad():
        ref = model.unet(x, t, ctx).detach()
    cats = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda ts, *a, **k: cats.append(ts[0].dim()) or real_cat(ts, *a, **k))
    with torch.no_grad():
        out = model.unet(x, t, ctx)
    assert cats and 4 not in cats, "a feature-map concatenation ran"
    assert rel_err(out, ref) < 1e-5


def test_downsample_gives_cudnn_a_dense_copy_of_a_channel_slice(monkeypatch):
    """A Downsample fed a channel slice of a skip buffer (channels-last inference) convolves a dense channels-last
    copy made by ops.add_bias (the convolution would otherwise copy it with PyTorch's unvectorised copy); the
    result equals the convolution of the slice."""
    import torch.nn.functional as F

    from rdm_fast.models import layers
    from rdm_fast.models.unet import Downsample

    down = Downsample(6).to(memory_format=torch.channels_last)
    wide = torch.randn(2, 10, 8, 6).contiguous(memory_format=torch.channels_last)
    x = wide[:, 4:]
    seen = []
    real = F.conv2d
    monkeypatch.setattr(layers.F, "conv2d", lambda inp, *a: seen.append(inp.is_contiguous(
        memory_format=torch.channels_last)) or real(inp, *a))
    with torch.no_grad():
        y = down(x)
    assert seen == [True]
    torch.testing.assert_close(y, real(x.contiguous(), down.conv.weight, down.conv.bias, 2, 1))


def test_channels_last_network_returns_contiguous_eps(fresh_dispatch):
    """A channels-last UNet (inference, as RDM.sample runs it on CUDA) returns eps in NCHW memory, so that the
    samplers' fused step (contiguous tensors only) takes the guided eps; the values equal the plain path's."""
    cfg = RDMConfig.preset("tiny")
    model = nonzero(RDM.from_config(cfg), channels_last=True)
    x, _, ctx = inputs(cfg, batch=2)
    with torch.no_grad():
        eps = guided(model.unet, ctx, 2.0, prepare=model.unet.prepare_context)(x, 500)
        with ops.use_mode("reference"):
            ref = guided(model.unet, ctx, 2.0, prepare=model.unet.prepare_context)(x, 500)
    assert eps.is_contiguous() and eps.dtype == x.dtype
    torch.testing.assert_close(eps, ref, rtol=1e-4, atol=1e-4)


def test_channels_last_conversion_inside_inference_mode_keeps_the_model_trainable():
    """The one-time channels-last conversion (sample's UNet, the first stage on CUDA) may run inside the caller's
    inference mode; the weights must stay ordinary tensors, so that a later training step or a gradient through
    the decoder works."""
    from rdm_fast.rdm import to_channels_last

    torch.manual_seed(0)
    model = RDM.from_config("tiny")
    with torch.inference_mode():
        model.sample(torch.randn(1, 4, 64), steps=2, channels_last=True)
        to_channels_last(model.first_stage)
    assert not model.unet.input_conv.weight.is_contiguous()  # converted
    assert not any(p.is_inference() for p in model.parameters())
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 700])
    model.unet(x, t, torch.randn(2, 4, 64)).square().mean().backward()
    z = torch.randn(1, 4, 16, 16, requires_grad=True)
    model.decode(z).sum().backward()
    assert z.grad is not None and model.unet.input_conv.weight.grad is not None


def test_cpu_models_keep_their_layout_unless_asked():
    """On the CPU, sample (channels_last default or False), encode and decode leave the weights in their NCHW
    layout; only channels_last=True converts the UNet. The channels-last tests asked for it explicitly, so a default
    (or False) that converted on the CPU too, or a first stage converted off CUDA, passed."""
    model = RDM.from_config("tiny")
    for kwargs in ({}, {"channels_last": False}):
        model.sample(torch.randn(1, 4, 64), steps=1, **kwargs)
        assert model.unet.input_conv.weight.is_contiguous(), kwargs
    model.decode(model.encode(torch.zeros(1, 3, 32, 32)))
    assert all(p.is_contiguous() for p in model.first_stage.parameters())
    model.sample(torch.randn(1, 4, 64), steps=1, channels_last=True)
    assert not model.unet.input_conv.weight.is_contiguous()


@pytest.fixture
def fake_cuda_device(monkeypatch) -> list:
    """``torch.cuda.device`` replaced by a context that records the devices entered (returned); cuda:0 current."""
    import contextlib

    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(dev)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return entered


def test_rdm_methods_run_with_the_models_gpu_current(fake_cuda_device):
    """sample, decode and encode_moments make the model's GPU the current CUDA device for their duration (Triton
    kernels and CUDA graphs launch on the current device); on the CPU nothing is switched. CUDA is simulated."""
    from rdm_fast import rdm as rdm_module

    entered = fake_cuda_device

    class Model:
        device = torch.device("cuda:1")

        @rdm_module.on_own_device
        def work(self, x):
            return x + 1

    assert Model().work(1) == 2 and entered == [torch.device("cuda:1")]
    for other in ("cpu", "cuda:0", "cuda"):  # the CPU, and the current GPU: nothing to switch
        Model.device = torch.device(other)
        assert Model().work(1) == 2 and len(entered) == 1
    wrapper = rdm_module.on_own_device(lambda self: None).__code__  # the code every such wrapper runs
    assert RDM.decode.__code__ is wrapper and RDM.encode_moments.__code__ is wrapper
    assert RDM.sample.__wrapped__.__code__ is wrapper  # under torch.no_grad's own wrapper


def test_module_entry_points_run_with_their_inputs_gpu_current(fake_cuda_device):
    """UNet.forward and the first stage's moments/decode (called directly, not through RDM's methods) make their
    input's GPU current when it is not; on the current GPU and on the CPU nothing is switched. CUDA is simulated
    (a stand-in for x with the attribute the check reads)."""
    from rdm_fast.models.autoencoder import Autoencoder
    from rdm_fast.models.layers import on_input_device
    from rdm_fast.models.unet import UNet

    entered = fake_cuda_device

    class OnGpu:  # a stand-in for a tensor on a GPU: the wrapper reads only its device
        def __init__(self, index):
            self.device = torch.device("cuda", index)

    forward = on_input_device(lambda self, x, y: y + 1)
    assert forward(None, OnGpu(1), 1) == 2 and entered == [torch.device("cuda:1")]
    assert forward(None, y=1, x=OnGpu(2)) == 2 and entered[-1] == torch.device("cuda:2")  # x by keyword
    entered.clear()
    assert forward(None, OnGpu(0), 1) == 2 and forward(None, torch.zeros(1), 1) == 2 and entered == []
    wrapper = forward.__code__
    for method in (UNet.forward, Autoencoder.moments, Autoencoder.decode):
        assert method.__code__ is wrapper, method


def test_sample_sees_weights_written_through_data():
    """Writes through .data (the reference's EMA copy style) bypass the version counter that the inference caches
    (fused qkv, float32 norms, timestep adds, ...) check; sample recomputes them, so both models draw the same."""
    torch.manual_seed(0)
    a, b = RDM.from_config("tiny"), RDM.from_config("tiny")
    with torch.no_grad():
        for p in [*a.parameters(), *b.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    ctx, x_T = torch.randn(2, 4, 64), torch.randn(2, 4, 16, 16)
    a.sample(ctx, steps=2, x_T=x_T, guidance_scale=2.0)  # fills a's caches from its own weights
    for p, q in zip(a.unet.parameters(), b.unet.parameters(), strict=True):
        p.data.copy_(q.data)
    assert torch.equal(a.sample(ctx, steps=2, x_T=x_T, guidance_scale=2.0),
                       b.sample(ctx, steps=2, x_T=x_T, guidance_scale=2.0))


def test_decode_and_encode_see_weights_written_through_data():
    """As sample: decode and encode_moments recompute the first stage's inference caches (the float32 copies of a
    bfloat16 model's norm weights and conv1 biases) at every call, so writes through .data reach them; decode
    without its refresh passed the tests. (In a float32 model most of these caches are views of the weights.)"""
    torch.manual_seed(0)
    a, b = RDM.from_config("tiny", dtype=torch.bfloat16), RDM.from_config("tiny", dtype=torch.bfloat16)
    with torch.no_grad():
        for p in [*a.first_stage.parameters(), *b.first_stage.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    z, images = torch.randn(1, 4, 16, 16), torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # the caches serve inference only (with autograd on they are computed afresh)
        a.decode(z)  # fills a's caches from its own weights
        a.encode_moments(images)
        for p, q in zip(a.first_stage.parameters(), b.first_stage.parameters(), strict=True):
            p.data.copy_(q.data)
        assert torch.equal(a.decode(z), b.decode(z))
        assert torch.equal(a.encode_moments(images), b.encode_moments(images))


def test_refreshing_the_caches_reads_no_host_data_and_follows_inference_mode(fresh_dispatch):
    """``RDM.sample`` refreshes the inference caches (fused qkv, transposed upsampling weights, ...) at every call:
    on CUDA that must queue device work only. A tensor made from host data (``torch.tensor(list, device=...)``:
    aten.lift_fresh) or a scalar read is a blocking copy that fails the GPU's sync-free sampling test; a CPU
    dispatch scan catches either here. Caches filled under ``torch.inference_mode`` are refreshed outside it too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rdm_fast.models.layers import cached_names, refresh_cached

    class HostData(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith(("aten.lift_fresh", "aten._local_scalar_dense", "aten.is_nonzero")):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = RDM.from_config("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero-initialised output layers
    ctx, x_T = torch.randn(2, 4, 64), torch.randn(2, 4, 16, 16)
    with torch.inference_mode():
        first = model.sample(ctx, steps=2, x_T=x_T, guidance_scale=2.0, channels_last=True)
    caches = [m for m in model.unet.modules() if cached_names(m)]
    assert len(caches) >= 5 and any("transposed" in cached_names(m) for m in caches)
    with HostData() as scan:
        refresh_cached(model.unet)
    assert scan.ops == []
    # a whole warm call: scalars are read, but only from CPU tensors (the schedule, CPU inputs' checks); nothing is
    # made from host data
    with torch.inference_mode(), HostData() as scan:
        model.sample(ctx, steps=2, x_T=x_T, guidance_scale=2.0, channels_last=True)
    assert "aten.lift_fresh.default" not in scan.ops
    with torch.no_grad():
        for p in model.unet.parameters():
            p.data.mul_(0.5)  # no version bump: only the refresh sees it
    again = model.sample(ctx, steps=2, x_T=x_T, guidance_scale=2.0, channels_last=True)  # outside inference mode
    fresh = RDM.from_config("tiny")
    fresh.load_state_dict(model.state_dict())
    assert not torch.equal(again, first)
    assert torch.equal(again, fresh.sample(ctx, steps=2, x_T=x_T, guidance_scale=2.0, channels_last=True))


def _perturbed(seed: int) -> RDM:
    torch.manual_seed(seed)
    model = RDM.from_config("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_derived_weights_follow_every_kind_of_weight_update():
    """Direct UNet calls under no_grad reuse derived weights (fused projections, float32 norms, timestep adds).
    They went stale after a fused optimiser step (no version bump), after load_state_dict inside inference mode
    (inference tensors keep no version), and decode/encode never refreshed the first stage after .data writes."""
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 4, 64)
    other = _perturbed(1)

    def same_as_fresh(model: RDM, what: str) -> None:
        fresh = RDM.from_config("tiny")
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.equal(model.unet(x, t, ctx), fresh.unet(x, t, ctx)), what

    model = _perturbed(0)
    with torch.no_grad():
        model.unet(x, t, ctx)  # fills the caches
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=1e-2, fused=True)
    model.unet(x, t, ctx).square().mean().backward()
    optimizer.step()
    same_as_fresh(model, "after a fused AdamW step")

    with torch.inference_mode():
        loaded = RDM.from_config("tiny")  # inference-tensor weights
        loaded.unet(x, t, ctx)
        loaded.load_state_dict(other.state_dict())
        assert torch.equal(loaded.unet(x, t, ctx), other.unet(x, t, ctx)), "after load_state_dict in inference mode"

    z, images = torch.randn(1, 4, 16, 16), torch.rand(1, 3, 32, 32) * 2 - 1
    model.decode(z), model.encode_moments(images)  # fills the first stage's caches
    with torch.no_grad():
        for a, b in zip(model.first_stage.parameters(), other.first_stage.parameters()):
            a.data.copy_(b.data)  # no version bump
    assert torch.equal(model.decode(z), other.decode(z))
    assert torch.equal(model.encode_moments(images), other.encode_moments(images))


def test_derived_weights_stay_where_graphs_read_them():
    """A CUDA graph reads the cached tensors: an update must write into them, not replace them, unless the weights
    themselves moved (which changes the graph's key). An optimiser step anywhere in the process (it changes the
    caches' key) replaced them while a graph made before could still be replayed."""
    from rdm_fast.models.layers import _CACHES

    def leaves(model: RDM) -> dict[tuple[int, str, int], int]:
        return {(id(m), name, i): leaf.data_ptr() for m in model.unet.modules() for name, entry in
                _CACHES.get(m, {}).items() for i, leaf in enumerate(tree_leaves(entry.value)) if torch.is_tensor(leaf)}

    model, other = _perturbed(0), torch.nn.Linear(2, 2)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 4, 64)
    with torch.no_grad():
        model.unet(x, t, ctx)
    before = leaves(model)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    other(torch.ones(1, 2)).sum().backward()
    optimizer.step()  # another model's step: every cache's key changes
    with torch.no_grad():
        model.unet(x, t, ctx)
        model.load_state_dict(_perturbed(1).state_dict())
        got = model.unet(x, t, ctx)
    assert leaves(model) == before and len(before) > 10
    with torch.no_grad():
        assert torch.equal(got, _perturbed(1).unet(x, t, ctx))


def test_cache_updates_say_when_a_graph_may_not_be_replayed():
    """``RDM.sample`` keys its CUDA graph by the weights' storage and versions and by ``cache_updates()``. Swapping
    weight tensors back and forth (assign=True loads; ``.data`` swaps across dtypes) restores storage and versions
    while the cached tensors were recomputed or replaced in between: the count must have moved. Repeated sampling
    with unchanged weights must not move it (the graph is reused)."""
    from rdm_fast.models.layers import cache_updates

    model = _perturbed(0).to(torch.bfloat16)
    ctx, x_T = torch.randn(1, 4, 64), torch.randn(1, 4, 16, 16)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    model.sample(ctx, steps=2, x_T=x_T)
    captured = cache_updates()
    model.sample(ctx, steps=2, x_T=x_T)
    assert cache_updates() == captured  # nothing changed: the graph of the first call would be replayed
    backup = model.unet.state_dict()
    model.unet.load_state_dict({k: v + 0.01 for k, v in backup.items()}, assign=True)
    with torch.no_grad():
        model.unet(x, t, ctx)  # recomputes for the other weights
    model.unet.load_state_dict(backup, assign=True)  # the first storage and versions again
    assert cache_updates() != captured
    want = _perturbed(0).to(torch.bfloat16)
    assert torch.equal(model.sample(ctx, steps=2, x_T=x_T), want.sample(ctx, steps=2, x_T=x_T))
    captured = cache_updates()
    saved = [p.data for p in model.unet.parameters()]
    for p in model.unet.parameters():
        p.data = p.data.float()  # e.g. float32 shadows swapped in
    with torch.no_grad():
        model.unet(x.float(), t, ctx)
    for p, data in zip(model.unet.parameters(), saved):
        p.data = data
    assert cache_updates() != captured


def test_cache_updates_never_write_into_a_weights_storage():
    """A float32 first stage caches ``conv1.bias.float()[None]``, a view of the bias itself: after ``.data`` swaps,
    the update copied the new bias into the old storage, the user's saved copy."""
    model = _perturbed(0)
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        first = model.decode(z)
        block = next(m for m in model.first_stage.modules() if "conv1_bias" in cached_names(m))
        saved = block.conv1.bias.data
        kept = saved.clone()
        block.conv1.bias.data = saved + 1.0
        assert not torch.equal(model.decode(z), first)
        assert torch.equal(saved, kept)  # the saved bias is untouched
        block.conv1.bias.data = saved
        assert torch.equal(model.decode(z), first)


def test_derived_weights_follow_dtype_moves():
    """After ``.to(dtype)`` the refresh copied into the old float32 values (a Parameter itself, for float32
    weights): sample and load_state_dict failed, and a refreshed value kept its old dtype."""
    model = _perturbed(0)
    ctx, x_T = torch.randn(1, 4, 64), torch.randn(1, 4, 16, 16)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    with torch.no_grad():
        model.unet(x, t, ctx)
    model.sample(ctx, steps=2, x_T=x_T)
    model.to(torch.bfloat16)
    model.load_state_dict(_perturbed(1).to(torch.bfloat16).state_dict())
    want = _perturbed(1).to(torch.bfloat16)
    assert torch.equal(model.sample(ctx, steps=2, x_T=x_T), want.sample(ctx, steps=2, x_T=x_T))
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, ctx), want.unet(x, t, ctx))
    model.float()
    refresh_cached(model.unet)
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, ctx), want.float().unet(x, t, ctx))


def test_models_pickle_and_copy_after_use(tmp_path):
    """The caches held functions in the modules: a model could not be pickled once it had run."""
    import copy
    import pickle

    model = _perturbed(0)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 4, 64)
    with torch.no_grad():
        want = model.unet(x, t, ctx)
        again = pickle.loads(pickle.dumps(model))
        assert torch.equal(again.unet(x, t, ctx), want)
        twin = copy.deepcopy(model)
        for p in twin.unet.parameters():
            p.data.zero_()
        refresh_cached(twin.unet)
        assert torch.equal(model.unet(x, t, ctx), want)  # the copy's caches are its own
    torch.save(model, tmp_path / "model.pt")


def test_sample_follows_the_config_conventions(caplog):
    """Defaults from the config's sampling section (tiny: DDIM, 20 steps, eta 0, guidance 2); contexts L2-normalised
    where the config says so (tiny, like rdm768); a context length outside the conventions is warned about."""
    torch.manual_seed(0)
    model = RDM.from_config("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ctx, x_T = torch.randn(2, 4, 64), torch.randn(2, 4, 16, 16)
    s = model.config.sampling
    assert (s.steps, s.sampler, s.eta, s.guidance_scale) == (20, "ddim", 0.0, 2.0)
    explicit = model.sample(ctx, steps=20, sampler="ddim", eta=0.0, guidance_scale=2.0, x_T=x_T)
    assert torch.equal(model.sample(ctx, x_T=x_T), explicit)
    torch.testing.assert_close(model.sample(ctx * 3.7, x_T=x_T), explicit, rtol=1e-3, atol=2e-4)  # rounding only
    assert "embeddings per sample" not in caplog.text
    model.sample(torch.randn(1, 22, 64), steps=1)
    assert "the context holds 22 embeddings per sample; this model takes a text or query embedding" in caplog.text


@pytest.mark.parametrize("name,sampler,steps,eta,scale", [
    ("tiny", "ddim", 5, 0.0, 2.0), ("tiny", "ddim", 5, 1.0, 3.0), ("tiny", "plms", 6, 0.0, 5.0),
    ("tiny", "ddim", 4, 0.0, 1.0), ("mini_vq", "ddim", 4, 0.0, 2.0)])
def test_sample_matches_a_plain_guided_loop(name, sampler, steps, eta, scale):
    """RDM.sample (prepared context, shared unconditional half, fused guided updates) against a loop written
    from the conventions alone: two plain UNet calls per step (zero context, then the context, L2-normalised
    where the config says), eps_u + s (eps_c - eps_u), and the DDIM/PLMS updates in float64 from the schedule."""
    torch.manual_seed(0)
    cfg = mini_vq_config() if name == "mini_vq" else RDMConfig.preset(name)
    model = RDM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    b = 2
    ctx = torch.randn(b, cfg.context_tokens, cfg.context_dim) * 3
    x_T = torch.randn(b, cfg.channels, cfg.image_size, cfg.image_size)
    ours = model.sample(ctx, steps=steps, sampler=sampler, eta=eta, guidance_scale=scale, x_T=x_T,
                        generator=torch.Generator().manual_seed(9))
    c = torch.nn.functional.normalize(ctx, dim=-1) if cfg.normalized_embeddings else ctx
    acp = model.schedule.alphas_cumprod.tolist()
    ts = list(range(1, 1000, 1000 // steps))[::-1]

    def eps(x, t):
        with torch.no_grad():
            tt = torch.full((b,), t)
            e_c = model.unet(x.float(), tt, c).double()
            e_u = model.unet(x.float(), tt, torch.zeros_like(c)).double() if scale != 1 else e_c
        return e_u + scale * (e_c - e_u)

    def update(x, e, i, noise=None):
        a, a_prev = acp[ts[i]], acp[ts[i + 1]] if i + 1 < len(ts) else acp[0]
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        out = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * e
        return out + sigma * noise if sigma > 0 else out

    g, x, history = torch.Generator().manual_seed(9), x_T.double(), []
    for i, t in enumerate(ts):
        e = eps(x, t)
        if sampler == "ddim":
            x = update(x, e, i, torch.randn(x.shape, generator=g).double() if eta > 0 else None)
            continue
        if not history:
            e_next = (e + eps(update(x, e, i), ts[i + 1])) / 2
        elif len(history) == 1:
            e_next = (3 * e - history[-1]) / 2
        elif len(history) == 2:
            e_next = (23 * e - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            e_next = (55 * e - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        x, history = update(x, e_next, i), (history + [e])[-3:]
    scale_of_x = float(x.abs().max())
    torch.testing.assert_close(ours.double(), x, rtol=0, atol=1e-5 * max(scale_of_x, 1.0))


@pytest.mark.parametrize("kwargs,error,message", [
    ({"steps": 2.5}, TypeError, "steps must be an int"),
    ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be finite"),
    ({"sampler": "plms", "eta": 0.5}, ValueError, "eta must be 0 for plms"),
    ({"sampler": "euler"}, ValueError, "sampler must be 'ddim' or 'plms'"),
    ({"generator": 0}, TypeError, "generator must be a torch.Generator or numpy"),
    ({"generator": [torch.Generator(), None]}, TypeError, "generator must be a torch.Generator or numpy"),
    ({"generator": [torch.Generator()], "x_T": torch.zeros(2, 4, 16, 16)}, ValueError, "1 generators for 2 samples"),
    ({"size": 8}, ValueError, r"size must be \(H, W\), two positive ints"),
    ({"size": (0, 0)}, ValueError, r"size must be \(H, W\), two positive ints"),
    ({"size": (True, 8)}, ValueError, r"size must be \(H, W\), two positive ints"),
    ({"context": torch.zeros(0, 4, 64)}, ValueError, r"context holds no samples"),
    # the UNet's own checks refused these later, naming none of the model's conventions (or, for integers on a
    # model that normalises its context, not at all)
    ({"context": torch.randn(2, 4, 32)}, ValueError, "context embeddings have 32 dimensions but this model expects 64"),
    ({"context": torch.zeros(2, 0, 64)}, ValueError, "context must hold at least one embedding per sample"),
    ({"context": torch.ones(2, 4, 64, dtype=torch.long)}, ValueError, "context must hold floats, got torch.int64"),
    ({"x_T": torch.zeros(2, 4, 8, 8)}, ValueError, r"x_T must have shape \(2, 4, 16, 16\), got \(2, 4, 8, 8\)"),
])
def test_sample_argument_errors(kwargs, error, message):
    model = RDM.from_config("tiny")
    kwargs = {"context": torch.randn(2, 4, 64), "steps": 2, **kwargs}
    with pytest.raises(error, match=message):
        model.sample(**kwargs)


def test_sample_size_takes_numpy_integers():
    model = RDM.from_config("tiny")
    ctx = torch.randn(1, 4, 64)
    a = model.sample(ctx, steps=1, size=(np.int64(8), np.int64(16)), generator=torch.Generator().manual_seed(0))
    b = model.sample(ctx, steps=1, size=(8, 16), generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 4, 8, 16) and torch.equal(a, b)


@pytest.mark.parametrize("preset", ["tiny", "imagenet"])
def test_unet_runs_on_meta_tensors(preset):
    """Shape propagation without memory, as bench/floors.py counts FLOPs (the ops' autocast check once raised
    for the meta device)."""
    model = RDM.from_config(preset, device="meta", dtype=torch.bfloat16)
    cfg, b = model.config, 4
    x = torch.empty(b, cfg.channels, cfg.image_size, cfg.image_size, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(b, cfg.context_tokens, cfg.context_dim, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        eps = model.unet(x, torch.zeros(b, dtype=torch.long, device="meta"), ctx)
    assert eps.shape == x.shape and eps.device.type == "meta"


@pytest.mark.parametrize("preset", ["imagenet", "rdm768"])
def test_every_norm_has_the_released_eps_and_groups(preset):
    """The norms' eps by role, as the released models have them: a wrong eps moves outputs by only about 1e-5
    relative on random weights, below the oracle tests' tolerance. UNet GroupNorms 1e-5 except the spatial
    transformers' 1e-6, LayerNorms 1e-5, the autoencoder's GroupNorms 1e-6; 32 groups everywhere."""
    from rdm_fast.models.layers import GroupNorm, LayerNorm
    from rdm_fast.models.unet import SpatialTransformer

    model = RDM.from_config(preset, device="meta")
    in_transformer = {f"{name}.{child}" for name, m in model.unet.named_modules() if isinstance(m, SpatialTransformer)
                      for child, c in m.named_children() if isinstance(c, GroupNorm)}
    seen = {"unet GroupNorm 1e-05": 0, "unet GroupNorm 1e-06": 0, "unet LayerNorm 1e-05": 0,
            "first_stage GroupNorm 1e-06": 0}
    for part in ("unet", "first_stage"):
        for name, m in getattr(model, part).named_modules():
            if isinstance(m, GroupNorm):
                want = 1e-6 if part == "first_stage" or name in in_transformer else 1e-5
                assert (m.eps, m.num_groups) == (want, 32), f"{part}.{name}"
                seen[f"{part} GroupNorm {want:g}"] += 1
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                assert isinstance(m, LayerNorm) and part == "unet" and m.eps == 1e-5, f"{part}.{name}"
                seen["unet LayerNorm 1e-05"] += 1
    # attention at 3 levels, 2 blocks down and 3 up each, and in the middle
    assert seen["unet GroupNorm 1e-06"] == len(in_transformer) == 16
    assert seen["unet LayerNorm 1e-05"] == 3 * 16
    assert seen["unet GroupNorm 1e-05"] > 0 and seen["first_stage GroupNorm 1e-06"] > 0


def test_first_stage_is_frozen():
    """The autoencoder is never trained with an RDM: decoding and encoding build no graph of its weights (the
    results can go straight to NumPy), while gradients still reach an input that asks for them."""
    model = RDM.from_config("tiny")
    assert not any(p.requires_grad for p in model.first_stage.parameters())
    assert all(p.requires_grad for p in model.unet.parameters())
    z = torch.randn(1, 4, 16, 16)
    assert not model.decode(z).requires_grad and not model.encode(model.decode(z)).requires_grad
    z.requires_grad_()
    model.decode(z).sum().backward()
    assert z.grad is not None
    # the same for encode, without a warning: its range check read the images' peak with float() on the
    # autograd tensor, which PyTorch warns about ("Converting a tensor with requires_grad=True to a scalar")
    images = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.encode(images, sample=False).sum().backward()
    assert images.grad is not None


@pytest.mark.parametrize("kwargs,error,message", [
    ({"context": torch.tensor([[[float("nan")] * 64]])}, ValueError, "context holds NaN or infinite values"),
    ({"context": torch.full((1, 4, 64), 1e20)}, ValueError, r"context embeddings have norms beyond 1.84e\+19"),
    # every component below the limit, the norm (8 * 1.5e19) beyond it: its float32 square overflows all the same
    ({"context": torch.full((1, 4, 64), 1.5e19)}, ValueError, r"context embeddings have norms beyond 1.84e\+19"),
    ({"x_T": torch.full((2, 4, 16, 16), float("inf"))}, ValueError, "x_T holds NaN or infinite values"),
    ({"context": np.zeros((2, 4, 64), np.float32)}, TypeError,
     r"context must be a torch.Tensor of shape \(B, k, 64\), got ndarray"),
    ({"context": None}, TypeError, "context must be a torch.Tensor"),
    ({"x_T": np.zeros((2, 4, 16, 16), np.float32)}, TypeError, "x_T must be a torch.Tensor"),
    ({"guidance_scale": "5"}, TypeError, "guidance_scale must be a real number"),
    ({"eta": "0.5"}, TypeError, "eta must be a real number"),
    ({"steps": True}, TypeError, "steps must be an int"),
    # integer or bool start noise was taken as draws (as encode's noise once was): refused like encode's
    ({"x_T": torch.ones(2, 4, 16, 16, dtype=torch.long)}, ValueError, "x_T must hold floats.*got torch.int64"),
    ({"x_T": torch.zeros(2, 4, 16, 16, dtype=torch.bool)}, ValueError, "x_T must hold floats.*got torch.bool"),
])
def test_sample_refuses_non_tensors_and_non_finite_cpu_inputs(kwargs, error, message):
    model = RDM.from_config("tiny")
    kwargs = {"context": torch.randn(2, 4, 64), "steps": 2, **kwargs}
    with pytest.raises(error, match=message):
        model.sample(**kwargs)


def test_sample_takes_numpy_integer_steps():
    model = RDM.from_config("tiny")
    ctx = torch.randn(1, 4, 64)
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.sample(ctx, steps=np.int64(2), x_T=x_T), model.sample(ctx, steps=2, x_T=x_T))


def test_autoencoder_refuses_non_tensors_and_empty_batches():
    model = RDM.from_config("tiny")
    with pytest.raises(TypeError, match=r"encode: images must be a torch.Tensor of shape \(B, 3, H, W\), got ndarray"):
        model.encode(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(TypeError, match="encode: images must be a torch.Tensor.*got list"):
        model.encode_moments([[0.0]])
    with pytest.raises(TypeError, match=r"decode: latents must be a torch.Tensor of shape \(B, 4, h, w\), got NoneType"):
        model.decode(None)
    with pytest.raises(ValueError, match=r"encode: images hold no samples \(batch of 0\)"):
        model.encode(torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match=r"decode: latents hold no samples \(batch of 0\)"):
        model.decode(torch.zeros(0, 4, 16, 16))



def test_half_precision_models_encode_and_decode_to_float32():
    """encode, encode_moments and decode return float32 whatever the model's precision (as documented; callers
    write decode's images as pixels and store encode_moments' output). Only float32 models' outputs were read, so
    a decode or encode_moments that returned the model's bfloat16 passed."""
    model = RDM.from_config("tiny", dtype=torch.bfloat16)
    images, z = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 4, 16, 16)
    assert model.encode_moments(images).dtype == model.encode(images).dtype == model.decode(z).dtype == torch.float32


def test_sample_runs_from_x_T_in_float32():
    """x_T of another float dtype starts the trajectory as its float32 copy: latents are float32 and equal those
    from x_T.float() (a bfloat16 x_T is exact in float32). Keeping x_T's dtype passed every test (a bfloat16 x_T
    then sampled a bfloat16 trajectory on a float32 model)."""
    model = nonzero(RDM.from_config("tiny"))
    context, x_T = torch.randn(1, 4, 64), torch.randn(1, 4, 16, 16).bfloat16()
    latents = model.sample(context, steps=2, x_T=x_T)
    assert latents.dtype == torch.float32 and torch.equal(latents, model.sample(context, steps=2, x_T=x_T.float()))


def test_decode_clamps_to_the_image_range():
    """decode's images lie in [-1, 1] whatever the decoder gives (as the reference's samples are clamped before
    they are written as pixels). The oracle tests' decoders stayed inside the range, so a decode without its clamp
    passed: here the output conv's bias pushes every pixel to +-5."""
    model = RDM.from_config("tiny")
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        model.first_stage.decoder.conv_out.bias.copy_(torch.tensor([5.0, -5.0, 5.0]))
        images = model.decode(z)
    assert torch.equal(images[:, 0], torch.ones_like(images[:, 0])) and (images[:, 1] == -1).all()


def test_latents_and_decode_check_their_inputs():
    """A NaN latent made the whole decoded image NaN (written as black); moments of the wrong shape were blamed on
    a noise never given, and NumPy moments failed deep inside."""
    model = RDM.from_config("tiny")  # a KL first stage: moments hold (mean, log-variance), 8 channels
    z = torch.randn(1, 4, 16, 16)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="decode: latents holds NaN or infinite values"):
        model.decode(z)
    with pytest.raises(ValueError, match="decode: latents must be floats, got torch.int64"):
        model.decode(torch.zeros(1, 4, 16, 16, dtype=torch.long))
    with pytest.raises(TypeError, match=r"latents: moments must be a torch.Tensor of shape \(B, 8, h, w\), got ndarray"):
        model.latents(np.zeros((2, 8, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"latents: moments must be \(B, 8, h, w\) .*got \(2, 5, 16, 16\)"):
        model.latents(torch.zeros(2, 5, 16, 16))
    with pytest.raises(ValueError, match="latents: moments holds NaN"):
        model.latents(torch.full((1, 8, 16, 16), float("inf")))
    with pytest.raises(TypeError, match="encode: noise must be a torch.Tensor.*got ndarray"):
        model.encode(torch.zeros(1, 3, 32, 32), noise=np.zeros((1, 4, 16, 16), np.float32))
    with pytest.raises(ValueError, match="encode: noise holds NaN"):  # the latents came out NaN without a word
        model.encode(torch.zeros(1, 3, 32, 32), noise=torch.full((1, 4, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="encode: noise must hold floats"):
        model.encode(torch.zeros(1, 3, 32, 32), noise=torch.ones(1, 4, 16, 16, dtype=torch.bool))
    for rows, error in ((1.5, TypeError), ("2", TypeError), (-1, ValueError)):  # 1.5 made a context for 3.5 rows
        with pytest.raises(error, match=f"zero_rows must be an int >= 0, got {rows!r}"):
            model.unet.prepare_context(torch.randn(2, 4, 64), rows)
    moments = model.encode_moments(torch.zeros(1, 3, 32, 32))
    noise = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(model.latents(moments, noise=noise), model.encode(torch.zeros(1, 3, 32, 32), noise=noise))


def test_unet_refuses_wrong_types_and_empty_batches():
    model = RDM.from_config("tiny")
    x, t, ctx = inputs(model.config)
    with pytest.raises(ValueError, match="unet: context must hold floats, got torch.int64"):
        model.unet(x, t, ctx.long())
    with pytest.raises(TypeError, match="unet: context must be a torch.Tensor.*got NoneType"):
        model.unet(x, t, None)
    for bad in (np.array([1, 2]), [1, 2], "5"):
        with pytest.raises(TypeError, match=r"unet: t must be a tensor of shape \(B,\) or a number"):
            model.unet(x, bad, ctx)
    with pytest.raises(TypeError, match="UNet: x must be a torch.Tensor, got ndarray"):
        model.unet(x.numpy(), t, ctx)
    with pytest.raises(TypeError, match="UNet: x must be a torch.Tensor, got list"):
        model.unet(x=[1.0], t=t, context=ctx)
    with pytest.raises(ValueError, match=r"unet: x holds no samples \(batch of 0\)"):
        model.unet(x[:0], 5, ctx[:0])
    with pytest.raises(ValueError, match="unet: context holds no samples"):
        model.unet.prepare_context(ctx[:0])
    with torch.no_grad():
        torch.testing.assert_close(model.unet(x, np.int64(10), ctx), model.unet(x, 10, ctx))


def test_unet_returns_eps_in_the_dtype_of_x():
    """The network runs in its weights' dtype; eps leaves in x's (as UNet.forward's docstring says)."""
    model = RDM.from_config("tiny", dtype=torch.bfloat16)
    x, t, ctx = inputs(model.config)
    with torch.no_grad():
        assert model.unet(x, t, ctx).dtype == torch.float32
        assert model.unet(x.bfloat16(), t, ctx).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_config_builds_the_model_in_the_given_dtype(dtype):
    """from_config(dtype=...) gives every weight that precision (bench/floors.py counts bfloat16 traffic from such a
    model); no test read it back, so a from_config that left the model in float32 passed."""
    model = RDM.from_config("tiny", dtype=dtype)
    assert model.dtype == dtype and {p.dtype for p in model.parameters()} == {dtype}


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, "bf16"])
def test_from_config_refuses_dtypes_the_model_cannot_run_in(dtype):
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.float16 or torch.bfloat16"):
        RDM.from_config("tiny", dtype=dtype)


def test_a_model_moved_to_float64_is_refused_by_name():
    """.double() bypasses from_config's dtype check: sample failed in a kernel ("conv3x3: unsupported x dtype
    torch.float64"), which named neither the model's precision nor the fix."""
    model = RDM.from_config("tiny").double()
    calls = {"sample": lambda: model.sample(torch.randn(1, 4, 64), steps=2),
             "decode": lambda: model.decode(torch.randn(1, 4, 16, 16)),
             "encode_moments": lambda: model.encode(torch.zeros(1, 3, 32, 32))}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{name.split('_')[0]}: the model's weights are torch.float64, but it runs in "
                                             r"float32, float16 or bfloat16: convert it with .float\(\)"):
            call()


def test_from_config_and_from_pretrained_name_a_bad_device(tmp_path):
    """Checked before any weights are read: torch's own message for "gpu" is a long list of device types."""
    for load in (lambda d: RDM.from_config("tiny", device=d),
                 lambda d: RDM.from_pretrained(tmp_path / "missing.ckpt", device=d)):
        with pytest.raises(ValueError, match=r"device 'gpu' is not a torch device \(e.g. 'cpu', 'cuda', 'cuda:1'\)"):
            load("gpu")
        with pytest.raises(ValueError, match=r"device 'xpu' is not supported: rdm_fast runs on 'cpu' or CUDA"):
            load("xpu")
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match=r"device 'cuda': no CUDA GPU is available here \(use 'cpu'\)"):
                load("cuda")
    assert RDM.from_config("tiny", device=torch.device("cpu")).unet.input_conv.weight.device.type == "cpu"


def test_zero_sized_maps_are_refused_by_name():
    """0 is a multiple of every factor: an empty H or W reached a convolution's "padded input size" error."""
    rdm = RDM.from_config("tiny")
    c, f = rdm.config.channels, rdm.config.first_stage_config.ddconfig.downsample_factor
    with pytest.raises(ValueError, match=r"decode: latents must be \(B, 4, h, w\) with h, w >= 1, got \(1, 4, 0, 8\)"):
        rdm.decode(torch.randn(1, c, 0, 8))
    with pytest.raises(ValueError, match=f"encode: images must be .* positive multiples of {f}"):
        rdm.encode(torch.rand(1, 3, 8 * f, 0))
    with pytest.raises(ValueError, match=r"unet: H and W must be positive multiples of \d+, got \(0, 8\)"):
        rdm.unet(torch.randn(1, c, 0, 8), torch.tensor([5]), torch.randn(1, rdm.config.context_tokens,
                                                                        rdm.config.context_dim))


def test_encode_refuses_sizes_that_are_not_multiples_of_the_downsampling():
    """An image whose height or width is no multiple of the first stage's factor is refused by name (the
    convolutions would otherwise round the latent's size, and decode would not give the image's size back)."""
    rdm = RDM.from_config("tiny")
    f = rdm.config.first_stage_config.ddconfig.downsample_factor
    for h, w in ((8 * f + 1, 8 * f), (8 * f, 8 * f + 1)):
        with pytest.raises(ValueError, match=rf"encode: images must be \(B, 3, H, W\) with H, W positive multiples of "
                                             rf"{f}, got \(1, 3, {h}, {w}\)"):
            rdm.encode(torch.zeros(1, 3, h, w))


def test_encode_refuses_non_finite_images():
    rdm = RDM.from_config("tiny")
    f = rdm.config.first_stage_config.ddconfig.downsample_factor
    images = torch.zeros(1, 3, 8 * f, 8 * f)
    images[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="encode: the images hold NaN or infinite values"):
        rdm.encode(images)


def test_unet_refuses_non_finite_timesteps():
    model = RDM.from_config("tiny")
    x, t, ctx = inputs(model.config)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="unet: t holds NaN or infinite timesteps"):
            model.unet(x, torch.full(t.shape, bad), ctx)
    model.unet(x, t.float() + 0.5, ctx)  # fractional timesteps stay allowed (continuous-time samplers use them)


def test_meta_inputs_to_a_real_model_are_named(tmp_path):
    """Meta tensors carry shapes only: they reached "Cannot copy out of meta tensor; no data!"."""
    from rdm_fast.retrieval import Database, write_database
    rdm = RDM.from_config("tiny")
    c, f = rdm.config.channels, rdm.config.first_stage_config.ddconfig.downsample_factor
    for call, name in ((lambda: rdm.sample(torch.empty(1, 4, 64, device="meta"), steps=1), "context"),
                       (lambda: rdm.sample(torch.randn(1, 4, 64), steps=1, x_T=torch.empty(1, c, 8, 8, device="meta")),
                        "x_T"),
                       (lambda: rdm.decode(torch.empty(1, c, 8, 8, device="meta")), "decode: latents"),
                       (lambda: rdm.encode(torch.empty(1, 3, 8 * f, 8 * f, device="meta")), "encode: images")):
        with pytest.raises(ValueError, match=f"^{name} is on the meta device \\(shapes without values\\); the model "
                                             "runs on cpu$"):
            call()
    db = Database.open(write_database(tmp_path / "db", np.random.default_rng(0).standard_normal((5, 64)),
                                      {"name": "t", "dim": 64, "normalized": False}), device="cpu")
    with pytest.raises(ValueError, match="queries are on the meta device"):
        db.search(torch.empty(2, 64, device="meta"), 2)


def test_a_meta_model_takes_meta_inputs():
    """A model built on the meta device (shapes only, as bench/floors.py builds one) takes meta inputs in encode,
    decode and sample: only a real model refuses them. A check that refused every meta input passed the tests
    above."""
    rdm = RDM.from_config("tiny", device="meta")
    c, f, s = rdm.config.channels, rdm.config.first_stage_config.ddconfig.downsample_factor, rdm.config.image_size
    assert rdm.decode(torch.empty(1, c, 8, 8, device="meta")).shape == (1, 3, 8 * f, 8 * f)
    assert rdm.encode(torch.empty(1, 3, 8 * f, 8 * f, device="meta"), sample=False).shape == (1, c, 8, 8)
    assert rdm.sample(torch.empty(1, 4, 64, device="meta"), steps=1).shape == (1, c, s, s)


def test_a_float64_state_dict_gives_a_runnable_model():
    """From a Python API audit: from_state_dict kept float64 tensors, and the model failed at its first kernel
    ("unsupported x dtype torch.float64")."""
    model = RDM.from_config("tiny")
    doubled = RDM.from_state_dict({k: v.double() for k, v in model.state_dict().items()}, "tiny")
    assert doubled.dtype == torch.float32
    context, x_T = torch.randn(1, 4, 64), torch.randn(1, *model.config.latent_shape)
    torch.testing.assert_close(doubled.sample(context, steps=2, x_T=x_T), model.sample(context, steps=2, x_T=x_T))
