"""3x3 convolution (stride 1, zero padding 1) plus bias, for the UNet's thin first and last layers.

Implementations (selected by :mod:`rdm_fast.ops._dispatch`):

* ``reference`` -- :func:`conv3x3_reference`: ``F.conv2d`` in float32, one rounding. The CPU path and the oracle.
* ``triton`` -- ``rdm_fast.kernels.conv`` for convolutions with at most ``MAX_THIN_CHANNELS`` (16) input or
  output channels (the kernel adds the bias in its epilogue and can write the result into both halves of a
  guided batch). In ``auto`` mode each call shape is timed once against cuDNN plus ``ops.add_bias``
  (:class:`~rdm_fast.ops._measured.Measured`) and the faster runs; ``fast`` mode always runs the kernel.
* ``triton-interpreter`` -- the same kernel on CPU tensors under ``TRITON_INTERPRET=1`` (``fast`` mode only).

Calls that need autograd use the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._layout import copy_into_blocks, nhwc_row_stride
from ._dispatch import SUPPORTED_DTYPES, Impl, Op, autocast_inputs, get_mode, needs_grad
from ._measured import Measured
from ._triton_kernels import TritonKernels, without_bfloat16
from .glue import add_bias

_kernels = TritonKernels("conv")
MAX_THIN_CHANNELS = 16  # the kernel's layers: at most this many input or output channels


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"conv3x3: expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[2:] != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv3x3: expected weight of shape (C_out, {x.shape[1]}, 3, 3), got {tuple(weight.shape)}")
    for name, t in (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"conv3x3: unsupported {name} dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"conv3x3: expected {name} on device {x.device}, got {t.device}")
    if weight.dtype != x.dtype:
        raise ValueError(f"conv3x3: expected weight of dtype {x.dtype} (that of x), got {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"conv3x3: expected bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if out is not None:
        b, _, h, w = x.shape
        if (out.dim() != 4 or (out.shape[0] % b if b else out.shape[0]) or out.shape[1:] != (weight.shape[0], h, w)
                or out.dtype != x.dtype or out.device != x.device):
            raise ValueError(f"conv3x3: expected out of shape (k * {b}, {weight.shape[0]}, {h}, {w}), dtype {x.dtype} "
                             f"on {x.device}, got {tuple(out.shape)}, {out.dtype} on {out.device}")


def _layout(x: Tensor) -> torch.memory_format:
    """The result's memory format: channels-last for channels-last maps and channel slices of them (as F.conv2d
    returns for channels-last input), else contiguous."""
    nhwc = not x.is_contiguous() and nhwc_row_stride(x) is not None
    return torch.channels_last if nhwc else torch.contiguous_format


def conv3x3_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``conv2d(x, weight, bias, padding=1)`` in float32, rounded once to x's dtype; laid out as :func:`conv3x3`
    lays it out, or written into ``out`` (into each of its blocks of B rows when it has k * B)."""
    _check(x, weight, bias, out)
    y = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), padding=1).to(x.dtype)
    return y.contiguous(memory_format=_layout(x)) if out is None else copy_into_blocks(y, out)


def _unsupported(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> str | None:
    if needs_grad(x, weight, bias):
        return "inputs require grad (no backward kernel)"
    cout, cin = weight.shape[:2]
    if min(cin, cout) > MAX_THIN_CHANNELS:
        return f"not a thin convolution ({cin} -> {cout} channels; the kernel takes <= {MAX_THIN_CHANNELS} in or out)"
    for name, t in (("x", x), ("out", out)):
        if 1 + sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) >= 2**31:
            return f"{name}'s elements within one image span 2^31 or more (32-bit offsets in the kernels)"
    return None


def _triton(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    why = _kernels.unavailable()  # loads the kernel module (the dispatch has, unless called directly)
    if why is not None:
        raise RuntimeError(f"conv3x3: {why}")
    return _kernels.module.conv3x3(x, weight, bias, out)


def _cudnn(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """cuDNN without the bias, then the bias pass of ``ops.add_bias`` into ``out`` (the plain fast path)."""
    y = F.conv2d(x, weight, None, padding=1)
    if bias is None:
        return copy_into_blocks(y, out)
    add_bias(y.permute(0, 2, 3, 1), bias, out=out.permute(0, 2, 3, 1))
    return out


_MEASURED = Measured("conv3x3", {"triton": _triton, "cudnn": _cudnn})


def _cuda_conv(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    if get_mode() == "fast" or torch.compiler.is_compiling():  # no timing inside a trace
        return _triton(x, weight, bias, out)
    key = (x.shape, x.stride(), weight.shape, weight.stride(), bias is None, out.shape, out.stride(), x.dtype, x.device)
    return _MEASURED(key, lambda: f"x {tuple(x.shape)} -> {weight.shape[0]} channels {x.dtype}", x, weight, bias, out)


CONV3X3 = Op("conv3x3", reference=Impl("reference", conv3x3_reference), by_device={
    "cuda": [Impl("triton", _cuda_conv, _unsupported, _kernels.unavailable)],
    "cpu": [Impl("triton-interpreter", _triton, without_bfloat16(_unsupported), _kernels.interpreter_unavailable,
                 fast_mode_only=True)],
})


@autocast_inputs
def conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    """``conv2d(x, weight, bias, stride=1, padding=1)`` for x (B, C_in, H, W) and weight (C_out, C_in, 3, 3) of
    one dtype: float32 accumulation, one rounding to x's dtype. Written into ``out`` when given and returned (a
    (B, C_out, H, W) map or channel slice; or one with k * B rows, each block of B rows getting the result),
    else into a new map, channels-last if x is (or is a channel slice of a channels-last map), else contiguous.
    The fast kernel takes layers with at most ``MAX_THIN_CHANNELS`` (16) input or output channels."""
    _check(x, weight, bias, out)
    if out is None:
        out = torch.empty((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device,
                          memory_format=_layout(x))
    return CONV3X3(x, weight, bias, out)
