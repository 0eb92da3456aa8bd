"""Triton flash-attention forward and backward kernels on the model's (B, N, heads*d) layout.

Semantics: ``softmax(q k^T * d^-0.5) v`` per (batch, head), no mask (``rdm_fast.ops.attention_reference``).
The kernels read q, k, v (and write the output and gradients) in place in the (B, N, heads*d) layout:
head ``h`` of token ``n`` of batch ``b`` lives at ``b * stride_b + n * stride_n + h * d``; only the last
dimension has to be contiguous, so views such as the three column blocks of a fused qkv projection need no
copy. Query and key lengths may differ and need not be multiples of the block sizes.

Forward: one program per (query block, batch * head) streams over the keys with an online softmax in
float32 (scores in log2 units: ``exp2(s * scale * log2 e - m)``) and stores the output plus the per-row
log-sum-exp ``lse`` (log2 units, float32, (B, heads, Nq)). Backward recomputes the probabilities P from
``lse``: one kernel per query block writes ``delta = rowsum(P * dP) / rowsum(P)`` (dP = dO V^T) from a
first pass over the keys, then dQ from a second; one kernel per key block accumulates dK and dV over all query
blocks (no atomics; deterministic). With this delta the rows of ``dS = P (dP - delta)`` sum to zero within
float32 rounding (the division: the recomputed P sums to 1 only within the rounding of logits that may be in
the hundreds). The usual ``delta = rowsum(dO * O)`` would save the first pass, but O is rounded to 16 bits
(and was computed from 16-bit P), so its error is common to a whole row of dS: instead of cancelling in
``dQ = dS K`` (and ``dK = dS^T Q``) it is multiplied by the keys' (queries') mean. Tokens share such a
component: with it the tiny UNet's self-attention weight gradients came out of bfloat16 training 0.28 off
float32 on an H200, against 0.03 for unfused PyTorch (``tests/test_ops_attention.py``, SHARED_CASES, has the
case). All accumulation is float32;
the probability tiles fed to the second matrix product are rounded to the input dtype (float32 inputs use
IEEE float32 products, never TF32). Head dims: 16, 32, 64, 128.

On a GPU each kernel is autotuned over a few block shapes per (Nq, Nk, head dim, dtype); under
``TRITON_INTERPRET=1`` (read when this module is imported) a single small configuration is used.

At head dim 32 the forward's softmax, not its matrix products, takes the issue slots: per key block of 64 a
thread issues about 450 instructions for 64 scores (sm_90 SASS, Triton 3.6). Two ways to shorten that loop
were measured slower on an H200 at every level of the released models and removed (``bench/RESULTS.md``):
half of the exponentials as polynomials on the FMA units, and the row sums on the tensor cores (``p @ ones``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634
INT32_LIMIT = 2**31
MAX_GRID_Y = 65535  # CUDA limit of the second grid dimension, which holds batch * heads: larger calls launch per slice

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(shapes: list[tuple], interpreter: tuple[int, int]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, warps, stages) candidates on a GPU, one small configuration in the interpreter."""
    def config(m: int, n: int, w: int, s: int) -> triton.Config:
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)

    if INTERPRETER:
        return [config(*interpreter, 4, 1)]
    return [config(*shape) for shape in shapes]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the candidates that suit the call: small tiles for float32 (its IEEE products run on the CUDA cores
    and spill registers in large tiles), no 128 x 128 score tiles at head dim 128 (shared memory), no blocks
    far longer than the sequences (short low-resolution levels). Always keeps at least one."""
    q = named_args["Q"]
    fp32 = q.dtype == torch.float32
    head_dim = q.shape[-1] // named_args["H"]
    cap_m = max(32, triton.next_power_of_2(named_args["N_Q"]))
    cap_n = max(32, triton.next_power_of_2(named_args["N_K"]))

    def fits(c: triton.Config) -> bool:
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if fp32:
            return (m, n) in _FP32_TILES
        if n < 32 and named_args["N_K"] > 64:  # 16-key tiles only for the few neighbour keys
            return False
        return m * n * head_dim <= 128 * 64 * 128 and m <= cap_m and n <= cap_n

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_TUNE_KEY = ["N_Q", "N_K", "HEAD_DIM"]
_FP32_TILES = {(32, 32), (64, 32), (32, 64)}
# Sequence lengths and head counts change between calls (and equal 1 in corner cases): one binary serves all.
_NO_SPECIALIZE = ["H", "N_Q", "N_K"]

# Head dim 32 is bound by the softmax (its exponentials and its instruction count), not by the matrix products:
# large score tiles (up to 256 x 64 / 128 x 128) amortise the per-row bookkeeping (on an H200 the autotuner
# chose 128 x 64 with 4 warps at 1024 and 2304 tokens); 64 x 32 and 32 x 32 serve the 36- and 64-token levels
# (and float32); x 16 tiles the cross-attention's 4 or 11 neighbour keys (a 32-key tile would be mostly
# masked).
_FWD_CONFIGS = _configs(
    [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
     (32, 32, 4, 2), (128, 16, 4, 2), (64, 16, 4, 2), (32, 16, 4, 2)],
    interpreter=(32, 16),
)
# dQ: BLOCK_M queries per program, BLOCK_N keys per step.
_DQ_CONFIGS = _configs(
    [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)],
    interpreter=(32, 16),
)
# dK/dV: BLOCK_N keys per program, BLOCK_M queries per step.
_DKDV_CONFIGS = _configs(
    [(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 4, 3), (32, 64, 4, 3), (32, 32, 4, 2)],
    interpreter=(16, 32),
)


@triton.jit
def _rows(base, rows, stride, offs_d, n, MASK: tl.constexpr):
    """Rows ``rows`` of one head's (N, d) slice starting at ``base``; rows at or past ``n`` read as zero when
    ``MASK`` (the tail block; full blocks load unmasked)."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if MASK:
        return tl.load(ptrs, mask=(rows < n)[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, N_K, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax: rescale the running sums and add p @ v."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _rows(k_base, offs_n, stride_kn, offs_d, N_K, MASK)
    v = _rows(v_base, offs_n, stride_vn, offs_d, N_K, MASK)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASK:
        s = tl.where((offs_n < N_K)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_on,
    H, N_Q, N_K, qk_scale,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    col = (pid_bh % H) * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    q = _rows(Q + b * stride_qb + col, offs_m, stride_qn, offs_d, N_Q, True)
    k_base = K + b * stride_kb + col
    v_base = V + b * stride_vb + col

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, start_n, N_K, qk_scale,
                                  HEAD_DIM, BLOCK_N, False, PRECISION)
    if n_full < N_K:
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, n_full, N_K, qk_scale,
                                  HEAD_DIM, BLOCK_N, True, PRECISION)

    acc = acc / l_i[:, None]
    tl.store(O + b * stride_ob + col + offs_m[:, None] * stride_on + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _probs_and_dp(q, do, lse, k_base, v_base, stride_kn, stride_vn, start_n, N_K, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """(K, P, dP = dO V^T) of one key block for a query block, P recomputed from the saved log-sum-exp (zero
    past the last key)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _rows(k_base, offs_n, stride_kn, offs_d, N_K, MASK)
    v = _rows(v_base, offs_n, stride_vn, offs_d, N_K, MASK)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    p = tl.exp2(s * qk_scale - lse[:, None])
    if MASK:
        p = tl.where((offs_n < N_K)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return k, p, dp


@triton.jit
def _delta_step(q, do, lse, k_base, v_base, stride_kn, stride_vn, start_n, N_K, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """(rowsum(P * dP), rowsum(P)) over one key block."""
    _, p, dp = _probs_and_dp(q, do, lse, k_base, v_base, stride_kn, stride_vn, start_n, N_K, qk_scale,
                             HEAD_DIM, BLOCK_N, MASK, PRECISION)
    return tl.sum(p * dp, 1), tl.sum(p, 1)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, start_n, N_K, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """dQ += dS @ K for one key block."""
    k, p, dp = _probs_and_dp(q, do, lse, k_base, v_base, stride_kn, stride_vn, start_n, N_K, qk_scale,
                             HEAD_DIM, BLOCK_N, MASK, PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn,
    stride_dob, stride_don, stride_dqb, stride_dqn,
    H, N_Q, N_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    col = (pid_bh % H) * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    rows = offs_m[:, None]
    q = _rows(Q + b * stride_qb + col, offs_m, stride_qn, offs_d, N_Q, True)
    do = _rows(DO + b * stride_dob + col, offs_m, stride_don, offs_d, N_Q, True)
    row_stats = pid_bh.to(tl.int64) * N_Q + offs_m
    lse = tl.load(LSE + row_stats, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + col
    v_base = V + b * stride_vb + col

    n_full = (N_K // BLOCK_N) * BLOCK_N
    # delta = rowsum(P dP) / rowsum(P): the recomputed P sums to 1 only within float32 rounding of the logits
    # (2^-24 |s|, not negligible for logits in the hundreds); this way the rows of dS sum to zero regardless
    weighted = tl.zeros([BLOCK_M], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, n_full, BLOCK_N):
        w_blk, t_blk = _delta_step(q, do, lse, k_base, v_base, stride_kn, stride_vn, start_n, N_K, qk_scale,
                                   HEAD_DIM, BLOCK_N, False, PRECISION)
        weighted += w_blk
        total += t_blk
    if n_full < N_K:
        w_blk, t_blk = _delta_step(q, do, lse, k_base, v_base, stride_kn, stride_vn, n_full, N_K, qk_scale,
                                   HEAD_DIM, BLOCK_N, True, PRECISION)
        weighted += w_blk
        total += t_blk
    delta = weighted / total
    tl.store(DELTA + row_stats, delta, mask=row_ok)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, start_n, N_K, qk_scale,
                      HEAD_DIM, BLOCK_N, False, PRECISION)
    if n_full < N_K:
        dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, n_full, N_K, qk_scale,
                      HEAD_DIM, BLOCK_N, True, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + col + rows * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, start_m, N_Q, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """dV += P^T dO and dK += dS^T Q for one query block, computed transposed (keys along rows)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _rows(q_base, offs_m, stride_qn, offs_d, N_Q, MASK)
    do = _rows(do_base, offs_m, stride_don, offs_d, N_Q, MASK)
    valid = offs_m < N_Q
    if MASK:
        lse = tl.load(lse_base + offs_m, mask=valid, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=valid, other=0.0)
    else:
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    p_t = tl.exp2(s_t * qk_scale - lse[None, :])
    if MASK:
        p_t = tl.where(valid[None, :], p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn,
    stride_dob, stride_don, stride_dkb, stride_dkn, stride_dvb, stride_dvn,
    H, N_Q, N_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    col = (pid_bh % H) * HEAD_DIM
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < N_K
    keys = offs_n[:, None]
    k = _rows(K + b * stride_kb + col, offs_n, stride_kn, offs_d, N_K, True)
    v = _rows(V + b * stride_vb + col, offs_n, stride_vn, offs_d, N_K, True)
    q_base = Q + b * stride_qb + col
    do_base = DO + b * stride_dob + col
    lse_base = LSE + pid_bh.to(tl.int64) * N_Q
    delta_base = DELTA + pid_bh.to(tl.int64) * N_Q

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    m_full = (N_Q // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, start_m,
                            N_Q, qk_scale, HEAD_DIM, BLOCK_M, False, PRECISION)
    if m_full < N_Q:
        dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, m_full,
                            N_Q, qk_scale, HEAD_DIM, BLOCK_M, True, PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + col + keys * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=key_ok[:, None])
    tl.store(DV + b * stride_dvb + col + keys * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=key_ok[:, None])


def unsupported(q: Tensor, k: Tensor, v: Tensor, heads: int) -> str | None:
    """None when these kernels can run the call (arguments already validated), else why not."""
    if q.is_cuda and torch.version.hip:
        return "the kernels target NVIDIA GPUs (ROCm is untested)"
    d = q.shape[-1] // heads
    if d not in HEAD_DIMS:
        return f"head dim {d} is not one of {HEAD_DIMS}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[1] * t.shape[2] >= INT32_LIMIT:
            return f"{name} has {t.shape[1] * t.shape[2]} elements per batch item (32-bit offsets)"
    return None


def _kernel_layout(t: Tensor) -> Tensor:
    """``t`` itself when the kernels can index it (unit last stride, 32-bit offsets within a batch item)."""
    n, w = t.shape[1], t.shape[2]
    if t.stride(2) == 1 and (n - 1) * t.stride(1) + w < INT32_LIMIT:
        return t
    return t.contiguous()


def _precision(t: Tensor) -> str:
    # float32 inputs: exact float32 products like the reference; 16-bit inputs ignore the setting.
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _batch_chunks(heads: int, *tensors: Tensor) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
    """(batch * heads, the tensors' batch slices) per launch: slices whose batch * heads fits the launch grid's
    second axis (the tensors themselves when one launch holds them all)."""
    batch = tensors[0].shape[0]
    step = max(1, MAX_GRID_Y // heads)
    if batch <= step:
        yield batch * heads, tensors
        return
    for b0 in range(0, batch, step):
        b = slice(b0, min(batch, b0 + step))
        yield (b.stop - b.start) * heads, tuple(t[b] for t in tensors)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Output (B, Nq, heads*d) in q's dtype (contiguous) and the log2-unit log-sum-exp (B, heads, Nq) float32."""
    q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    batch, n_q, width = q.shape
    n_k = k.shape[1]
    d = width // heads
    out = torch.empty((batch, n_q, width), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    sm_scale = 1.0 / math.sqrt(d)

    with _device_guard(q):
        for rows, tensors in _batch_chunks(heads, q, k, v, out, lse):
            _attn_fwd_kernel[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), rows)](
                *tensors,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                out.stride(0), out.stride(1),
                heads, n_q, n_k, sm_scale * LOG2E,
                HEAD_DIM=d, PRECISION=_precision(q),
            )
    return out, lse


def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv), contiguous, in the inputs' dtype, from the forward's ``lse``."""
    q, k, v = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    do = _kernel_layout(grad_out.to(q.dtype))
    batch, n_q, width = q.shape
    n_k = k.shape[1]
    d = width // heads
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    if batch == 0 or width == 0:
        return dq, dk, dv
    if n_q == 0:  # no query attends to anything: the keys and values received no gradient
        return dq, dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    sm_scale = 1.0 / math.sqrt(d)
    common = {"HEAD_DIM": d, "PRECISION": _precision(q)}

    with _device_guard(q):
        for rows, (q_, k_, v_, do_, dq_, dk_, dv_, lse_, delta_) in _batch_chunks(
                heads, q, k, v, do, dq, dk, dv, lse, delta):
            _attn_bwd_dq_kernel[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), rows)](
                q_, k_, v_, do_, dq_, lse_, delta_,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
                heads, n_q, n_k, sm_scale * LOG2E, sm_scale, **common,
            )
            _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), rows)](
                q_, k_, v_, do_, dk_, dv_, lse_, delta_,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                heads, n_q, n_k, sm_scale * LOG2E, sm_scale, **common,
            )
    return dq, dk, dv
