"""Triton forward kernel of the fused GroupNorm (semantics: ``rdm_fast.ops.group_norm_reference``).

One program per (batch, group) loops over the group's ``C / G * spatial`` values in blocks of
``BLOCK``: pass 1 sums ``x + add`` (mean), pass 2 sums squared deviations (centred variance),
pass 3 writes ``silu?((x + add - mean) * rstd * weight + bias)``. Statistics are float32 with one
accumulator per lane. NCHW-contiguous (any spatial rank) and 4-D channels_last inputs are read in
place. Runs on CPU under ``TRITON_INTERPRET=1`` (float32/float16; bfloat16 needs a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _group_norm_fwd_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    add_ptr,
    channels,
    spatial,
    groups,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ADD: tl.constexpr,
    SILU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // groups
    g = pid % groups
    d = channels // groups
    group_numel = d * spatial
    c0 = g * d
    if CHANNELS_LAST:
        base = b.to(tl.int64) * spatial * channels + c0
    else:
        base = pid.to(tl.int64) * group_numel
    lanes = tl.arange(0, BLOCK)

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, group_numel, BLOCK):
        idx = start + lanes
        mask = idx < group_numel
        if CHANNELS_LAST:
            ch = idx % d
            offs = (idx // d).to(tl.int64) * channels + ch
        else:
            ch = idx // spatial
            offs = idx
        v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            v += tl.load(add_ptr + b * channels + c0 + ch, mask=mask, other=0.0)
        acc += v
    mean = tl.sum(acc, axis=0) / group_numel

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, group_numel, BLOCK):
        idx = start + lanes
        mask = idx < group_numel
        if CHANNELS_LAST:
            ch = idx % d
            offs = (idx // d).to(tl.int64) * channels + ch
        else:
            ch = idx // spatial
            offs = idx
        v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            v += tl.load(add_ptr + b * channels + c0 + ch, mask=mask, other=0.0)
        dv = tl.where(mask, v - mean, 0.0)
        acc += dv * dv
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / group_numel + eps)

    for start in range(0, group_numel, BLOCK):
        idx = start + lanes
        mask = idx < group_numel
        if CHANNELS_LAST:
            ch = idx % d
            offs = (idx // d).to(tl.int64) * channels + ch
        else:
            ch = idx // spatial
            offs = idx
        v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            v += tl.load(add_ptr + b * channels + c0 + ch, mask=mask, other=0.0)
        r = (v - mean) * rstd
        if HAS_WEIGHT:
            r = r * tl.load(w_ptr + c0 + ch, mask=mask, other=1.0)
        if HAS_BIAS:
            r = r + tl.load(b_ptr + c0 + ch, mask=mask, other=0.0)
        if SILU:
            r = r / (1.0 + tl.exp(-r))
        tl.store(y_ptr + base + offs, r.to(y_ptr.dtype.element_ty), mask=mask)


def _float_param(t: Tensor | None, like: Tensor) -> Tensor:
    """Contiguous float32 copy of an optional parameter (``like`` as a dummy pointer when absent)."""
    return like if t is None else t.to(torch.float32).contiguous()


def group_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
    eps: float,
    *,
    add: Tensor | None = None,
    silu: bool = False,
) -> Tensor:
    """Fused GroupNorm forward with Triton; arguments as validated by ``rdm_fast.ops.group_norm``."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if not (channels_last or x.is_contiguous()):
        raise ValueError(f"triton group_norm: x must be contiguous or 4-D channels_last, got strides {x.stride()}")
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    batch, channels = x.shape[:2]
    spatial = x.numel() // (batch * channels)
    group_numel = channels // num_groups * spatial
    block = min(max(triton.next_power_of_2(group_numel), 128), 2048)
    _group_norm_fwd_kernel[(batch * num_groups,)](
        x,
        out,
        _float_param(weight, x),
        _float_param(bias, x),
        _float_param(add, x),
        channels,
        spatial,
        num_groups,
        eps,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_ADD=add is not None,
        SILU=silu,
        CHANNELS_LAST=channels_last,
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return out
