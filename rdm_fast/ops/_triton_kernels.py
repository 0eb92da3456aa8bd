"""Lazy import of one Triton kernel module (``rdm_fast.kernels.<name>``) for the ops' dispatch tables."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import torch
from torch import Tensor

from ._dispatch import Impl, Op, eager_constant

R = TypeVar("R")


def without_bfloat16(unsupported: Callable[..., str | None]) -> Callable[..., str | None]:
    """``unsupported`` of an impl that runs in Triton's interpreter, which computes bfloat16 wrongly (no error,
    wrong values): such calls are refused there too."""
    def check(*args, **kwargs) -> str | None:
        if any(isinstance(a, Tensor) and a.dtype == torch.bfloat16 for a in (*args, *kwargs.values())):
            return "bfloat16 is broken in the Triton interpreter"
        return unsupported(*args, **kwargs)

    return check


class TritonKernels:
    """Imports ``rdm_fast.kernels.<name>`` (hence triton) on first need; a failure is remembered, never raised.

    ``unavailable`` is the :class:`~rdm_fast.ops._dispatch.Impl` availability check of the CUDA impls,
    ``interpreter_unavailable`` the one of the CPU impls that run in Triton's interpreter (only when
    ``TRITON_INTERPRET=1``, which must be set before the kernel module is imported).
    """

    def __init__(self, name: str) -> None:
        self.name = f"rdm_fast.kernels.{name}"
        self._module: ModuleType | None = None
        self._error: str | None = None

        @eager_constant
        def unavailable() -> str | None:
            return self._load()

        @eager_constant
        def interpreter_unavailable() -> str | None:
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "the Triton interpreter is off (set TRITON_INTERPRET=1 before importing rdm_fast)"
            return self._load()

        self.unavailable: Callable[[], str | None] = unavailable
        self.interpreter_unavailable: Callable[[], str | None] = interpreter_unavailable

    def _load(self) -> str | None:
        if self._module is None and self._error is None:
            try:
                self._module = importlib.import_module(self.name)
            except Exception as exc:  # optional dependency: a missing or broken triton must not break the op
                missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "triton"
                self._error = f"triton kernels unavailable ({type(exc).__name__}: {exc}" + \
                    ("; pip install triton)" if missing else ")")
        return self._error

    @property
    def module(self) -> ModuleType:
        """The kernel module (call an availability check first)."""
        if self._module is None:
            raise RuntimeError(f"{self.name} is not loaded: {self._load() or 'call unavailable() first'}")
        return self._module

    def op(self, name: str, reference: Callable[..., R], unsupported: Callable[..., str | None]) -> Op[R]:
        """The usual table of an op whose fast path is this module's function ``name``: the Triton kernel on
        CUDA, the same kernel in Triton's interpreter on the CPU (``fast`` mode only), else ``reference``."""

        def fast(*args, **kwargs):
            return getattr(self.module, name)(*args, **kwargs)  # loaded by the availability check

        return Op(name, reference=Impl("reference", reference), by_device={
            "cpu": [Impl("triton-interpreter", fast, without_bfloat16(unsupported), self.interpreter_unavailable,
                         fast_mode_only=True)],
            "cuda": [Impl("triton", fast, unsupported, self.unavailable)],
        })
