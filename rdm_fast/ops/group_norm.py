"""Fused GroupNorm: ``silu?(GroupNorm(x + add[:, :, None, ...]) * weight + bias)``.

:func:`group_norm_reference` defines the semantics (statistics, affine and SiLU in float32, one
rounding to ``x.dtype`` at the end, output in the memory format of ``x``) and is the CPU fallback.
:func:`group_norm` validates the arguments and dispatches (see :mod:`rdm_fast.ops._dispatch`) to the
CUDA extension, the Triton kernels, the C++ CPU extension or the reference. Channels_last maps on CUDA run the
Triton kernels' three passes (statistics, finalize, apply), untimed.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _layout
from . import _extension
from ._dispatch import Impl, Op, autocast_inputs, check_eps, check_tensor, eager_constant, needs_grad
from ._triton_kernels import TritonKernels


def check_args(x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, add: Tensor | None) -> None:
    """Raise ValueError (TypeError for a num_groups that is no int) when the arguments do not describe a valid
    group_norm call."""
    if x.dim() < 2:
        raise ValueError(
            f"group_norm: expected x of shape (B, C, *spatial) with at least 2 dims, got shape {tuple(x.shape)}"
        )
    check_tensor("group_norm", "x", x)
    channels = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):  # the kernels' dispatcher dumped
        raise TypeError(f"group_norm: num_groups must be an int, got {num_groups!r}")
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(
            f"group_norm: number of channels C={channels} must be divisible by num_groups={num_groups} "
            f"(x of shape {tuple(x.shape)})"
        )
    if weight is not None:
        check_tensor("group_norm", "weight", weight, x, (channels,), "(C,)")
    if bias is not None:
        check_tensor("group_norm", "bias", bias, x, (channels,), "(C,)")
    if add is not None:
        check_tensor("group_norm", "add", add, x, (x.shape[0], channels), "(B, C)")


_INT_MAX = 2**31 - 1
_GROUP_LIMIT = _INT_MAX - 4096  # the kernels' 32-bit loop counters step past a group's end by up to a block
MAX_GRID_Z = 65535  # CUDA's limit on a launch grid's y and z axes; the channels_last kernels put the batch on z


def is_nhwc_rows(x: Tensor) -> bool:
    """Whether ``x`` (B, C, H, W) is pixel rows of C unit-strided channels at one row stride: channels_last, or a
    channel slice of a wider channels_last map (the UNet writes its skip connections into such slices)."""
    return _layout.nhwc_row_stride(x) is not None


def _output_like(x: Tensor, values: Tensor) -> Tensor:
    """``values`` rounded once to ``x.dtype``, with x's strides when x is dense, channels_last for the channel
    slice of a channels_last map."""
    if not x.is_contiguous() and is_nhwc_rows(x):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    else:
        out = torch.empty_like(x)
    out.copy_(values)
    return out


def group_norm_reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
    eps: float,
    *,
    add: Tensor | None = None,
    silu: bool = False,
) -> Tensor:
    """Plain-PyTorch fused GroupNorm in float32; the oracle for every other implementation."""
    check_args(x, weight, bias, num_groups, add)
    eps = check_eps("group_norm", eps)
    # NCHW on purpose: torch's CPU channels_last GroupNorm kernel loses precision when the mean is
    # large relative to the spread (error ~1.5 for x = 1000 + randn); the result is laid out like x.
    h = x.float().contiguous()
    if h.numel() == 0:  # F.group_norm refuses samples without spatial positions; there is nothing to normalise
        return _output_like(x, h)
    if add is not None:
        h = h + add.float()[(...,) + (None,) * (x.dim() - 2)]
    h = F.group_norm(
        h,
        num_groups,
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    if silu:
        h = F.silu(h)
    return _output_like(x, h)


def _layout_unsupported(x: Tensor) -> str | None:
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return None
    return f"x must be contiguous or 4-D channels_last, got shape {tuple(x.shape)} with strides {x.stride()}"


def _unsupported(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
    eps: float,
    *,
    add: Tensor | None = None,
    silu: bool = False,
) -> str | None:
    if needs_grad(x, weight, bias, add):
        return "inputs require grad (no backward kernel yet)"
    if x.numel() and x.shape[1] // num_groups * (x.numel() // (x.shape[0] * x.shape[1])) > _GROUP_LIMIT:
        return f"a group holds more than {_GROUP_LIMIT} values (32-bit offsets and loop counters in the kernels)"
    return _layout_unsupported(x)


def _nhwc_unsupported(x: Tensor, weight, bias, num_groups, eps, *, add=None, silu=False) -> str | None:
    """The Triton kernels read channels_last rows whole (the CUDA kernel walks one group at a time, which on
    NHWC reads each memory sector for a few bytes: measured 2x slower than its NCHW case on an H200); they also
    read channel slices of wider channels_last maps."""
    if x.is_contiguous() or not is_nhwc_rows(x):
        return "x is not a (strictly) channels_last 4-D tensor or a channel slice of one"
    if x.shape[0] > MAX_GRID_Z:
        return f"batch {x.shape[0]} is above the launch grid's limit of {MAX_GRID_Z} (its z axis)"
    if needs_grad(x, weight, bias, add):
        return "inputs require grad (no backward kernel yet)"
    return None


def _triton_unsupported(x: Tensor, weight, bias, num_groups, eps, *, add=None, silu=False) -> str | None:
    """The Triton op runs channels_last maps with the channels_last kernels, so their limits hold there too (a
    batch above the grid's z limit, which triton-nhwc refused, reached this one where the extension is missing,
    and failed in the kernel's launcher instead of running the reference)."""
    if not x.is_contiguous() and is_nhwc_rows(x):
        return _nhwc_unsupported(x, weight, bias, num_groups, eps, add=add, silu=silu)
    return _unsupported(x, weight, bias, num_groups, eps, add=add, silu=silu)


def _ext_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
    eps: float,
    *,
    add: Tensor | None = None,
    silu: bool = False,
) -> Tensor:
    return torch.ops.rdm_fast.group_norm.default(x, weight, bias, num_groups, eps, add, silu)


def _cpu_unsupported(x: Tensor, weight: Tensor | None, bias: Tensor | None, num_groups: int, eps: float, *,
                     add: Tensor | None = None, silu: bool = False) -> str | None:
    """The C++ CPU kernels take contiguous and channels_last maps; channel slices of channels_last maps are
    copied to channels_last first (see :func:`_cpu_forward`), so for those only gradients rule them out."""
    if not x.is_contiguous() and is_nhwc_rows(x):
        return "inputs require grad (no backward kernel yet)" if needs_grad(x, weight, bias, add) else None
    return _unsupported(x, weight, bias, num_groups, eps, add=add, silu=silu)


def _cpu_forward(x: Tensor, *args, **kwargs) -> Tensor:
    if not x.is_contiguous() and is_nhwc_rows(x):
        x = x.contiguous(memory_format=torch.channels_last)
    return _ext_forward(x, *args, **kwargs)


@eager_constant
def _cpu_ext_unavailable() -> str | None:
    return None if _extension.cpu_loaded() else _extension.load_error("rdm_fast._C")


@eager_constant
def _cuda_ext_unavailable() -> str | None:
    if _extension.cuda_loaded():
        return None
    return _extension.load_error("rdm_fast._C") or _extension.load_error("rdm_fast._C_cuda")


_KERNELS = TritonKernels("group_norm")
_triton_unavailable = _KERNELS.unavailable


def _triton_forward(*args, **kwargs) -> Tensor:
    return _KERNELS.module.group_norm(*args, **kwargs)  # loaded by _triton_unavailable() during selection


def _register_fake() -> None:
    """Shape/stride propagation for ``torch.ops.rdm_fast.group_norm`` (meta tensors, torch.compile)."""
    @torch.library.register_fake("rdm_fast::group_norm")
    def _group_norm_fake(x, weight, bias, num_groups, eps, add, silu):
        if _layout_unsupported(x) is None:  # the op makes other layouts contiguous (NCHW) first
            return torch.empty_like(x)
        return torch.empty_like(x, memory_format=torch.contiguous_format)


_extension.add_post_load_hook(_register_fake)

GROUP_NORM = Op(
    "group_norm",
    reference=Impl("reference", group_norm_reference),
    by_device={
        "cpu": [Impl("cpu-ext", _cpu_forward, _cpu_unsupported, _cpu_ext_unavailable)],
        "cuda": [
            # the three kernels: a single-kernel variant (its second read from L2) was slower on an H200 at most
            # shapes, by up to 6x, and ahead by at most 0.008 ms (2026-11-27, bench/RESULTS.md), so there is one
            # channels_last path and nothing to time per shape
            Impl("triton-nhwc", _triton_forward, _nhwc_unsupported, _triton_unavailable),
            Impl("cuda-ext", _ext_forward, _unsupported, _cuda_ext_unavailable),
            Impl("triton", _triton_forward, _triton_unsupported, _triton_unavailable),
        ],
    },
)


@autocast_inputs
def group_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
    eps: float,
    *,
    add: Tensor | None = None,
    silu: bool = False,
) -> Tensor:
    """Fused GroupNorm with optional per-(B, C) ``add`` before the statistics and optional SiLU after.

    x is (B, C, *spatial), float32/float16/bfloat16, any layout; the result has x's shape and dtype and x's
    memory format (channels_last for a channel slice of a channels_last map). Contiguous and 4-D channels_last
    inputs (and such slices; the CPU extension copies those first) run the fused kernels; other layouts the
    reference. ``eps`` must be finite and >= 0 (ValueError); ``num_groups`` an int and ``silu`` a bool (TypeError).
    Semantics are those of :func:`group_norm_reference`.
    """
    check_args(x, weight, bias, num_groups, add)
    eps = check_eps("group_norm", eps)
    if not isinstance(silu, (bool, np.bool_)):
        raise TypeError(f"group_norm: silu must be True or False, got {silu!r}")
    return GROUP_NORM(x, weight, bias, int(num_groups), eps, add=add, silu=bool(silu))
