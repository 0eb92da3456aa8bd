"""Multi-head softmax attention on the model's (B, N, heads*d) layout: ``softmax(q k^T * d^-0.5) v`` per head.

Implementations (selected by :mod:`rdm_fast.ops._dispatch`):

* ``reference`` -- :func:`attention_reference`: explicit scores, softmax and product in float32. The one
  plain-PyTorch path: the CPU default, the fallback for calls the kernels do not handle, and the tests' oracle.
* ``triton`` -- the flash-attention kernels of ``rdm_fast.kernels.attention`` (forward and backward), exposed
  as the custom ops ``rdm_fast::attention_triton`` / ``rdm_fast::attention_triton_backward`` with autograd
  and fake (meta) implementations, so training and torch.compile work through them. The CUDA default.
  They read q, k, v in place in the (B, N, heads*d) layout: no transposes to (B, heads, N, d) and back.
  Inference in ``auto`` mode times them once per call shape against PyTorch's
  ``scaled_dot_product_attention`` on the same views and runs the faster
  (:class:`~rdm_fast.ops._measured.Measured`; the short sequences of the lowest levels are where the vendor
  kernels can win); training, torch.compile and ``fast`` mode always run the Triton kernels.
* ``triton-interpreter`` -- the same kernels on CPU tensors under ``TRITON_INTERPRET=1``; used only in
  ``fast`` mode (correct but far slower than the reference), never for bfloat16 (broken in the interpreter).

* ``sdpa`` -- PyTorch's ``scaled_dot_product_attention`` for CUDA inference calls the Triton kernels do not
  handle (``auto`` mode only), e.g. the first-stage decoders' single head of 512 channels: a vendor kernel in
  the input's precision instead of the reference's float32 score matrix.

Per device: ``cuda: [triton, sdpa]``, ``cpu: [triton-interpreter (fast mode only)]``, then the reference
(``auto``) or an error naming the reason (``fast``).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import SUPPORTED_DTYPES, Impl, Op, autocast_inputs, eager_constant, get_mode, needs_grad
from ._measured import Measured
from ._triton_kernels import TritonKernels, without_bfloat16

def check_args(q: Tensor, k: Tensor, v: Tensor, heads: int) -> None:
    """Raise ValueError when (q, k, v, heads) do not describe a valid attention call."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"attention: expected {name} of shape (B, N, heads*d), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"attention: unsupported {name} dtype {t.dtype} (expected float32, float16 or bfloat16)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if isinstance(heads, (bool, np.bool_)) or not isinstance(heads, (int, np.integer)) or heads <= 0:
        raise ValueError(f"attention: heads must be a positive int, got {heads!r}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or k.shape[1] != v.shape[1]:
        raise ValueError(
            f"attention: expected q (B, Nq, C), k and v (B, Nk, C), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.shape[2] == k.shape[2] == v.shape[2]) or q.shape[2] % heads:
        raise ValueError(
            f"attention: q, k, v need the same width C = heads*d with C divisible by heads={heads}, got widths "
            f"{q.shape[2]}, {k.shape[2]}, {v.shape[2]}"
        )
    if k.shape[1] == 0:
        raise ValueError(f"attention: k and v hold no tokens (shape {tuple(k.shape)}); softmax needs at least one")


def attention_reference(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Plain-PyTorch attention in float32 (explicit scores and softmax, not SDPA); differentiable."""
    check_args(q, k, v, heads)
    b, n, width = q.shape
    d = width // heads
    qh, kh, vh = (t.float().unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2)) * d**-0.5
    probs = torch.softmax(scores, dim=-1)
    return (probs @ vh).transpose(1, 2).reshape(b, n, width).to(q.dtype)


_KERNELS = TritonKernels("attention")
_triton_unavailable = _KERNELS.unavailable


@eager_constant
def _interpreter_unavailable() -> str | None:
    why = _KERNELS.interpreter_unavailable()
    if why is None and not _KERNELS.module.INTERPRETER:
        return "rdm_fast.kernels.attention was imported before TRITON_INTERPRET=1 was set"
    return why


def _kernels() -> ModuleType:
    why = _triton_unavailable()
    if why is not None:
        raise RuntimeError(f"attention: {why}")
    return _KERNELS.module


def _triton_unsupported(q: Tensor, k: Tensor, v: Tensor, heads: int) -> str | None:
    return _kernels().unsupported(q, k, v, heads)


@torch.library.custom_op("rdm_fast::attention_triton", mutates_args=())
def _attention_triton(q: Tensor, k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Triton forward: (output (B, Nq, C) contiguous, log2-unit log-sum-exp (B, heads, Nq) float32)."""
    return _kernels().attention_forward(q, k, v, heads)


@_attention_triton.register_fake
def _attention_triton_fake(q: Tensor, k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    b, n, width = q.shape
    return q.new_empty((b, n, width)), q.new_empty((b, heads, n), dtype=torch.float32)


@torch.library.custom_op("rdm_fast::attention_triton_backward", mutates_args=())
def _attention_triton_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: contiguous (dq, dk, dv) from the saved log-sum-exp (the output is not needed)."""
    return _kernels().attention_backward(grad_out, q, k, v, lse, heads)


@_attention_triton_backward.register_fake
def _attention_triton_backward_fake(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, heads = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    # autograd cannot save tensors made under inference_mode (e.g. a context projected there): a copy of those
    q, k, v = (t.clone() if t.is_inference() else t for t in (q, k, v))
    ctx.save_for_backward(q, k, v, lse)
    ctx.heads = heads


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None) -> tuple[Tensor, Tensor, Tensor, None]:
    q, k, v, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.rdm_fast.attention_triton_backward(grad_out, q, k, v, lse, ctx.heads)
    return dq, dk, dv, None


_attention_triton.register_autograd(_backward, setup_context=_setup_context)


def attention_triton(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """The Triton kernels through the differentiable custom op (arguments as validated by :func:`attention`)."""
    return torch.ops.rdm_fast.attention_triton(q, k, v, heads)[0]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """PyTorch's scaled_dot_product_attention on (B, heads, N, d) views of the (B, N, heads*d) tensors."""
    b, n, width = q.shape
    split = lambda t: t.unflatten(-1, (heads, width // heads)).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, width)


_MEASURED = Measured("attention", {"triton": attention_triton, "sdpa": _sdpa})


def _sdpa_unsupported(q: Tensor, k: Tensor, v: Tensor, heads: int) -> str | None:
    if get_mode() == "fast":
        return "mode 'fast' runs rdm_fast's own kernels"
    if needs_grad(q, k, v):  # training keeps the float32 reference's gradients where the Triton kernels cannot run
        return "gradients are needed"
    return None


def _cuda_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """The Triton kernels for training, torch.compile and ``fast`` mode; for inference in ``auto`` mode, the
    faster of them and SDPA at this call's shape and strides."""
    if get_mode() == "fast" or torch.compiler.is_compiling() or needs_grad(q, k, v):
        return attention_triton(q, k, v, heads)
    key = (q.shape, k.shape, q.stride(), k.stride(), v.stride(), heads, q.dtype, q.device)
    return _MEASURED(key, lambda: f"q {tuple(q.shape)} k {tuple(k.shape)} {heads} heads {q.dtype}", q, k, v, heads)


ATTENTION = Op(
    "attention",
    reference=Impl("reference", attention_reference),
    by_device={
        "cuda": [Impl("triton", _cuda_attention, _triton_unsupported, _triton_unavailable),
                 Impl("sdpa", _sdpa, _sdpa_unsupported)],
        "cpu": [Impl("triton-interpreter", attention_triton, without_bfloat16(_triton_unsupported),
                     _interpreter_unavailable, fast_mode_only=True)],
    },
)


@autocast_inputs
def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head attention ``softmax(q k^T * d^-0.5) v`` on (B, Nq, heads*d) queries and (B, Nk, heads*d)
    keys/values (d = C / heads); returns (B, Nq, heads*d) in q's dtype. Differentiable on every path (twice,
    e.g. for a gradient penalty, on the reference path only: the Triton backward has no derivative of its own)."""
    check_args(q, k, v, heads)
    return ATTENTION(q, k, v, int(heads))
