"""Triton kernel: the GEGLU feed-forward's input projection with the gating in its epilogue.

``y = a * gelu_erf(gate)`` with ``[a, gate] = x @ W^T + b`` (W: (2N, K), the two halves of the projection's
output features). Unfused, the projection writes the (M, 2N) pre-activation and a second pass reads it back
to write the (M, N) result: 3 of the 4 (M, N)-sized transfers are the pre-activation's. Here each program
computes the a-tile and the matching gate-tile of one (BLOCK_M, BLOCK_N) output block (two accumulators over
the same x tiles), applies the bias and the gating in float32 and writes only y, rounded once.

Semantics: ``rdm_fast.ops.geglu_linear_reference`` (float32 accumulation; float32 inputs use IEEE products,
never TF32). Rows of x may be strided (unit column stride). On a GPU the kernel is autotuned over a few
tilings per (M, N, K, dtype); under ``TRITON_INTERPRET=1`` (read when this module is imported) one small
tiling is used.

Each program loops over output tiles (``tile, tile + programs, ...``). With one program per tile that is the
plain launch; the ``PER_SM`` candidates launch that many programs per SM instead, and the loop over tiles is
flattened with the K loop (``tl.range(..., flatten=True)``) so that the next tile's loads are issued during
this tile's gating and store. The model's K is short (384 to 1792: 6 to 28 steps of 64), so a plain launch
spends a large share of each tile filling the pipeline and in the epilogue: on an H200 the plain kernel ran
at 323 TFLOP/s at imagenet's 131072 x 384 -> 2 x 1536 shape, where cuBLAS + the gating pass took 0.874 ms
against its 0.957 ms (``bench/results/2026-11-26-h200-c/tune.txt``).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._layout import as_rows

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per SM or 0 for one per tile); two accumulators per
# program, so BLOCK_N is half of what a plain GEMM tile of the same register budget would use. A flattened
# persistent loop holds more registers (the next tile's loads beside this tile's epilogue): its candidates are
# those that build for sm_90 without spills (128 x 128 tiles and 4-warp 128 x 64 tiles spill), one per SM.
_SHAPES = [(128, 64, 64, 4, 4, 0), (128, 128, 64, 8, 3, 0), (128, 64, 64, 8, 4, 0), (64, 128, 64, 4, 4, 0),
           (256, 64, 64, 8, 3, 0), (64, 64, 64, 4, 4, 0), (64, 32, 32, 4, 2, 0), (32, 32, 32, 4, 2, 0),
           (128, 64, 64, 8, 3, 1), (128, 64, 64, 8, 4, 1), (64, 128, 64, 8, 3, 1)]
_FP32_SHAPES = {(64, 32, 32), (32, 32, 32)}  # IEEE products run on the CUDA cores: small tiles (no spills)
_INTERPRETER_PROGRAMS = 3  # the interpreter runs a persistent launch: several tiles per program, tails included


def _configs() -> list[triton.Config]:
    if INTERPRETER:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "PER_SM": 1}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "PER_SM": per_sm}, num_warps=w, num_stages=s)
            for m, n, k, w, s, per_sm in _SHAPES]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Small tiles for float32; no tiles far larger than the problem. Always keeps at least one."""
    fp32 = named_args["X"].dtype == torch.float32
    cap_m = max(32, triton.next_power_of_2(named_args["M"]))
    cap_n = max(32, triton.next_power_of_2(named_args["N"]))

    def fits(c: triton.Config) -> bool:
        m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if fp32:
            return (m, n, k) in _FP32_SHAPES and not c.kwargs["PER_SM"]
        return m <= cap_m and n <= cap_n

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


@triton.autotune(configs=_configs(), key=["M", "N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})  # the model's K: multiples of 64
@triton.jit
def _geglu_linear_kernel(
    X, W, B, Y,
    M, N, K,
    stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PER_SM: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    rk = tl.arange(0, BLOCK_K)
    # one iteration per (tile, K step); with PER_SM == 0 each program has one tile and no overlap to gain
    for tile in tl.range(tl.program_id(0), blocks_m * blocks_n, tl.num_programs(0), flatten=PER_SM > 0):
        # grouped order: GROUP_M row blocks share each column block's weight tiles while they are in L2
        first_m = (tile // per_group) * GROUP_M
        group_m = min(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % group_m
        pid_n = (tile % per_group) // group_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        x_ptrs = X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
        wa_ptrs = W + rn.to(tl.int64)[None, :] * K + rk[:, None]  # (BLOCK_K, BLOCK_N) tile of W^T, the a half
        wg_ptrs = wa_ptrs + N.to(tl.int64) * K  # the gate half: rows N .. 2N of W (64-bit: N K may pass 2^31)
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:  # no K tail: only the row and column edges are masked
                x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
                wa = tl.load(wa_ptrs, mask=mask_n[None, :], other=0.0)
                wg = tl.load(wg_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                mask_k = rk < K - k
                x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w_mask = mask_k[:, None] & mask_n[None, :]
                wa = tl.load(wa_ptrs, mask=w_mask, other=0.0)
                wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
            if IEEE:
                acc_a = tl.dot(x, wa, acc_a, input_precision="ieee")
                acc_g = tl.dot(x, wg, acc_g, input_precision="ieee")
            else:
                acc_a = tl.dot(x, wa, acc_a)
                acc_g = tl.dot(x, wg, acc_g)
            x_ptrs += BLOCK_K
            wa_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K

        if HAS_BIAS:
            acc_a += tl.load(B + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(B + N + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y = acc_a * (0.5 * acc_g * (1.0 + tl.math.erf(acc_g * 0.7071067811865476)))
        y_ptrs = Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@functools.cache
def _sm_count(device: torch.device) -> int:
    return _INTERPRETER_PROGRAMS if INTERPRETER else torch.cuda.get_device_properties(device).multi_processor_count


def _grid(m: int, n: int, device: torch.device):
    """Programs of a launch: one per output tile, or ``PER_SM`` per SM (at most one per tile)."""
    sms = _sm_count(device)

    def grid(meta) -> tuple[int]:
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(tiles, meta["PER_SM"] * sms) if meta["PER_SM"] else tiles,)
    return grid


def geglu_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``a * gelu_erf(gate)``, ``[a, gate] = x @ weight^T + bias``: x (..., K) with K >= 1, weight (2N, K), bias
    (2N,) or None, all of one dtype; returns (..., N) contiguous in x's dtype."""
    k = x.shape[-1]
    n = weight.shape[0] // 2
    x2 = as_rows(x, k)
    m = x2.shape[0]
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    w = weight.contiguous()
    _geglu_linear_kernel[_grid(m, n, x.device)](
        x2, w, w if bias is None else bias.contiguous(), y,
        m, n, k,
        x2.stride(0), n,
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        GROUP_M=8,
    )
    return y
