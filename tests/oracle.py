"""Independent reference ("oracle") implementation of the RDM networks and diffusion numbers.

Written from the released models' documented conventions (the paper and its official configs) and the
official checkpoint key lists (tests/data) only; it imports nothing from ``rdm_fast`` on purpose, so that it can
be used to check the real implementation.

Everything works on plain state dicts with the *official* tensor names:

* UNet names without the ``model.diffusion_model.`` prefix (``time_embed.0.weight``, ``input_blocks.1.0.in_layers.0.weight``, ...),
* first-stage names without the ``first_stage_model.`` prefix (``encoder.down.0.block.0.norm1.weight``, ...).

The forward functions are written for clarity, not speed: explicit GroupNorm / LayerNorm / softmax, einsum
attention, exact-erf GELU, float64 by default.  Diffusion numbers are computed with Python floats and ``math``.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

Shapes = dict[str, tuple[int, ...]]

UNET_GN_EPS = 1e-5  # GroupNorm32 in ResBlocks and the output head
TRANSFORMER_GN_EPS = 1e-6  # GroupNorm in front of SpatialTransformer.proj_in
LAYERNORM_EPS = 1e-5  # nn.LayerNorm default (norm1/2/3 of the transformer block)
AE_GN_EPS = 1e-6  # all GroupNorms of the autoencoders
NUM_GROUPS = 32


# ----------------------------------------------------------------------------------------------------------
# Shape tables
# ----------------------------------------------------------------------------------------------------------


def _unet_resblock_shapes(p: str, cin: int, cout: int, emb: int) -> Shapes:
    s: Shapes = {
        f"{p}.in_layers.0.weight": (cin,),
        f"{p}.in_layers.0.bias": (cin,),
        f"{p}.in_layers.2.weight": (cout, cin, 3, 3),
        f"{p}.in_layers.2.bias": (cout,),
        f"{p}.emb_layers.1.weight": (cout, emb),
        f"{p}.emb_layers.1.bias": (cout,),
        f"{p}.out_layers.0.weight": (cout,),
        f"{p}.out_layers.0.bias": (cout,),
        f"{p}.out_layers.3.weight": (cout, cout, 3, 3),
        f"{p}.out_layers.3.bias": (cout,),
    }
    if cin != cout:
        s[f"{p}.skip_connection.weight"] = (cout, cin, 1, 1)
        s[f"{p}.skip_connection.bias"] = (cout,)
    return s


def _unet_transformer_shapes(p: str, ch: int, context_dim: int, head_ch: int, depth: int) -> Shapes:
    heads = ch // head_ch
    inner = heads * head_ch
    s: Shapes = {
        f"{p}.norm.weight": (ch,),
        f"{p}.norm.bias": (ch,),
        f"{p}.proj_in.weight": (inner, ch, 1, 1),
        f"{p}.proj_in.bias": (inner,),
    }
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for a, kv_dim in (("attn1", inner), ("attn2", context_dim)):
            s[f"{b}.{a}.to_q.weight"] = (inner, inner)
            s[f"{b}.{a}.to_k.weight"] = (inner, kv_dim)
            s[f"{b}.{a}.to_v.weight"] = (inner, kv_dim)
            s[f"{b}.{a}.to_out.0.weight"] = (inner, inner)
            s[f"{b}.{a}.to_out.0.bias"] = (inner,)
        s[f"{b}.ff.net.0.proj.weight"] = (8 * inner, inner)
        s[f"{b}.ff.net.0.proj.bias"] = (8 * inner,)
        s[f"{b}.ff.net.2.weight"] = (inner, 4 * inner)
        s[f"{b}.ff.net.2.bias"] = (inner,)
        for n in ("norm1", "norm2", "norm3"):
            s[f"{b}.{n}.weight"] = (inner,)
            s[f"{b}.{n}.bias"] = (inner,)
    s[f"{p}.proj_out.weight"] = (ch, inner, 1, 1)
    s[f"{p}.proj_out.bias"] = (ch,)
    return s


def unet_shapes(
    *,
    in_channels: int,
    out_channels: int,
    model_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attention_resolutions: Iterable[int],
    context_dim: int,
    num_head_channels: int = 32,
    transformer_depth: int = 1,
) -> Shapes:
    """Official tensor names (no ``model.diffusion_model.`` prefix) and shapes of the RDM UNet.

    ``attention_resolutions`` holds downsampling factors ds (1 = full latent resolution, 2 = half, ...);
    a SpatialTransformer follows every ResBlock at those levels; the middle block always has one.
    """
    mc = model_channels
    emb = 4 * mc
    attn = set(attention_resolutions)
    s: Shapes = {
        "time_embed.0.weight": (emb, mc),
        "time_embed.0.bias": (emb,),
        "time_embed.2.weight": (emb, emb),
        "time_embed.2.bias": (emb,),
        "input_blocks.0.0.weight": (mc, in_channels, 3, 3),
        "input_blocks.0.0.bias": (mc,),
    }

    def tf(p: str, c: int) -> Shapes:
        return _unet_transformer_shapes(p, c, context_dim, num_head_channels, transformer_depth)

    skip_chans = [mc]
    ch, ds, n = mc, 1, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            s.update(_unet_resblock_shapes(f"input_blocks.{n}.0", ch, mult * mc, emb))
            ch = mult * mc
            if ds in attn:
                s.update(tf(f"input_blocks.{n}.1", ch))
            skip_chans.append(ch)
            n += 1
        if level != len(channel_mult) - 1:
            s[f"input_blocks.{n}.0.op.weight"] = (ch, ch, 3, 3)
            s[f"input_blocks.{n}.0.op.bias"] = (ch,)
            skip_chans.append(ch)
            ds *= 2
            n += 1

    s.update(_unet_resblock_shapes("middle_block.0", ch, ch, emb))
    s.update(tf("middle_block.1", ch))
    s.update(_unet_resblock_shapes("middle_block.2", ch, ch, emb))

    n = 0
    for level in reversed(range(len(channel_mult))):
        mult = channel_mult[level]
        for i in range(num_res_blocks + 1):
            cin = ch + skip_chans.pop()
            s.update(_unet_resblock_shapes(f"output_blocks.{n}.0", cin, mult * mc, emb))
            ch = mult * mc
            m = 1
            if ds in attn:
                s.update(tf(f"output_blocks.{n}.1", ch))
                m = 2
            if level != 0 and i == num_res_blocks:
                s[f"output_blocks.{n}.{m}.conv.weight"] = (ch, ch, 3, 3)
                s[f"output_blocks.{n}.{m}.conv.bias"] = (ch,)
                ds //= 2
            n += 1
    assert not skip_chans

    s["out.0.weight"] = (ch,)
    s["out.0.bias"] = (ch,)
    s["out.2.weight"] = (out_channels, ch, 3, 3)
    s["out.2.bias"] = (out_channels,)
    return s


def _ae_resblock_shapes(p: str, cin: int, cout: int) -> Shapes:
    s: Shapes = {
        f"{p}.norm1.weight": (cin,),
        f"{p}.norm1.bias": (cin,),
        f"{p}.conv1.weight": (cout, cin, 3, 3),
        f"{p}.conv1.bias": (cout,),
        f"{p}.norm2.weight": (cout,),
        f"{p}.norm2.bias": (cout,),
        f"{p}.conv2.weight": (cout, cout, 3, 3),
        f"{p}.conv2.bias": (cout,),
    }
    if cin != cout:
        s[f"{p}.nin_shortcut.weight"] = (cout, cin, 1, 1)
        s[f"{p}.nin_shortcut.bias"] = (cout,)
    return s


def _ae_attn_shapes(p: str, c: int) -> Shapes:
    s: Shapes = {f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,)}
    for n in ("q", "k", "v", "proj_out"):
        s[f"{p}.{n}.weight"] = (c, c, 1, 1)
        s[f"{p}.{n}.bias"] = (c,)
    return s


def _ae_mid_shapes(p: str, c: int) -> Shapes:
    s = _ae_resblock_shapes(f"{p}.mid.block_1", c, c)
    s.update(_ae_attn_shapes(f"{p}.mid.attn_1", c))
    s.update(_ae_resblock_shapes(f"{p}.mid.block_2", c, c))
    return s


def autoencoder_shapes(
    kind: str,
    *,
    ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Iterable[int],
    resolution: int,
    z_channels: int,
    embed_dim: int,
    in_channels: int = 3,
    out_ch: int = 3,
    n_embed: int | None = None,
    double_z: bool,
) -> Shapes:
    """Official names (no ``first_stage_model.`` prefix) and shapes of the LDM first-stage autoencoder.

    ``attn_resolutions`` are absolute feature-map sizes (e.g. 16 for the 16×16 level of a 256 px model).
    Encoder level i has ``num_res_blocks`` blocks, the decoder level i ``num_res_blocks + 1``; every level
    but the last (encoder) / first (decoder, i = 0) has a down/upsampler.
    """
    if kind not in ("kl", "vq"):
        raise ValueError(f"kind must be 'kl' or 'vq', got {kind!r}")
    attn = set(attn_resolutions)
    levels = len(ch_mult)
    s: Shapes = {}

    # encoder
    s["encoder.conv_in.weight"] = (ch, in_channels, 3, 3)
    s["encoder.conv_in.bias"] = (ch,)
    cur, c = resolution, ch
    for i, mult in enumerate(ch_mult):
        cout = ch * mult
        for j in range(num_res_blocks):
            s.update(_ae_resblock_shapes(f"encoder.down.{i}.block.{j}", c, cout))
            c = cout
            if cur in attn:
                s.update(_ae_attn_shapes(f"encoder.down.{i}.attn.{j}", c))
        if i != levels - 1:
            s[f"encoder.down.{i}.downsample.conv.weight"] = (c, c, 3, 3)
            s[f"encoder.down.{i}.downsample.conv.bias"] = (c,)
            cur //= 2
    s.update(_ae_mid_shapes("encoder", c))
    zc = 2 * z_channels if double_z else z_channels
    s["encoder.norm_out.weight"] = (c,)
    s["encoder.norm_out.bias"] = (c,)
    s["encoder.conv_out.weight"] = (zc, c, 3, 3)
    s["encoder.conv_out.bias"] = (zc,)

    # decoder
    c = ch * ch_mult[-1]
    cur = resolution // 2 ** (levels - 1)
    s["decoder.conv_in.weight"] = (c, z_channels, 3, 3)
    s["decoder.conv_in.bias"] = (c,)
    s.update(_ae_mid_shapes("decoder", c))
    for i in reversed(range(levels)):
        cout = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            s.update(_ae_resblock_shapes(f"decoder.up.{i}.block.{j}", c, cout))
            c = cout
            if cur in attn:
                s.update(_ae_attn_shapes(f"decoder.up.{i}.attn.{j}", c))
        if i != 0:
            s[f"decoder.up.{i}.upsample.conv.weight"] = (c, c, 3, 3)
            s[f"decoder.up.{i}.upsample.conv.bias"] = (c,)
            cur *= 2
    s["decoder.norm_out.weight"] = (c,)
    s["decoder.norm_out.bias"] = (c,)
    s["decoder.conv_out.weight"] = (out_ch, c, 3, 3)
    s["decoder.conv_out.bias"] = (out_ch,)

    if kind == "vq":
        if n_embed is None:
            raise ValueError("vq autoencoder needs n_embed")
        s["quantize.embedding.weight"] = (n_embed, embed_dim)
        s["quant_conv.weight"] = (embed_dim, z_channels, 1, 1)
        s["quant_conv.bias"] = (embed_dim,)
    else:
        s["quant_conv.weight"] = (2 * embed_dim, 2 * z_channels, 1, 1)
        s["quant_conv.bias"] = (2 * embed_dim,)
    s["post_quant_conv.weight"] = (z_channels, embed_dim, 1, 1)
    s["post_quant_conv.bias"] = (z_channels,)
    return s


# ----------------------------------------------------------------------------------------------------------
# Random weights
# ----------------------------------------------------------------------------------------------------------


def random_state_dict(
    shapes: Shapes, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Well-conditioned random weights for a shape table.

    * conv / linear weights (ndim >= 2): N(0, (scale / sqrt(fan_in))²), fan_in = prod(shape[1:]);
    * codebooks (``*embedding.weight``): N(0, 1);
    * 1-D ``weight`` (GroupNorm / LayerNorm gains): 1 + 0.1·N(0, 1);
    * biases: 0.05·N(0, 1).

    Nothing is zero (the zero-initialised proj_out / out / to_out layers get ordinary random weights), so every
    path influences the output.  Deterministic for a given seed and shape table (names are visited sorted).
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        r = torch.randn(shape, generator=g, dtype=torch.float64)
        if name.endswith("embedding.weight"):
            t = r
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            t = r * (scale / math.sqrt(fan_in))
        elif name.endswith(".weight"):
            t = 1.0 + 0.1 * r
        else:
            t = 0.05 * r
        sd[name] = t.to(dtype)
    return {k: sd[k] for k in shapes}  # keep the table's order


# ----------------------------------------------------------------------------------------------------------
# Primitive ops (explicit, float64-friendly)
# ----------------------------------------------------------------------------------------------------------


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, groups: int = NUM_GROUPS):
    """GroupNorm by explicit mean / biased variance over (channels-in-group, spatial)."""
    b, c = x.shape[:2]
    xg = x.reshape(b, groups, -1)
    mean = xg.mean(dim=-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=-1, keepdim=True)
    xg = (xg - mean) / torch.sqrt(var + eps)
    x = xg.reshape(x.shape)
    view = (1, c) + (1,) * (x.ndim - 2)
    return x * weight.reshape(view) + bias.reshape(view)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = LAYERNORM_EPS):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def softmax_last(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    y = torch.einsum("...i,oi->...o", x, w)
    return y if b is None else y + b


def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int = 1, padding: int = 0):
    return F.conv2d(x, w, b, stride=stride, padding=padding)


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """cat([cos(t·f), sin(t·f)]) with f_i = exp(-ln(max_period)·i/half), i = 0..half-1 (zero pad if dim odd)."""
    half = dim // 2
    freqs = torch.tensor([math.exp(-math.log(max_period) * i / half) for i in range(half)], dtype=torch.float64)
    args = t.to(torch.float64)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class _SD:
    """State-dict view: casts tensors to the working dtype/device on access and answers structure questions."""

    def __init__(self, sd: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
        self.sd, self.dtype, self.device = sd, dtype, device

    def __call__(self, name: str) -> torch.Tensor:
        return self.sd[name].to(device=self.device, dtype=self.dtype)

    def get(self, name: str) -> torch.Tensor | None:
        return self(name) if name in self.sd else None

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.sd)

    def indices(self, prefix: str) -> list[int]:
        """Sorted distinct integers N of keys ``{prefix}N.…``."""
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        return sorted({int(m.group(1)) for k in self.sd if (m := pat.match(k))})


# ----------------------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------------------


def _attention(q_in, kv_in, p: _SD, pre: str, head_ch: int) -> torch.Tensor:
    q = linear(q_in, p(f"{pre}.to_q.weight"))
    k = linear(kv_in, p(f"{pre}.to_k.weight"))
    v = linear(kv_in, p(f"{pre}.to_v.weight"))
    b, n, inner = q.shape
    h = inner // head_ch
    q = q.reshape(b, n, h, head_ch)
    k = k.reshape(b, k.shape[1], h, head_ch)
    v = v.reshape(b, v.shape[1], h, head_ch)
    sim = torch.einsum("bihd,bjhd->bhij", q, k) * head_ch**-0.5
    w = softmax_last(sim)
    out = torch.einsum("bhij,bjhd->bihd", w, v).reshape(b, n, inner)
    return linear(out, p(f"{pre}.to_out.0.weight"), p(f"{pre}.to_out.0.bias"))


def _unet_resblock(x, emb, p: _SD, pre: str) -> torch.Tensor:
    h = group_norm(x, p(f"{pre}.in_layers.0.weight"), p(f"{pre}.in_layers.0.bias"), UNET_GN_EPS)
    h = conv(silu(h), p(f"{pre}.in_layers.2.weight"), p(f"{pre}.in_layers.2.bias"), padding=1)
    e = linear(silu(emb), p(f"{pre}.emb_layers.1.weight"), p(f"{pre}.emb_layers.1.bias"))
    h = h + e[:, :, None, None]
    h = group_norm(h, p(f"{pre}.out_layers.0.weight"), p(f"{pre}.out_layers.0.bias"), UNET_GN_EPS)
    h = conv(silu(h), p(f"{pre}.out_layers.3.weight"), p(f"{pre}.out_layers.3.bias"), padding=1)
    sw = p.get(f"{pre}.skip_connection.weight")
    skip = x if sw is None else conv(x, sw, p(f"{pre}.skip_connection.bias"))
    return skip + h


def _spatial_transformer(x, context, p: _SD, pre: str, head_ch: int) -> torch.Tensor:
    b, c, hh, ww = x.shape
    h = group_norm(x, p(f"{pre}.norm.weight"), p(f"{pre}.norm.bias"), TRANSFORMER_GN_EPS)
    h = conv(h, p(f"{pre}.proj_in.weight"), p(f"{pre}.proj_in.bias"))
    inner = h.shape[1]
    tok = h.reshape(b, inner, hh * ww).transpose(1, 2)  # (b, hw, c)
    for d in p.indices(f"{pre}.transformer_blocks."):
        bp = f"{pre}.transformer_blocks.{d}"
        n1 = layer_norm(tok, p(f"{bp}.norm1.weight"), p(f"{bp}.norm1.bias"))
        tok = tok + _attention(n1, n1, p, f"{bp}.attn1", head_ch)
        n2 = layer_norm(tok, p(f"{bp}.norm2.weight"), p(f"{bp}.norm2.bias"))
        tok = tok + _attention(n2, context, p, f"{bp}.attn2", head_ch)
        n3 = layer_norm(tok, p(f"{bp}.norm3.weight"), p(f"{bp}.norm3.bias"))
        a, gate = linear(n3, p(f"{bp}.ff.net.0.proj.weight"), p(f"{bp}.ff.net.0.proj.bias")).chunk(2, dim=-1)
        tok = tok + linear(a * gelu_exact(gate), p(f"{bp}.ff.net.2.weight"), p(f"{bp}.ff.net.2.bias"))
    h = tok.transpose(1, 2).reshape(b, inner, hh, ww)
    h = conv(h, p(f"{pre}.proj_out.weight"), p(f"{pre}.proj_out.bias"))
    return x + h


def _unet_block(x, emb, context, p: _SD, pre: str, head_ch: int) -> torch.Tensor:
    """Run one TimestepEmbedSequential: layers ``{pre}.M`` in order, the layer type read off its keys."""
    for m in p.indices(f"{pre}."):
        lp = f"{pre}.{m}"
        if p.has_prefix(f"{lp}.in_layers."):
            x = _unet_resblock(x, emb, p, lp)
        elif p.has_prefix(f"{lp}.proj_in."):
            x = _spatial_transformer(x, context, p, lp, head_ch)
        elif p.has_prefix(f"{lp}.op."):
            x = conv(x, p(f"{lp}.op.weight"), p(f"{lp}.op.bias"), stride=2, padding=1)
        elif p.has_prefix(f"{lp}.conv."):
            x = conv(upsample_nearest2x(x), p(f"{lp}.conv.weight"), p(f"{lp}.conv.bias"), padding=1)
        elif f"{lp}.weight" in p.sd:  # input_blocks.0.0: the plain input conv
            x = conv(x, p(f"{lp}.weight"), p(f"{lp}.bias"), padding=1)
        else:
            raise KeyError(f"cannot tell what layer {lp} is")
    return x


def unet_forward(
    sd: dict[str, torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    *,
    num_head_channels: int = 32,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """eps prediction of the RDM UNet from an official-named state dict (no prefix).

    x: (B, C, H, W) latent; t: (B,) timesteps (int or float); context: (B, K, D) retrieval/text embeddings.
    Returns (B, out_channels, H, W) in ``dtype``.
    """
    p = _SD(sd, dtype, x.device)
    x = x.to(dtype)
    context = context.to(device=x.device, dtype=dtype)
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    mc = sd["time_embed.0.weight"].shape[1]
    emb = timestep_embedding(t, mc).to(device=x.device, dtype=dtype)
    emb = linear(emb, p("time_embed.0.weight"), p("time_embed.0.bias"))
    emb = linear(silu(emb), p("time_embed.2.weight"), p("time_embed.2.bias"))

    hs = []
    h = x
    for n in p.indices("input_blocks."):
        h = _unet_block(h, emb, context, p, f"input_blocks.{n}", num_head_channels)
        hs.append(h)
    h = _unet_block(h, emb, context, p, "middle_block", num_head_channels)
    for n in p.indices("output_blocks."):
        h = torch.cat([h, hs.pop()], dim=1)
        h = _unet_block(h, emb, context, p, f"output_blocks.{n}", num_head_channels)
    assert not hs, "input/output block counts do not match"
    h = silu(group_norm(h, p("out.0.weight"), p("out.0.bias"), UNET_GN_EPS))
    return conv(h, p("out.2.weight"), p("out.2.bias"), padding=1)


# ----------------------------------------------------------------------------------------------------------
# Autoencoders
# ----------------------------------------------------------------------------------------------------------


def _ae_resblock(x, p: _SD, pre: str) -> torch.Tensor:
    h = silu(group_norm(x, p(f"{pre}.norm1.weight"), p(f"{pre}.norm1.bias"), AE_GN_EPS))
    h = conv(h, p(f"{pre}.conv1.weight"), p(f"{pre}.conv1.bias"), padding=1)
    h = silu(group_norm(h, p(f"{pre}.norm2.weight"), p(f"{pre}.norm2.bias"), AE_GN_EPS))
    h = conv(h, p(f"{pre}.conv2.weight"), p(f"{pre}.conv2.bias"), padding=1)
    sw = p.get(f"{pre}.nin_shortcut.weight")
    skip = x if sw is None else conv(x, sw, p(f"{pre}.nin_shortcut.bias"))
    return skip + h


def _ae_attn(x, p: _SD, pre: str) -> torch.Tensor:
    b, c, hh, ww = x.shape
    h = group_norm(x, p(f"{pre}.norm.weight"), p(f"{pre}.norm.bias"), AE_GN_EPS)
    q = conv(h, p(f"{pre}.q.weight"), p(f"{pre}.q.bias")).reshape(b, c, hh * ww)
    k = conv(h, p(f"{pre}.k.weight"), p(f"{pre}.k.bias")).reshape(b, c, hh * ww)
    v = conv(h, p(f"{pre}.v.weight"), p(f"{pre}.v.bias")).reshape(b, c, hh * ww)
    w = softmax_last(torch.einsum("bci,bcj->bij", q, k) * c**-0.5)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww)
    return x + conv(out, p(f"{pre}.proj_out.weight"), p(f"{pre}.proj_out.bias"))


def _ae_level(h, p: _SD, pre: str) -> torch.Tensor:
    """Blocks ``{pre}.block.j`` each followed by ``{pre}.attn.j`` when present."""
    for j in p.indices(f"{pre}.block."):
        h = _ae_resblock(h, p, f"{pre}.block.{j}")
        if p.has_prefix(f"{pre}.attn.{j}."):
            h = _ae_attn(h, p, f"{pre}.attn.{j}")
    return h


def _ae_mid(h, p: _SD, pre: str) -> torch.Tensor:
    h = _ae_resblock(h, p, f"{pre}.mid.block_1")
    h = _ae_attn(h, p, f"{pre}.mid.attn_1")
    return _ae_resblock(h, p, f"{pre}.mid.block_2")


def _encoder(x, p: _SD) -> torch.Tensor:
    h = conv(x, p("encoder.conv_in.weight"), p("encoder.conv_in.bias"), padding=1)
    for i in p.indices("encoder.down."):
        h = _ae_level(h, p, f"encoder.down.{i}")
        if p.has_prefix(f"encoder.down.{i}.downsample."):
            h = F.pad(h, (0, 1, 0, 1))
            h = conv(h, p(f"encoder.down.{i}.downsample.conv.weight"), p(f"encoder.down.{i}.downsample.conv.bias"), stride=2)
    h = _ae_mid(h, p, "encoder")
    h = silu(group_norm(h, p("encoder.norm_out.weight"), p("encoder.norm_out.bias"), AE_GN_EPS))
    return conv(h, p("encoder.conv_out.weight"), p("encoder.conv_out.bias"), padding=1)


def _decoder(z, p: _SD) -> torch.Tensor:
    h = conv(z, p("decoder.conv_in.weight"), p("decoder.conv_in.bias"), padding=1)
    h = _ae_mid(h, p, "decoder")
    for i in reversed(p.indices("decoder.up.")):
        h = _ae_level(h, p, f"decoder.up.{i}")
        if p.has_prefix(f"decoder.up.{i}.upsample."):
            h = upsample_nearest2x(h)
            h = conv(h, p(f"decoder.up.{i}.upsample.conv.weight"), p(f"decoder.up.{i}.upsample.conv.bias"), padding=1)
    h = silu(group_norm(h, p("decoder.norm_out.weight"), p("decoder.norm_out.bias"), AE_GN_EPS))
    return conv(h, p("decoder.conv_out.weight"), p("decoder.conv_out.bias"), padding=1)


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Index (B, H, W) of the nearest codebook row (squared L2, exact differences, first index on ties)."""
    b, c, hh, ww = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, c)
    idx = []
    for s in range(0, flat.shape[0], chunk):
        d = ((flat[s : s + chunk, None, :] - codebook[None, :, :]) ** 2).sum(-1)
        idx.append(d.argmin(dim=1))
    return torch.cat(idx).reshape(b, hh, ww)


def vq_quantize(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Replace every latent vector (channel dim) by its nearest codebook entry."""
    idx = nearest_codes(z, codebook)
    return codebook[idx].permute(0, 3, 1, 2)


def decoder_forward(
    sd: dict[str, torch.Tensor], z: torch.Tensor, *, kind: str, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Decode an UNSCALED first-stage latent: (vq: snap to codebook →) post_quant_conv → decoder."""
    p = _SD(sd, dtype, z.device)
    z = z.to(dtype)
    if kind == "vq":
        z = vq_quantize(z, p("quantize.embedding.weight"))
    elif kind != "kl":
        raise ValueError(kind)
    z = conv(z, p("post_quant_conv.weight"), p("post_quant_conv.bias"))
    return _decoder(z, p)


def encoder_forward(sd: dict[str, torch.Tensor], images: torch.Tensor, *, kind: str, dtype: torch.dtype = torch.float64):
    """Encode images in [-1, 1].

    kl: returns (mean, logvar) of the posterior (quant_conv output split in two, logvar clamped to [-30, 20]);
    vq: returns the quant_conv output (latent before quantisation).
    """
    p = _SD(sd, dtype, images.device)
    h = _encoder(images.to(dtype), p)
    h = conv(h, p("quant_conv.weight"), p("quant_conv.bias"))
    if kind == "vq":
        return h
    if kind != "kl":
        raise ValueError(kind)
    mean, logvar = h.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


# ----------------------------------------------------------------------------------------------------------
# Diffusion numbers (pure Python floats)
# ----------------------------------------------------------------------------------------------------------


def make_betas(linear_start: float, linear_end: float, T: int = 1000) -> torch.Tensor:
    """betas_i = (sqrt(ls) + (sqrt(le) - sqrt(ls))·i/(T-1))², i = 0..T-1, as float64 tensor."""
    a, b = math.sqrt(linear_start), math.sqrt(linear_end)
    out = []
    for i in range(T):
        s = b if i == T - 1 else a + (b - a) * i / (T - 1)
        out.append(s * s)
    return torch.tensor(out, dtype=torch.float64)


def make_alphas_cumprod(betas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """ᾱ_t = prod_{s<=t} (1 - β_s), by a sequential Python loop."""
    acc, out = 1.0, []
    for beta in [float(v) for v in betas]:
        acc *= 1.0 - beta
        out.append(acc)
    return torch.tensor(out, dtype=torch.float64)


def ddim_timesteps(S: int, T: int = 1000) -> list[int]:
    """"uniform" DDIM steps: c = T // S, [0, c, 2c, ...] + 1 (may hold more than S entries if S ∤ T)."""
    c = T // S
    return [i + 1 for i in range(0, T, c)]


def ddim_coefficients(alphas_cumprod, timesteps: Sequence[int], eta: float):
    """(ᾱ_t, ᾱ_prev, σ) per DDIM step, float64 tensors; ᾱ_prev of the first step is ᾱ[0]."""
    ac = [float(v) for v in alphas_cumprod]
    alphas = [ac[t] for t in timesteps]
    alphas_prev = [ac[0]] + [ac[t] for t in timesteps[:-1]]
    sigmas = [
        eta * math.sqrt((1.0 - ap) / (1.0 - a) * (1.0 - a / ap)) for a, ap in zip(alphas, alphas_prev)
    ]
    f = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return f(alphas), f(alphas_prev), f(sigmas)


def ddim_step(x, eps, a_t: float, a_prev: float, sigma: float, noise=None):
    """One DDIM update (no clipping); returns (x_prev, x0)."""
    x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev - sigma**2) * eps
    if sigma != 0.0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def plms_eps(eps: torch.Tensor, history: Sequence[torch.Tensor]) -> torch.Tensor:
    """Adams–Bashforth combination of eps for PLMS steps after the first (history: newest last, ≥1 entries).

    (The first PLMS step instead averages eps at t and at the next step; callers handle that.)
    """
    h = list(history)
    if len(h) == 1:
        return (3 * eps - h[-1]) / 2
    if len(h) == 2:
        return (23 * eps - 16 * h[-1] + 5 * h[-2]) / 12
    return (55 * eps - 59 * h[-1] + 37 * h[-2] - 9 * h[-3]) / 24
