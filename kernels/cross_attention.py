"""Triton kernel of the fused neighbour cross-attention (semantics: ``rdm_fast.ops.cross_attention_reference``).

``out[b, n, h*D:(h+1)*D] = softmax(q_h k_h^T / sqrt(D)) v_h`` with ``q = LayerNorm(x) @ w_q^T``, where the
keys/values ``k, v`` (B or 1, M, heads*D) were projected once per trajectory and M <= 32.

Design. One program owns a tile of ``BLOCK_N`` tokens of one sample and a group of consecutive heads:

1. LayerNorm statistics of the tile in float32: a K-loop over the channels for the mean, a second one for
   the centred variance (the second read hits the cache).
2. Per head, the query projection is a K-loop over the channels: load a ``BLOCK_N x BLOCK_K`` slab of x,
   normalise it (``(x - mean) * rstd * ln_w + ln_b``), round it to the operand dtype and ``tl.dot`` it with
   the ``BLOCK_K x D`` slice of ``w_q^T`` into a float32 accumulator. This handles any channel count
   (C = 384 ... 1792 in the released models) without holding a row in registers.
3. The query (rounded to the operand dtype, as a Linear layer's output would be) meets the head's keys,
   zero-padded to ``M_PAD = max(16, next_pow2(M))`` rows (``tl.dot`` needs every dimension >= 16); padded
   keys get -inf logits. Softmax in float32 (exp2 with log2(e) folded into the scale), probabilities
   normalised, rounded to the operand dtype, ``tl.dot`` with the values; one store per head.

The tile of x is read from memory once; the per-head re-reads of its slabs and the statistics recomputed per
head group come from the cache. The grid splits the heads into groups only as far as needed to give the GPU
enough programs (small token counts such as the 6x6 middle block). float32 operands use IEEE (not TF32)
products. Runs on the CPU under ``TRITON_INTERPRET=1`` (float32/float16; bfloat16 needs a GPU).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _cross_attention_kernel(
    x_ptr,
    lnw_ptr,
    lnb_ptr,
    wq_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    n_tokens,
    channels,
    n_keys,
    heads_per_program,
    eps,
    qk_scale,
    stride_xb,
    stride_xn,
    stride_wq,
    stride_kb,
    stride_kn,
    stride_vb,
    stride_vn,
    stride_ob,
    stride_on,
    HAS_LNW: tl.constexpr,
    HAS_LNB: tl.constexpr,
    D: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(M_PAD >= 16)  # tl.dot needs every dimension >= 16 on GPUs (the interpreter does not)
    tl.static_assert(D >= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_K >= 16)
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    head0 = tl.program_id(2) * heads_per_program

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_tokens
    x_rows = x_ptr + b * stride_xb + rows.to(tl.int64)[:, None] * stride_xn
    kk = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_K):
        cols = c0 + kk
        m = row_mask[:, None] & (cols < channels)[None, :]
        acc += tl.load(x_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=1) / channels
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_K):
        cols = c0 + kk
        m = row_mask[:, None] & (cols < channels)[None, :]
        xv = tl.load(x_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dv = tl.where(m, xv - mean[:, None], 0.0)
        acc += dv * dv
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / channels + eps)

    d = tl.arange(0, D)
    keys = tl.arange(0, M_PAD)
    key_mask = keys < n_keys
    k_base = k_ptr + b * stride_kb
    v_base = v_ptr + b * stride_vb
    out_rows = out_ptr + b * stride_ob + rows.to(tl.int64)[:, None] * stride_on
    for i in range(heads_per_program):
        col0 = (head0 + i) * D
        q = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        for c0 in range(0, channels, BLOCK_K):
            cols = c0 + kk
            cmask = cols < channels
            m = row_mask[:, None] & cmask[None, :]
            xv = tl.load(x_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
            xn = (xv - mean[:, None]) * rstd[:, None]
            if HAS_LNW:
                xn = xn * tl.load(lnw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if HAS_LNB:
                xn = xn + tl.load(lnb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            w = tl.load(wq_ptr + (col0 + d)[None, :] * stride_wq + cols[:, None], mask=cmask[:, None], other=0.0)
            xn = tl.where(m, xn, 0.0).to(w.dtype)
            q = tl.dot(xn, w, q, input_precision=DOT_PRECISION)
        kt = tl.load(k_base + keys[None, :] * stride_kn + (col0 + d)[:, None], mask=key_mask[None, :], other=0.0)
        s = tl.dot(q.to(kt.dtype), kt, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(key_mask[None, :], s, float("-inf"))
        p = tl.exp2(s - tl.max(s, axis=1)[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        vv = tl.load(v_base + keys[:, None] * stride_vn + (col0 + d)[None, :], mask=key_mask[:, None], other=0.0)
        o = tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PRECISION)
        tl.store(out_rows + (col0 + d)[None, :], o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _head_groups(heads: int, tiles: int, device: torch.device) -> int:
    """The fewest head groups (a divisor of ``heads``) giving at least two programs per multiprocessor."""
    if device.type != "cuda":
        return 1
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    for groups in range(1, heads + 1):
        if heads % groups == 0 and tiles * groups >= target:
            return groups
    return heads


def cross_attention(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    ln_eps: float,
    w_q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
) -> Tensor:
    """Fused LayerNorm + query projection + attention over M <= 32 keys; arguments as validated by
    ``rdm_fast.ops.cross_attention`` (x, w_q, k, v of one dtype, unit stride on their last dim)."""
    batch, n_tokens, channels = x.shape
    inner = w_q.shape[0]
    dim_head = inner // heads
    n_keys = k.shape[1]
    out = torch.empty((batch, n_tokens, inner), dtype=x.dtype, device=x.device)
    if batch == 0 or n_tokens == 0:
        return out
    block_n = 64 if n_tokens > 32 else max(16, triton.next_power_of_2(n_tokens))
    # Chosen from ptxas register counts for sm_90 (no spills at M_PAD 16 and 32), not yet tuned on a GPU.
    wide = x.dtype == torch.float32
    block_k, num_warps, num_stages = (32, 8, 1) if wide else (64, 4, 2)
    tiles = triton.cdiv(n_tokens, block_n)
    groups = _head_groups(heads, tiles * batch, x.device)
    _cross_attention_kernel[(tiles, batch, groups)](
        x,
        x if ln_weight is None else ln_weight,
        x if ln_bias is None else ln_bias,
        w_q,
        k,
        v,
        out,
        n_tokens,
        channels,
        n_keys,
        heads // groups,
        ln_eps,
        math.log2(math.e) / math.sqrt(dim_head),
        x.stride(0),
        x.stride(1),
        w_q.stride(0),
        0 if k.shape[0] == 1 else k.stride(0),
        k.stride(1),
        0 if v.shape[0] == 1 else v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_LNW=ln_weight is not None,
        HAS_LNB=ln_bias is not None,
        D=dim_head,
        M_PAD=max(16, triton.next_power_of_2(n_keys)),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if wide else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
