"""Triton forward kernels of the fused GroupNorm (semantics: ``rdm_fast.ops.group_norm_reference``).

NCHW-contiguous inputs (any spatial rank): one program per (batch, group) loops over the group's
``C / G * spatial`` contiguous values in blocks of ``BLOCK``: pass 1 sums ``x + add`` less the group's first
such value (the mean, exact for a constant group, no float32 loss for large means), pass 2 sums squared
deviations (centred variance), pass 3 writes ``silu?((x + add - mean) * rstd * weight + bias)``.

4-D channels_last inputs: a group's channels are a few adjacent values in every C-wide pixel row, so walking
one group at a time would read each 32-byte sector for a handful of bytes. Instead every program reads
(pixels x channel block) tiles, the channel block a divisor of C where possible (no masked lanes), rows
coalesced:

1. ``_nhwc_stats``: programs (split, channel block, batch) sum, per channel over their pixel range, the
   deviations ``x - x[pixel 0]`` and their squares (shifted sums: exact to combine, no cancellation for large
   means);
2. ``_nhwc_finalize``: one program per sample adds the splits' partials, forms each group's mean and centred
   variance from them (per channel: ``sum (dev + e)^2 = S2 + 2 e S1 + N e^2``; the channels as a (group,
   channel-in-group) tile, every group reduced at once) and writes the per-channel affine
   ``y = (x - shift) * A + B`` that folds in ``add``, the statistics, weight and bias;
3. ``_nhwc_apply``: one program per tile applies it (and SiLU), one read and one write per value.

Statistics are float32. Runs on CPU under ``TRITON_INTERPRET=1`` (float32/float16; bfloat16 needs a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._layout import nhwc_row_stride


@triton.jit
def _load_group_block(x_ptr, add_ptr, base, add_base, idx, group_numel, spatial, HAS_ADD: tl.constexpr):
    """Values ``idx`` of an NCHW group (plus ``add``), float32, and their channel within the group."""
    mask = idx < group_numel
    ch = idx // spatial
    v = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        v += tl.load(add_ptr + add_base + ch, mask=mask, other=0.0)
    return v, ch, mask


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
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // groups
    g = pid % groups
    d = channels // groups
    group_numel = d * spatial
    c0 = g * d
    base = pid.to(tl.int64) * group_numel
    add_base = b * channels + c0
    lanes = tl.arange(0, BLOCK)

    first = tl.load(x_ptr + base).to(tl.float32)  # the group's first value: pass 1 sums the deviations from it
    if HAS_ADD:
        first += tl.load(add_ptr + add_base)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, group_numel, BLOCK):
        v, ch, mask = _load_group_block(x_ptr, add_ptr, base, add_base, start + lanes, group_numel, spatial,
                                        HAS_ADD)
        acc += tl.where(mask, v - first, 0.0)
    mean = first + tl.sum(acc, axis=0) / group_numel

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, group_numel, BLOCK):
        v, ch, mask = _load_group_block(x_ptr, add_ptr, base, add_base, start + lanes, group_numel, spatial,
                                        HAS_ADD)
        dv = tl.where(mask, v - mean, 0.0)
        acc += dv * dv
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / group_numel + eps)

    for start in range(0, group_numel, BLOCK):
        idx = start + lanes
        v, ch, mask = _load_group_block(x_ptr, add_ptr, base, add_base, idx, group_numel, spatial, HAS_ADD)
        r = (v - mean) * rstd
        if HAS_WEIGHT:
            r = r * tl.load(w_ptr + c0 + ch, mask=mask, other=1.0)
        if HAS_BIAS:
            r = r + tl.load(b_ptr + c0 + ch, mask=mask, other=0.0)
        if SILU:
            r = r / (1.0 + tl.exp(-r))
        tl.store(y_ptr + base + idx, r.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _shifted_tile(base, rows, p_end, c, cmask, x_row, shift):
    """A (rows x channel block) tile of ``x - shift`` in float32, zero outside the pixel range and channels."""
    m = (rows < p_end)[:, None] & cmask[None, :]
    v = tl.load(base + rows.to(tl.int64)[:, None] * x_row + c[None, :], mask=m, other=0.0).to(tl.float32)
    return tl.where(m, v - shift[None, :], 0.0)


@triton.jit
def _shifted_sums(base, p0, p_end, c, cmask, x_row, shift, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                  UNROLL: tl.constexpr):
    """Per channel of the block, the sums of ``x - shift`` and of its squares over pixels p0 .. p_end."""
    s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    # UNROLL = 2: both tiles' loads are issued before either is summed, twice the bytes in flight per thread
    # (a read-only pass is bound by how many loads wait on memory at once) for the same accumulators
    for p in range(p0, p_end, BLOCK_P * UNROLL):
        rows = p + tl.arange(0, BLOCK_P)
        d = _shifted_tile(base, rows, p_end, c, cmask, x_row, shift)
        if UNROLL == 2:
            d2 = _shifted_tile(base, rows + BLOCK_P, p_end, c, cmask, x_row, shift)
            s1 += d2
            s2 += d2 * d2
        s1 += d
        s2 += d * d
    return tl.sum(s1, axis=0), tl.sum(s2, axis=0)


@triton.jit
def _nhwc_stats_kernel(x_ptr, part_ptr, hw, channels, x_row, pix_per_prog, BLOCK_P: tl.constexpr,
                       BLOCK_C: tl.constexpr, UNROLL: tl.constexpr):
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    cmask = c < channels
    base = x_ptr + b.to(tl.int64) * hw * x_row
    shift = tl.load(base + c, mask=cmask, other=0.0).to(tl.float32)
    p0 = split * pix_per_prog
    t1, t2 = _shifted_sums(base, p0, tl.minimum(p0 + pix_per_prog, hw), c, cmask, x_row, shift, BLOCK_P, BLOCK_C,
                           UNROLL)
    out = part_ptr + (b * tl.num_programs(0) + split).to(tl.int64) * 2 * channels
    tl.store(out + c, t1, mask=cmask)
    tl.store(out + channels + c, t2, mask=cmask)


@triton.jit
def _nhwc_finalize_kernel(
    x_ptr, part_ptr, w_ptr, b_ptr, add_ptr, coef_ptr, hw, channels, x_row, add_row, splits, groups, per_group, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # the sample's channels as a (group, channel-in-group) tile: every group reduced at once along axis 1
    b = tl.program_id(0)
    g = tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_D)[None, :]
    c = g * per_group + j
    cmask = (g < groups) & (j < per_group)
    shift = tl.load(x_ptr + b.to(tl.int64) * hw * x_row + c, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for split in range(splits):
        part = part_ptr + (b * splits + split).to(tl.int64) * 2 * channels
        s1 += tl.load(part + c, mask=cmask, other=0.0)
        s2 += tl.load(part + channels + c, mask=cmask, other=0.0)
    n = tl.cast(hw, tl.float32)  # not hw.to(): the launcher passes an hw of 1 as a constexpr, which has no .to
    k = shift  # the values' shift: x[pixel 0] + add
    if HAS_ADD:
        k += tl.load(add_ptr + b * add_row + c, mask=cmask, other=0.0)
    mean = tl.sum(tl.where(cmask, k + s1 / n, 0.0), axis=1) / per_group
    e = k - mean[:, None]
    m2 = tl.sum(tl.where(cmask, s2 + 2.0 * e * s1 + n * e * e, 0.0), axis=1)
    scale = (1.0 / tl.sqrt(m2 / (n * per_group) + eps))[:, None] + tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c, mask=cmask, other=1.0)
    offset = e * scale
    if HAS_BIAS:
        offset += tl.load(b_ptr + c, mask=cmask, other=0.0)
    coef = coef_ptr + b.to(tl.int64) * 3 * channels
    tl.store(coef + c, shift, mask=cmask)
    tl.store(coef + channels + c, scale, mask=cmask)
    tl.store(coef + 2 * channels + c, offset, mask=cmask)


@triton.jit
def _nhwc_apply_kernel(x_ptr, y_ptr, coef_ptr, hw, channels, x_row, SILU: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    cmask = c < channels
    coef = coef_ptr + b.to(tl.int64) * 3 * channels
    shift = tl.load(coef + c, mask=cmask, other=0.0)[None, :]
    scale = tl.load(coef + channels + c, mask=cmask, other=0.0)[None, :]
    offset = tl.load(coef + 2 * channels + c, mask=cmask, other=0.0)[None, :]
    m = (rows < hw)[:, None] & cmask[None, :]
    pix = b.to(tl.int64) * hw + rows.to(tl.int64)[:, None]
    r = (tl.load(x_ptr + pix * x_row + c[None, :], mask=m, other=0.0).to(tl.float32) - shift) * scale + offset
    if SILU:
        r = r / (1.0 + tl.exp(-r))
    tl.store(y_ptr + pix * channels + c[None, :], r.to(y_ptr.dtype.element_ty), mask=m)


# Tunables of the channels_last kernels: values per tile, programs per SM aimed at by the statistics kernel,
# warps per program, widest channel block, tiles loaded per step of the statistics loop (1 or 2). Chosen by
# bench/gpu_tune.py on an H200 (2026-11-26, bench/RESULTS.md) over the 61 GroupNorms of an imagenet step: 5.32 ms,
# against 5.48 ms for tile 2048 / 4 waves, 6.03 ms without the unrolling, and 4.26 ms for three passes at copy
# bandwidth (the next configurations within 2 %: tile 4096 with 8 or 4 waves).
MAX_GRID_Z = 65535  # CUDA's limit on a grid's z axis, where the channels_last kernels put the batch
NHWC_TUNING = {"tile": 4096, "waves": 2, "warps": 4, "max_block_c": 64, "unroll": 2}


_SMS: dict[torch.device, int] = {}


def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (a plain dict as cache: torch.compile traces through here)."""
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def nhwc_config(batch: int, hw: int, channels: int, device: torch.device) -> dict[str, int]:
    """Tile and grid of the channels_last kernels: a channel block that divides C where one of 16..64 does
    (no masked lanes: 192, 576, 960 -> 64), rows filling ``tile`` values, and enough
    (batch, channel block, split) programs for the statistics to fill the GPU with whole loop steps per split."""
    pow2, widest = channels & -channels, NHWC_TUNING["max_block_c"]  # the largest power of two dividing C
    block_c = min(pow2, widest) if pow2 >= 16 else min(triton.next_power_of_2(channels), widest)
    block_p = max(1, NHWC_TUNING["tile"] // block_c)
    if device.type == "cuda":
        target = NHWC_TUNING["waves"] * _sm_count(device)
    else:  # the interpreter: a few splits, so that the partial sums are combined in the tests
        target = 3 * batch
    step = block_p * NHWC_TUNING["unroll"]  # pixels per iteration of the statistics loop
    programs = batch * triton.cdiv(channels, block_c)
    splits = max(1, min(triton.cdiv(target, programs), triton.cdiv(hw, step)))
    per = triton.cdiv(triton.cdiv(hw, splits), step) * step
    return {"block_c": block_c, "block_p": block_p, "splits": triton.cdiv(hw, per), "per": per,
            "warps": NHWC_TUNING["warps"], "unroll": NHWC_TUNING["unroll"]}


def _group_norm_nhwc(x, weight, bias, num_groups, eps, add, silu, x_row: int) -> Tensor:
    """``x_row``: the pixel stride, C or more for a channel slice of a wider map (the UNet's skip buffers)."""
    batch, channels, h, w = x.shape
    hw = h * w
    if batch > MAX_GRID_Z:
        raise ValueError(f"triton group_norm: batch {batch} exceeds the launch grid's limit of {MAX_GRID_Z}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    cfg = nhwc_config(batch, hw, channels, x.device)
    block_c, block_p, splits, warps = cfg["block_c"], cfg["block_p"], cfg["splits"], cfg["warps"]
    cblocks = triton.cdiv(channels, block_c)
    part = torch.empty((batch, splits, 2, channels), dtype=torch.float32, device=x.device)
    coef = torch.empty((batch, 3, channels), dtype=torch.float32, device=x.device)
    _nhwc_stats_kernel[(splits, cblocks, batch)](x, part, hw, channels, x_row, cfg["per"], BLOCK_P=block_p,
                                                 BLOCK_C=block_c, UNROLL=cfg["unroll"], num_warps=warps)
    per_group = channels // num_groups
    block_g, block_d = triton.next_power_of_2(num_groups), triton.next_power_of_2(per_group)
    add_rows = _add_rows(add, x)
    _nhwc_finalize_kernel[(batch,)](
        x, part, _float_param(weight, x), _float_param(bias, x), add_rows, coef, hw, channels, x_row,
        add_rows.stride(0) if add is not None else 0, splits, num_groups, per_group, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_ADD=add is not None, BLOCK_G=block_g,
        BLOCK_D=block_d, num_warps=4 if block_g * block_d <= 1024 else 8,
    )
    _nhwc_apply_kernel[(triton.cdiv(hw, block_p), cblocks, batch)](x, out, coef, hw, channels, x_row, SILU=silu,
                                                                  BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return out


def _float_param(t: Tensor | None, like: Tensor) -> Tensor:
    """Contiguous float32 copy of an optional parameter (``like`` as a dummy pointer when absent)."""
    return like if t is None else t.to(torch.float32).contiguous()


def _add_rows(add: Tensor | None, like: Tensor) -> Tensor:
    """``add`` (B, C) as float32 rows of unit channel stride at any row stride, without a copy where it already is
    (a column slice of the UNet's batched timestep adds, one row expanded over the batch); ``like`` when absent."""
    if add is None:
        return like
    if add.dtype != torch.float32 or (add.stride(1) != 1 and add.shape[1] > 1):
        return add.float().contiguous()
    return add


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
    # channels_last, or a channel slice of a wider channels_last map (rdm_fast.ops.group_norm checks the rest)
    x_row = nhwc_row_stride(x) if not x.is_contiguous() else None
    if x_row is None and not x.is_contiguous():
        raise ValueError(f"triton group_norm: x must be contiguous, channels_last or a channel slice of a "
                         f"channels_last map, got shape {tuple(x.shape)} with strides {x.stride()}")
    if x.numel() == 0:
        return torch.empty_like(x)
    if x_row is not None:
        return _group_norm_nhwc(x, weight, bias, num_groups, eps, add, silu, x_row)
    out = torch.empty_like(x)
    batch, channels = x.shape[:2]
    spatial = x.numel() // (batch * channels)
    group_numel = channels // num_groups * spatial
    if group_numel > 2**31 - 1 - 4096:  # 32-bit offsets, and a loop counter that steps past the end by a block
        raise ValueError(f"triton group_norm: groups of {group_numel} values exceed the kernel's 2^31 - 4097 limit")
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
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return out
