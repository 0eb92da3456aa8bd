"""Reading embedding files: ``.npy`` arrays (N, D) and the official ``{N}x{D}-part_{i}.npz`` database parts."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np


def _part_index(path: Path) -> tuple[int, str]:
    m = re.search(r"part_(\d+)", path.name)
    return (int(m.group(1)) if m else -1, path.name)


def load_embeddings(path: str | Path) -> np.ndarray:
    """(N, D) float embeddings from a ``.npy`` file, an ``.npz`` with an ``embedding`` array, or a directory of
    such files (official part files are concatenated in part order). ``.npy`` files are memory-mapped."""
    path = Path(path)
    if path.is_dir():
        files = sorted([*path.glob("*.npz"), *path.glob("*.npy")], key=_part_index)
        if not files:
            raise FileNotFoundError(f"{path} holds no .npy or .npz embedding files")
        parts = [load_embeddings(f) for f in files]
        dims = {p.shape[1] for p in parts}
        if len(dims) != 1:
            raise ValueError(f"the embedding files in {path} have different dimensions: {sorted(dims)}")
        return np.concatenate(parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "embedding" not in z.files:
                    raise ValueError(f"{path} has no 'embedding' array (it has {z.files})")
                arr = z["embedding"]
        else:
            raise ValueError(f"{path}: expected a .npy or .npz embedding file")
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable numpy file ({e})") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{path} holds a {arr.dtype} array of shape {arr.shape}; expected float (N, D) embeddings")
    return arr
