"""The environment of the tests' child Python processes (entry points, torchrun, interpreter runs)."""

from __future__ import annotations

import os
import site
from pathlib import Path

import rdm_fast

TESTS = Path(__file__).resolve().parent


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with a PYTHONPATH under which a child imports the same rdm_fast as this
    process (the installed copy for ``pytest tests/``, the checkout for ``python -m pytest`` from its root) and
    the tests' helper modules."""
    env = {**os.environ, **extra}
    pkg_parent = str(Path(rdm_fast.__file__).resolve().parent.parent)
    paths = [] if pkg_parent in site.getsitepackages() else [pkg_parent]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH"), str(TESTS)]))
    return env
