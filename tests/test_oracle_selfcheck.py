"""Self-checks of the independent oracle (tests/oracle.py): shape tables vs the official key lists,
sanity of the functional forwards on tiny configs, primitives vs torch built-ins, hand-computed diffusion numbers."""

from __future__ import annotations

import math

import oracle
import pytest
import torch
import torch.nn.functional as F
from refdata import IMAGENET_TSV, RDM768_TSV, section


# Released configurations, as derived from the key lists.
IMAGENET_UNET = dict(
    in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2,
    attention_resolutions=(8, 4, 2), context_dim=512,
)
RDM768_UNET = dict(
    in_channels=16, out_channels=16, model_channels=448, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
    attention_resolutions=(4, 2, 1), context_dim=768,
)
IMAGENET_VQ = dict(
    ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), resolution=256, z_channels=3,
    embed_dim=3, n_embed=8192, double_z=False,
)
RDM768_KL = dict(
    ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), resolution=256, z_channels=16,
    embed_dim=16, double_z=True,
)


def _assert_same_table(mine: dict, ref: dict, check_order: bool = True):
    """Same names and shapes; with check_order also the key lists' order (the oracle emits the TSV order;
    a real module's state_dict order may legitimately differ, so pass check_order=False for those)."""
    missing = sorted(set(ref) - set(mine))
    extra = sorted(set(mine) - set(ref))
    wrong = [(k, mine[k], ref[k]) for k in ref if k in mine and tuple(mine[k]) != ref[k]]
    assert not missing and not extra and not wrong, (missing[:5], extra[:5], wrong[:5])
    if check_order:
        assert list(mine) == list(ref), "same names, different order"


# ------------------------------------------------------------------------------------------------ shapes


def test_unet_shapes_imagenet():
    ref, n, e = section(IMAGENET_TSV, "UNet", "model.diffusion_model.")
    mine = oracle.unet_shapes(**IMAGENET_UNET)
    _assert_same_table(mine, ref)
    assert (n, e) == (688, 400_920_579)
    assert sum(math.prod(s) for s in mine.values()) == 400_920_579


def test_unet_shapes_rdm768():
    ref, n, e = section(RDM768_TSV, "UNet", "model.diffusion_model.")
    mine = oracle.unet_shapes(**RDM768_UNET)
    _assert_same_table(mine, ref)
    assert (n, e) == (688, 1_335_480_400)


def test_autoencoder_shapes_imagenet_vq():
    ref, n, e = section(IMAGENET_TSV, "first stage", "first_stage_model.")
    _assert_same_table(oracle.autoencoder_shapes("vq", **IMAGENET_VQ), ref)
    assert (n, e) == (205, 55_322_782)


def test_autoencoder_shapes_rdm768_kl():
    ref, n, e = section(RDM768_TSV, "first stage", "first_stage_model.")
    _assert_same_table(oracle.autoencoder_shapes("kl", **RDM768_KL), ref)
    assert (n, e) == (342, 69_610_963)


def test_ffhq_param_count():
    """FFHQ variant of the facts: mc 224, mult 1,2,3,4, otherwise as ImageNet -> 414,713,603 params."""
    s = oracle.unet_shapes(**{**IMAGENET_UNET, "model_channels": 224, "channel_mult": (1, 2, 3, 4)})
    assert sum(math.prod(v) for v in s.values()) == 414_713_603


# ------------------------------------------------------------------------------------------------ primitives


def test_primitives_match_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 5, 3, generator=g, dtype=torch.float64) * 3 + 1
    w, b = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    torch.testing.assert_close(oracle.group_norm(x, w, b, 1e-6), F.group_norm(x, 32, w, b, 1e-6), rtol=0, atol=1e-12)
    tok = torch.randn(2, 7, 64, generator=g, dtype=torch.float64)
    torch.testing.assert_close(oracle.layer_norm(tok, w, b), F.layer_norm(tok, (64,), w, b), rtol=0, atol=1e-12)
    torch.testing.assert_close(oracle.gelu_exact(tok), F.gelu(tok), rtol=0, atol=1e-14)
    torch.testing.assert_close(oracle.softmax_last(tok), torch.softmax(tok, -1), rtol=0, atol=1e-15)
    torch.testing.assert_close(
        oracle.upsample_nearest2x(x), F.interpolate(x, scale_factor=2, mode="nearest"), rtol=0, atol=0
    )


def test_cross_attention_matches_sdpa():
    g = torch.Generator().manual_seed(1)
    c, d, heads = 64, 48, 4
    sd = {
        "a.to_q.weight": torch.randn(c, c, generator=g, dtype=torch.float64) / 8,
        "a.to_k.weight": torch.randn(c, d, generator=g, dtype=torch.float64) / 7,
        "a.to_v.weight": torch.randn(c, d, generator=g, dtype=torch.float64) / 7,
        "a.to_out.0.weight": torch.randn(c, c, generator=g, dtype=torch.float64) / 8,
        "a.to_out.0.bias": torch.randn(c, generator=g, dtype=torch.float64),
    }
    x = torch.randn(2, 10, c, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 3, d, generator=g, dtype=torch.float64)
    got = oracle._attention(x, ctx, oracle._SD(sd, torch.float64, x.device), "a", c // heads)

    def split(t):
        return t.reshape(2, t.shape[1], heads, c // heads).transpose(1, 2)

    q, k, v = split(x @ sd["a.to_q.weight"].T), split(ctx @ sd["a.to_k.weight"].T), split(ctx @ sd["a.to_v.weight"].T)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 10, c)
    ref = o @ sd["a.to_out.0.weight"].T + sd["a.to_out.0.bias"]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_timestep_embedding_by_hand():
    dim = 8
    t = torch.tensor([0.0, 1.0, 999.0])
    e = oracle.timestep_embedding(t, dim)
    assert e.shape == (3, dim) and e.dtype == torch.float64
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4, dtype=torch.float64))
    for j in range(4):  # frequencies 1, 10^-1, 10^-2, 10^-3 for half = 4
        f = 10000.0 ** (-j / 4)
        assert abs(e[2, j].item() - math.cos(999 * f)) < 1e-12
        assert abs(e[2, 4 + j].item() - math.sin(999 * f)) < 1e-12
    assert abs(e[1, 0].item() - math.cos(1.0)) < 1e-15 and abs(e[1, 4].item() - math.sin(1.0)) < 1e-15


# ------------------------------------------------------------------------------------------------ tiny UNet

TINY_UNET = dict(
    in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
    attention_resolutions=(1, 2), context_dim=64, num_head_channels=16,
)


@pytest.fixture(scope="module")
def tiny_unet():
    shapes = oracle.unet_shapes(**TINY_UNET)
    sd = oracle.random_state_dict(shapes, seed=0)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 3, 64, generator=g)
    t = torch.tensor([10, 700])
    return shapes, sd, x, t, ctx


def _run_unet(sd, x, t, ctx, **kw):
    return oracle.unet_forward(sd, x, t, ctx, num_head_channels=16, **kw)


def test_tiny_unet_has_every_layer_type(tiny_unet):
    shapes = tiny_unet[0]
    for needle in (".in_layers.", ".skip_connection.", ".proj_in.", ".op.", ".conv.", "middle_block.1.", "out.2."):
        assert any(needle in k for k in shapes), needle


def test_tiny_unet_forward_sane(tiny_unet):
    _, sd, x, t, ctx = tiny_unet
    out = _run_unet(sd, x, t, ctx)
    assert out.shape == (2, 4, 16, 16) and out.dtype == torch.float64
    assert torch.isfinite(out).all()
    assert 0.05 < out.std().item() < 20 and out.abs().max().item() < 100


def test_tiny_unet_depends_on_context_t_and_is_per_sample(tiny_unet):
    _, sd, x, t, ctx = tiny_unet
    out = _run_unet(sd, x, t, ctx)
    ctx2 = ctx.clone()
    ctx2[1] = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    out_c = _run_unet(sd, x, t, ctx2)
    assert torch.equal(out_c[0], out[0])  # sample 0 untouched
    assert (out_c[1] - out[1]).abs().max() > 1e-2
    out_t = _run_unet(sd, x, torch.tensor([10, 200]), ctx)
    assert torch.equal(out_t[0], out[0])
    assert (out_t[1] - out[1]).abs().max() > 1e-2
    # permuting the context tokens must not matter (no positional encoding on the context)
    out_p = _run_unet(sd, x, t, ctx[:, [2, 0, 1]])
    torch.testing.assert_close(out_p, out, rtol=0, atol=1e-12)


def test_tiny_unet_every_tensor_matters(tiny_unet):
    _, sd, x, t, ctx = tiny_unet
    params = {k: v.detach().double().requires_grad_(True) for k, v in sd.items()}
    out = _run_unet(params, x, t, ctx)
    (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)).sum().backward()
    dead = [k for k, v in params.items() if v.grad is None or v.grad.abs().max() == 0]
    assert not dead, dead


def test_tiny_unet_float32_close_to_float64(tiny_unet):
    _, sd, x, t, ctx = tiny_unet
    o64 = _run_unet(sd, x, t, ctx)
    o32 = _run_unet(sd, x, t, ctx, dtype=torch.float32)
    assert o32.dtype == torch.float32
    torch.testing.assert_close(o32.double(), o64, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ tiny autoencoders

TINY_AE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, z_channels=4, embed_dim=4)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1


def test_tiny_autoencoder_layout():
    s = oracle.autoencoder_shapes("kl", **TINY_AE, double_z=True)
    assert "encoder.down.1.attn.0.q.weight" in s and "encoder.down.0.attn.0.q.weight" not in s
    assert "decoder.up.1.attn.1.q.weight" in s and "decoder.up.0.attn.0.q.weight" not in s
    assert "encoder.down.0.downsample.conv.weight" in s and "encoder.down.1.downsample.conv.weight" not in s
    assert "decoder.up.1.upsample.conv.weight" in s and "decoder.up.0.upsample.conv.weight" not in s
    assert s["quant_conv.weight"] == (8, 8, 1, 1) and s["post_quant_conv.weight"] == (4, 4, 1, 1)


def test_tiny_kl_encode_decode(images):
    sd = oracle.random_state_dict(oracle.autoencoder_shapes("kl", **TINY_AE, double_z=True), seed=1)
    mean, logvar = oracle.encoder_forward(sd, images, kind="kl")
    assert mean.shape == logvar.shape == (2, 4, 8, 8)
    assert torch.isfinite(mean).all() and 0.05 < mean.std().item() < 20
    assert logvar.min() >= -30 and logvar.max() <= 20
    rec = oracle.decoder_forward(sd, mean, kind="kl")
    assert rec.shape == (2, 3, 16, 16) and torch.isfinite(rec).all() and 0.05 < rec.std().item() < 20
    # logvar clamp: blow up the logvar half of quant_conv's bias
    sd2 = dict(sd)
    bias = sd["quant_conv.bias"].clone()
    bias[4:] = 1e4
    sd2["quant_conv.bias"] = bias
    _, lv = oracle.encoder_forward(sd2, images, kind="kl")
    assert torch.equal(lv, torch.full_like(lv, 20.0))
    # decoder depends on the latent and every decoder tensor matters
    params = {k: v.double().requires_grad_(True) for k, v in sd.items() if k.startswith(("decoder.", "post_quant"))}
    out = oracle.decoder_forward(params, mean.detach(), kind="kl")
    (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)).sum().backward()
    assert not [k for k, v in params.items() if v.grad is None or v.grad.abs().max() == 0]


def test_tiny_vq_encode_decode(images):
    sd = oracle.random_state_dict(oracle.autoencoder_shapes("vq", **TINY_AE, n_embed=64, double_z=False), seed=2)
    h = oracle.encoder_forward(sd, images, kind="vq")
    assert h.shape == (2, 4, 8, 8) and torch.isfinite(h).all()
    code = sd["quantize.embedding.weight"].double()
    rec = oracle.decoder_forward(sd, h, kind="vq")
    assert rec.shape == (2, 3, 16, 16) and torch.isfinite(rec).all() and 0.05 < rec.std().item() < 20
    # decoding is a function of the nearest codes only
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 64, (2, 8, 8), generator=g)
    z_exact = code[idx].permute(0, 3, 1, 2)
    z_noisy = z_exact + 1e-3 * torch.randn(z_exact.shape, generator=g, dtype=torch.float64)
    assert torch.equal(oracle.nearest_codes(z_noisy, code), idx)
    d_exact = oracle.decoder_forward(sd, z_exact, kind="vq")
    torch.testing.assert_close(oracle.decoder_forward(sd, z_noisy, kind="vq"), d_exact, rtol=0, atol=0)
    # ... and the codes do matter
    idx2 = idx.clone()
    idx2[0, 3, 4] = (idx2[0, 3, 4] + 1) % 64
    d_other = oracle.decoder_forward(sd, code[idx2].permute(0, 3, 1, 2), kind="vq")
    assert (d_other - d_exact).abs().max() > 1e-3
    # nearest_codes against brute force
    ref = torch.cdist(h.permute(0, 2, 3, 1).reshape(-1, 4).double(), code).argmin(1).reshape(2, 8, 8)
    assert torch.equal(oracle.nearest_codes(h, code), ref)


# ------------------------------------------------------------------------------------------------ diffusion numbers


def test_betas_by_hand():
    for le in (0.0195, 0.015):
        b = oracle.make_betas(0.0015, le)
        assert b.dtype == torch.float64 and b.shape == (1000,)
        assert abs(b[0].item() - 0.0015) < 1e-15
        assert abs(b[-1].item() - le) < 1e-15
        mid = (math.sqrt(0.0015) + (math.sqrt(le) - math.sqrt(0.0015)) * 500 / 999) ** 2
        assert abs(b[500].item() - mid) < 1e-15
        assert (b[1:] > b[:-1]).all()
        ref = torch.linspace(0.0015**0.5, le**0.5, 1000, dtype=torch.float64) ** 2
        torch.testing.assert_close(b, ref, rtol=0, atol=1e-16)


def test_alphas_cumprod():
    b = oracle.make_betas(0.0015, 0.0195)
    ac = oracle.make_alphas_cumprod(b)
    assert ac[0].item() == 1 - 0.0015
    torch.testing.assert_close(ac, torch.cumprod(1 - b, 0), rtol=1e-14, atol=0)
    assert 0 < ac[-1].item() < 1e-2


def test_ddim_timesteps():
    assert oracle.ddim_timesteps(50) == [1 + 20 * i for i in range(50)]
    assert oracle.ddim_timesteps(50)[:3] == [1, 21, 41] and oracle.ddim_timesteps(50)[-1] == 981
    assert oracle.ddim_timesteps(100) == list(range(1, 1000, 10))
    assert oracle.ddim_timesteps(1000) == list(range(1, 1001))


def test_ddim_coefficients():
    ac = oracle.make_alphas_cumprod(oracle.make_betas(0.0015, 0.015))
    ts = oracle.ddim_timesteps(50)
    a, ap, s0 = oracle.ddim_coefficients(ac, ts, 0.0)
    assert a.shape == ap.shape == s0.shape == (50,)
    assert a[0].item() == ac[1].item() and a[-1].item() == ac[981].item()
    assert ap[0].item() == ac[0].item()  # first step's alpha_prev is ᾱ[0], not 1
    assert torch.equal(ap[1:], a[:-1])
    assert torch.equal(s0, torch.zeros(50, dtype=torch.float64))
    _, _, s1 = oracle.ddim_coefficients(ac, ts, 1.0)
    i = 17
    at, aprev = ac[ts[i]].item(), ac[ts[i - 1]].item()
    assert abs(s1[i].item() - math.sqrt((1 - aprev) / (1 - at) * (1 - at / aprev))) < 1e-15
    assert (s1 > 0).all() and (s1**2 < 1 - ap).all()


def test_ddim_step_recovers_x0():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, generator=g, dtype=torch.float64)
    at, aprev = 0.3, 0.6
    x = math.sqrt(at) * x0 + math.sqrt(1 - at) * eps
    x_prev, x0_hat = oracle.ddim_step(x, eps, at, aprev, 0.0)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-14)
    torch.testing.assert_close(x_prev, math.sqrt(aprev) * x0 + math.sqrt(1 - aprev) * eps, rtol=0, atol=1e-14)
    # Adams–Bashforth weights sum to 1 (a constant eps is reproduced)
    for n in (1, 2, 3):
        torch.testing.assert_close(oracle.plms_eps(eps, [eps] * n), eps, rtol=0, atol=1e-14)
