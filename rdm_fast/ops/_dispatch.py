"""Implementation selection for the fused ops.

Each op has, per device type, an ordered list of :class:`Impl` (fastest first, the plain-PyTorch
reference last). The mode decides how one is picked:

* ``auto`` (default): the first implementation that is available and supports the call.
* ``reference``: always the reference (the extension is not even loaded).
* ``fast``: the first non-reference implementation that supports the call, else ``RuntimeError``.

The mode comes from :func:`set_mode` / :func:`use_mode`, else from the ``RDM_FAST_OPS`` environment
variable (read on every call), else ``auto``. The first run of each (op, impl, device type, dtype)
is logged at INFO on the ``rdm_fast.ops`` logger.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import numpy as np
import torch
from torch import Tensor

from ._extension import BUILD_HINT

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # of every fused op's tensors
P = ParamSpec("P")
R = TypeVar("R")  # what an op returns: a tensor, or a tuple of them


def check_tensor(op: str, name: str, t: Tensor, like: Tensor | None = None, shape: tuple | None = None,
                 desc: str | None = None, dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES) -> None:
    """ValueError naming ``op`` and the argument ``name`` unless ``t`` has ``shape`` (written as ``desc``, e.g.
    "(C,)", where given), one of ``dtypes`` and ``like``'s device; TypeError unless it is a tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        want = f"{desc} = {tuple(shape)}" if desc else str(tuple(shape))
        raise ValueError(f"{op}: expected {name} of shape {want}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{op}: unsupported {name} dtype {t.dtype} (expected one of {names})")
    if like is not None and t.device != like.device:
        raise ValueError(f"{op}: expected {name} on device {like.device}, got {t.device}")


def check_eps(op: str, eps: float, name: str = "eps") -> float:
    """``eps`` as a Python float, the type the kernels take (a NumPy scalar or a one-element tensor is converted:
    reading a CUDA tensor synchronises with the host). ValueError naming ``op`` and ``name`` unless it is finite
    and >= 0 (a negative one makes the normalisation's variance + eps negative or zero: NaN or Inf outputs),
    TypeError unless it is a real number. Returned as it is while torch.compile traces (a symbolic float)."""
    if type(eps) is float and 0.0 <= eps < math.inf:  # the usual case, in a few tens of nanoseconds
        return eps
    if torch.compiler.is_compiling():
        return eps
    if isinstance(eps, Tensor):
        if eps.numel() != 1:
            raise TypeError(f"{op}: expected {name} to be a float, got a tensor of shape {tuple(eps.shape)}")
        eps = eps.item()
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: expected {name} to be a float, got {type(eps).__name__}")
    if not math.isfinite(float(eps)) or eps < 0:
        raise ValueError(f"{op}: {name} must be a finite number >= 0, got {eps!r}")
    return float(eps)


logger = logging.getLogger("rdm_fast.ops")

MODES = ("auto", "reference", "fast")
ENV_VAR = "RDM_FAST_OPS"

_mode_override: str | None = None


class FastPathUnavailable(RuntimeError):
    """Mode ``fast`` was asked for, and no fast implementation can run a call (the message says why)."""


def _check_mode(mode: str, source: str) -> str:
    if mode not in MODES:
        raise ValueError(f"invalid rdm_fast ops mode {mode!r} from {source}; valid modes: {', '.join(MODES)}")
    return mode


def get_mode() -> str:
    """The active mode: the :func:`set_mode` / :func:`use_mode` value, else ``$RDM_FAST_OPS``, else ``auto``."""
    if _mode_override is not None:
        return _mode_override
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return _check_mode(env, f"${ENV_VAR}") if env else "auto"


def set_mode(mode: str | None) -> None:
    """Set the mode process-wide; ``None`` goes back to following ``$RDM_FAST_OPS``."""
    global _mode_override
    _mode_override = None if mode is None else _check_mode(mode, "set_mode()")


@contextlib.contextmanager
def use_mode(mode: str) -> Iterator[None]:
    """Context manager that sets the mode for its body and restores the previous setting. Process-wide, as
    :func:`set_mode`: threads that switch modes at once see each other's (and overlapping bodies restore out of
    order)."""
    global _mode_override
    previous = _mode_override
    set_mode(mode)
    try:
        yield
    finally:
        _mode_override = previous


def eager_constant(fn: Callable) -> Callable:
    """Mark ``fn`` so that torch.compile calls it eagerly while tracing and uses its result as a constant.

    Same as ``torch.compiler.assume_constant_result`` (which sets this attribute), without importing
    torch._dynamo (about 1 s) at import time. Used for the loader, availability checks and logging,
    whose side effects (imports, locks, log records) cannot be traced.
    """
    setattr(fn, "_dynamo_marked_constant", True)  # an attribute Callable does not declare
    return fn


_logged: set[tuple[str, str, str, str]] = set()
_warned_missing: set[str] = set()


@eager_constant
def log_first_use(op: str, impl: str, device_type: str, dtype: str, passed_over: str = "") -> None:
    """Log at INFO the first run of each (op, impl, device type, dtype), with why the implementations preferred
    to it did not take the call (``passed_over``), e.g. the reference for a call that needs gradients."""
    key = (op, impl, device_type, dtype)
    if key not in _logged:
        _logged.add(key)
        logger.info("%s: %s (%s, %s%s)", op, impl, device_type, dtype.removeprefix("torch."),
                    f"; not {passed_over}" if passed_over else "")


@eager_constant
def warn_missing_once(op: str, reasons: str, fallback: str = "reference") -> None:
    """Warn once per op that a missing backend made it fall back to a slower implementation."""
    if op not in _warned_missing:
        _warned_missing.add(op)
        logger.warning("%s: falling back to the slower %s implementation because %s%s", op, fallback, reasons,
                       build_hint(reasons))


def build_hint(reasons: str) -> str:
    """The advice to (re)build rdm_fast where a compiled extension is among the missing backends' ``reasons``
    (a missing triton says itself how to install it)."""
    return f"; {BUILD_HINT}" if "rdm_fast._C" in reasons else ""


def _autocast_devices() -> frozenset[str]:
    """Device types autocast knows (``torch.is_autocast_enabled`` raises for others, e.g. meta); a constant set, so
    that torch.compile traces the check as one."""
    available = getattr(torch.amp.autocast_mode, "is_autocast_available", None)  # torch >= 2.4
    names = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "privateuseone")
    return frozenset(n for n in names if available(n)) if available is not None else frozenset({"cpu", "cuda"})


_AUTOCAST_DEVICES = _autocast_devices()


def autocast_inputs(op: Callable[Concatenate[Tensor, P], R]) -> Callable[Concatenate[Tensor, P], R]:
    """Let ``op`` run inside ``torch.autocast`` regions (mixed-precision training).

    There, convolutions and linear layers return autocast's lower-precision dtype while other tensors stay
    float32, but the ops take operands of one dtype. Under autocast the floating-point tensor arguments (all but
    ``out``, which the ops take by keyword only) are cast to that dtype, as autocast does for matrix products,
    and the op runs with autocast off.
    The ops keep their float32 statistics and accumulation, so only the rounding of their inputs and output
    changes. Outside autocast this adds one check.
    """
    @functools.wraps(op)
    def wrapper(x: Tensor, *args: P.args, **kwargs: P.kwargs) -> R:
        if not isinstance(x, Tensor):  # a NumPy array has a .device too (the string "cpu")
            raise TypeError(f"{op.__name__}: expected a torch.Tensor, got {type(x).__name__}")
        arrays = [f"argument {i + 2}" for i, a in enumerate(args) if isinstance(a, np.ndarray)]
        arrays += [k for k, v in kwargs.items() if isinstance(v, np.ndarray)]
        if arrays:
            raise TypeError(f"{op.__name__}: {', '.join(arrays)} must be a torch.Tensor, not a NumPy array")
        device = x.device.type
        if device not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
            return op(x, *args, **kwargs)
        dtype = torch.get_autocast_dtype(device)

        def cast(a):
            return a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a

        cast_kwargs = {k: v if k == "out" else cast(v) for k, v in kwargs.items()}
        call: Callable[..., R] = op  # the cast arguments are no longer typed as P
        with torch.autocast(device, enabled=False):
            return call(cast(x), *(cast(a) for a in args), **cast_kwargs)

    return wrapper


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record this call (of the fast impls only attention's has a backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@dataclass(eq=False)
class Impl(Generic[R]):
    """One implementation of an op.

    ``unavailable`` returns None when the backend can run at all (e.g. the extension loaded), else
    the reason; ``unsupported`` takes the op's arguments and returns None when this call is
    supported, else the reason. ``fast_mode_only`` impls are skipped in ``auto`` mode (Triton's CPU
    interpreter: correct but far slower than the reference, so only used when ``fast`` is forced).
    """

    name: str
    fn: Callable[..., R]
    unsupported: Callable[..., str | None] = lambda *args, **kwargs: None
    unavailable: Callable[[], str | None] = lambda: None
    fast_mode_only: bool = False

    def supports(self, *args: Any, **kwargs: Any) -> bool:
        """Whether this implementation is available and supports the call."""
        return self.unavailable() is None and self.unsupported(*args, **kwargs) is None


def _refusal(impl: Impl, *args: Any, **kwargs: Any) -> str | None:
    """Why an unavailable ``impl`` would refuse this call even if its backend were there (e.g. a call that needs
    gradients, which the inference-only kernels never take), from its argument check; None where the check lets
    the call through, or needs the missing backend itself (attention's asks the kernel module)."""
    try:
        return impl.unsupported(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a check that cannot run without its backend
        return None


@dataclass(eq=False)
class Op(Generic[R]):
    """An op with its implementations in preference order per device type."""

    name: str
    reference: Impl[R]
    by_device: dict[str, list[Impl[R]]] = field(default_factory=dict)

    def impl(self, name: str) -> Impl[R]:
        """The implementation called ``name`` (for tests and diagnostics)."""
        for impl in [self.reference, *(i for impls in self.by_device.values() for i in impls)]:
            if impl.name == name:
                return impl
        raise KeyError(f"{self.name}: no implementation named {name!r}")

    def select(self, device_type: str, *args: Any, **kwargs: Any) -> Impl[R]:
        """The implementation the current mode picks for this call."""
        return self._select(device_type, *args, **kwargs)[0]

    def _select(self, device_type: str, *args, **kwargs) -> tuple[Impl[R], list[str]]:
        """The implementation the current mode picks, and why the ones preferred to it do not support the call."""
        mode = get_mode()
        if mode == "reference":
            return self.reference, []
        reasons: list[str] = []
        missing = []
        for impl in self.by_device.get(device_type, ()):
            if impl.fast_mode_only and mode != "fast":
                continue
            why = impl.unavailable()
            if why is not None:
                refused = _refusal(impl, *args, **kwargs)
                if refused is None:  # the missing backend would have run it: worth a warning
                    missing.append(why)
                else:  # installing it would change nothing for this call (e.g. one that needs gradients)
                    why = refused
            else:
                why = impl.unsupported(*args, **kwargs)
                if why is None:
                    if missing:
                        warn_missing_once(self.name, "; ".join(missing), impl.name)
                    return impl, reasons
            reasons.append(f"{impl.name}: {why}")
        if mode == "fast":
            detail = "; ".join(reasons) if reasons else f"no fast implementation exists for {device_type} tensors"
            raise FastPathUnavailable(f"{self.name}: mode 'fast' but no fast implementation can run this call "
                                      f"({detail}){build_hint('; '.join(missing))}")
        if missing:
            warn_missing_once(self.name, "; ".join(missing))
        return self.reference, reasons

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> R:
        impl, passed_over = self._select(x.device.type, x, *args, **kwargs)
        # under torch.compile the reasons can hold symbolic sizes, which str.join cannot trace: logged without them
        why = "" if torch.compiler.is_compiling() else "; ".join(passed_over)
        log_first_use(self.name, impl.name, x.device.type, str(x.dtype), why)
        return impl.fn(x, *args, **kwargs)
