"""Triton kernels of the memory-bound glue around the UNet's transformer blocks and the sampler
(semantics: the references in ``rdm_fast.ops.glue``).

* ``layer_norm`` / ``add_layer_norm``: one program per ``BLOCK_R`` rows, each row held whole in registers
  (``BLOCK_C = next_pow2(C)``, C <= 16384): float32 mean, then the centred variance from the same registers,
  one write; ``shift`` (a per-channel bias) joins x in float32 before the statistics. The fused form first
  forms ``s = x + residual + residual_bias`` in float32, rounds it once to the output dtype, stores it and
  normalises the rounded values (so ``y == layer_norm(s)`` exactly).
* ``add_bias``: ``x + residual + bias`` with the bias on the last dim (a convolution's or linear layer's bias
  and the residual it is added to, in one pass); 2-D (rows, columns) tiles, the bias read once per tile.
* ``geglu``: ``h = [a, gate]`` on the last dim -> ``a * gelu_erf(gate)`` (float32 math, one rounding); 2-D tiles
  of (rows, columns) so both halves are read once with no per-element division.
* ``sampler_step``: the guided eps ``e_u + s (e_c - e_u)`` (or a given eps), an optional linear multistep
  combination with up to three past eps, the DDIM update and the predicted x0, elementwise in float32.
  Coefficients come either as float32 scalars derived on the host in float64 (Python floats) or as 0-d
  device tensors loaded in the kernel (no host synchronisation; CUDA-graph capturable), in which case the
  square roots are taken in float64.

All run on the CPU under ``TRITON_INTERPRET=1`` (float32/float16; bfloat16 needs a GPU).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._layout import as_rows, copy_into_blocks, row_view


@triton.jit
def _layer_norm_kernel(
    x_ptr,
    res_ptr,
    rbias_ptr,
    w_ptr,
    b_ptr,
    sum_ptr,
    y_ptr,
    rows,
    width,
    stride_x,
    stride_res,
    eps,
    HAS_RES: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_SUM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rmask = r < rows
    cmask = c < width
    mask = rmask[:, None] & cmask[None, :]
    r64 = r.to(tl.int64)
    v = tl.load(x_ptr + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        v += tl.load(res_ptr + r64[:, None] * stride_res + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RBIAS:
        v += tl.load(rbias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out_offs = r64[:, None] * width + c[None, :]
    if STORE_SUM:
        rounded = v.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + out_offs, rounded, mask=mask)
        v = rounded.to(tl.float32)
    mean = tl.sum(v, axis=1) / width
    d = tl.where(mask, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / width + eps)
    y = d * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _layer_norm_launch(x, residual, residual_bias, weight, bias, eps, store_sum):
    width = x.shape[-1]
    x2 = as_rows(x, width)
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if store_sum else y
    res2 = as_rows(residual, width) if residual is not None else x2
    if rows == 0 or width == 0:
        return s, y
    block_c = triton.next_power_of_2(width)
    block_r = max(1, min(16, 4096 // block_c))
    _layer_norm_kernel[(triton.cdiv(rows, block_r),)](
        x2,
        res2,
        x if residual_bias is None else residual_bias.contiguous(),
        x if weight is None else weight.contiguous(),
        x if bias is None else bias.contiguous(),
        s,
        y,
        rows,
        width,
        x2.stride(0),
        res2.stride(0),
        eps,
        HAS_RES=residual is not None,
        HAS_RBIAS=residual_bias is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        STORE_SUM=store_sum,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=min(16, max(4, block_c * block_r // 512)),  # ~16 values per thread: no spills on sm_90
    )
    return s, y


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *,
               shift: Tensor | None = None) -> Tensor:
    """LayerNorm over the last dim of ``x (+ shift)`` (float32 statistics, output in x's dtype, contiguous)."""
    return _layer_norm_launch(x, None, shift, weight, bias, eps, store_sum=False)[1]


def add_layer_norm(
    x: Tensor,
    residual: Tensor | None,
    residual_bias: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``s = x + residual + residual_bias`` (rounded to x's dtype) and ``layer_norm(s)``, in one pass."""
    return _layer_norm_launch(x, residual, residual_bias, weight, bias, eps, store_sum=True)


@triton.jit
def _add_bias_kernel(
    x_ptr,
    b_ptr,
    r_ptr,
    out_ptr,
    rows,
    width,
    stride_x,
    stride_r,
    stride_o,
    HAS_RES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COPIES: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < width
    mask = (r < rows)[:, None] & cmask[None, :]
    r64 = r.to(tl.int64)[:, None]
    y = tl.load(x_ptr + r64 * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        y += tl.load(r_ptr + r64 * stride_r + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = y.to(out_ptr.dtype.element_ty)
    for k in tl.static_range(COPIES):  # copy k: the rows ``k * rows`` further on (tl.cast: rows may be a constexpr 1)
        tl.store(out_ptr + (r64 + k * tl.cast(rows, tl.int64)) * stride_o + c[None, :], y, mask=mask)


# Values per program, warps and widest column block of the add_bias kernel (bench/gpu_tune.py sweeps them; these
# are the values measured in the H200 runs of 2026-11-26, not yet tuned).
ADD_BIAS_TUNING = {"tile": 4096, "warps": 8, "max_block_c": 256}


def add_bias(x: Tensor, bias: Tensor | None, residual: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``x + residual + bias`` (bias on the last dim, either term optional; float32 sum, one rounding) into
    ``out`` (default: a new tensor laid out like x, contiguous where x has gaps; with k times x's leading rows,
    the result goes into each block of them). The kernel reads and writes rows of C at any row stride:
    contiguous tensors and channel slices of wider channels-last maps cost one pass; other layouts go through
    contiguous copies."""
    width = x.shape[-1]
    dest = torch.empty_like(x) if out is None else out
    if x.numel() == 0:
        return dest
    copies = dest.shape[0] // x.shape[0] if dest.shape != x.shape else 1
    x2 = as_rows(x, width)
    r2 = as_rows(residual, width) if residual is not None else x2
    d2 = row_view(dest, width)
    o2 = d2 if d2 is not None else torch.empty((x2.shape[0], width), dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    pow2 = width & -width  # a column block dividing the width (192 -> 64, 384 -> 128) leaves no lane masked
    block_c = min(pow2 if pow2 >= 16 else triton.next_power_of_2(width), ADD_BIAS_TUNING["max_block_c"])
    block_r = max(1, ADD_BIAS_TUNING["tile"] // block_c)
    _add_bias_kernel[(triton.cdiv(rows, block_r), triton.cdiv(width, block_c))](
        x2, bias.contiguous() if bias is not None else x2, r2, o2, rows, width, x2.stride(0), r2.stride(0),
        o2.stride(0), HAS_RES=residual is not None, HAS_BIAS=bias is not None,
        COPIES=copies if d2 is not None else 1, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=ADD_BIAS_TUNING["warps"],
    )
    if d2 is None:
        copy_into_blocks(o2.view(x.shape), dest)
    return dest


@triton.jit
def _geglu_kernel(
    h_ptr,
    out_ptr,
    rows,
    half,
    stride_h,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (r < rows)[:, None] & (f < half)[None, :]
    r64 = r.to(tl.int64)[:, None]
    a_ptrs = h_ptr + r64 * stride_h + f[None, :]
    a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(a_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    y = a * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
    tl.store(out_ptr + r64 * half + f[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def geglu(h: Tensor) -> Tensor:
    """``a * gelu_erf(gate)`` for ``h = cat([a, gate], -1)``; output (..., F) contiguous, in h's dtype."""
    half = h.shape[-1] // 2
    out = torch.empty(h.shape[:-1] + (half,), dtype=h.dtype, device=h.device)
    if out.numel() == 0:  # before the row view, which cannot size rows of no values
        return out
    h2 = as_rows(h, 2 * half)
    rows = h2.shape[0]
    block_f = min(triton.next_power_of_2(half), 256)
    block_r = max(1, 2048 // block_f)
    _geglu_kernel[(triton.cdiv(rows, block_r), triton.cdiv(half, block_f))](
        h2, out, rows, half, h2.stride(0), BLOCK_R=block_r, BLOCK_F=block_f, num_warps=4
    )
    return out


@triton.jit
def _coef(value, ptr, IS_PTR: tl.constexpr):
    """A float32 coefficient given either as a scalar argument or as a 0-d tensor."""
    if IS_PTR:
        return tl.load(ptr).to(tl.float32)
    else:
        return value


@triton.jit
def _sampler_step_kernel(
    x_ptr,
    e_ptr,
    eu_ptr,
    h1_ptr,
    h2_ptr,
    h3_ptr,
    noise_ptr,
    xprev_ptr,
    x0_ptr,
    eps_out_ptr,
    numel,
    scale,
    scale_ptr,
    w0,
    w1,
    w2,
    w3,
    sqrt_a,
    sqrt_1ma,
    sqrt_ap,
    dir_coef,
    sigma,
    a_ptr,
    ap_ptr,
    sigma_ptr,
    GUIDED: tl.constexpr,
    SCALE_PTR: tl.constexpr,
    NUM_HIST: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    STORE_EPS: tl.constexpr,
    COEF_PTRS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        s = _coef(scale, scale_ptr, SCALE_PTR)
        eu = tl.load(eu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        e = eu + s * (e - eu)
    if STORE_EPS:
        tl.store(eps_out_ptr + offs, e.to(eps_out_ptr.dtype.element_ty), mask=mask)
    e = w0 * e
    if NUM_HIST > 0:
        e += w1 * tl.load(h1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM_HIST > 1:
        e += w2 * tl.load(h2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM_HIST > 2:
        e += w3 * tl.load(h3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if COEF_PTRS:
        a = tl.load(a_ptr).to(tl.float64)
        ap = tl.load(ap_ptr).to(tl.float64)
        sg = tl.load(sigma_ptr).to(tl.float64)
        c_sa = tl.sqrt(a).to(tl.float32)
        c_s1ma = tl.sqrt(1.0 - a).to(tl.float32)
        c_sap = tl.sqrt(ap).to(tl.float32)
        c_dir = tl.sqrt(1.0 - ap - sg * sg).to(tl.float32)
        c_sigma = sg.to(tl.float32)
    else:
        c_sa = sqrt_a
        c_s1ma = sqrt_1ma
        c_sap = sqrt_ap
        c_dir = dir_coef
        c_sigma = sigma
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = (x - c_s1ma * e) / c_sa
    x_prev = c_sap * x0 + c_dir * e
    if HAS_NOISE:
        x_prev += c_sigma * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    tl.store(xprev_ptr + offs, x_prev.to(xprev_ptr.dtype.element_ty), mask=mask)


def sampler_step(
    x: Tensor,
    e_uncond: Tensor | None,
    e_cond: Tensor,
    guidance_scale: float | Tensor,
    history: tuple[Tensor, ...],
    weights: tuple[float, ...],
    a_t: float | Tensor,
    a_prev: float | Tensor,
    sigma_t: float | Tensor,
    noise: Tensor | None,
    store_eps: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(x_prev, x0, eps or None); arguments as validated by ``rdm_fast.ops.glue`` (contiguous, same shape and
    dtype; tensor coefficients are 0-d on x's device; ``history`` newest last, ``weights`` = (w_now, w_-1, ...))."""
    x_prev = torch.empty_like(x, memory_format=torch.contiguous_format)
    x0 = torch.empty_like(x_prev)
    eps_out = torch.empty_like(x_prev) if store_eps else None
    numel = x.numel()
    if numel == 0:
        return x_prev, x0, eps_out
    coef_ptrs = any(torch.is_tensor(c) for c in (a_t, a_prev, sigma_t))
    if coef_ptrs:
        a_ptr, ap_ptr, sg_ptr = (
            c if torch.is_tensor(c) else torch.full((), c, dtype=torch.float64, device=x.device)
            for c in (a_t, a_prev, sigma_t)
        )
        host = (1.0, 0.0, 1.0, 0.0, 0.0)
    else:
        a_ptr = ap_ptr = sg_ptr = x
        host = (
            math.sqrt(a_t),
            math.sqrt(1.0 - a_t),
            math.sqrt(a_prev),
            math.sqrt(1.0 - a_prev - sigma_t**2),
            float(sigma_t),
        )
    scale_is_ptr = torch.is_tensor(guidance_scale)
    hist = list(reversed(history)) + [x] * (3 - len(history))  # newest first: h1 = history[-1]
    w = [float(v) for v in weights] + [0.0] * (4 - len(weights))
    block = 1024
    _sampler_step_kernel[(triton.cdiv(numel, block),)](
        x,
        e_cond,
        x if e_uncond is None else e_uncond,
        *hist,
        x if noise is None else noise,
        x_prev,
        x0,
        x if eps_out is None else eps_out,
        numel,
        1.0 if scale_is_ptr else float(guidance_scale),
        guidance_scale if scale_is_ptr else x,
        *w,
        *host,
        a_ptr,
        ap_ptr,
        sg_ptr,
        GUIDED=e_uncond is not None,
        SCALE_PTR=scale_is_ptr,
        NUM_HIST=len(history),
        HAS_NOISE=noise is not None,
        STORE_EPS=store_eps,
        COEF_PTRS=coef_ptrs,
        BLOCK=block,
        num_warps=4,
    )
    return x_prev, x0, eps_out
