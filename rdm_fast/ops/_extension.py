"""Lazy loading of the compiled operator libraries ``rdm_fast._C`` and ``rdm_fast._C_cuda``.

Nothing is loaded at import time: :func:`load` runs on the first use of a fast op (or of
:func:`rdm_fast.ops.available_backends`). A missing or broken extension is logged, never raised;
callers ask :func:`cpu_loaded` / :func:`cuda_loaded` and fall back to the reference.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable

logger = logging.getLogger("rdm_fast.ops")

BUILD_HINT = "build it with `pip install --no-build-isolation .` from the rdm_fast source tree"

_lock = threading.RLock()
_attempted = False
_loaded: dict[str, bool] = {"rdm_fast._C": False, "rdm_fast._C_cuda": False}
_errors: dict[str, str] = {}
_post_load_hooks: list[Callable[[], None]] = []


def _import(module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        _errors[module] = f"{module} is not built"
        logger.info("%s is not available: %s", module, _errors[module])
    except (ImportError, OSError) as exc:  # present but unloadable (ABI / torch mismatch, missing lib)
        _errors[module] = f"{module} failed to load: {exc}"
        logger.warning("%s; rebuild it against the installed torch (%s)", _errors[module], BUILD_HINT)
    else:
        _loaded[module] = True


def load() -> None:
    """Import the CPU extension, then the CUDA one; idempotent and thread-safe."""
    global _attempted
    if _attempted:
        return
    with _lock:
        if _attempted:
            return
        _import("rdm_fast._C")
        _import("rdm_fast._C_cuda")
        _attempted = True
        if _loaded["rdm_fast._C"]:
            for hook in _post_load_hooks:
                hook()


def add_post_load_hook(hook: Callable[[], None]) -> None:
    """Run ``hook`` once the operator schemas are registered (immediately if they already are)."""
    with _lock:
        _post_load_hooks.append(hook)
        run_now = _attempted and _loaded["rdm_fast._C"]
    if run_now:
        hook()


def cpu_loaded() -> bool:
    """Whether ``rdm_fast._C`` (schemas and CPU kernels) is loaded, loading it if needed."""
    load()
    return _loaded["rdm_fast._C"]


def cuda_loaded() -> bool:
    """Whether ``rdm_fast._C_cuda`` (CUDA kernels) is loaded, loading it if needed."""
    load()
    return _loaded["rdm_fast._C"] and _loaded["rdm_fast._C_cuda"]


def load_error(module: str) -> str | None:
    """Why ``module`` is not loaded (None when it is, or before :func:`load` ran)."""
    return _errors.get(module)
