"""A digest of the C++/CUDA sources in ``csrc/``: compiled into the extensions by setup.py, compared at load time
with a source checkout's, so that a stale build (an older ``pip install``) is not used with newer sources.

Standard library only: setup.py loads this file on its own, before the package is built.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def csrc_digest(directory: str | Path) -> str:
    """16 hex digits of SHA-256 over the names and bytes of the C++/CUDA files in ``directory``, in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(directory).iterdir() if p.suffix in SUFFIXES and p.is_file()):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]
