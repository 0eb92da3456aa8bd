"""The RDM denoiser: the latent-diffusion UNet with spatial transformers that cross-attend to neighbour embeddings.

Structure (faithful to the released models): a timestep MLP; an input conv; per resolution level
``num_res_blocks`` stages of [ResBlock, SpatialTransformer if the level's downsampling factor is in
``attention_resolutions``], then a strided-conv downsample (except at the last level); a middle block
[ResBlock, SpatialTransformer, ResBlock]; the mirror image on the way up with skip connections concatenated
on the channel axis (``num_res_blocks + 1`` stages per level, nearest x2 + conv upsampling); GroupNorm, SiLU,
conv out.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._layout import nhwc_row_stride, row_view
from ..config import UNetConfig
from .. import ops
from .layers import (GroupNorm, LayerNorm, Upsample, cached, conv1x1, conv3x3, conv_with_bias, conv_without_bias,
                     is_channels_last, nchw, nhwc, official_names, on_input_device, pointwise_linear)

M = TypeVar("M", bound=nn.Module)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding cat([cos, sin]) of (B,) timesteps, in fp32, as the reference computes it."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def zero_init(module: M) -> M:
    """Zero a layer's parameters: the residual branches and the output start as identities in training."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


@dataclass(eq=False)
class PreparedContext:
    """A context whose cross-attention keys and values are computed once, for a whole sampling trajectory: a
    snapshot of the weights, to be prepared again after they change.

    The first ``zero_rows`` rows of the batch have an all-zero context (the unconditional half under
    classifier-free guidance). Keys and values are bias-free projections, so those rows' attention output is
    exactly zero and their cross-attention branch is just ``to_out``'s bias: it is skipped. ``kv`` holds, per
    cross-attention module, the (k, v) projections of the other (conditional) rows.

    ``shared_input``: the UNet gets the ``batch // 2`` rows that the unconditional and the conditional half
    share (guidance evaluates both at the same x and t). Everything before the first cross-attention ignores
    the context, so it runs once on those rows; the rows are duplicated just before that cross-attention.
    """

    kv: dict[nn.Module, tuple[Tensor, Tensor]]
    zero_rows: int
    batch: int
    shared_input: bool = False

    @property
    def input_rows(self) -> int:
        """Rows of the UNet's input x."""
        return self.batch // 2 if self.shared_input else self.batch

    def load_(self, other: PreparedContext) -> None:
        """Copy ``other``'s keys and values into this context's tensors (a CUDA graph captured with this context
        then runs on ``other``'s); both must come from the same model, batch layout and context shape."""
        same = (other.zero_rows, other.batch, other.shared_input) == (self.zero_rows, self.batch, self.shared_input)
        if not same or other.kv.keys() != self.kv.keys() or any(
                a.shape != b.shape for m in self.kv for a, b in zip(self.kv[m], other.kv[m])):
            raise ValueError("PreparedContext.load_: the contexts differ in model, batch layout or shape")
        for m, (k, v) in self.kv.items():
            k.copy_(other.kv[m][0])
            v.copy_(other.kv[m][1])


@dataclass(eq=False)
class TimestepAdds:
    """Every ResBlock's per-channel add before norm2 (its timestep projection plus conv1's bias), float32, for a
    whole UNet call from one GEMM instead of a small projection, cast and add per ResBlock: ``values`` (B, the
    ResBlocks' channels, concatenated), ``columns[block]`` the block's slice (the GroupNorm reads it in place)."""

    values: Tensor
    columns: dict[nn.Module, slice]

    def of(self, block: nn.Module) -> Tensor:
        return self.values[:, self.columns[block]]

    def repeated(self) -> TimestepAdds:
        """For both halves of a guided batch (the shared rows twice)."""
        return TimestepAdds(torch.cat([self.values, self.values]), self.columns)


class ResBlock(nn.Module):
    """GN-SiLU-conv, add the projected timestep embedding, GN-SiLU-dropout-conv, plus a (1x1) skip."""

    OFFICIAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection"}

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = GroupNorm(cin)
        self.conv1 = conv3x3(cin, cout)
        self.emb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = GroupNorm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(conv3x3(cout, cout))
        self.skip = conv1x1(cin, cout) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | TimestepAdds, out: Tensor | None = None,
                out_bias: Tensor | None = None) -> Tensor:
        """``emb`` is the SiLU of the timestep embedding (the first op of emb_layers), taken once per UNet call,
        or (inference) the :class:`TimestepAdds` of all ResBlocks; ``out``: where to write the result (a channel
        slice of a wider map), else a new tensor; ``out_bias``: added instead of conv2's bias (which it must
        include; see :meth:`SpatialTransformer.carried_biases`)."""
        # The 3x3 convolutions run without their biases, which cost a full pass each on the GPU: conv1's joins
        # the per-channel add before norm2 (exact: a per-channel constant), conv2's joins the residual add (one
        # pass for bias + residual). The 1x1 skip is a linear layer on the (B, H, W, C) view, its bias in the
        # GEMM's epilogue.
        h = conv_without_bias(self.conv1, self.norm1(x, silu=True))
        assert self.conv1.bias is not None  # conv3x3 has a bias
        add = emb.of(self) if isinstance(emb, TimestepAdds) else self.emb_proj(emb).float() + self.conv1.bias.float()
        h = self.norm2(h, add=add, silu=True)
        h = conv_without_bias(self.conv2, self.dropout(h))
        skip = nhwc(x) if isinstance(self.skip, nn.Identity) else pointwise_linear(self.skip, nhwc(x))
        bias = self.conv2.bias if out_bias is None else out_bias
        return nchw(ops.add_bias(nhwc(h), bias, skip, out=None if out is None else nhwc(out)))


class Attention(nn.Module):
    """Multi-head attention; keys/values from ``context`` (cross) or from the queries' own tokens (self)."""

    OFFICIAL = {"to_out": "to_out.0"}

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.to_out(self.attend(x, context))

    def attend(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The heads' output before ``to_out``."""
        if context is None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # one projection GEMM with [W_q; W_k; W_v], concatenated once; q, k, v are strided views the kernel reads
            weight = cached(self, "qkv", lambda *w: torch.cat(w), self.to_q.weight, self.to_k.weight, self.to_v.weight)
            q, k, v = F.linear(x, weight).chunk(3, dim=-1)
        else:
            ctx = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        return ops.attention(q, k, v, self.heads)


class GEGLU(nn.Module):
    """Feed-forward x -> W2 (a * gelu(g)) with [a, g] = W1 x; exact (erf) GELU; hidden width 4*dim."""

    OFFICIAL = {"proj": "net.0.proj", "out": "net.2"}

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 8 * dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.dropout(ops.geglu(self.proj(x))))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the context, GEGLU feed-forward; residual each."""

    OFFICIAL = {"self_attn": "attn1", "cross_attn": "attn2"}

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dim_head)
        self.norm2 = LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, dim_head, context_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = GEGLU(dim, dropout)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

    def forward_prepared(self, x: Tensor, context: PreparedContext,
                         pending: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The block with precomputed context keys/values, for sampling. ``x`` (B, N, C), this block's to update
        in place, comes without the bias ``pending`` (C,) added (the previous block's, if any) and so does the
        result: returns ``(x', b)`` with the block's output ``x' + b``. Each residual rides in its output GEMM's
        epilogue (``addmm_``, beta = 1) while the biases are carried: the self-attention's into norm2 (as a
        shift) and, with the cross-attention's, into norm3; the feed-forward's into the next LayerNorm or the
        transformer's output projection."""
        if pending is None:
            h = self.norm1(x)
        else:
            x, h = ops.add_layer_norm(x, None, pending, self.norm1.weight, self.norm1.bias, self.norm1.eps)
        o = self.self_attn.attend(h)
        x.view(-1, x.shape[-1]).addmm_(o.view(-1, o.shape[-1]), self.self_attn.to_out.weight.t())
        if x.shape[0] != context.batch:  # rows shared by both halves so far: the context makes them differ
            x = torch.cat([x, x])
        x, h = self._add_prepared_cross(x, context)
        ff = self.ff
        g = ff.dropout(ops.geglu(ff.proj(h)))
        x.view(-1, x.shape[-1]).addmm_(g.view(-1, g.shape[-1]), ff.out.weight.t())  # x: this block's own tensor
        return x, ff.out.bias

    def _add_prepared_cross(self, x: Tensor, context: PreparedContext) -> tuple[Tensor, Tensor]:
        """(x + self-attention's bias + cross-attention, norm3 of it) with precomputed keys/values: LayerNorm (of
        x shifted by the self-attention's bias), query projection and attention in one op
        (``ops.cross_attention``), run on the conditional rows only (the zero-context rows get to_out's bias);
        the output projection adds into those rows in its GEMM's epilogue and both biases join norm3's pass."""
        attn, z, n2, n3 = self.cross_attn, context.zero_rows, self.norm2, self.norm3
        k, v = context.kv[attn]
        carried = self.self_attn.to_out.bias
        o = ops.cross_attention(x[z:], n2.weight, n2.bias, n2.eps, attn.to_q.weight, k, v, attn.heads, shift=carried)
        # x is this block's own intermediate: safe to update in place
        x[z:].view(-1, x.shape[-1]).addmm_(o.view(-1, o.shape[-1]), attn.to_out.weight.t())
        biases = cached(self, "attn_biases", lambda a, b: a.float() + b.float(), carried, attn.to_out.bias)
        return ops.add_layer_norm(x, None, biases, n3.weight, n3.bias, n3.eps)


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, tokens (B, HW, C) through transformer blocks, 1x1 conv out, plus the input."""

    OFFICIAL = {"blocks": "transformer_blocks"}

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm(channels, eps=1e-6)
        self.proj_in = conv1x1(channels, inner)
        self.blocks = nn.ModuleList(TransformerBlock(inner, heads, dim_head, context_dim, dropout)
                                    for _ in range(depth))
        self.proj_out = zero_init(conv1x1(inner, channels))

    def forward(self, x: Tensor, context: Tensor | PreparedContext, out: Tensor | None = None, *,
                carried: Tensor | None = None) -> Tensor:
        """``out``: where to write the result (a channel slice of a wider map), else a new tensor. ``carried``:
        ``-b`` of :meth:`carried_biases`, whose b x already holds (its producer added it): the result is then
        computed in x's own memory and x is returned."""
        # The 1x1 convolutions in and out are linear layers on the (B, H*W, C) tokens (channels-last feature
        # maps are those tokens already): proj_in's bias rides in the GEMM's epilogue, proj_out's joins the
        # residual add (or, carried, the residual rides in proj_out's GEMM epilogue on x itself).
        b, c, h, w = x.shape
        if carried is not None:
            x_rows = row_view(nhwc(x), c)
            if x_rows is None or not isinstance(context, PreparedContext) or context.batch != b or out is not None:
                raise ValueError("SpatialTransformer: carried needs channels-last rows of x, a prepared context of "
                                 "x's batch and no out")
            norm = self.norm(x, add=carried.expand(b, c))  # the norm of x without the carried bias
        else:
            norm = self.norm(x)
        tokens = pointwise_linear(self.proj_in, nhwc(norm).reshape(b, h * w, c))
        bias: Tensor | None
        if isinstance(context, PreparedContext):
            pending = None
            for block in self.blocks:
                tokens, pending = cast(TransformerBlock, block).forward_prepared(tokens, context, pending)
            bias = self._output_bias()
        else:
            for block in self.blocks:
                tokens = block(tokens, context)
            bias = self.proj_out.bias
        weight = self.proj_out.weight.flatten(1)
        if carried is not None:
            assert x_rows is not None  # checked above
            x_rows.addmm_(tokens.view(-1, tokens.shape[-1]), weight.t())
            return x
        y = F.linear(tokens, weight).view(tokens.shape[0], h, w, c)
        if y.shape[0] != b:  # the blocks duplicated rows shared by both halves of a guided batch
            x = torch.cat([x, x])
        return nchw(ops.add_bias(nhwc(x), bias, y, out=None if out is None else nhwc(out)))

    def _output_bias(self) -> Tensor:
        """proj_out's bias on the prepared path, float32: the last block's carried feed-forward bias p goes through
        proj_out, W (t + p) + b = W t + (W p + b), computed once."""
        return cached(self, "out_bias", _projected_bias, *self._output_bias_terms())

    def _output_bias_terms(self) -> tuple[Tensor, Tensor, Tensor]:
        # the last block's feed-forward bias is what forward_prepared carries out of it
        assert self.proj_out.bias is not None  # conv1x1 has a bias
        return self.proj_out.weight, self.proj_out.bias, cast(TransformerBlock, self.blocks[-1]).ff.out.bias

    def carried_biases(self, rows: int, context: Tensor | PreparedContext,
                       producer_bias: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(producer_bias + b, -b)`` (float32; b: this transformer's output bias) for :meth:`forward`'s
        ``carried`` path: the producer (a ResBlock whose own output bias is ``producer_bias``) adds b in its output
        pass, the GroupNorm takes it off again, and the residual rides in proj_out's GEMM epilogue on x itself:
        two passes over the map fewer than a separate bias + residual add. None where that path does not apply
        (autograd, a plain context, rows the blocks will duplicate)."""
        if torch.is_grad_enabled() or not isinstance(context, PreparedContext) or rows != context.batch:
            return None

        def biases(p: Tensor, *terms: Tensor) -> tuple[Tensor, Tensor]:
            b = _projected_bias(*terms)
            return p.float() + b, -b

        return cached(self, "carried", biases, producer_bias, *self._output_bias_terms())


def _projected_bias(weight: Tensor, bias: Tensor, carried: Tensor) -> Tensor:
    """``weight @ carried + bias`` in float32 for a 1x1 conv ``weight``: a bias carried through a linear layer."""
    return torch.addmv(bias.float(), weight.flatten(1).float(), carried.float())


class Downsample(nn.Module):
    """A 3x3 convolution with stride 2 (padding 1), as the released UNets downsample."""

    OFFICIAL = {"conv": "op"}

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2)

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        row = nhwc_row_stride(x)
        if row is not None and row > x.shape[1]:  # a channel slice of a skip buffer: cuDNN takes dense maps only,
            x = nchw(ops.add_bias(nhwc(x), None))  # and PyTorch's own copy of a slice is unvectorised
        return conv_with_bias(self.conv, x, out)


def _res_then_transformer(res: ResBlock, attn: SpatialTransformer, x: Tensor, emb: Tensor | TimestepAdds,
                          context: Tensor | PreparedContext, out: Tensor | None) -> Tensor:
    """``attn(res(x))`` written to ``out`` if given. Where it can (channels-last maps, which are rows of tokens),
    the ResBlock adds the transformer's output bias in its own output pass (into ``out``) and the transformer
    finishes in that memory (``carried``)."""
    assert res.conv2.bias is not None  # conv3x3 has a bias
    biases = attn.carried_biases(x.shape[0], context, res.conv2.bias) if is_channels_last(res.conv1.weight) else None
    if biases is None:
        return attn(res(x, emb), context, out)
    return attn(res(x, emb, out, out_bias=biases[0]), context, carried=biases[1])


class Stage(nn.Module):
    """One entry of the official input/output block lists: [ResBlock] [SpatialTransformer] [Down/Upsample]."""

    def __init__(self, res: ResBlock | None = None, attn: SpatialTransformer | None = None,
                 resample: nn.Module | None = None) -> None:
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample
        present = [name for name in ("res", "attn", "resample") if getattr(self, name) is not None]
        self.OFFICIAL = {name: str(i) for i, name in enumerate(present)}

    def forward(self, x: Tensor, emb: Tensor | TimestepAdds, context: Tensor | PreparedContext,
                out: Tensor | None = None) -> Tensor:
        """``out``: where the last module writes the stage's result (a channel slice of a wider map), if given."""
        last = next(m for m in (self.resample, self.attn, self.res) if m is not None)
        if self.res is not None and self.attn is not None:
            x = _res_then_transformer(self.res, self.attn, x, emb, context, out if last is self.attn else None)
        elif self.res is not None:
            x = self.res(x, emb, out if last is self.res else None)
        elif self.attn is not None:
            x = self.attn(x, context, out if last is self.attn else None)
        if self.resample is not None:
            x = self.resample(x, out)
        return x


class MidBlock(nn.Module):
    """ResBlock, SpatialTransformer, ResBlock at the lowest resolution."""

    OFFICIAL = {"res1": "0", "attn": "1", "res2": "2"}

    def __init__(self, res1: ResBlock, attn: SpatialTransformer, res2: ResBlock) -> None:
        super().__init__()
        self.res1, self.attn, self.res2 = res1, attn, res2

    def forward(self, x: Tensor, emb: Tensor | TimestepAdds, context: Tensor | PreparedContext,
                out: Tensor | None = None) -> Tensor:
        return self.res2(_res_then_transformer(self.res1, self.attn, x, emb, context, None), emb, out)


class UNet(nn.Module):
    """eps-prediction UNet: ``unet(x (B,C,H,W), t (B,), context (B,k,D)) -> eps (B,C,H,W)``."""

    OFFICIAL = {"time_fc1": "time_embed.0", "time_fc2": "time_embed.2", "input_conv": "input_blocks.0.0",
                "mid": "middle_block", "up": "output_blocks", "out_norm": "out.0", "out_conv": "out.2"}

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_fc1 = nn.Linear(mc, emb_dim)
        self.time_fc2 = nn.Linear(emb_dim, emb_dim)
        self.input_conv = conv3x3(cfg.in_channels, mc)

        def transformer(ch: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads(ch)
            return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim, cfg.dropout)

        ch, ds, skips = mc, 1, [(mc, 0)]  # skips: (channels, level) of every skip connection
        down = []
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                res = ResBlock(ch, mult * mc, emb_dim, cfg.dropout)
                ch = mult * mc
                down.append(Stage(res, transformer(ch) if ds in cfg.attention_resolutions else None))
                skips.append((ch, level))
            if level != len(cfg.channel_mult) - 1:
                down.append(Stage(resample=Downsample(ch)))
                skips.append((ch, level + 1))
                ds *= 2
        self.down = nn.ModuleList(down)
        self.mid = MidBlock(ResBlock(ch, ch, emb_dim, cfg.dropout), transformer(ch),
                            ResBlock(ch, ch, emb_dim, cfg.dropout))
        up = []
        self.concat_plan = []  # per up stage: (channels of h, channels of the skip, level) of its input
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                skip_ch, skip_level = skips.pop()
                self.concat_plan.append((ch, skip_ch, skip_level))
                res = ResBlock(ch + skip_ch, mult * mc, emb_dim, cfg.dropout)
                ch = mult * mc
                attn = transformer(ch) if ds in cfg.attention_resolutions else None
                upsample = None
                if level and i == cfg.num_res_blocks:
                    upsample = Upsample(ch)
                    ds //= 2
                up.append(Stage(res, attn, upsample))
        self.up = nn.ModuleList(up)
        # the down stage holding the first cross-attention; the stages before it never see the context
        self.first_context_stage = next((i for i, st in enumerate(self.down) if st.attn is not None), None)
        self.out_norm = GroupNorm(ch)
        self.out_conv = zero_init(conv3x3(mc, cfg.out_channels))
        # training: recompute each stage's activations in the backward pass instead of keeping them (less memory)
        self.gradient_checkpointing = False
        # every ResBlock, in module order (a plain tuple, not registered twice): their timestep projections batch
        self.res_blocks = tuple(m for m in self.modules() if isinstance(m, ResBlock))

    def official_names(self) -> dict[str, str]:
        """Our state-dict names -> official names (without the ``model.diffusion_model.`` prefix)."""
        names = official_names(self)
        for ours, off in names.items():  # down.i is input_blocks.(i+1): input_blocks.0 is the input conv
            if ours.startswith("down."):
                index, rest = off[len("down."):].split(".", 1)
                names[ours] = f"input_blocks.{int(index) + 1}.{rest}"
        return names

    def _check_context(self, context: Tensor, batch: int | None = None) -> None:
        """TypeError unless ``context`` is a tensor, ValueError unless it is (batch, k >= 1, context_dim) floats
        with batch >= 1 (type, shape and dtype only: nothing is read from a device tensor)."""
        d = self.cfg.context_dim
        if not isinstance(context, Tensor):
            raise TypeError(f"unet: context must be a torch.Tensor of shape ({batch if batch is not None else 'B'}, "
                            f"k, {d}) or a PreparedContext, got {type(context).__name__}")
        if context.dim() != 3 or context.shape[2] != d or (batch is not None and context.shape[0] != batch):
            want = f"({batch if batch is not None else 'B'}, k, {d})"
            raise ValueError(f"unet: context must be {want}, got {tuple(context.shape)}")
        if context.shape[0] < 1 or context.shape[1] < 1:
            raise ValueError(f"unet: context holds no samples or no embeddings, got {tuple(context.shape)}")
        if not context.is_floating_point():
            raise ValueError(f"unet: context must hold floats, got {context.dtype}")

    @torch.no_grad()
    def prepare_context(self, context: Tensor, zero_rows: int = 0, *, shared_input: bool = False) -> PreparedContext:
        """Project ``context`` (B, k, D) to every cross-attention's keys and values once (for sampling).

        The returned context stands for a batch of ``zero_rows + B`` rows whose first ``zero_rows`` have an
        all-zero context; pass it to :meth:`forward` in place of the context tensor. ``shared_input`` (with
        ``zero_rows == B``, classifier-free guidance): :meth:`forward` then takes the B rows x that both halves
        share and runs the layers before the first cross-attention once (granted where the first
        cross-attention is in a down stage, as in the released models; the result's ``shared_input`` says).
        """
        self._check_context(context)
        if isinstance(zero_rows, bool) or not isinstance(zero_rows, numbers.Integral):
            raise TypeError(f"zero_rows must be an int >= 0, got {zero_rows!r}")
        if zero_rows < 0:
            raise ValueError(f"zero_rows must be an int >= 0, got {zero_rows!r}")
        zero_rows = int(zero_rows)
        if shared_input and zero_rows != context.shape[0]:
            raise ValueError(f"shared_input needs as many zero rows as context rows, got {zero_rows} and "
                             f"{context.shape[0]}")
        context = context.to(self.input_conv.weight.dtype)
        kv: dict[nn.Module, tuple[Tensor, Tensor]] = {
            m.cross_attn: (m.cross_attn.to_k(context), m.cross_attn.to_v(context))
            for m in self.modules() if isinstance(m, TransformerBlock)}
        shared = shared_input and self.first_context_stage is not None
        return PreparedContext(kv, zero_rows, zero_rows + context.shape[0], shared)

    def _check(self, x: Tensor, t: Tensor, context: Tensor | PreparedContext) -> None:
        cfg = self.cfg
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"unet: x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"unet: x must be a float tensor, got {x.dtype}")
        if x.shape[0] < 1:
            raise ValueError("unet: x holds no samples (batch of 0)")
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor or not x.shape[2] or not x.shape[3]:
            raise ValueError(f"unet: H and W must be positive multiples of {factor}, got {tuple(x.shape[2:])}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"unet: t must be ({x.shape[0]},) (one timestep per sample), got {tuple(t.shape)}")
        if (t.device.type == "cpu" and t.is_floating_point() and not torch.compiler.is_compiling()  # no sync, no
                and not bool(torch.isfinite(t).all())):                                            # graph break
            raise ValueError("unet: t holds NaN or infinite timesteps")
        if isinstance(context, PreparedContext):
            if context.input_rows != x.shape[0]:
                shared = " (rows shared by its two halves)" if context.shared_input else ""
                raise ValueError(f"unet: the prepared context takes x of {context.input_rows} rows{shared}, x has "
                                 f"{x.shape[0]}")
        else:
            self._check_context(context, x.shape[0])

    @on_input_device
    def forward(self, x: Tensor, t: Tensor | int | float, context: Tensor | PreparedContext) -> Tensor:
        """eps for noisy latents ``x`` (B, C, H, W) at timesteps ``t`` ((B,) or 0-d tensor, or a Python/NumPy
        number for every sample), given a context tensor (B, k, D) of floats or a :class:`PreparedContext`.
        ``t`` is taken as given (its sinusoidal embedding is defined for any real value, and continuous-time
        samplers pass fractions); the released models were trained on the integers 0 to 999.

        The network runs in its weights' dtype; eps (B, out_channels, H, W) is returned in ``x``'s dtype.
        TypeError for a ``t`` or context of another type, ValueError for mismatched shapes or a batch of 0."""
        if not torch.is_tensor(t):
            if isinstance(t, bool) or not isinstance(t, numbers.Real):
                raise TypeError(f"unet: t must be a tensor of shape (B,) or a number, got {type(t).__name__}")
            t = torch.full((x.shape[0],), t, device=x.device)  # a float stays a float, as in a tensor
        elif t.dim() == 0:  # no int(t): a device tensor must not synchronise (CUDA graphs, sync-free loops)
            t = t.expand(x.shape[0])
        self._check(x, t, context)
        dtype = self.input_conv.weight.dtype
        emb: Tensor | TimestepAdds = timestep_embedding(t, self.cfg.model_channels).to(dtype)
        emb = F.silu(self.time_fc2(F.silu(self.time_fc1(emb))))  # every ResBlock's emb_layers starts with SiLU
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and ops.get_mode() != "reference":
            emb = self._timestep_adds(emb)
        if isinstance(context, Tensor):
            context = context.to(dtype)
        nhwc_weights = is_channels_last(self.input_conv.weight)
        if nhwc_weights:  # converted weights
            x = x.contiguous(memory_format=torch.channels_last)
        # Skip connections: the plain path concatenates [h, skip] before each up stage. The fast path (channels-last
        # inference) gives each up stage's input its buffer up front and has every producer write straight into
        # its channel slice (the skip from the way down, h from the previous up stage): no concatenation copies.
        # A shared input (guidance: both halves at the same x and t) runs the stages before the first
        # cross-attention on x's rows alone; that stage's transformer duplicates them (see PreparedContext). Their
        # skips are needed for both halves: the fast path's producers write them into both halves of their slices
        # at once (``ops.add_bias`` into k times the rows), the plain path concatenates them at the split.
        batch = context.batch if isinstance(context, PreparedContext) else x.shape[0]
        shared = x.shape[0] != batch
        inputs = self._concat_buffers(batch, x, dtype) if nhwc_weights and not torch.is_grad_enabled() and \
            ops.get_mode() != "reference" else None

        def slot(stage: int, part: int) -> Tensor | None:  # part 0: h, part 1: skip; all rows of the batch
            if inputs is None or stage >= len(inputs):
                return None
            split = self.concat_plan[stage][0]
            return inputs[stage][:, split:] if part else inputs[stage][:, :split]

        n = len(self.concat_plan)  # one up stage per skip; skip i feeds up stage n - 1 - i
        rows = x.shape[0]  # rows the stages run on: batch // 2 up to the split of a shared input, then batch
        h = conv_with_bias(self.input_conv, x.to(dtype), slot(n - 1, 1))
        hs = [h]
        for i, stage in enumerate(self.down, 1):
            h = self._run(stage, h[:rows], emb, context, slot(n - 1 - i, 1))
            if shared and i - 1 == self.first_context_stage:  # the rows are the two halves' own from here on
                if inputs is None:
                    hs = [torch.cat([s, s]) for s in hs]
                emb = emb.repeated() if isinstance(emb, TimestepAdds) else torch.cat([emb, emb])
                rows = batch
            hs.append(h)
        h = self._run(self.mid, h, emb, context, slot(0, 0))
        for j, stage in enumerate(self.up):
            skip = hs.pop()
            h = self._run(stage, inputs[j] if inputs is not None else torch.cat([h, skip], dim=1), emb, context,
                          slot(j + 1, 0))
        # eps leaves in NCHW memory even from a channels-last network: the samplers' fused step takes contiguous
        # tensors only (on others it falls back to its reference, one PyTorch op at a time)
        eps = None if inputs is None else torch.empty((batch, self.cfg.out_channels, *x.shape[2:]), dtype=dtype,
                                                      device=x.device)
        return conv_with_bias(self.out_conv, self.out_norm(h, silu=True), eps).to(x.dtype)

    def _run(self, stage: nn.Module, *args) -> Tensor:
        """``stage(*args)``, under activation checkpointing when :attr:`gradient_checkpointing` is set in training."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, *args, use_reentrant=False)
        return stage(*args)

    def _timestep_adds(self, emb: Tensor) -> TimestepAdds:
        """All ResBlocks' timestep projections in one GEMM, each plus conv1's bias (summed once, float32)."""
        blocks = self.res_blocks
        n = len(blocks)

        def concatenated(*t: Tensor) -> tuple[Tensor, Tensor, dict[nn.Module, slice]]:
            weights, biases, conv_biases = t[:n], t[n:2 * n], t[2 * n:]
            bias = torch.cat([b.float() + c.float() for b, c in zip(biases, conv_biases)])
            ends = itertools.accumulate(w.shape[0] for w in weights)
            columns: dict[nn.Module, slice] = {blk: slice(end - w.shape[0], end)
                                               for blk, w, end in zip(blocks, weights, ends)}
            return torch.cat(weights), bias, columns

        weight, bias, columns = cached(self, "timestep_adds", concatenated, *(b.emb_proj.weight for b in blocks),
                                       *(b.emb_proj.bias for b in blocks),
                                       *(cast(Tensor, b.conv1.bias) for b in blocks))  # conv3x3 has a bias
        return TimestepAdds(torch.add(F.linear(emb, weight), bias), columns)  # float32: the sum promotes

    def _concat_buffers(self, batch: int, x: Tensor, dtype: torch.dtype) -> list[Tensor]:
        """The channels-last input map of every up stage, [h | skip] channels, at its level's resolution."""
        _, _, height, width = x.shape
        return [torch.empty((batch, hc + sc, height >> level, width >> level), dtype=dtype, device=x.device,
                            memory_format=torch.channels_last) for hc, sc, level in self.concat_plan]

