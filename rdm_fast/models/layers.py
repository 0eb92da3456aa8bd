"""Building blocks shared by the UNet and the autoencoders, and the official-name mapping they declare.

Each module that names its children differently from the official checkpoints says so in ``OFFICIAL``
(our child name -> official child path); ``official_names`` walks a model and joins those pieces, so the
converter between the two layouts is defined next to the modules themselves.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._pytree import tree_leaves

from .. import ops
from .._layout import copy_into_blocks, row_view


def current_device(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that makes ``device`` the current CUDA device for its duration where it is a GPU other than the
    current one: Triton kernels and CUDA graphs launch on the current device, not on their tensors' (a model on
    cuda:1 would otherwise launch on cuda:0). A no-op on the CPU, on the current GPU and while torch.compile
    traces."""
    if device.type != "cuda" or torch.compiler.is_compiling() or device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def on_input_device(forward: Callable) -> Callable:
    """Run a module's ``forward(self, x, ...)`` with x's GPU current (:func:`current_device`)."""
    name = list(inspect.signature(forward).parameters)[1]  # x's name, for calls that pass it by keyword

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        x = args[0] if args else kwargs[name]
        device = getattr(x, "device", None)  # a tensor's (NumPy arrays have a device string)
        if not isinstance(device, torch.device):
            raise TypeError(f"{type(self).__name__}: {name} must be a torch.Tensor, got {type(x).__name__}")
        with current_device(device):
            return forward(self, *args, **kwargs)
    return wrapper


class GroupNorm(nn.Module):
    """GroupNorm with fp32 statistics, optionally fused with a per-channel add before it and SiLU after it."""

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, *, add: Tensor | None = None, silu: bool = False) -> Tensor:
        # the kernels take float32 affine parameters: converted once, not on every call of a bf16/fp16 model
        weight, bias = cached(self, "float32", lambda w, b: (w.float(), b.float()), self.weight, self.bias)
        return ops.group_norm(x, weight, bias, self.num_groups, self.eps, add=add, silu=silu)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, groups={self.num_groups}, eps={self.eps}"


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim with fp32 statistics, through the fused op (same parameters and names)."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution with padding 1 (the UNet's and the autoencoders')."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    """A 1x1 convolution (channel projections: skips, proj_in/proj_out, quant convs)."""
    return nn.Conv2d(cin, cout, 1)


def _upsample_taps(w: Tensor, dim: int) -> Tensor:
    """Nearest x2 then a 3x3 "same" convolution, along one axis: output 2i+a sees input rows i-1+a and i+a, so as
    one stride-2 transposed convolution (padding 1) its 4 taps along ``dim`` are (w2, w1+w2, w0+w1, w0)."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack((w2, w1 + w2, w0 + w1, w0), dim)


def upsample_conv_weight(weight: Tensor) -> Tensor:
    """A 3x3 conv weight (O, I, 3, 3) -> the (I, O, 4, 4) ``conv_transpose2d(stride=2, padding=1)`` weight that
    equals nearest x2 upsampling followed by that convolution (taps summed in float32, so a float16 or bfloat16
    weight is rounded once). Made from the weight alone, with no host data: a CUDA caller does not wait on a copy
    (sampling refreshes it per call)."""
    out = _upsample_taps(_upsample_taps(weight.float(), 2), 3).transpose(0, 1).to(weight.dtype)
    return out.contiguous(memory_format=torch.channels_last) if is_channels_last(weight) else out.contiguous()


def is_channels_last(t: Tensor) -> bool:
    """Strictly channels-last 4-D memory (a tensor that is both, e.g. with 1x1 spatial dims, counts as NCHW)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


# Derived weights per module (name -> _Entry), outside the modules: a pickle or deep copy of a
# model carries none (the values hold functions, and a copy recomputes its own).
_CACHES: weakref.WeakKeyDictionary[nn.Module, dict[str, _Entry]] = weakref.WeakKeyDictionary()
# Bumped after every optimiser step: fused optimisers update weights in place without the version bump.
_OPTIMIZER_STEPS = [0]
# Bumped whenever a cached value is recomputed for other weights by a forward call, or replaced: part of the key of
# a CUDA graph made with the cached tensors (see cache_updates).
_CACHE_UPDATES = [0]


def cache_updates() -> int:
    """How often cached values were recomputed in a forward call, or replaced, in this process so far. A CUDA graph
    reads the cached tensors: a graph captured at one count may be replayed only at the same count (the refresh
    that ``RDM.sample`` runs before it writes in place and counts nothing)."""
    return _CACHE_UPDATES[0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _weights_key(weights: tuple[Tensor, ...]) -> tuple:
    """What identifies the weights' current values as far as can be seen without reading them: storage, version
    (inference tensors keep none) and dtype of each, and the process's optimiser step count."""
    return (_OPTIMIZER_STEPS[0], *((w.data_ptr(), None if w.is_inference() else w._version, w.dtype)
                                   for w in weights))


class _Entry(NamedTuple):
    """A cached value: the key of the weights it was computed from, the value, how to compute it, those weights,
    and which of its tensors have storage of their own (the others alias a weight: ``w.float()`` of a float32
    ``w`` is ``w``, and views share it), the only ones ever written into."""

    key: tuple
    value: Any
    fn: Callable[..., Any]
    weights: tuple[Tensor, ...]
    owned: tuple[bool, ...]


def _entry(key: tuple, fn: Callable[..., Any], weights: tuple[Tensor, ...]) -> _Entry:
    value = fn(*weights)
    shared = {w.untyped_storage().data_ptr() for w in weights}
    owned = tuple(isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in shared for t in tree_leaves(value))
    return _Entry(key, value, fn, weights, owned)


def cached(module: nn.Module, name: str, fn: Callable[..., Any], *weights: Tensor) -> Any:
    """``fn(*weights)`` for inference, computed once and rebuilt only when one of ``weights`` changes (dtype or
    device moves, optimiser steps, in-place updates), and recomputed by ``load_state_dict``; under autograd it is
    computed afresh so that gradients flow, and under torch.compile too (the compiler folds it; storage pointers
    would break its graph). Writes through ``.data``, and in-place updates of inference tensors inside inference
    mode, change a weight without anything this sees: :func:`refresh_cached` recomputes after them
    (``RDM.sample``, ``decode`` and ``encode`` do so at every call)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return fn(*weights)
    key = _weights_key(weights)
    store = _CACHES.get(module)
    if store is None:
        store = _CACHES.setdefault(module, {})  # one dict even if two threads get here at once
        if _refresh_after_load not in module._load_state_dict_post_hooks.values():  # a copy has its original's
            module.register_load_state_dict_post_hook(_refresh_after_load)
    entry = store.get(name)
    if entry is None:
        store[name] = _entry(key, fn, weights)
    elif entry.key != key:
        _CACHE_UPDATES[0] += 1
        store[name] = _update(entry, _entry(key, fn, weights))
    return store[name].value


def cached_names(module: nn.Module) -> list[str]:
    """The names of the values :func:`cached` holds for ``module``."""
    return list(_CACHES.get(module, {}))


def _refresh_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    _refresh(module)


def _update(entry: _Entry, fresh: _Entry) -> _Entry:
    """``fresh``'s values written into ``entry``'s tensors, which stay (a CUDA graph that reads them stays valid),
    where they can all take them (see :func:`_copies`); else ``fresh``, counted in :func:`cache_updates`."""
    copies = _copies(entry, fresh)
    if copies is None:
        _CACHE_UPDATES[0] += 1
        return fresh
    with torch.no_grad():
        for old, new in copies:
            with torch.inference_mode(old.is_inference()):  # one made under inference mode is updated in it
                old.copy_(new)
    return fresh._replace(value=entry.value, owned=entry.owned)


def _copies(entry: _Entry, fresh: _Entry) -> list[tuple[Tensor, Tensor]] | None:
    """The (old, new) tensor pairs to copy for ``entry`` to hold ``fresh``'s values, or None where an old tensor
    cannot take its new value: another shape, dtype, device or strides (a move of the weights), or no storage of
    its own (writing into a weight's storage would change the weight, or a user's copy of an older one)."""
    olds, news = tree_leaves(entry.value), tree_leaves(fresh.value)
    if len(olds) != len(news):
        return None
    copies = []
    for old, new, owned in zip(olds, news, entry.owned):
        if not isinstance(old, Tensor) or not isinstance(new, Tensor):
            if old != new:  # e.g. the column slices of the timestep adds
                return None
        elif old.data_ptr() != new.data_ptr():
            if not owned or (old.shape, old.dtype, old.device, old.stride()) != (new.shape, new.dtype, new.device,
                                                                                  new.stride()):
                return None
            copies.append((old, new))
    return copies


@torch.no_grad()
def _refresh(module: nn.Module) -> None:
    """Recompute ``module``'s cached values from their weights' current values, in place where they can take them
    (see :func:`_update`)."""
    store = _CACHES.get(module, {})
    for name, entry in list(store.items()):
        store[name] = _update(entry, _entry(_weights_key(entry.weights), entry.fn, entry.weights))


def refresh_cached(root: nn.Module) -> None:
    """Recompute every value :func:`cached` holds under ``root`` from its weights' current values, in place where
    they can take them (see :func:`_copies`; a CUDA graph that reads the cached tensors stays valid): for weights
    written through ``.data``, as EMA copies in
    the reference code's style do, which the cache's checks cannot see."""
    for m in root.modules():
        _refresh(m)


def conv_without_bias(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv`` without its bias (the caller adds it where it costs no extra pass)."""
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding)


def pointwise_linear(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 ``conv`` applied to (..., C) tokens as the linear layer it is, bias in the GEMM's epilogue. Tokens
    that are rows at a fixed stride (a channel slice of a wider channels-last map) are read in place: F.linear
    would run a bias-free GEMM and a separate, unvectorised bias add on them."""
    rows = row_view(x, x.shape[-1]) if x.dim() > 2 and conv.bias is not None else None
    if rows is None:
        return F.linear(x, conv.weight.flatten(1), conv.bias)
    assert conv.bias is not None  # rows are taken only with a bias
    return torch.addmm(conv.bias, rows, conv.weight.flatten(1).t()).view(*x.shape[:-1], -1)


def nhwc(x: Tensor) -> Tensor:
    """(B, C, H, W) -> its (B, H, W, C) view (a view of channels-last memory; strided for NCHW)."""
    return x.permute(0, 2, 3, 1)


def nchw(x: Tensor) -> Tensor:
    """(B, H, W, C) -> its (B, C, H, W) view: dense (B, H, W, C) memory is a channels-last feature map."""
    return x.permute(0, 3, 1, 2)


def add_channel_bias(x: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``x + bias[:, None, None]`` for a feature map in one vectorised pass (``ops.add_bias`` on its
    (B, H, W, C) view), written into ``out`` when given (a channel slice of a wider map; with k times x's rows,
    into each block of them): cuDNN adds a convolution's bias with a broadcast kernel that runs at a fraction of
    the copy bandwidth on channels-last maps."""
    if out is not None:
        if bias is None:
            return copy_into_blocks(x, out)
        return nchw(ops.add_bias(nhwc(x), bias, out=nhwc(out)))
    if bias is None:
        return x
    if ops.get_mode() == "reference" or (torch.is_grad_enabled() and (x.requires_grad or bias.requires_grad)):
        return x + bias[:, None, None]  # PyTorch's own broadcast add (autograd; the plain-PyTorch path)
    return nchw(ops.add_bias(nhwc(x), bias))


def conv_with_bias(conv: nn.Conv2d, x: Tensor, out: Tensor | None = None) -> Tensor:
    """``conv(x)`` with its bias added by :func:`add_channel_bias` (into ``out`` when given). Thin 3x3 layers
    (the UNet's first and last: few channels in or out) run as one ``ops.conv3x3``, bias included, outside
    autograd, torch.compile and the plain-PyTorch mode."""
    thin = (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.groups == 1
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and min(conv.in_channels, conv.out_channels) <= ops.MAX_THIN_CHANNELS)
    if thin and ops.get_mode() != "reference" and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)):
        return ops.conv3x3(x, conv.weight, conv.bias, out=out)
    return add_channel_bias(F.conv2d(x, conv.weight, None, conv.stride, conv.padding), conv.bias, out)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling and a 3x3 convolution (UNet and autoencoder decoder alike).

    The fast path runs one stride-2 transposed convolution with the taps summed (:func:`upsample_conv_weight`):
    no upsampled copy of the input is made, and each output pixel costs 4 instead of 9 taps. The plain-PyTorch
    path (ops mode ``reference``) computes the definition.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """``out``: where to write the result (a channel slice of a wider map), else a new tensor."""
        if ops.get_mode() == "reference":
            y = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
            return y if out is None else out.copy_(y)
        weight = cached(self, "transposed", upsample_conv_weight, self.conv.weight)
        return add_channel_bias(F.conv_transpose2d(x, weight, None, stride=2, padding=1), self.conv.bias, out)


def official_names(model: nn.Module) -> dict[str, str]:
    """Map every state-dict key of ``model`` to its name in the official checkpoints."""
    out = {}
    for name in model.state_dict().keys():
        parts = name.split(".")
        mod, pieces = model, []
        for part in parts[:-1]:
            pieces.append(getattr(mod, "OFFICIAL", {}).get(part, part))
            mod = mod.get_submodule(part)
        pieces.append(parts[-1])
        out[name] = ".".join(pieces)
    return out
