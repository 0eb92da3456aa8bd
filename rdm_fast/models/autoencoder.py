"""First-stage autoencoders: the KL-regularised (rdm768, KL-f16) and the vector-quantised (ImageNet, VQ-f4) ones.

Encoder and decoder follow the released models: conv in; per level ResBlocks (+ single-head attention at the
listed resolutions) and a resampling conv; a middle ResBlock-attention-ResBlock; GroupNorm (eps 1e-6), swish,
conv out. The RDM works on ``z_model = scale_factor * z_ae``; that scaling lives in ``RDM.encode/decode``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..config import AutoencoderConfig, DDConfig
from .layers import (GroupNorm, Upsample, cached, conv1x1, conv3x3, conv_with_bias, conv_without_bias, nchw, nhwc,
                     on_input_device, pointwise_linear)


QUANTIZE_BLOCK = 2**26  # distance values formed at a time by Autoencoder.quantize (256 MB in float32)


def _norm(channels: int) -> GroupNorm:
    return GroupNorm(channels, eps=1e-6)


class ResBlock(nn.Module):
    """GN-SiLU-conv twice, plus a (1x1) skip; no timestep input (the autoencoders' block)."""

    OFFICIAL = {"skip": "nin_shortcut"}

    def __init__(self, cin: int, cout: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = conv3x3(cin, cout)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(cout, cout)
        self.skip = conv1x1(cin, cout) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # As in the UNet's ResBlock: the 3x3 convolutions run without their biases, conv1's joins norm2 as its
        # per-channel add (exact: a constant per channel before the statistics), conv2's joins the residual add
        # (one pass for bias + skip); the 1x1 skip is a linear layer on the (B, H, W, C) view, bias in the GEMM.
        h = conv_without_bias(self.conv1, self.norm1(x, silu=True))
        assert self.conv1.bias is not None  # conv3x3 has a bias
        bias1 = cached(self, "conv1_bias", lambda b: b.float()[None], self.conv1.bias)
        h = self.norm2(h, add=bias1.expand(x.shape[0], -1), silu=True)
        h = conv_without_bias(self.conv2, self.dropout(h))
        skip = nhwc(x) if isinstance(self.skip, nn.Identity) else pointwise_linear(self.skip, nhwc(x))
        return nchw(ops.add_bias(nhwc(h), self.conv2.bias, skip))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels with 1x1-conv projections, scale C^-0.5, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = conv1x1(channels, channels), conv1x1(channels, channels), conv1x1(channels, channels)
        self.proj_out = conv1x1(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        # the 1x1 projections are linear layers on the (B, H*W, C) tokens (a view of a channels-last map), biases
        # in the GEMMs' epilogues except proj_out's, which joins the residual pass
        b, c, h, w = x.shape
        tokens = nhwc(self.norm(x)).reshape(b, h * w, c)
        q, k, v = (pointwise_linear(m, tokens) for m in (self.q, self.k, self.v))
        out = F.linear(ops.attention(q, k, v, heads=1), self.proj_out.weight.flatten(1))
        return nchw(ops.add_bias(out.view(b, h, w, c), self.proj_out.bias, nhwc(x)))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return conv_with_bias(self.conv, F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """The ResBlocks (each followed by attention where the resolution asks for it) and resampler of one level."""

    OFFICIAL = {"res": "block"}

    def __init__(self, res: list[ResBlock], attn: list[AttnBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        if resample is not None:
            setattr(self, name, resample)
        self.resample_name = name if resample is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Mid(nn.Module):
    """The lowest level's ResBlock, attention block, ResBlock."""

    OFFICIAL = {"res1": "block_1", "attn": "attn_1", "res2": "block_2"}

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, dropout)
        self.attn = AttnBlock(channels)
        self.res2 = ResBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x)))


class Encoder(nn.Module):
    """Images -> the first stage's moments before quant_conv: ResBlocks (and attention) per level, downsampling
    between levels, then the middle block, GN-SiLU and a 3x3 convolution to 2 * z_channels (double_z: KL's mean
    and log-variance) or z_channels."""

    def __init__(self, dd: DDConfig) -> None:
        super().__init__()
        self.conv_in = conv3x3(dd.in_channels, dd.ch)
        res, cin, levels = dd.resolution, dd.ch, []
        for i, mult in enumerate(dd.ch_mult):
            blocks, attns = [], []
            for _ in range(dd.num_res_blocks):
                blocks.append(ResBlock(cin, dd.ch * mult, dd.dropout))
                cin = dd.ch * mult
                if res in dd.attn_resolutions:
                    attns.append(AttnBlock(cin))
            last = i == len(dd.ch_mult) - 1
            levels.append(Level(blocks, attns, None if last else Downsample(cin), "downsample"))
            res = res if last else res // 2
        self.down = nn.ModuleList(levels)
        self.mid = Mid(cin, dd.dropout)
        self.norm_out = _norm(cin)
        self.conv_out = conv3x3(cin, 2 * dd.z_channels if dd.double_z else dd.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = conv_with_bias(self.conv_in, x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return conv_with_bias(self.conv_out, self.norm_out(h, silu=True))


class Decoder(nn.Module):
    """``up`` is indexed by level like the encoder's ``down`` (up.0: the full-resolution level); runs last-first."""

    def __init__(self, dd: DDConfig) -> None:
        super().__init__()
        cin = dd.ch * dd.ch_mult[-1]
        res = dd.resolution // dd.downsample_factor
        self.conv_in = conv3x3(dd.z_channels, cin)
        self.mid = Mid(cin, dd.dropout)
        levels: list[Level] = []
        for i in reversed(range(len(dd.ch_mult))):
            blocks, attns = [], []
            for _ in range(dd.num_res_blocks + 1):
                blocks.append(ResBlock(cin, dd.ch * dd.ch_mult[i], dd.dropout))
                cin = dd.ch * dd.ch_mult[i]
                if res in dd.attn_resolutions:
                    attns.append(AttnBlock(cin))
            levels.insert(0, Level(blocks, attns, Upsample(cin) if i else None, "upsample"))
            res = res * 2 if i else res
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = conv3x3(cin, dd.out_ch)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(conv_with_bias(self.conv_in, z))
        for level in reversed(self.up):
            h = level(h)
        return conv_with_bias(self.conv_out, self.norm_out(h, silu=True))


class Autoencoder(nn.Module):
    """KL or VQ first stage. ``encode`` returns the unscaled latent, ``decode`` takes one."""

    OFFICIAL = {"codebook": "quantize.embedding"}

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dd = cfg.ddconfig
        self.encoder = Encoder(dd)
        self.decoder = Decoder(dd)
        moments = 2 if cfg.kind == "kl" else 1
        self.quant_conv = conv1x1(moments * dd.z_channels, moments * cfg.embed_dim)
        self.post_quant_conv = conv1x1(cfg.embed_dim, dd.z_channels)
        if cfg.kind == "vq":
            assert cfg.n_embed is not None  # AutoencoderConfig checks it for vq
            self.codebook = nn.Embedding(cfg.n_embed, cfg.embed_dim)

    @on_input_device
    def moments(self, images: Tensor) -> Tensor:
        """What the encoder determines: KL, the posterior's (mean, log-variance) stacked on the channels; VQ, the
        pre-quantisation latent. Deterministic, so training can store it once per image (:meth:`latent`)."""
        return self.quant_conv(self.encoder(images))

    def latent(self, moments: Tensor, *, sample: bool = True, noise: Tensor | None = None) -> Tensor:
        """The latent of :meth:`moments`: VQ, the moments themselves (pre-quantisation); KL, a posterior sample
        ``mean + std * noise`` (``noise``: standard normal in the latent's shape, drawn here when None), or its mean
        if ``sample=False``."""
        if self.cfg.kind == "vq":
            return moments
        mean, logvar = moments.chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        if noise is None:
            noise = torch.randn_like(mean)
        elif noise.shape != mean.shape:
            raise ValueError(f"encode: noise must have the latent's shape {tuple(mean.shape)}, "
                             f"got {tuple(noise.shape)}")
        return mean + std * noise.to(mean.dtype)

    def quantize(self, z: Tensor) -> Tensor:
        """Snap each latent vector (B, D, H, W) to its nearest codebook entry: squared Euclidean distances as the
        reference's quantiser forms them, ``(|z|^2 + |e|^2) - 2 z.e`` in float32, and their argmin (the lower index
        on ties). The distance matrix is formed for blocks of latent vectors (at most ``QUANTIZE_BLOCK`` values
        at a time): whole, it takes 8.6 GB at 64 latents of imagenet's 64x64 with its 8192 codes."""
        codes = self.codebook.weight.float()
        code_sq = codes.pow(2).sum(1)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        rows = max(1, QUANTIZE_BLOCK // codes.shape[0])
        index = torch.cat([((f.pow(2).sum(1, keepdim=True) + code_sq) - 2 * (f @ codes.t())).argmin(dim=1)
                           for f in flat.split(rows)])
        snapped = self.codebook.weight[index]
        return snapped.view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2).to(z.dtype)

    @on_input_device
    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent -> images in roughly [-1, 1] (not clamped)."""
        if self.cfg.kind == "vq":
            z = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))
