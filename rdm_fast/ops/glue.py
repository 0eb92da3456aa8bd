"""Memory-bound glue of the transformer blocks and the sampler, each as one pass over memory.

* :func:`layer_norm` — LayerNorm over the last dim, float32 statistics, output in x's dtype; optionally of
  ``x + shift`` (a per-channel bias still owed to x, added in float32 and not stored).
* :func:`add_layer_norm` — ``s = x + residual + residual_bias`` and ``layer_norm(s)`` in one pass (a block's
  residual add, where the linear layer before it ran without its bias, fused with the next LayerNorm).
* :func:`add_bias` — ``x + residual + bias`` with the bias on the last dim: a convolution or linear layer run
  without its bias, its bias and the residual it feeds, in one pass instead of a bias pass and an add pass.
* :func:`geglu` — ``a * gelu_erf(gate)`` for ``[a, gate]`` on the last dim (the GEGLU feed-forward's middle).
* :func:`ddim_guided_step` / :func:`plms_guided_step` — PLMS multistep combination and the DDIM update with the
  predicted x0 (and optionally the classifier-free guidance combine), in float32: every update of the samplers.

The ``*_reference`` functions define the semantics (float32 math, one rounding to the input dtype; contiguous
outputs, except ``add_bias``, whose output keeps x's layout) and are the CPU path; the Triton kernels of
``rdm_fast.kernels.glue`` run on CUDA (and on the CPU in Triton's interpreter when ``RDM_FAST_OPS=fast`` and
``TRITON_INTERPRET=1``). Calls that need autograd use the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._layout import copy_into_blocks
from ._dispatch import SUPPORTED_DTYPES, autocast_inputs, check_eps, check_tensor, needs_grad
from ._triton_kernels import TritonKernels

MAX_LAYER_NORM_WIDTH = 16384  # the Triton kernel holds a row in registers
Coef = float | Tensor

_kernels = TritonKernels("glue")


def _check_same(op: str, name: str, t: Tensor, x: Tensor, dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES) -> None:
    check_tensor(op, name, t, x, x.shape, dtypes=dtypes)
    if t.dtype != x.dtype:
        raise ValueError(f"{op}: expected {name} of dtype {x.dtype} (that of x), got {t.dtype}")


def _grad_unsupported(*tensors: Tensor | None) -> str | None:
    return "inputs require grad (no backward kernel)" if needs_grad(*tensors) else None


# ----------------------------------------------------------------------------------------------- LayerNorm


def _check_layer_norm(op: str, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                      shift: Tensor | None = None) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: expected x with a non-empty last dim to normalise, got shape {tuple(x.shape)}")
    check_tensor(op, "x", x)
    for name, p in (("weight", weight), ("bias", bias), ("shift", shift)):
        if p is not None:
            check_tensor(op, name, p, x, (x.shape[-1],))


def layer_norm_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *,
                         shift: Tensor | None = None) -> Tensor:
    """LayerNorm over the last dim of ``x (+ shift)`` in float32 (PyTorch's kernel on a float32 copy: under
    autograd it keeps only that copy and the row statistics), rounded once; the oracle and CPU path."""
    _check_layer_norm("layer_norm", x, weight, bias, shift)
    eps = check_eps("layer_norm", eps)
    xf = x.float() if shift is None else x.float() + shift.float()
    y = F.layer_norm(xf, (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return y.to(x.dtype).contiguous()


def _layer_norm_unsupported(x, weight, bias, eps, *, shift=None) -> str | None:
    if x.shape[-1] > MAX_LAYER_NORM_WIDTH:
        return f"rows of {x.shape[-1]} > {MAX_LAYER_NORM_WIDTH} values"
    return _grad_unsupported(x, weight, bias, shift)


LAYER_NORM = _kernels.op("layer_norm", layer_norm_reference, _layer_norm_unsupported)


@autocast_inputs
def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *,
               shift: Tensor | None = None) -> Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` with float32 statistics; contiguous output in x's dtype.

    ``shift`` (C,): normalise ``x + shift`` instead, the sum formed in float32 and not stored (a linear layer's
    bias that its caller carries instead of adding it to x in a pass of its own)."""
    _check_layer_norm("layer_norm", x, weight, bias, shift)
    eps = check_eps("layer_norm", eps)
    return LAYER_NORM(x, weight, bias, eps, shift=shift)


def _check_add_layer_norm(x, residual, residual_bias, weight, bias) -> None:
    _check_layer_norm("add_layer_norm", x, weight, bias)
    if residual is not None:
        _check_same("add_layer_norm", "residual", residual, x)
    if residual_bias is not None:
        check_tensor("add_layer_norm", "residual_bias", residual_bias, x, (x.shape[-1],))


def _residual_sum(x: Tensor, residual: Tensor | None, bias: Tensor | None) -> Tensor:
    """``x + residual + bias`` in float32 (either term optional; bias on the last dim): the residual adds'
    semantics, shared by add_layer_norm and add_bias."""
    s = x.float()
    if residual is not None:
        s = s + residual.float()
    if bias is not None:
        s = s + bias.float()
    return s


def add_layer_norm_reference(
    x: Tensor,
    residual: Tensor | None,
    residual_bias: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """(s, layer_norm(s)) with ``s = x + residual + residual_bias`` summed in float32, rounded to x's dtype."""
    _check_add_layer_norm(x, residual, residual_bias, weight, bias)
    s = _residual_sum(x, residual, residual_bias).to(x.dtype).contiguous()
    return s, layer_norm_reference(s, weight, bias, eps)


def _add_layer_norm_unsupported(x, residual, residual_bias, weight, bias, eps) -> str | None:
    if x.shape[-1] > MAX_LAYER_NORM_WIDTH:
        return f"rows of {x.shape[-1]} > {MAX_LAYER_NORM_WIDTH} values"
    return _grad_unsupported(x, residual, residual_bias, weight, bias)


ADD_LAYER_NORM = _kernels.op("add_layer_norm", add_layer_norm_reference, _add_layer_norm_unsupported)


@autocast_inputs
def add_layer_norm(
    x: Tensor,
    residual: Tensor | None,
    residual_bias: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Residual add fused with the next LayerNorm: returns ``(s, layer_norm(s))``, ``s = x + residual +
    residual_bias`` (each optional; the sum in float32, rounded once to x's dtype; both outputs contiguous).

    One read of x and residual and one write of each output, instead of an add pass plus a LayerNorm pass that
    reads s again; ``residual_bias`` (C,) takes the bias of the linear layer that produced ``residual``.
    """
    _check_add_layer_norm(x, residual, residual_bias, weight, bias)
    eps = check_eps("add_layer_norm", eps)
    return ADD_LAYER_NORM(x, residual, residual_bias, weight, bias, eps)


# ----------------------------------------------------------------------------------------------- bias + residual


def _check_add_bias(x: Tensor, bias: Tensor | None, residual: Tensor | None, out: Tensor | None) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"add_bias: expected x of shape (..., C) with C > 0, got {tuple(x.shape)}")
    check_tensor("add_bias", "x", x)
    if bias is not None:
        check_tensor("add_bias", "bias", bias, x, (x.shape[-1],))
    if residual is not None:
        _check_same("add_bias", "residual", residual, x)
    if out is not None:
        check_tensor("add_bias", "out", out, x)
        if out.dtype != x.dtype:
            raise ValueError(f"add_bias: expected out of dtype {x.dtype} (that of x), got {out.dtype}")
        if _out_copies(x, out) is None:
            raise ValueError(f"add_bias: expected out of shape {tuple(x.shape)}, or with a multiple of its "
                             f"{x.shape[0] if x.dim() > 1 else '-'} leading rows, got {tuple(out.shape)}")


def _out_copies(x: Tensor, out: Tensor) -> int | None:
    """How many copies of the result ``out`` takes: 1 if it is shaped like x; k if x has at least two dims and
    out has k * B leading rows for x's B (all else equal); None if it fits neither."""
    if out.shape == x.shape:
        return 1
    if x.dim() < 2 or out.shape[1:] != x.shape[1:] or x.shape[0] == 0 or out.shape[0] % x.shape[0]:
        return None
    return out.shape[0] // x.shape[0]


def add_bias_reference(x: Tensor, bias: Tensor | None, residual: Tensor | None = None,
                       out: Tensor | None = None) -> Tensor:
    """``x + residual + bias`` in float32 (bias broadcast over the last dim), rounded once to x's dtype, written
    into ``out`` when given (into each of its blocks of x's leading rows, where it has k times as many); else the
    result has x's strides when x is dense (a channels-last map's (B, H, W, C) view stays channels-last, an NCHW
    map's stays NCHW), or is contiguous."""
    _check_add_bias(x, bias, residual, out)
    dest = torch.empty_like(x) if out is None else out
    return copy_into_blocks(_residual_sum(x, residual, bias), dest)


def _add_bias_unsupported(x: Tensor, bias: Tensor | None, residual: Tensor | None,
                          out: Tensor | None = None) -> str | None:
    return _grad_unsupported(x, bias, residual, out)


ADD_BIAS = _kernels.op("add_bias", add_bias_reference, _add_bias_unsupported)


@autocast_inputs
def add_bias(x: Tensor, bias: Tensor | None, residual: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    """``x + residual + bias`` with ``bias`` (C,) on the last dim of x (..., C) and ``residual`` shaped like x
    (either may be None: with neither, a copy at the kernel's bandwidth, e.g. of a channel slice).

    Float32 sum, one rounding to x's dtype; written into ``out`` (shaped like x, e.g. a channel slice of a wider
    map) when given and returned, else into a new tensor laid out like x. ``out`` may instead have k times x's
    leading rows: the result is written into each of its k blocks of rows (the two halves of a guided batch that
    share their input: a second write instead of a later copy). Pass feature maps as their (B, H, W, C) views:
    for channels-last maps (and channel slices of them) those views are rows of C values and the kernel makes
    one read of x and residual and one write (per copy).
    """
    _check_add_bias(x, bias, residual, out)
    return ADD_BIAS(x, bias, residual, out)


# ----------------------------------------------------------------------------------------------- GEGLU


def _check_geglu(h: Tensor) -> None:
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"geglu: expected h of shape (..., 2F) with an even last dim, got {tuple(h.shape)}")
    check_tensor("geglu", "h", h)


def geglu_reference(h: Tensor) -> Tensor:
    """``a * gelu(gate)`` (exact erf GELU) for ``[a, gate] = h.chunk(2, -1)``, in float32, rounded once."""
    _check_geglu(h)
    a, gate = h.float().chunk(2, dim=-1)
    return (a * F.gelu(gate)).to(h.dtype).contiguous()


def _geglu_unsupported(h: Tensor) -> str | None:
    return _grad_unsupported(h)


GEGLU = _kernels.op("geglu", geglu_reference, _geglu_unsupported)


@autocast_inputs
def geglu(h: Tensor) -> Tensor:
    """GEGLU gate: (..., 2F) -> (..., F), ``a * gelu_erf(gate)`` with ``a = h[..., :F]``, ``gate = h[..., F:]``.

    Float32 math and one rounding to h's dtype; reads both halves once and writes the result once.
    """
    _check_geglu(h)
    return GEGLU(h)


# ----------------------------------------------------------------------------------------------- sampler

PLMS_WEIGHTS = {
    0: (1.0,),
    1: (3 / 2, -1 / 2),
    2: (23 / 12, -16 / 12, 5 / 12),
    3: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
"""Adams-Bashforth weights (current eps, then history[-1], history[-2], ...) by number of past eps."""


def _is_real(c: object) -> bool:
    """A Python or NumPy int or float, not a bool."""
    return isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, (bool, np.bool_))


def _coef(name: str, c: Coef, x: Tensor) -> Coef:
    """A coefficient as a Python float (from a Python or NumPy number, e.g. a schedule array's element), or as a
    0-d float tensor on x's device (kept on the device: no sync)."""
    if not _is_real(c) and not isinstance(c, Tensor):
        raise TypeError(f"sampler step: {name} must be a float or a 0-d tensor, got {type(c).__name__}")
    if not torch.is_tensor(c):
        return float(c)
    if c.dim() != 0 or not c.dtype.is_floating_point:
        raise ValueError(f"sampler step: {name} must be a 0-d floating-point tensor, got {c.dtype} of shape "
                         f"{tuple(c.shape)}")
    return c if c.device == x.device else float(c.item())


STEP_DTYPES = (*SUPPORTED_DTYPES, torch.float64)
"""The sampler step also takes float64 (reference only: the samplers run in any floating dtype, e.g. exact tests)."""


def _check_step(x, e_uncond, e_cond, history, weights, noise) -> None:
    op = "sampler step"
    check_tensor(op, "x", x, dtypes=STEP_DTYPES)
    _check_same(op, "e_cond", e_cond, x, STEP_DTYPES)
    if e_uncond is not None:
        _check_same(op, "e_uncond", e_uncond, x, STEP_DTYPES)
    if noise is not None:
        _check_same(op, "noise", noise, x, STEP_DTYPES)
    if len(history) > 3:
        raise ValueError(f"{op}: at most 3 past eps are supported, got {len(history)}")
    for i, h in enumerate(history):
        _check_same(op, f"history[{i}]", h, x, STEP_DTYPES)
    if len(weights) != len(history) + 1:
        raise ValueError(f"{op}: expected {len(history) + 1} weights (current eps, then history newest first), "
                         f"got {len(weights)}")
    for w in weights:
        if not _is_real(w):
            raise TypeError(f"{op}: multistep weights must be Python or NumPy floats, got {type(w).__name__}")
        if not math.isfinite(w):
            raise ValueError(f"{op}: multistep weights must be finite, got {w}")


def _check_coefs(a_t: Coef, a_prev: Coef, sigma_t: Coef, noise: Tensor | None) -> None:
    if not torch.is_tensor(a_t) and not 0.0 < a_t <= 1.0:
        raise ValueError(f"sampler step: a_t (alpha-bar of t) must be in (0, 1], got {a_t}")
    if not torch.is_tensor(a_prev) and not 0.0 < a_prev <= 1.0:
        raise ValueError(f"sampler step: a_prev must be in (0, 1], got {a_prev}")
    if not torch.is_tensor(sigma_t):
        if not sigma_t >= 0:  # NaN too: every output NaN
            raise ValueError(f"sampler step: sigma_t must be >= 0, got {sigma_t}")
        if sigma_t > 0 and noise is None:
            raise ValueError("sampler step: sigma_t > 0 needs noise")
        if not torch.is_tensor(a_prev) and 1.0 - a_prev - sigma_t**2 < 0:
            raise ValueError(f"sampler step: 1 - a_prev - sigma_t^2 must be >= 0, got a_prev={a_prev}, "
                             f"sigma_t={sigma_t}")


def _ddim_coefficients(a_t: Coef, a_prev: Coef, sigma_t: Coef, dtype: torch.dtype) -> tuple[Coef, ...]:
    """(sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev - sigma_t^2), sigma_t) computed in float64:
    Python floats when all three inputs are floats, else 0-d tensors of ``dtype``."""
    tensors = [c for c in (a_t, a_prev, sigma_t) if torch.is_tensor(c)]
    if not tensors:
        return (math.sqrt(a_t), math.sqrt(1.0 - a_t), math.sqrt(a_prev), math.sqrt(1.0 - a_prev - sigma_t**2),
                sigma_t)
    a, ap, sg = (torch.as_tensor(c, dtype=torch.float64, device=tensors[0].device) for c in (a_t, a_prev, sigma_t))
    return tuple(t.to(dtype) for t in (a.sqrt(), (1.0 - a).sqrt(), ap.sqrt(), (1.0 - ap - sg * sg).sqrt(), sg))


def sampler_step_reference(
    x: Tensor,
    e_uncond: Tensor | None,
    e_cond: Tensor,
    guidance_scale: Coef,
    history: tuple[Tensor, ...],
    weights: tuple[float, ...],
    a_t: Coef,
    a_prev: Coef,
    sigma_t: Coef,
    noise: Tensor | None,
    store_eps: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Guided eps, multistep combination and DDIM update in float32 (float64 for float64 tensors; square roots
    of the coefficients in float64); returns contiguous (x_prev, x0, guided eps or None) in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    e = e_cond.to(acc)
    if e_uncond is not None:
        eu = e_uncond.to(acc)
        e = eu + (guidance_scale.to(acc) if torch.is_tensor(guidance_scale) else guidance_scale) * (e - eu)
    eps_out = e.to(x.dtype).contiguous() if store_eps else None
    e = weights[0] * e
    for w, h in zip(weights[1:], reversed(history)):
        e = e + w * h.to(acc)
    sqrt_a, sqrt_1ma, sqrt_ap, direction, sigma = _ddim_coefficients(a_t, a_prev, sigma_t, acc)
    x0 = (x.to(acc) - sqrt_1ma * e) / sqrt_a
    x_prev = sqrt_ap * x0 + direction * e
    if noise is not None:
        x_prev = x_prev + sigma * noise.to(acc)
    return x_prev.to(x.dtype).contiguous(), x0.to(x.dtype).contiguous(), eps_out


def _step_unsupported(x, e_uncond, e_cond, guidance_scale, history, weights, a_t, a_prev, sigma_t, noise,
                      store_eps) -> str | None:
    tensors = (x, e_uncond, e_cond, noise, *history)
    if x.dtype == torch.float64:
        return "float64 runs in the reference only"
    if not all(t is None or t.is_contiguous() for t in tensors):
        return "x, eps, history and noise must be contiguous"
    return _grad_unsupported(*tensors)


SAMPLER_STEP = _kernels.op("sampler_step", sampler_step_reference, _step_unsupported)


def ddim_guided_step(
    x: Tensor,
    e_uncond: Tensor | None,
    e_cond: Tensor,
    guidance_scale: Coef,
    a_t: Coef,
    a_prev: Coef,
    sigma_t: Coef = 0.0,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step on the classifier-free-guided eps; returns ``(x_prev, pred_x0)`` in x's dtype.

    ``e = e_u + s (e_c - e_u)`` (``e = e_cond`` when ``e_uncond`` is None), ``x0 = (x - sqrt(1 - a_t) e) /
    sqrt(a_t)``, ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) e + sigma_t noise``. ``noise`` (x's
    shape) is required when ``sigma_t`` > 0 (ValueError "sigma_t > 0 needs noise") and may be None only for the
    deterministic update, ``sigma_t`` = 0 (a 0-d tensor ``sigma_t`` on x's device is not read, so there a
    missing ``noise`` is not detected and the noise term is left out). The update of ``samplers.sample_ddim``,
    which passes the guided eps (``samplers.guided`` combines the halves inside the graphed step), and optionally
    that combine, in one pass. Coefficients are Python or NumPy floats or 0-d tensors; 0-d tensors on x's device
    are read by the kernel (no host synchronisation, so a sampling loop can be captured in a CUDA graph; pass
    float64 ones for full precision of ``1 - a``). Tensors: x's shape and dtype; float32 math (float64 for
    float64 tensors, which only the reference takes).
    """
    return _step(x, e_uncond, e_cond, guidance_scale, (), (1.0,), a_t, a_prev, sigma_t, noise, False)[:2]


def plms_guided_step(
    x: Tensor,
    e_uncond: Tensor | None,
    e_cond: Tensor,
    guidance_scale: Coef,
    history: Sequence[Tensor],
    a_t: Coef,
    a_prev: Coef,
    *,
    weights: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One PLMS (eta = 0) update; returns ``(x_prev, pred_x0, eps)``, ``eps`` the guided eps of this call.

    ``e' = weights[0] eps + weights[1] history[-1] + weights[2] history[-2] + ...`` (``history`` newest last,
    at most 3), then the DDIM update of :func:`ddim_guided_step` with ``e'``. ``weights`` default to the
    Adams-Bashforth ones (``PLMS_WEIGHTS``) for ``len(history)``; the first PLMS step's second update
    (the mean of the eps at t and at the next timestep) is ``history=[eps_t], weights=(0.5, 0.5)``.
    """
    history = tuple(history)
    if weights is None:
        if len(history) > 3:
            raise ValueError(f"plms_guided_step: at most 3 past eps are supported, got {len(history)}")
        weights = PLMS_WEIGHTS[len(history)]
    return _step(x, e_uncond, e_cond, guidance_scale, history, tuple(weights), a_t, a_prev, 0.0, None, True)


def _step(x, e_uncond, e_cond, guidance_scale, history, weights, a_t, a_prev, sigma_t, noise, store_eps):
    _check_step(x, e_uncond, e_cond, history, weights, noise)
    scale = _coef("guidance_scale", guidance_scale, x)
    if not torch.is_tensor(scale) and not math.isfinite(scale):  # a tensor is not read (no host synchronisation)
        raise ValueError(f"sampler step: guidance_scale must be finite, got {scale}")
    a_t, a_prev, sigma_t = (_coef(n, c, x) for n, c in (("a_t", a_t), ("a_prev", a_prev), ("sigma_t", sigma_t)))
    _check_coefs(a_t, a_prev, sigma_t, noise)
    weights = tuple(float(w) for w in weights)
    return SAMPLER_STEP(x, e_uncond, e_cond, scale, history, weights, a_t, a_prev, sigma_t, noise, store_eps)
