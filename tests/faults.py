"""Write failures injected into rdm_fast's writers: what a full disk leaves behind is tested with them."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest


def fail_writes_to(monkeypatch: pytest.MonkeyPatch, module: object, writer: str, file_name: str | None = None,
                   code: int = errno.ENOSPC) -> Callable:
    """Make ``module.writer(target, ...)`` raise the OSError of ``code`` (a full disk by default), naming the target,
    where the target's name is ``file_name`` (every target when None); other targets are written as before.
    Returns the real writer (to put back with ``monkeypatch.setattr``)."""
    real = getattr(module, writer)

    def failing(target, *args, **kwargs):
        if file_name is None or Path(target).name == file_name:
            raise OSError(code, os.strerror(code), str(target))
        return real(target, *args, **kwargs)

    monkeypatch.setattr(module, writer, failing)
    return real
