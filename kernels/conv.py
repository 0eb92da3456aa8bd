"""Triton 3x3 convolution (stride 1, zero padding 1) for thin layers: few input or few output channels.

Semantics: ``rdm_fast.ops.conv3x3_reference``. The UNet's first convolution takes 3 or 16 channels and its
last one makes 3 or 16. cuDNN runs those at a fraction of memory bandwidth (an H200, imagenet at 64 images:
0.252 ms for the output convolution, which only has to read 201 MB, i.e. 47 us; then a separate bias pass).
Whether ours is faster at a shape is measured (``rdm_fast.ops.conv``). On an H200 (bench/RESULTS.md,
2026-11-27) the few-outputs path beat cuDNN + ``add_bias`` at both models' output convolutions (imagenet
0.090 against 0.268 ms, rdm768 0.087 against 0.100 ms); the direct kernel lost at their input convolutions
(0.280 against 0.241 ms, 0.127 against 0.062 ms) and wins only at small batches.

Two kernels, by which side is thin:

* few output channels (the output convolution; ``_taps_kernel`` + ``_sum_taps_kernel``): re-reading the input
  once per tap made a direct kernel L2-bound on an H200 (9 x 201 MB for imagenet's: 0.283 ms, cuDNN 0.268 ms).
  Instead one GEMM over pixels reads every input pixel once and writes its 9 * C_out per-tap partial outputs
  (float32: 27 per pixel for imagenet, 144 for rdm768); a second pass sums, per output pixel, the 9 partials
  its neighbours made for it (zero past the image border) and adds the bias: one rounding of a float32 sum, as
  a direct kernel.
* few input channels (the input convolution; ``_conv3x3_kernel``): implicit GEMM, one program per
  (BLOCK_P pixels x BLOCK_N output channels) tile, the bias in its epilogue; the reduction runs over the
  9 * C_in (tap, channel) pairs, gathered in chunks of 32 or 64 (``TAPS_IN_K``), or, where C_in is a multiple
  of 16, tap by tap in chunks of BLOCK_K channels that divide C_in.

x and the output are read and written through their strides (channels-last maps and channel slices of them
need no copy); the output may take several copies of the result, ``copy_stride`` elements apart (both halves
of a guided batch that share their input). Runs on the CPU under ``TRITON_INTERPRET=1`` (float32/float16).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    if INTERPRETER:
        return [triton.Config({"BLOCK_P": 32}, num_warps=4, num_stages=1)]
    # larger tiles, or 4 warps on 64 pixels and more, spill registers on sm_90 (the compile test checks)
    return [triton.Config({"BLOCK_P": p}, num_warps=w, num_stages=2) for p, w in [(32, 4), (32, 8), (64, 8), (128, 8)]]


CONFIGS = _configs()
# the partial outputs' GEMM (K = C_in, N = 9 * C_out): one read of its input tile per program. 256-pixel tiles
# only where BLOCK_K divides C_in: with masked channel chunks they spill registers on sm_90 (the compile test).
TAPS_CONFIGS = [triton.Config({"BLOCK_P": 32}, num_warps=4, num_stages=1)] if INTERPRETER else [
    triton.Config({"BLOCK_P": p}, num_warps=w, num_stages=3) for p, w in [(64, 4), (64, 8), (128, 8), (256, 8)]]


def _prune_taps(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    even = kwargs.get("EVEN_K", named_args.get("EVEN_K"))
    return [c for c in configs if even or c.kwargs["BLOCK_P"] <= 128] or configs[:1]


@triton.jit
def _pixels(block, n_pix, H, W, BLOCK_P: tl.constexpr):
    """Pixel block ``block``'s BLOCK_P flat pixel indices (b * H * W + h * W + w), which are in range, and
    (b, h, w)."""
    p = block * BLOCK_P + tl.arange(0, BLOCK_P)
    hw = H * W
    return p, p < n_pix, p // hw, (p % hw) // W, p % W


@triton.jit
def _bias_and_store(acc, b_ptr, out_ptr, n, n_ok, p_ok, b, h, w, sob, soc, soh, sow, copy_stride,
                    HAS_BIAS: tl.constexpr, COPIES: tl.constexpr):
    """The epilogue: acc (pixels x output channels ``n``) plus the bias, rounded once, stored into every copy."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    dest = (out_ptr + b.to(tl.int64) * sob + h * soh + w * sow)[:, None] + n[None, :] * soc
    for k in tl.static_range(COPIES):
        tl.store(dest + k * tl.cast(copy_stride, tl.int64), y, mask=p_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=CONFIGS, key=["CIN", "COUT", "BLOCK_N", "BLOCK_K", "TAPS_IN_K", "COPIES"])
@triton.jit(do_not_specialize=["n_pix", "H", "W", "copy_stride"])
def _conv3x3_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    n_pix, H, W, CIN, COUT,
    sxb, sxc, sxh, sxw,
    swo, swi, swh, sww,
    sob, soc, soh, sow,
    copy_stride,
    HAS_BIAS: tl.constexpr, COPIES: tl.constexpr, TAPS_IN_K: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one program per (pixel block, channel block), the channel blocks of a pixel block adjacent: they read the
    # same input tile, which then comes from L2 instead of memory
    n_blocks = tl.cdiv(COUT, BLOCK_N)
    p, p_ok, b, h, w = _pixels(tl.program_id(0) // n_blocks, n_pix, H, W, BLOCK_P)
    n = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < COUT
    x_pix = x_ptr + b.to(tl.int64) * sxb + h * sxh + w * sxw
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    if TAPS_IN_K:
        for k0 in range(0, 9 * CIN, BLOCK_K):
            j = k0 + tl.arange(0, BLOCK_K)
            j_ok = j < 9 * CIN
            tap = j // CIN
            c = j % CIN
            dy = tap // 3 - 1
            dx = tap % 3 - 1
            hh = h[:, None] + dy[None, :]
            ww = w[:, None] + dx[None, :]
            ok = p_ok[:, None] & j_ok[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            a = tl.load(x_pix[:, None] + (dy * sxh + dx * sxw + c * sxc)[None, :], mask=ok, other=0.0)
            wt = tl.load(w_ptr + n[None, :] * swo + (c * swi + (dy + 1) * swh + (dx + 1) * sww)[:, None],
                         mask=j_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    else:
        chunks = tl.cdiv(CIN, BLOCK_K)
        for step in range(9 * chunks):  # one loop over (tap, channel chunk): compact code, pipelined loads
            tap = step // chunks
            k = (step % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            ty = tap // 3 - 1
            tx = tap % 3 - 1
            hh = h + ty
            ww = w + tx
            row_ok = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            a_ptrs = (x_pix + ty * sxh + tx * sxw)[:, None] + k[None, :] * sxc
            w_ptrs = w_ptr + (ty + 1) * swh + (tx + 1) * sww + k[:, None] * swi + n[None, :] * swo
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)  # BLOCK_K divides CIN: no channel mask
            wt = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
            acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    _bias_and_store(acc, b_ptr, out_ptr, n, n_ok, p_ok, b, h, w, sob, soc, soh, sow, copy_stride, HAS_BIAS, COPIES)


@triton.autotune(configs=TAPS_CONFIGS, key=["CIN", "N_OUT", "BLOCK_N", "BLOCK_K"],
                 prune_configs_by={"early_config_prune": _prune_taps})
@triton.jit(do_not_specialize=["n_pix", "H", "W"])
def _taps_kernel(
    x_ptr, w_ptr, y_ptr,
    n_pix, H, W, CIN, COUT, N_OUT,
    sxb, sxc, sxh, sxw,
    swo, swi, swh, sww,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[p, t * COUT + o] = sum_c x[p, c] w[o, c, ty, tx] for every tap t = 3 * ty + tx, float32."""
    n_blocks = tl.cdiv(N_OUT, BLOCK_N)  # as in _conv3x3_kernel: a pixel block's column blocks adjacent
    p, p_ok, b, h, w = _pixels(tl.program_id(0) // n_blocks, n_pix, H, W, BLOCK_P)
    n = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N_OUT
    x_pix = x_ptr + b.to(tl.int64) * sxb + h * sxh + w * sxw
    tap = n // COUT
    w_col = w_ptr + (n % COUT) * swo + (tap // 3) * swh + (tap % 3) * sww
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, CIN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(x_pix[:, None] + k[None, :] * sxc, mask=p_ok[:, None], other=0.0)
            wt = tl.load(w_col[None, :] + k[:, None] * swi, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = k < CIN
            a = tl.load(x_pix[:, None] + k[None, :] * sxc, mask=p_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_col[None, :] + k[:, None] * swi, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    rows = y_ptr + p.to(tl.int64)[:, None] * N_OUT + n[None, :]
    tl.store(rows, acc, mask=p_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["n_pix", "H", "W", "copy_stride"])
def _sum_taps_kernel(
    y_ptr, b_ptr, out_ptr,
    n_pix, H, W, COUT,
    sob, soc, soh, sow,
    copy_stride,
    HAS_BIAS: tl.constexpr, COPIES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """out[p, o] = bias[o] + sum over taps t = (ty, tx) of y[p + (ty - 1, tx - 1), t * COUT + o] (0 past the
    image border)."""
    p, p_ok, b, h, w = _pixels(tl.program_id(0), n_pix, H, W, BLOCK_P)
    o = tl.arange(0, BLOCK_O)
    o_ok = o < COUT
    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.float32)
    for t in tl.static_range(9):
        # tap t = (ty, tx) of output pixel (h, w) reads input pixel (h + ty - 1, w + tx - 1): that pixel's partial
        hh = h + (t // 3 - 1)
        ww = w + (t % 3 - 1)
        ok = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        q = p + (t // 3 - 1) * W + (t % 3 - 1)
        part = y_ptr + q.to(tl.int64)[:, None] * (9 * COUT) + t * COUT + o[None, :]
        acc += tl.load(part, mask=ok[:, None] & o_ok[None, :], other=0.0)
    _bias_and_store(acc, b_ptr, out_ptr, o, o_ok, p_ok, b, h, w, sob, soc, soh, sow, copy_stride, HAS_BIAS, COPIES)


def few_outputs(cin: int, cout: int) -> bool:
    """Whether a convolution takes the per-tap partial outputs path (few outputs, more inputs)."""
    return cout <= 16 and cin > cout


def arguments(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> tuple[tuple, dict]:
    """The kernel's arguments for a call: (positional, constexpr keywords other than the tuned BLOCK_P)."""
    batch, cin, height, width = x.shape
    cout = weight.shape[0]
    divisor = min(cin & -cin, 64)  # the largest power of two up to 64 dividing C_in: tap by tap if >= 16
    taps_in_k = divisor < 16
    block_k = (32 if 9 * cin <= 32 else 64) if taps_in_k else divisor
    args = (x, weight, bias if bias is not None else weight, out, batch * height * width, height, width, cin, cout,
            *x.stride(), *weight.stride(), *out.stride(), batch * out.stride(0))
    meta = dict(HAS_BIAS=bias is not None, COPIES=out.shape[0] // batch, TAPS_IN_K=taps_in_k,
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # ignored for 16-bit operands
                BLOCK_N=min(64, max(16, triton.next_power_of_2(cout))), BLOCK_K=block_k)
    return args, meta


SUM_BLOCK_P = 128  # pixels per program of the summing pass


def taps_arguments(x: Tensor, weight: Tensor, partials: Tensor) -> tuple[tuple, dict]:
    """``_taps_kernel``'s arguments: (positional, constexpr keywords other than the tuned BLOCK_P)."""
    batch, cin, height, width = x.shape
    cout = weight.shape[0]
    block_k = min(64, max(16, triton.next_power_of_2(cin)))
    args = (x, weight, partials, batch * height * width, height, width, cin, cout, 9 * cout, *x.stride(),
            *weight.stride())
    meta = dict(EVEN_K=cin % block_k == 0, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                BLOCK_N=min(64, max(16, triton.next_power_of_2(9 * cout))), BLOCK_K=block_k)
    return args, meta


def conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``conv2d(x, weight, bias, padding=1)`` into ``out`` ((k * B, C_out, H, W): k copies, each block of B
    rows one), float32 accumulation, one rounding to out's dtype."""
    batch, cin, height, width = x.shape
    cout = weight.shape[0]
    n_pix = batch * height * width
    if n_pix == 0:
        return out
    if bias is not None:  # the kernels read it as consecutive values (a strided view gave other channels' bias)
        bias = bias.contiguous()
    if few_outputs(cin, cout):
        partials = torch.empty((n_pix, 9 * cout), dtype=torch.float32, device=x.device)
        args, meta = taps_arguments(x, weight, partials)
        _taps_kernel[lambda cfg: (triton.cdiv(n_pix, cfg["BLOCK_P"]) * triton.cdiv(9 * cout, cfg["BLOCK_N"]),)](
            *args, **meta)
        _sum_taps_kernel[(triton.cdiv(n_pix, SUM_BLOCK_P),)](
            partials, bias if bias is not None else weight, out, n_pix, height, width, cout, *out.stride(),
            batch * out.stride(0), HAS_BIAS=bias is not None, COPIES=out.shape[0] // batch, BLOCK_P=SUM_BLOCK_P,
            BLOCK_O=max(2, triton.next_power_of_2(cout)), num_warps=4)
        return out
    args, meta = arguments(x, weight, bias, out)
    _conv3x3_kernel[lambda cfg: (triton.cdiv(n_pix, cfg["BLOCK_P"]) * triton.cdiv(cout, cfg["BLOCK_N"]),)](
        *args, **meta)
    return out
