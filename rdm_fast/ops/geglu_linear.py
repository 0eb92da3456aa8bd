"""The GEGLU feed-forward's input projection and gating as one op: ``a * gelu_erf(gate)``, ``[a, gate] = x W^T + b``.

Unfused, the projection writes its (M, 2N) pre-activation and the :func:`~rdm_fast.ops.geglu` pass reads it back;
the fused Triton kernel (``rdm_fast.kernels.geglu_linear``) gates in the GEMM's epilogue and writes only the
(M, N) result. Whether that beats the vendor GEMM plus the gating pass depends on the card and the shape, so
on CUDA in ``auto`` mode the first call of each shape times both and keeps the faster
(:class:`~rdm_fast.ops._measured.Measured`); ``fast`` mode always runs the kernel.

:func:`geglu_linear_reference` defines the semantics and is the CPU path: float32 products and sums, one
rounding to x's dtype (the unfused path also rounds the pre-activation, within tolerance of this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import Impl, Op, autocast_inputs, get_mode, needs_grad
from ._measured import Measured
from ._triton_kernels import TritonKernels, without_bfloat16
from .glue import _check_tensor, geglu, geglu_reference

_kernels = TritonKernels("geglu_linear")


def check_args(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Raise ValueError when the arguments do not describe a valid geglu_linear call."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"geglu_linear: expected x of shape (..., K) with K > 0, got {tuple(x.shape)}")
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k or weight.shape[0] % 2:
        raise ValueError(f"geglu_linear: expected weight of shape (2N, K={k}), got {tuple(weight.shape)}")
    _check_tensor("geglu_linear", "x", x)
    for name, t, shape in (("weight", weight, None), ("bias", bias, (weight.shape[0],))):
        if t is not None:
            _check_tensor("geglu_linear", name, t, x, shape)
            if t.dtype != x.dtype:
                raise ValueError(f"geglu_linear: expected {name} of dtype {x.dtype} (that of x), got {t.dtype}")


def geglu_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Plain PyTorch, the oracle and CPU path: the projection in float32, then :func:`geglu_reference`'s
    exact-erf gating, rounded once to x's dtype; contiguous (..., N). Differentiable."""
    check_args(x, weight, bias)
    h = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return geglu_reference(h).to(x.dtype).contiguous()  # float32 in, float32 out: the one rounding is here


def _unsupported(x: Tensor, weight: Tensor, bias: Tensor | None) -> str | None:
    return "inputs require grad (no backward kernel)" if needs_grad(x, weight, bias) else None


def _fused(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _kernels.module.geglu_linear(x, weight, bias)  # loaded by the availability check


def _unfused(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return geglu(F.linear(x, weight, bias))


_MEASURED = Measured("geglu_linear", {"fused": _fused, "gemm+geglu": _unfused})


def _cuda_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``fast`` mode: the kernel. ``auto``: whichever of the kernel and GEMM + gating was faster for this shape
    (under torch.compile, which cannot time: GEMM + gating)."""
    if get_mode() == "fast":
        return _fused(x, weight, bias)
    if torch.compiler.is_compiling():
        return _unfused(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    key = (rows, *weight.shape, x.dtype, x.device)
    return _MEASURED(key, lambda: f"({rows} x {x.shape[-1]}) @ {tuple(weight.shape)}^T {x.dtype}", x, weight, bias)


GEGLU_LINEAR = Op(
    "geglu_linear",
    reference=Impl("reference", geglu_linear_reference),
    by_device={
        "cpu": [Impl("triton-interpreter", _fused, without_bfloat16(_unsupported), _kernels.interpreter_unavailable,
                     fast_mode_only=True)],
        "cuda": [Impl("triton", _cuda_forward, _unsupported, _kernels.unavailable)],
    },
)


@autocast_inputs
def geglu_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``geglu(F.linear(x, weight, bias))`` in one op: ``a * gelu_erf(gate)`` with ``[a, gate] = x @ weight^T +
    bias`` split on the last dim. x (..., K); weight (2N, K); bias (2N,) or None; one dtype. Returns (..., N)
    contiguous in x's dtype."""
    check_args(x, weight, bias)
    return GEGLU_LINEAR(x, weight, bias)
