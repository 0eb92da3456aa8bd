"""Triton 3x3 convolution (stride 1, zero padding 1) for thin layers: few input or few output channels.

Semantics: ``rdm_fast.ops.conv3x3_reference``. The UNet's first convolution takes 3 or 16 channels and its
last one makes 3 or 16. cuDNN runs those at a fraction of memory bandwidth (an H200, imagenet at 64 images:
0.252 ms for the output convolution, which only has to read 201 MB, i.e. 47 us; then a separate bias pass).

Implicit GEMM over pixels: one program computes a (BLOCK_P pixels x BLOCK_N output channels) tile of the
output, float32 accumulation, and adds the bias in its epilogue. Two ways to walk the reduction:

* many input channels (the output convolution): one loop over the 9 taps x chunks of BLOCK_K channels, one
  matrix product per step on the tap's shifted pixel rows; a step's load is a (pixels x channels) tile with
  unit channel stride, masked per pixel only (image border) when BLOCK_K divides the channel count;
* few input channels (``TAPS_IN_K``, the input convolution): the reduction runs over the 9 * C_in
  (tap, channel) pairs at once, gathered into one or two BLOCK_K chunks, instead of 9 chunks of mostly
  padding.

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
TAPS_IN_K_BELOW = 16  # fewer input channels: the reduction runs over (tap, channel) pairs


def _configs() -> list[triton.Config]:
    if INTERPRETER:
        return [triton.Config({"BLOCK_P": 32}, num_warps=4, num_stages=1)]
    # larger tiles, or 4 warps on 64 pixels and more, spill registers on sm_90 (the compile test checks)
    return [triton.Config({"BLOCK_P": p}, num_warps=w, num_stages=2) for p, w in [(32, 4), (32, 8), (64, 8), (128, 8)]]


CONFIGS = _configs()


@triton.autotune(configs=CONFIGS, key=["CIN", "COUT", "BLOCK_N", "BLOCK_K", "TAPS_IN_K", "COPIES"])
@triton.jit(do_not_specialize=["n_pix", "H", "W", "copy_stride"])
def _conv3x3_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    n_pix, H, W, CIN, COUT,
    sxb, sxc, sxh, sxw,
    swo, swi, swh, sww,
    sob, soc, soh, sow,
    copy_stride,
    HAS_BIAS: tl.constexpr, COPIES: tl.constexpr, TAPS_IN_K: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok = p < n_pix
    n_ok = n < COUT
    hw = H * W
    b = p // hw
    h = (p % hw) // W
    w = p % W
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
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                wt = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = k < CIN
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    o = out_ptr + b.to(tl.int64) * sob + h * soh + w * sow
    for k in tl.static_range(COPIES):
        tl.store(o[:, None] + k * copy_stride.to(tl.int64) + n[None, :] * soc, y, mask=p_ok[:, None] & n_ok[None, :])


def arguments(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> tuple[tuple, dict]:
    """The kernel's arguments for a call: (positional, constexpr keywords other than the tuned BLOCK_P)."""
    batch, cin, height, width = x.shape
    cout = weight.shape[0]
    taps_in_k = cin < TAPS_IN_K_BELOW
    block_k = (32 if 9 * cin <= 32 else 64) if taps_in_k else min(64, max(16, triton.next_power_of_2(cin)))
    args = (x, weight, bias if bias is not None else weight, out, batch * height * width, height, width, cin, cout,
            *x.stride(), *weight.stride(), *out.stride(), batch * out.stride(0))
    meta = dict(HAS_BIAS=bias is not None, COPIES=out.shape[0] // batch, TAPS_IN_K=taps_in_k,
                EVEN_K=not taps_in_k and cin % block_k == 0,
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # ignored for 16-bit operands
                BLOCK_N=min(64, max(16, triton.next_power_of_2(cout))), BLOCK_K=block_k)
    return args, meta


def conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``conv2d(x, weight, bias, padding=1)`` into ``out`` ((k * B, C_out, H, W): k copies, each block of B
    rows one), float32 accumulation, one rounding to out's dtype."""
    args, meta = arguments(x, weight, bias, out)
    n_pix, cout = args[4], args[8]
    if n_pix == 0:
        return out

    def grid(cfg: dict) -> tuple[int, int]:
        return triton.cdiv(n_pix, cfg["BLOCK_P"]), triton.cdiv(cout, cfg["BLOCK_N"])

    _conv3x3_kernel[grid](*args, **meta)
    return out
