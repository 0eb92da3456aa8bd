"""Exact top-k inner-product search with Triton: query x database tile products fused with a streaming top-k.

Stage 1, the kernel: the grid is (database splits x query blocks), query blocks of one split adjacent so they
share the split's tiles in L2. A program streams its split in ``BLOCK_N``-row tiles; each tile's scores
``queries (BLOCK_Q, D) @ tile.T`` are accumulated in fp32 registers over ``BLOCK_D``-wide slices (``tl.dot``)
and merged into a running top-k per query held in registers (``K`` slots, a power of two >= k, of which the
first k are used). The merge is a loop that only runs while some query's best remaining tile score beats its
k-th best so far (the threshold): a tile that cannot enter costs one row maximum and one comparison. Each step
takes every query's best remaining tile element (lowest column among equal scores) and, where it beats the
threshold strictly, puts it in place of the worst slot (lowest score, highest id among equal scores). Tiles
come in id order and a tile's elements in (score descending, id ascending) order, so the kept set is exactly
the top-k by (score descending, id ascending) of the split. One flat loop runs over (tile, D slice), so the
software pipeline keeps loading the next tile's slices while a tile's merge runs. The Q x N score matrix is
never written: each program writes k (score, id) candidates per query.

Stage 2, in PyTorch: the (Q, splits * k) candidates are ordered by one int64 key per candidate, the score's
order-preserving integer image in the high bits and ``2**31 - 1 - id`` in the low 31, so ``torch.topk`` on
the key gives (score descending, id ascending) without a sort. Everything runs in the current CUDA stream
with no host synchronisation. Runs on the CPU under ``TRITON_INTERPRET=1`` (float32/float16).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_K = 64
"""Largest k the kernel supports (its registers hold the running top-k)."""

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# CONFIGS: the tile configurations autotuned over; the interpreter cannot autotune and gets one with small tiles
if _INTERPRET:
    CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_D": 32})]
else:
    # sm_90 ptxas (checked offline): 150-245 registers, no spills for k <= 16; in-flight loads per SM =
    # CTAs/SM x (stages - 1) x BLOCK_N x BLOCK_D x 2 bytes, 64-96 KiB for these
    CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_D": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 256, "BLOCK_D": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_D": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_D": 128}, num_warps=8, num_stages=3),
    ]
_SPLIT_GRANULE = max(c.kwargs["BLOCK_N"] for c in CONFIGS)  # splits are whole tiles for every config
_INVALID_ID = tl.constexpr(2**31 - 1)  # id of an empty slot (score -inf); above every valid id (N <= 2**31 - 1)


@triton.autotune(configs=CONFIGS, key=["D", "K", "BLOCK_Q", "IEEE"])
@triton.jit
def _topk_ip_kernel(
    q_ptr,
    db_ptr,
    out_s_ptr,
    out_i_ptr,
    Q,
    N,
    stride_q,
    stride_db,
    rows_per_split,
    n_qblocks,
    k,
    cand_stride,
    D: tl.constexpr,
    K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    qb = pid % n_qblocks
    split = pid // n_qblocks
    split_start = split.to(tl.int64) * rows_per_split
    split_len = tl.minimum(N - split_start, rows_per_split).to(tl.int32)

    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < Q
    q_rows = q_ptr + offs_q.to(tl.int64)[:, None] * stride_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, K)
    active = slots < k

    # running top-k per query: split-local ids; empty slots hold -inf and distinct placeholder ids
    top_s = tl.full([BLOCK_Q, K], float("-inf"), tl.float32)
    top_i = tl.zeros([BLOCK_Q, K], tl.int32) + slots[None, :]
    thr = tl.full([BLOCK_Q], float("-inf"), tl.float32)

    # one flat loop over (tile, D slice) so that the software pipeline keeps loading the next tile's slices
    # while the current tile's top-k merge runs
    d_steps = (D + BLOCK_D - 1) // BLOCK_D  # constexpr
    acc = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
    for it in range(tl.cdiv(split_len, BLOCK_N) * d_steps):
        t0 = (it // d_steps) * BLOCK_N
        d = (it % d_steps) * BLOCK_D + offs_d
        tile = db_ptr + (split_start + t0) * stride_db  # int64 row offset: N * D may exceed 2**31
        n_ok = offs_n < split_len - t0
        if D % BLOCK_D == 0:
            q_mask = q_ok[:, None]
            db_mask = n_ok[:, None]
        else:
            q_mask = q_ok[:, None] & (d < D)[None, :]
            db_mask = n_ok[:, None] & (d < D)[None, :]
        a = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0)
        b = tl.load(tile + offs_n[:, None] * stride_db + d[None, :], mask=db_mask, other=0.0)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        if it % d_steps == d_steps - 1:  # the tile's scores are complete: merge them
            s = tl.where(q_ok[:, None] & n_ok[None, :], acc, float("-inf"))
            m = tl.max(s, axis=1)
            while tl.max((m > thr).to(tl.int32), axis=0) > 0:
                take = m > thr
                col = tl.min(tl.where(s == m[:, None], offs_n[None, :], BLOCK_N), axis=1)
                # the slot to replace: score == threshold (the minimum), highest id among those
                is_min = (top_s == thr[:, None]) & active[None, :]
                worst = tl.max(tl.where(is_min, top_i, -1), axis=1)
                put = is_min & (top_i == worst[:, None]) & take[:, None]
                top_s = tl.where(put, m[:, None], top_s)
                top_i = tl.where(put, (t0 + col)[:, None], top_i)
                s = tl.where(offs_n[None, :] == col[:, None], float("-inf"), s)
                m = tl.max(s, axis=1)
                thr = tl.min(tl.where(active[None, :], top_s, float("inf")), axis=1)
            acc = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)

    ids = tl.where(top_s > float("-inf"), split_start + top_i, _INVALID_ID)
    out = offs_q.to(tl.int64)[:, None] * cand_stride + split * k + slots[None, :]
    out_mask = q_ok[:, None] & active[None, :]
    tl.store(out_s_ptr + out, top_s, mask=out_mask)
    tl.store(out_i_ptr + out, ids, mask=out_mask)


def merge_candidates(scores: Tensor, ids: Tensor, k: int) -> Tensor:
    """Column order of the k best candidates per row, best first: by score descending, then id ascending.

    ``ids`` must lie in [0, 2**31 - 1]; -0.0 counts as 0.0 and NaN as the largest score, as in ``torch.sort``.
    """
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into 0.0
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # integer order == float order
    key = key * 2**31 + (2**31 - 1 - ids)
    return torch.topk(key, k, dim=1).indices


def _num_programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def topk_inner_product(
    queries: Tensor, database: Tensor, k: int, *, num_splits: int | None = None, config: triton.Config | None = None
) -> tuple[Tensor, Tensor]:
    """Exact top-k database rows by inner product for each query: (scores float32 (Q, k), ids int64 (Q, k)),
    best first, ties broken by the lower id.

    ``queries`` (Q, D) and ``database`` (N, D) share a float16/bfloat16/float32 dtype and a device (float32
    products are exact fp32, not TF32); rows are used as given (normalise them for cosine similarity).
    ``num_splits`` overrides how many row ranges the database is cut into (default: enough programs to fill
    the GPU); ``config`` (one of ``CONFIGS``) runs that tile configuration instead of the autotuned one. No
    host synchronisation (except while autotuning a new shape); the kernel runs in the current stream of the
    tensors' device.
    """
    if queries.dim() != 2 or database.dim() != 2:
        raise ValueError(
            f"queries must be (Q, D) and database (N, D), got {tuple(queries.shape)} and {tuple(database.shape)}"
        )
    n, dim = database.shape
    if queries.shape[1] != dim:
        raise ValueError(f"queries have {queries.shape[1]} dimensions but the database {dim}")
    if not 1 <= k <= min(n, MAX_K):
        raise ValueError(f"k must be between 1 and min(database size {n}, {MAX_K}), got {k}")
    if n > 2**31 - 1:
        raise ValueError(f"the database has {n} rows; the kernel supports at most 2**31 - 1 per call")
    if database.dtype not in (torch.float16, torch.bfloat16, torch.float32) or queries.dtype != database.dtype:
        raise ValueError(
            f"queries and database must share a float16, bfloat16 or float32 dtype, got {queries.dtype} and "
            f"{database.dtype}"
        )
    if queries.device != database.device:
        raise ValueError(f"queries are on {queries.device} but the database on {database.device}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if config is not None and config.kwargs.get("BLOCK_N", 0) > _SPLIT_GRANULE:
        raise ValueError(f"config BLOCK_N must be at most {_SPLIT_GRANULE}, got {config.kwargs.get('BLOCK_N')}")
    if database.stride(1) != 1:
        database = database.contiguous()
    if queries.stride(1) != 1:
        queries = queries.contiguous()
    nq = queries.shape[0]
    device = database.device
    if nq == 0:
        return (torch.empty(0, k, dtype=torch.float32, device=device),
                torch.empty(0, k, dtype=torch.int64, device=device))

    block_q = min(max(triton.next_power_of_2(nq), 16), 64)
    n_qblocks = triton.cdiv(nq, block_q)
    if num_splits is None:
        num_splits = max(1, _num_programs_target(device) // n_qblocks)
    rows_per_split = triton.cdiv(triton.cdiv(n, num_splits), _SPLIT_GRANULE) * _SPLIT_GRANULE
    splits = triton.cdiv(n, rows_per_split)
    kk = max(triton.next_power_of_2(k), 8)

    cand_s = torch.empty(nq, splits * k, dtype=torch.float32, device=device)
    cand_i = torch.empty(nq, splits * k, dtype=torch.int64, device=device)
    kernel, options = (_topk_ip_kernel, {}) if config is None else (_topk_ip_kernel.fn, config.all_kwargs())
    # triton launches on the current device's current stream: make that the tensors' device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(splits * n_qblocks,)](
            queries, database, cand_s, cand_i,
            nq, n, queries.stride(0), database.stride(0), rows_per_split, n_qblocks, k, splits * k,
            D=dim, K=kk, BLOCK_Q=block_q, IEEE=database.dtype == torch.float32, **options,
        )
    order = merge_candidates(cand_s, cand_i, k)
    return cand_s.gather(1, order), cand_i.gather(1, order)
