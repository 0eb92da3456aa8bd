"""Neighbour cross-attention of the UNet's transformer blocks (everything before ``to_out``).

``cross_attention(x, ln_w, ln_b, eps, w_q, k, v, heads)`` = multi-head ``softmax(q k^T / sqrt(d)) v`` with
``q = LayerNorm(x) @ w_q^T`` (``LayerNorm(x + shift)`` with ``shift=``: a bias the caller still owes x) and
keys/values ``k, v`` = ``to_k(context)``, ``to_v(context)``. The context (a few neighbour embeddings: 4 for
imagenet, 11 for rdm768) is fixed for a whole sampling trajectory, so the model projects k and v once per
trajectory and this op does the per-step rest. With classifier-free guidance the unconditional context is all
zeros: its k = v = 0 and the attention output is exactly 0, so the model calls this op on the conditional half
only (the unconditional half's block output is ``to_out``'s bias).

Fast path: the LayerNorm kernel, the query projection through the vendor GEMM, and the flash-attention kernel
over the M keys. A single kernel that also did the projection (per-head K-loops over the channels) was measured
2-3.5x slower than this on an H200 (bench/RESULTS.md) and was dropped.

:func:`cross_attention_reference` defines the semantics and is the CPU path: the LayerNorm and attention
references of this package around a float32 query projection, each step rounded to the dtype the next one
meets, as a LayerNorm -> Linear -> attention stack would (the normalised x to x's dtype, q to k's), float32
statistics, softmax and accumulation, output in x's dtype.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._dispatch import Impl, Op, autocast_inputs, check_eps, check_tensor, needs_grad
from .attention import _interpreter_unavailable, _triton_unavailable, attention, attention_reference
from ._triton_kernels import without_bfloat16
from .glue import layer_norm, layer_norm_reference

def check_args(x: Tensor, ln_weight: Tensor | None, ln_bias: Tensor | None, w_q: Tensor, k: Tensor, v: Tensor,
               heads: int, shift: Tensor | None = None) -> None:
    """Raise ValueError when the arguments do not describe a valid cross_attention call."""
    if x.dim() != 3:
        raise ValueError(f"cross_attention: expected x of shape (B, N, C), got {tuple(x.shape)}")
    batch, _, channels = x.shape
    check_tensor("cross_attention", "x", x)
    if w_q.dim() != 2 or w_q.shape[1] != channels:
        raise ValueError(f"cross_attention: expected w_q of shape (heads * d, C={channels}), got {tuple(w_q.shape)}")
    check_tensor("cross_attention", "w_q", w_q, x)
    inner = w_q.shape[0]
    if heads <= 0 or inner % heads:
        raise ValueError(f"cross_attention: w_q's {inner} output features are not divisible into {heads} heads")
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias), ("shift", shift)):
        if p is not None:
            check_tensor("cross_attention", name, p, x, (channels,), "(C,)")
    if k.dim() != 3 or k.shape[0] not in (1, batch) or k.shape[2] != inner or k.shape[1] < 1:
        raise ValueError(f"cross_attention: expected k of shape (B={batch} or 1, M >= 1, heads * d={inner}), "
                         f"got {tuple(k.shape)}")
    check_tensor("cross_attention", "k", k, x)
    check_tensor("cross_attention", "v", v, x, tuple(k.shape), "k's shape")


def cross_attention_reference(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    ln_eps: float,
    w_q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    *,
    shift: Tensor | None = None,
) -> Tensor:
    """Plain-PyTorch cross-attention, the oracle: ``layer_norm_reference``, the query projection in float32
    (operands rounded to w_q's dtype, the result to k's), ``attention_reference``; output in x's dtype."""
    check_args(x, ln_weight, ln_bias, w_q, k, v, heads, shift)
    xn = layer_norm_reference(x, ln_weight, ln_bias, ln_eps, shift=shift)
    q = (xn.to(w_q.dtype).float() @ w_q.float().t()).to(k.dtype)
    batch = x.shape[0]
    k, v = k.expand(batch, -1, -1), v.to(k.dtype).expand(batch, -1, -1)
    return attention_reference(q, k, v, heads).to(x.dtype)


def _unsupported(x, ln_weight, ln_bias, ln_eps, w_q, k, v, heads, *, shift=None) -> str | None:
    if needs_grad(x, ln_weight, ln_bias, w_q, k, v, shift):
        return "inputs require grad (no backward kernel)"
    if not x.dtype == w_q.dtype == k.dtype == v.dtype:
        return f"x, w_q, k and v must share one dtype, got {x.dtype}, {w_q.dtype}, {k.dtype}, {v.dtype}"
    dim_head = w_q.shape[0] // heads
    if dim_head not in (16, 32, 64, 128):  # the flash kernel's head dims (rdm_fast.kernels.attention.HEAD_DIMS)
        return f"head dim {dim_head} is not 16, 32, 64 or 128"
    return None


def _fast_forward(x, ln_weight, ln_bias, ln_eps, w_q, k, v, heads, *, shift=None) -> Tensor:
    """LayerNorm kernel -> vendor GEMM -> flash attention over the keys (each sub-op logs its own path)."""
    q = F.linear(layer_norm(x, ln_weight, ln_bias, ln_eps, shift=shift), w_q)
    batch = x.shape[0]
    return attention(q, k.expand(batch, -1, -1), v.expand(batch, -1, -1), heads)


CROSS_ATTENTION = Op(
    "cross_attention",
    reference=Impl("reference", cross_attention_reference),
    by_device={
        "cpu": [Impl("triton-interpreter", _fast_forward, without_bfloat16(_unsupported), _interpreter_unavailable,
                     fast_mode_only=True)],
        "cuda": [Impl("triton", _fast_forward, _unsupported, _triton_unavailable)],
    },
)


@autocast_inputs
def cross_attention(
    x: Tensor,
    ln_weight: Tensor | None,
    ln_bias: Tensor | None,
    ln_eps: float,
    w_q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    *,
    shift: Tensor | None = None,
) -> Tensor:
    """Multi-head attention of LayerNorm(x) @ w_q^T over precomputed keys/values; returns (B, N, heads * d).

    x: (B, N, C) tokens; ln_weight, ln_bias: (C,) or None; w_q: (heads * d, C) (``to_q.weight``); k, v:
    (B or 1, M, heads * d), the projected context (batch 1 broadcasts over x's batch). Scale d^-0.5. The
    result is contiguous in x's dtype; ``to_out`` is applied by the caller. ``shift`` (C,): the queries come
    from ``LayerNorm(x + shift)`` (the sum in float32, not stored).
    """
    check_args(x, ln_weight, ln_bias, w_q, k, v, heads, shift)
    ln_eps = check_eps("cross_attention", ln_eps, "ln_eps")
    return CROSS_ATTENTION(x, ln_weight, ln_bias, ln_eps, w_q, k, v, heads, shift=shift)
