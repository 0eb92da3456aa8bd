"""The official checkpoints' tensor names and shapes (tests/data/*.tsv, copied from the project's reference
notes: lines ``name<TAB>[shape]``, sections headed ``# <title>: N tensors, M elements``)."""

from __future__ import annotations

import math
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
IMAGENET_TSV = DATA / "rdm_imagenet_checkpoint_keys.tsv"
RDM768_TSV = DATA / "rdm768_checkpoint_keys.tsv"

Shapes = dict[str, tuple[int, ...]]


def parse_tsv(path: Path) -> dict[str, tuple[Shapes, int, int]]:
    """{section header: (name -> shape, declared tensor count, declared element count)}."""
    sections: dict[str, tuple[Shapes, int, int]] = {}
    cur = None
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            m = re.search(r"([\d,]+) tensors, ([\d,]+) elements", line)
            assert m, line
            cur = line[1:].strip()
            sections[cur] = ({}, int(m.group(1).replace(",", "")), int(m.group(2).replace(",", "")))
            continue
        name, shape = line.split("\t")
        inner = shape.strip().strip("[]").strip()
        sections[cur][0][name] = tuple(int(v) for v in inner.split(",")) if inner else ()
    return sections


def all_keys(path: Path) -> Shapes:
    """Every tensor of the file, all sections together."""
    out: Shapes = {}
    for shapes, _, _ in parse_tsv(path).values():
        out.update(shapes)
    return out


def section(path: Path, startswith: str, prefix: str) -> tuple[Shapes, int, int]:
    """One section, its names stripped of ``prefix``; checks the section against its declared counts."""
    for header, (d, n, e) in parse_tsv(path).items():
        if header.startswith(startswith):
            assert len(d) == n and sum(math.prod(s) for s in d.values()) == e, f"TSV section {header} inconsistent"
            assert all(k.startswith(prefix) for k in d)
            return {k[len(prefix):]: v for k, v in d.items()}, n, e
    raise AssertionError(f"no section {startswith!r} in {path}")
