"""Lazy loading of the compiled operator libraries ``rdm_fast._C`` and ``rdm_fast._C_cuda``.

Nothing is loaded at import time: :func:`load` runs on the first use of a fast op (or of
:func:`rdm_fast.ops.available_backends`). A missing or broken extension is logged, never raised;
callers ask :func:`cpu_loaded` / :func:`cuda_loaded` and fall back to the reference.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .. import SOURCE_CHECKOUT
from .._sources import csrc_digest

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
        stale = stale_build(module)
        if stale is None:
            _loaded[module] = True
        else:
            _errors[module] = stale
            logger.warning("%s: not using it (%s)", stale, BUILD_HINT)


# csrc/ of the source checkout this package runs from, if it does (None for an installed package)
CHECKOUT_CSRC = None if SOURCE_CHECKOUT is None else Path(SOURCE_CHECKOUT) / "csrc"


def stale_build(module: str, csrc: Path | None = CHECKOUT_CSRC) -> str | None:
    """Why the imported ``module`` does not fit the sources in ``csrc`` (None where it does, or where there are no
    sources to compare with): run from a source checkout, rdm_fast finds its extensions in an installed copy, which
    may have been built from older sources."""
    if csrc is None or not csrc.is_dir():
        return None
    built = getattr(sys.modules[module], "csrc_digest", "unknown")
    if built == csrc_digest(csrc):
        return None
    where = getattr(sys.modules[module], "__file__", module)
    return f"{module} ({where}) was built from other C++/CUDA sources than {csrc} (digest {built}, sources " \
           f"{csrc_digest(csrc)}): a stale build"


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
