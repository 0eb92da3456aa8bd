"""Image embedding databases on disk: a directory of memory-mapped float16 shards plus a JSON manifest.

Format (``format_version`` 1)::

    DB/
      manifest.json       written last; a directory without it is not (yet) a database
      emb_00000.npy       (n_0, D) float16, opened with np.load(mmap_mode="r")
      meta_00000.npz      uncompressed: sources (n_0,) str, class_id (n_0,) int64 (-1 unknown),
                          patch_coords (n_0, 2) int32 (x, y of the crop's top-left corner; -1 unknown)
      emb_00001.npy ...
      index_<kind>.faiss  optional FAISS index (``python -m rdm_fast.db index``)
      proposals.npy       optional (N, 2) int64 [id, count]: every entry ranked by how often it was a training
                          neighbour (descending count, ties by lower id), for top-m unconditional sampling
      progress/           build bookkeeping (arguments and one done-record per finished shard; see build.py)

``manifest.json`` holds ``format`` ("rdm_fast-database"), ``format_version``, ``encoder`` ({name, dim,
normalized}: the encoder that made the vectors; queries must come from the same one), ``dim``, ``count``,
``dtype`` ("float16"), ``has_sources`` / ``has_class_ids`` / ``has_patch_coords`` (whether the metadata
arrays hold real values or only the unknown markers), ``shards`` (a list of {embeddings, meta, rows, bytes,
sha256, meta_bytes, meta_sha256}), ``index`` (null or {file, kind, params}), ``proposals`` (null or {file,
queries, k, ...}), ``image_root`` (directory that relative ``sources`` are resolved against, or null),
``skipped`` ({count, files}: inputs that could not be read) and ``build`` (how the database was made).

Global ids are row numbers in shard order. Every file is written under a temporary name and renamed into
place, the manifest last, so a killed writer never leaves a truncated file under a final name. Opening
checks each shard's size against the manifest (and its SHA-256 with ``verify=True``).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import numbers
import os
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor
from tqdm.auto import tqdm

from .._distributed import parse_device
from .._files import (array_file_problem, atomic_save_npy, atomic_save_npz, atomic_write_json, remove_stale_temps,
                      sha256_file)
from .search import check_count, check_k, exact_search
from ..encoders.base import Encoder, check_encoder_arg, embed_images, embed_texts
from ..images import check_image_range

log = logging.getLogger("rdm_fast.retrieval")

FORMAT = "rdm_fast-database"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROPOSALS = "proposals.npy"
BACKENDS = ("auto", "torch", "triton", "faiss")
SCAN_ROWS = 1 << 20  # rows of a ranking checked at a time


def shard_names(j: int) -> tuple[str, str]:
    """File names of shard ``j``: (embeddings .npy, metadata .npz)."""
    return f"emb_{j:05d}.npy", f"meta_{j:05d}.npz"


def _check_finite(rows: np.ndarray, row_name: Callable[[int], str]) -> None:
    """ValueError naming the first of ``rows`` that is not finite once stored as float16 (NaN, Inf, or beyond
    +-65504): search would rank it arbitrarily."""
    with np.errstate(over="ignore"):  # values beyond float16 become inf
        finite = np.isfinite(rows.astype(np.float16, copy=False)).all(1)
    if not finite.all():
        raise ValueError(f"{row_name(int(np.argmin(finite)))}: the embedding is not finite (NaN or Inf, or beyond "
                         "float16's +-65504); refusing to store it")


def write_shard(directory: str | Path, j: int, embeddings: np.ndarray, *,
                sources: Sequence[str] | np.ndarray | None = None,
                class_ids: np.ndarray | None = None, patch_coords: np.ndarray | None = None,
                row_name: Callable[[int], str] | None = None) -> dict:
    """Write shard ``j`` (embeddings as float16, metadata with unknown markers where not given) atomically;
    returns its manifest entry (names, rows, sizes, checksums). A row that is not finite as float16 (NaN, Inf,
    or beyond +-65504) is refused, since search would rank it arbitrarily; ``row_name(i)`` names the shard's
    row ``i`` in that error (default: "shard j row i")."""
    directory = Path(directory)
    with np.errstate(over="ignore"):  # values beyond float16 become inf: reported below
        emb = np.ascontiguousarray(embeddings, dtype=np.float16)
    if emb.ndim != 2:
        raise ValueError(f"shard embeddings must be (n, D), got shape {emb.shape}")
    _check_finite(emb, row_name or (lambda i: f"shard {j} row {i}"))
    n = emb.shape[0]
    if sources is None:
        src = np.full(n, "", dtype="<U1")
    else:  # bytes decode as ASCII, numbers print as in str()
        src = (sources.astype(np.str_) if isinstance(sources, np.ndarray) else np.array(list(sources), np.str_))
        src = src.reshape(n).astype(f"<U{max(1, int(np.char.str_len(src).max(initial=0)))}")  # narrowest width
    cls = np.full(n, -1, np.int64) if class_ids is None else np.asarray(class_ids, np.int64).reshape(n)
    xy = np.full((n, 2), -1, np.int32) if patch_coords is None else np.asarray(patch_coords, np.int32).reshape(n, 2)
    emb_name, meta_name = shard_names(j)
    atomic_save_npy(directory / emb_name, emb)
    atomic_save_npz(directory / meta_name, sources=src, class_id=cls, patch_coords=xy)
    return {"embeddings": emb_name, "meta": meta_name, "rows": n,
            "bytes": (directory / emb_name).stat().st_size, "sha256": sha256_file(directory / emb_name),
            "meta_bytes": (directory / meta_name).stat().st_size, "meta_sha256": sha256_file(directory / meta_name)}


def new_manifest(encoder_info: dict, shards: list[dict], *, has_sources: bool, has_class_ids: bool,
                 has_patch_coords: bool, **extra: Any) -> dict:
    """A version-1 manifest for ``shards`` made by the encoder described by ``encoder_info``."""
    info = {"name": str(encoder_info["name"]), "dim": int(encoder_info["dim"]),
            "normalized": bool(encoder_info["normalized"])}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "encoder": info, "dim": info["dim"],
                "count": sum(int(s["rows"]) for s in shards), "dtype": "float16", "has_sources": has_sources,
                "has_class_ids": has_class_ids, "has_patch_coords": has_patch_coords, "shards": shards,
                "index": None, "proposals": None, "image_root": None, "skipped": {"count": 0, "files": []},
                "build": None}
    manifest.update(extra)
    return manifest


RESERVED_KEYS = ("format", "format_version", "encoder", "dim", "count", "dtype", "has_sources", "has_class_ids",
                 "has_patch_coords", "shards", "index", "proposals")  # what a manifest's reader relies on


def _extra_entries_problem(manifest: dict) -> str | None:
    """Why an entry that rdm_fast's readers interpret beyond the reserved ones (``image_root``, ``build``,
    ``skipped``, ``enlarged``: db info, db search, training data, ``Database.encoder_spec``) has a form they cannot
    read, or None. Each may be absent."""
    if manifest.get("image_root") is not None and not isinstance(manifest["image_root"], str):
        return f"image_root {manifest['image_root']!r} is not a directory (a string) or null"
    for key in ("build", "enlarged"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            return f"{key} {manifest[key]!r} is not a dict or null"
    skipped = manifest.get("skipped")
    if "skipped" in manifest and not (isinstance(skipped, dict) and isinstance(skipped.get("count"), int)
                                      and not isinstance(skipped["count"], bool) and skipped["count"] >= 0
                                      and isinstance(skipped.get("files"), list)):
        return f"skipped {skipped!r} is not {{count: int >= 0, files: list}}"
    return None


def json_values(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` as they read back from the manifest's JSON (NumPy scalars and arrays as numbers and lists);
    TypeError naming a key whose value JSON cannot hold, before anything is written."""
    def plain(value: Any) -> Any:
        if isinstance(value, (np.generic, np.ndarray)):
            return value.tolist()
        raise TypeError
    out = {}
    for key, value in values.items():
        try:
            out[key] = json.loads(json.dumps(value, default=plain))
        except (TypeError, ValueError):
            raise TypeError(f"{where}: {key}={value!r} cannot be stored in the manifest (it holds JSON: numbers, "
                            "strings, lists and dicts)") from None
    return out


def write_manifest(directory: str | Path, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (the step that makes a directory a database)."""
    atomic_write_json(Path(directory) / MANIFEST, manifest)


def update_manifest(directory: str | Path, change: Callable[[dict], None]) -> dict:
    """Read the manifest, apply ``change`` to it in place, write it back atomically; returns the new one."""
    manifest = read_manifest(directory)
    change(manifest)
    write_manifest(directory, manifest)
    return manifest


def check_encoder_info(encoder_info: Any, where: str) -> None:
    """TypeError/ValueError (prefixed with ``where``) unless ``encoder_info`` is a dict {name: str, dim: positive
    int, normalized: bool}, as ``Encoder.info()`` returns: the manifest records it, and queries are checked
    against it."""
    if not isinstance(encoder_info, dict):
        raise TypeError(f"{where}: encoder_info must be a dict {{name, dim, normalized}} (e.g. encoder.info()), got "
                        f"{type(encoder_info).__name__}")
    missing = [key for key in ("name", "dim", "normalized") if key not in encoder_info]
    if missing:
        raise ValueError(f"{where}: encoder_info lacks {', '.join(map(repr, missing))}: it must hold name, dim and "
                         f"normalized (e.g. encoder.info()), got {encoder_info!r}")
    name, dim, normalized = encoder_info["name"], encoder_info["dim"], encoder_info["normalized"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: encoder_info's name must be a non-empty string, got {name!r}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"{where}: encoder_info's dim must be a positive integer, got {dim!r}")
    if not isinstance(normalized, (bool, np.bool_)):
        raise ValueError(f"{where}: encoder_info's normalized must be True or False, got {normalized!r}")


def write_database(path: str | Path, embeddings: np.ndarray | Tensor, encoder_info: dict, *,
                   sources: Sequence[str] | None = None, class_ids: np.ndarray | None = None,
                   patch_coords: np.ndarray | None = None, shard_size: int = 100_000, **extra: Any) -> Path:
    """Write in-memory (N, D) embeddings (and optional per-row metadata) as a database directory."""
    check_encoder_info(encoder_info, "write_database")
    if isinstance(embeddings, Tensor):
        embeddings = embeddings.detach().cpu()
        embeddings = (embeddings.float() if embeddings.dtype == torch.bfloat16 else embeddings).numpy()  # no NumPy
        # bfloat16; other dtypes convert to float16 directly, as NumPy arrays do
    emb = np.asarray(embeddings)
    dim = encoder_info["dim"]
    if isinstance(sources, (str, bytes)):  # list("abc") would be three one-letter sources
        raise TypeError("write_database: sources must be a sequence of strings (one per row), got a single string")
    shard_size = check_count(shard_size, "write_database: shard_size")
    if emb.dtype.kind != "f":  # ints and bools are no embeddings; complex ones would lose their imaginary part
        raise ValueError(f"embeddings must be floating point, got {emb.dtype}")
    if emb.ndim != 2 or emb.shape[1] != int(dim):
        raise ValueError(f"embeddings of shape {emb.shape} do not match the encoder's dim {dim}")
    n = emb.shape[0]
    if sources is not None:
        sources = list(sources)
        if len(sources) != n:
            raise ValueError(f"sources has {len(sources)} values, expected {n} for {n} embeddings")
    for name, value, shape in (("class_ids", class_ids, (n,)), ("patch_coords", patch_coords, (n, 2))):
        if value is None:
            continue
        if np.shape(value) != shape:  # a (2, N) array of corners was read as (N, 2) pairs
            raise ValueError(f"{name} must have shape {shape} for {n} embeddings, got {np.shape(value)}")
        if np.size(value) and np.asarray(value).dtype.kind not in "iu":  # 0.5 was stored as 0
            raise ValueError(f"{name} must be integers, got {np.asarray(value).dtype}")
        stored = np.iinfo(np.int64 if name == "class_ids" else np.int32)  # wrapped: 2**64 - 1 became -1 ("none")
        if np.size(value) and not stored.min <= np.asarray(value).min() <= np.asarray(value).max() <= stored.max:
            raise ValueError(f"{name} are stored as {stored.dtype}, whose range [{stored.min}, {stored.max}] does "
                             f"not hold {np.asarray(value).min()} to {np.asarray(value).max()}")
    reserved = sorted(set(extra) & set(RESERVED_KEYS))
    if reserved:
        raise ValueError(f"write_database: {', '.join(reserved)} {'is' if len(reserved) == 1 else 'are'} the "
                         "manifest's own (written by rdm_fast), not a keyword")
    extra = json_values(extra, "write_database")
    problem = _extra_entries_problem(extra)  # a database every later reader of these entries would fail on
    if problem:
        raise ValueError(f"write_database: {problem}")
    for start in range(0, n, shard_size):  # every row checked before the first shard is written, a shard at a time
        _check_finite(emb[start:start + shard_size], lambda i: f"embeddings row {start + i}")  # called at once
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if (path / MANIFEST).exists():
        raise FileExistsError(f"{path / MANIFEST} already exists: write the database into a new directory")
    shards = []
    for j, start in enumerate(range(0, max(n, 1), shard_size)):  # rows checked above
        sl = slice(start, start + shard_size)
        shards.append(write_shard(path, j, emb[sl], sources=None if sources is None else sources[sl],
                                  class_ids=None if class_ids is None else np.asarray(class_ids)[sl],
                                  patch_coords=None if patch_coords is None else np.asarray(patch_coords)[sl]))
    write_manifest(path, new_manifest(encoder_info, shards, has_sources=sources is not None,
                                      has_class_ids=class_ids is not None,
                                      has_patch_coords=patch_coords is not None, **extra))
    return path


def _plain_name(value: Any, what: str, file: Path) -> str:
    if not isinstance(value, str) or not value or Path(value).name != value or value.startswith("."):
        raise ValueError(f"{file} is corrupted: {what} {value!r} is not a plain file name")
    return value


def read_manifest(directory: str | Path) -> dict:
    """The checked manifest of the database in ``directory`` (one-line errors naming the file)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"a database directory must be a str or Path, got {type(directory).__name__}")
    directory = Path(directory)
    file = directory / MANIFEST
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a database directory")
    if not directory.is_dir():
        raise FileNotFoundError(f"database directory {directory} does not exist")
    if not file.is_file():
        hint = (" (its build did not finish: rerun the same build command to resume)"
                if (directory / "progress").is_dir() else "")
        raise FileNotFoundError(f"{file} is missing: {directory} is not an rdm_fast database{hint}")
    try:
        m = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is corrupted: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{file} is not an rdm_fast database manifest (no \"format\": \"{FORMAT}\")")
    version = m.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"{file} is corrupted: format_version is {version!r}, expected an integer")
    if version > FORMAT_VERSION:
        raise ValueError(f"{file} has format_version {version}, but this rdm_fast reads up to version "
                         f"{FORMAT_VERSION}: upgrade rdm_fast")
    try:
        enc, dim, count, shards = m["encoder"], m["dim"], m["count"], m["shards"]
        if not (isinstance(enc, dict) and isinstance(enc["name"], str) and enc["dim"] == dim
                and isinstance(enc["normalized"], bool)):
            raise ValueError("encoder must be {name, dim (= dim), normalized}")
        if not isinstance(dim, int) or dim < 1 or not isinstance(count, int) or count < 0:
            raise ValueError(f"dim {dim!r} / count {count!r} are not valid sizes")
        if m["dtype"] != "float16":
            raise ValueError(f"dtype {m['dtype']!r} is not float16")
        for key in ("has_sources", "has_class_ids", "has_patch_coords"):
            if not isinstance(m[key], bool):
                raise ValueError(f"{key} must be true or false")
        if not isinstance(shards, list) or sum(int(s["rows"]) for s in shards) != count:
            raise ValueError(f"the shards' rows do not add up to count {count}")
        for s in shards:
            _plain_name(s["embeddings"], "shard file", file)
            _plain_name(s["meta"], "metadata file", file)
            for key in ("rows", "bytes", "meta_bytes"):
                if not isinstance(s[key], int) or s[key] < 0:
                    raise ValueError(f"shard {s['embeddings']}: {key} {s[key]!r} is not a size")
        for key in ("index", "proposals"):
            if m.get(key) is not None:
                _plain_name(m[key].get("file"), f"{key} file", file)
        problem = _extra_entries_problem(m)
        if problem:
            raise ValueError(problem)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{file} is corrupted: missing or malformed entry {e}") from None
    except ValueError as e:
        if str(e).startswith(str(file)):
            raise
        raise ValueError(f"{file} is corrupted: {e}") from None
    return m


# rerunning the build repairs a missing or resized shard file (retrieval.build.damaged_shard)
REPAIR = "rerun the db build or db import-npz that made the database (it computes that shard again), or restore it"


def check_shard_file(path: Path, size: int, sha256: str | None, verify: bool) -> None:
    """FileNotFoundError or ValueError (with the repair) unless the shard file ``path`` exists with the recorded
    ``size`` (and, with ``verify``, its SHA-256)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (listed in {MANIFEST}): {REPAIR}")
    actual = path.stat().st_size
    if actual != size:
        raise ValueError(f"{path} has {actual} bytes but {MANIFEST} records {size}: it is truncated or was "
                         f"replaced; {REPAIR}")
    if verify and sha256_file(path) != sha256:
        raise ValueError(f"{path} does not match its SHA-256 checksum in {MANIFEST}: it is corrupted; delete it, "
                         f"then {REPAIR}")


def _open_shard(path: Path, rows: int, dim: int) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npy array ({array_file_problem(path, e)})") from None
    if arr.shape != (rows, dim) or arr.dtype != np.float16:
        raise ValueError(f"{path} holds {arr.dtype} {arr.shape}, but {MANIFEST} records float16 ({rows}, {dim})")
    return arr


def _utf8(strings: np.ndarray) -> np.ndarray:
    """NumPy strings as UTF-8 bytes (a quarter of the memory for ASCII): ASCII in one C-level cast, else element by
    element, keeping names that are not UTF-8 (os.fsdecode's surrogates) for the decode."""
    try:
        return strings.astype(np.bytes_)
    except UnicodeEncodeError:
        return np.char.encode(strings, "utf-8", "surrogateescape")


def _scattered_rows(shard: np.ndarray) -> np.ndarray:
    """Another memory map of a shard's file, for reads of scattered rows (neighbour gathers, re-ranking): advised
    MADV_RANDOM, the kernel reads the pages asked for instead of its read-ahead of up to megabytes around each.
    The streaming scans keep the default map, whose read-ahead they need."""
    if not isinstance(shard, np.memmap) or shard.filename is None:
        return shard
    scattered = np.load(shard.filename, mmap_mode="r", allow_pickle=False)
    mapped = getattr(scattered, "_mmap", None)  # numpy's own mmap object (none for an empty shard)
    if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return scattered


class TorchExactSearch:
    """Exact cosine search in PyTorch over the memory-mapped float16 shards, streamed in row chunks, so only
    one chunk at a time is in memory (on ``device``). Ties are broken by the lower id."""

    name = "torch-exact"

    def __init__(self, shards: Sequence[np.ndarray], *, device: str | torch.device = "cpu",
                 chunk_rows: int = 65536) -> None:
        self.shards, self.device, self.chunk_rows = list(shards), torch.device(device), chunk_rows

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(scores, ids) of the k most similar entries per query, best first (see ``exact_search``)."""
        return exact_search(queries.to(self.device), self.shards, k, chunk=self.chunk_rows)


def _as_index_array(ids: Any) -> tuple[np.ndarray, tuple[int, ...], torch.device]:
    t = ids if isinstance(ids, Tensor) else torch.as_tensor(np.asarray(ids))
    if not t.numel():  # an empty list reads as float64
        t = t.long()
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"ids must be integers, got {t.dtype}")
    return t.reshape(-1).cpu().numpy().astype(np.int64), tuple(t.shape), t.device


class Database:
    """An opened embedding database: metadata, stored vectors and k-nearest-neighbour search by cosine.

    Use :meth:`open`. The search backend is picked at open time (``backend``) and built on the first search.
    """

    def __init__(self, path: Path, manifest: dict, shards: list[np.ndarray], backend: str,
                 device: torch.device, backend_options: dict) -> None:
        self.path, self.manifest, self._shards = path, manifest, shards
        self.device, self._backend_kind, self._backend_options = device, backend, backend_options
        self._offsets = np.cumsum([0] + [s.shape[0] for s in shards]).astype(np.int64)
        self._meta: dict[tuple[int, str], np.ndarray] = {}
        self._scattered: list[np.ndarray] | None = None  # the shards mapped for random rows, made on first use
        self._engine = None
        self._proposals: np.ndarray | None = None

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, *, backend: str = "auto", device: str | torch.device | None = None,
             verify: bool = False, nprobe: int | None = None, ef_search: int | None = None,
             chunk_rows: int = 65536) -> "Database":
        """Open the database directory ``path``.

        ``backend``: "auto" (Triton exact search when CUDA is usable, else the FAISS index when the database has
        one, else exact PyTorch search over the memory-mapped shards), or force "torch", "triton" or "faiss".
        ``device``: where searches run (default: CUDA when available, else the CPU). ``verify`` checks the SHA-256
        of every shard's embeddings and metadata (reads them all; the index and proposals files have no
        checksum); their sizes are always checked. ``nprobe``/``ef_search`` tune FAISS
        indexes (an ``nprobe`` that the backend ignores is warned about); ``chunk_rows`` (an int >= 1) is the torch
        backend's streaming block.
        """
        if not isinstance(path, (str, Path)) and not hasattr(path, "__fspath__"):
            raise TypeError(f"Database.open: path must be a str or a path-like object (the database directory), "
                            f"got {type(path).__name__}")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
            raise ValueError(f"Database.open: chunk_rows must be an int >= 1, got {chunk_rows!r}")
        chunk_rows = int(chunk_rows)
        if device is not None:
            parse_device(device)  # a bad name or a missing GPU, before the shards are read
        if backend not in BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        path = Path(path)
        manifest = read_manifest(path)
        shards = []
        # hashing a large database takes minutes: a bar over its bytes (in terminals)
        with tqdm(total=sum(s["bytes"] + s["meta_bytes"] for s in manifest["shards"]), desc="verifying", unit="B",
                  unit_scale=True, disable=None if verify else True) as bar:
            for s in manifest["shards"]:
                check_shard_file(path / s["embeddings"], s["bytes"], s.get("sha256"), verify)
                check_shard_file(path / s["meta"], s["meta_bytes"], s.get("meta_sha256"), verify)
                shards.append(_open_shard(path / s["embeddings"], s["rows"], manifest["dim"]))
                bar.update(s["bytes"] + s["meta_bytes"])
        if manifest.get("proposals"):
            proposals = manifest["proposals"]
            if not (path / proposals["file"]).is_file():
                raise FileNotFoundError(f"{path / proposals['file']} is missing (listed in {MANIFEST})")
        if verify and manifest.get("index"):
            if not (path / manifest["index"]["file"]).is_file():
                raise FileNotFoundError(f"{path / manifest['index']['file']} is missing (listed in {MANIFEST}): "
                                        f"rebuild it with python -m rdm_fast.db index {path}")
            changed = _index_changed(path, manifest["index"])
            if changed:
                raise ValueError(changed)
        dev = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        kind = cls._pick_backend(path, manifest, backend, dev)
        db = cls(path, manifest, shards, kind, dev, {"nprobe": nprobe, "ef_search": ef_search,
                                                      "chunk_rows": chunk_rows,
                                                      "devices": None if device is None else [dev]})
        if nprobe is not None and db.backend != "faiss-ivfpq":  # a setting that changes nothing, said once
            log.warning("--nprobe applies to ivfpq indexes only; this search runs %s, which ignores it", db.backend)
        # the search backend is logged at the first search: the commands that only read (db info, build, train)
        # open with backend "torch", which is not the one their database's searches use
        log.info("opened %s: %d x %d embeddings from %s", path, len(db), db.dim, db.encoder_name)
        return db

    @staticmethod
    def _triton_unavailable(device: torch.device) -> str | None:
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"the Triton search runs on CUDA GPUs only (device is {device})"
        try:
            from .gpu_search import GPUExactSearch
        except ImportError as e:
            return f"rdm_fast.retrieval.gpu_search cannot be imported ({e})"
        return GPUExactSearch.unavailable()

    @staticmethod
    def _faiss_unavailable(path: Path, manifest: dict) -> str | None:
        if not manifest.get("index"):
            return f"{path} has no FAISS index (build one with: python -m rdm_fast.db index {path})"
        try:
            from . import faiss_index  # noqa: F401
        except ImportError as e:
            return f"FAISS is not usable here ({e}); install faiss-cpu or faiss-gpu"
        if not (path / manifest["index"]["file"]).is_file():
            return f"{path / manifest['index']['file']} is missing (listed in {MANIFEST})"
        return _index_changed(path, manifest["index"])

    @classmethod
    def _pick_backend(cls, path: Path, manifest: dict, backend: str, device: torch.device) -> str:
        if backend == "auto":
            if cls._triton_unavailable(device) is None:
                return "triton"
            if manifest.get("index"):
                why = cls._faiss_unavailable(path, manifest)
                if why is None:
                    return "faiss"
                log.warning("%s: its %s index cannot be used (%s): searching exactly instead", path,
                            manifest["index"].get("kind", "FAISS"), why)
            return "torch"
        why = {"torch": lambda: None, "triton": lambda: cls._triton_unavailable(device),
               "faiss": lambda: cls._faiss_unavailable(path, manifest)}[backend]()
        if why is not None:
            raise ValueError(f"search backend {backend!r} is unavailable: {why}")
        return backend

    # ---------------------------------------------------------------- properties
    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        return f"Database({str(self.path)!r}, {len(self)} x {self.dim}, encoder={self.encoder_name!r})"

    @property
    def dim(self) -> int:
        """Width of the stored embeddings."""
        return int(self.manifest["dim"])

    @property
    def encoder_info(self) -> dict:
        """The encoder that made the embeddings, as recorded: {"name", "dim", "normalized"}."""
        return dict(self.manifest["encoder"])

    @property
    def encoder_name(self) -> str:
        """Name of the encoder that made the embeddings (queries must come from the same one)."""
        return self.manifest["encoder"]["name"]

    @property
    def encoder_spec(self) -> str:
        """How to rebuild this database's encoder: the builder's ``package.module:factory`` spec when it used
        one (``resolve_encoder`` takes either), else the encoder's name."""
        return (self.manifest.get("build") or {}).get("encoder_spec") or self.encoder_name

    @property
    def normalized(self) -> bool:
        """Whether the stored vectors are L2-normalised (as the encoder produced them)."""
        return bool(self.manifest["encoder"]["normalized"])

    @property
    def shard_arrays(self) -> list[np.ndarray]:
        """The memory-mapped (n_i, D) float16 shards, in id order."""
        return list(self._shards)

    @property
    def backend(self) -> str:
        """Name of the search backend: "torch-exact", "triton-exact" or "faiss-<kind>"."""
        if self._backend_kind == "torch":
            return TorchExactSearch.name
        if self._backend_kind == "triton":
            from .gpu_search import GPUExactSearch

            return GPUExactSearch.name
        return f"faiss-{self.manifest['index']['kind']}"

    @property
    def search_settings(self) -> dict[str, Any]:
        """What decides this database's search results besides the queries and k: the backend, the index it
        reads (file and build parameters) and the search-time parameters given at open (None: the index's)."""
        opts = self._backend_options
        return {"backend": self.backend, "index": self.manifest.get("index") if self._backend_kind == "faiss" else
                None, "nprobe": opts["nprobe"], "ef_search": opts["ef_search"]}

    # ---------------------------------------------------------------- search
    def _search_engine(self):
        if self._engine is None:
            opts = self._backend_options
            if self._backend_kind == "torch":
                self._engine = TorchExactSearch(self._shards, device=self.device, chunk_rows=opts["chunk_rows"])
            elif self._backend_kind == "triton":
                from .gpu_search import GPUExactSearch
                # the memory-mapped shards in id order (empty ones add no rows), streamed onto the GPU(s)
                self._engine = GPUExactSearch([s for s in self._shards if s.shape[0]], devices=opts["devices"],
                                              dtype=torch.float16, normalize=True)
            else:
                from .faiss_index import FaissSearch
                self._engine = FaissSearch.load(self.path / self.manifest["index"]["file"], mmap=True,
                                                nprobe=opts["nprobe"], ef_search=opts["ef_search"],
                                                vectors=self._scattered_shards())  # re-ranks candidates
            log.info("searching %s with %s on %s", self.path, self.backend, self.device)
        return self._engine

    def check_encoder(self, name: str) -> None:
        """Raise ValueError unless embeddings named ``name`` can be compared with this database's."""
        if name != self.encoder_name:
            raise ValueError(f"queries come from encoder {name!r}, but {self.path} holds {self.encoder_name!r} "
                             "embeddings: use the database's encoder")

    def search(self, queries: Tensor | np.ndarray, k: int, *, encoder: str | Encoder | None = None
               ) -> tuple[Tensor, Tensor]:
        """The k entries most similar (cosine) to each of the (Q, D) ``queries`` (a tensor, or a NumPy array taken
        as float32 CPU queries): (scores (Q, k) float32, ids (Q, k) int64), best first, on the queries' device
        (CPU ids and scores for an array). ``encoder`` names the queries' encoder, or is that :class:`Encoder`
        (checked against the database's). Queries on the CPU must be finite and non-zero (ValueError); CUDA
        queries are not checked, which would synchronise with the host (sampling's retrieval runs without)."""
        if isinstance(encoder, Encoder):  # as search_text takes it: was compared as a name, its repr in the error
            self._check_encoder_object(encoder, "search")
        elif encoder is not None:
            if not isinstance(encoder, str):
                raise TypeError(f"search: encoder must be the queries' encoder name (a str) or Encoder, got "
                                f"{type(encoder).__name__}")
            self.check_encoder(encoder)
        if len(self) == 0:
            raise ValueError(f"database {self.path} is empty: nothing to search")
        return self.search_checked(self.checked_queries(queries), k)

    def search_checked(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """:meth:`search` for queries that :meth:`checked_queries` has passed (not read again)."""
        check_k(k, len(self))
        if queries.shape[0] == 0:
            empty = torch.empty((0, k), device=queries.device)
            return empty, empty.long()
        scores, ids = self._search_engine().search(queries, k)
        return scores.to(queries.device, torch.float32), ids.to(queries.device, torch.int64)

    def checked_queries(self, queries: Tensor | np.ndarray) -> Tensor:
        """``queries`` as a (Q, D) float tensor of this database's width (a NumPy array becomes float32 CPU queries),
        else ValueError. Queries on the CPU must be finite and non-zero; CUDA queries are not checked, which would
        synchronise with the host (sampling's retrieval runs without)."""
        if isinstance(queries, np.ndarray) and np.issubdtype(queries.dtype, np.floating):
            queries = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        if (not isinstance(queries, Tensor) or queries.dim() != 2 or queries.shape[1] != self.dim
                or not queries.is_floating_point()):
            shape = (f"{queries.dtype} {tuple(queries.shape)}" if isinstance(queries, Tensor) else
                     f"ndarray {queries.dtype} {queries.shape}" if isinstance(queries, np.ndarray) else
                     type(queries).__name__)
            raise ValueError(f"queries must be a (Q, {self.dim}) float tensor or array for {self.path}, got {shape}")
        if queries.is_meta:
            raise ValueError("queries are on the meta device (shapes without values): nothing to search with")
        if queries.device.type == "cpu" and not bool(torch.isfinite(queries).all()):
            bad = int((~torch.isfinite(queries).all(1)).nonzero()[0, 0])
            raise ValueError(f"query {bad} holds NaN or infinite values: no meaningful neighbours")
        if queries.device.type == "cpu" and not bool(queries.any(1).all()):
            bad = int((~queries.any(1)).nonzero()[0, 0])
            raise ValueError(f"query {bad} is all zeros: it has no direction, so no cosine neighbours")
        return queries

    def _check_encoder_object(self, encoder, where: str) -> None:
        check_encoder_arg(encoder, where)
        self.check_encoder(encoder.name)
        if encoder.dim != self.dim:
            raise ValueError(f"encoder {encoder.name!r} makes {encoder.dim}-d embeddings, {self.path} holds "
                             f"{self.dim}-d ones")

    def search_images(self, encoder: Encoder, images: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Embed (B, 3, H, W) images in [-1, 1] with ``encoder`` (the database's encoder, an :class:`Encoder`)
        and search. ``images`` must be a tensor (TypeError); CPU images far outside [-1, 1] are warned about."""
        self._check_encoder_object(encoder, "search_images")
        if not isinstance(images, Tensor):
            raise TypeError(f"search_images: images must be a torch.Tensor (B, 3, H, W) in [-1, 1], got "
                            f"{type(images).__name__} (a NumPy array: torch.from_numpy(a))")
        if images.device != encoder.device:  # embed_images warns about CPU images it sees; these it won't
            check_image_range(images, f"search_images ({encoder.name})", "the encoder")
        with torch.inference_mode():
            queries = embed_images(encoder, images.to(encoder.device))
        return self.search(queries, k)

    def search_text(self, encoder: Encoder, texts: str | Sequence[str], k: int) -> tuple[Tensor, Tensor]:
        """Embed captions with ``encoder`` (the database's encoder, an :class:`Encoder` with a text tower) and
        search."""
        self._check_encoder_object(encoder, "search_text")
        if isinstance(texts, str):
            texts = [texts]
        with torch.inference_mode():
            queries = embed_texts(encoder, texts)
        return self.search(queries, k)

    # ---------------------------------------------------------------- stored data
    def _locate(self, ids: np.ndarray) -> np.ndarray:
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise IndexError(f"id {bad} is out of range for {self.path} ({len(self)} entries)")
        return np.searchsorted(self._offsets, ids, side="right") - 1

    def _gather(self, ids: np.ndarray, fetch: Callable[[int, np.ndarray], np.ndarray], out: np.ndarray) -> None:
        shard_of = self._locate(ids)
        for j in np.unique(shard_of):
            sel = shard_of == j
            rows = ids[sel] - self._offsets[j]
            order = np.argsort(rows, kind="stable")  # read each memory map in ascending row order
            picked = np.empty((len(rows),) + out.shape[1:], out.dtype)
            picked[order] = fetch(int(j), rows[order])
            out[sel] = picked

    def embeddings(self, ids: Tensor) -> Tensor:
        """The stored vectors of ``ids`` (any shape) as float32, shape ids.shape + (D,), on the ids' device.

        With the Triton backend and CUDA ids they are gathered from the GPU copy without leaving the device (no
        host synchronisation; out-of-range ids are not reported there), else read from the memory-mapped shards.
        """
        if self._backend_kind == "triton" and isinstance(ids, Tensor) and ids.is_cuda:
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"ids must be integers, got {ids.dtype}")
            return self._search_engine().vectors(ids.long())
        flat, shape, device = _as_index_array(ids)
        out = np.empty((flat.size, self.dim), np.float32)
        scattered = self._scattered_shards()
        self._gather(flat, lambda j, rows: scattered[j][rows], out)
        return torch.from_numpy(out).reshape(*shape, self.dim).to(device)

    def _scattered_shards(self) -> list[np.ndarray]:
        if self._scattered is None:
            self._scattered = [_scattered_rows(s) for s in self._shards]
        return self._scattered

    def _meta_of(self, j: int, key: str) -> np.ndarray:
        """Shard ``j``'s metadata array ``key``, read once per process: only the arrays asked for, and sources as
        UTF-8 bytes (NumPy's strings take 4 bytes a character; each training data worker keeps its own copy)."""
        if (j, key) not in self._meta:
            file = self.path / self.manifest["shards"][j]["meta"]
            try:
                with np.load(file, allow_pickle=False) as z:
                    value = z[key]
            except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
                raise ValueError(f"{file} is not a readable metadata file ({e})") from None
            self._meta[j, key] = _utf8(value) if value.dtype.kind == "U" else value
        return self._meta[j, key]

    def sources(self, ids: ArrayLike) -> list[str]:
        """Where the entries came from (image paths or ids), flattened in the order of ``ids``."""
        if not self.manifest["has_sources"]:
            raise ValueError(f"{self.path} records no sources for its entries")
        flat, _, _ = _as_index_array(ids)
        out = np.empty(flat.size, object)
        self._gather(flat, lambda j, rows: self._meta_of(j, "sources")[rows], out)
        return [s.decode("utf-8", "surrogateescape") if isinstance(s, bytes) else str(s) for s in out]

    def class_ids(self, ids: ArrayLike) -> Tensor:
        """Class ids (int64, -1 where unknown), shaped like ``ids``, on the ids' device."""
        flat, shape, device = _as_index_array(ids)
        out = np.empty(flat.size, np.int64)
        self._gather(flat, lambda j, rows: self._meta_of(j, "class_id")[rows], out)
        return torch.from_numpy(out).reshape(shape).to(device)

    def patch_coords(self, ids: ArrayLike) -> Tensor:
        """(x, y) of each entry's crop (int32, -1 where unknown), shape ids.shape + (2,)."""
        flat, shape, device = _as_index_array(ids)
        out = np.empty((flat.size, 2), np.int32)
        self._gather(flat, lambda j, rows: self._meta_of(j, "patch_coords")[rows], out)
        return torch.from_numpy(out).reshape(*shape, 2).to(device)

    # ---------------------------------------------------------------- proposals
    def _ranking(self) -> np.ndarray:
        """The (N, 2) [id, count] proposal ranking, memory-mapped (16 bytes an entry: 320 MB at 20M) and checked."""
        entry = self.manifest.get("proposals")
        if not entry:
            raise ValueError(f"{self.path} has no proposal ranking: compute it with "
                             f"python -m rdm_fast.db neighbors {self.path} --k K --out FILE")
        if self._proposals is None:
            file = self.path / entry["file"]
            again = f"compute the ranking again with python -m rdm_fast.db neighbors {self.path} --k K --out FILE"
            try:
                arr = np.load(file, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise ValueError(f"{file} is not a readable .npy array ({array_file_problem(file, e)}): "
                                 f"{again}") from None
            if arr.shape != (len(self), 2) or arr.dtype != np.int64:
                raise ValueError(f"{file} holds {arr.dtype} {arr.shape}, expected int64 ({len(self)}, 2): {again}")
            for first in range(0, len(arr), SCAN_ROWS):
                ids = arr[first:first + SCAN_ROWS, 0]
                bad = (ids < 0) | (ids >= len(self))
                if bad.any():
                    raise ValueError(f"{file} holds id {ids[bad.argmax()]}, outside the database's {len(self)} "
                                     f"entries: it is corrupted or belongs to another database; {again}")
            self._proposals = arr
        return self._proposals

    def proposal_ranking(self) -> tuple[Tensor, Tensor]:
        """(ids, counts) of every entry, ranked by how often it was a training neighbour (see neighbors.py)."""
        arr = self._ranking()
        return torch.from_numpy(np.array(arr[:, 0])), torch.from_numpy(np.array(arr[:, 1]))

    def proposals(self, m: float) -> Tensor:
        """The ids of the top fraction ``m`` (0 < m <= 1) of the proposal ranking, ``ceil(m * N)`` of them (at least
        one): the pseudo-queries of top-m unconditional sampling. ``m`` is taken as the decimal it prints as (0.07
        of 100 entries is 7, where the binary float product 7.000000000000001 would round up to 8). Reads only
        those rows of the ranking."""
        if isinstance(m, bool) or not isinstance(m, numbers.Real):
            raise TypeError(f"m must be a fraction in (0, 1], got {m!r}")
        if not 0 < m <= 1:
            raise ValueError(f"m must be a fraction in (0, 1], got {m}")
        # a NumPy float prints in its own precision: float(np.float32(0.1)) prints as 0.10000000149011612
        fraction = Fraction(str(m) if isinstance(m, np.floating) else str(float(m)))
        return torch.from_numpy(np.array(self._ranking()[:max(1, math.ceil(fraction * len(self))), 0]))


def _index_changed(path: Path, index: dict) -> str | None:
    """Why the database ``path``'s index file is not the one its manifest records (another size, e.g. another
    database's index copied in), or None (indexes recorded before their size was are taken as they are)."""
    file, recorded = path / index["file"], index.get("bytes")
    if recorded is None or file.stat().st_size == recorded:
        return None
    return (f"{file} holds {file.stat().st_size} bytes but {MANIFEST} records {recorded}: not this database's index; "
            f"rebuild it with python -m rdm_fast.db index {path}")


def save_proposals(directory: str | Path, ids: np.ndarray, counts: np.ndarray, **info: Any) -> None:
    """Store a proposal ranking in the database directory and record it in the manifest: ``ids`` every entry
    once, in ranked order, ``counts`` how often each was a training neighbour (see neighbors.py). ValueError for
    other shapes, non-integers, ids that are not the entries or negative counts (such a ranking was recorded,
    then refused by every later read)."""
    directory = Path(directory)
    n = read_manifest(directory)["count"]
    ids, counts = np.asarray(ids), np.asarray(counts)
    if ids.shape != (n,) or counts.shape != (n,):
        raise ValueError(f"a proposal ranking needs one id and count per entry ({n}), got {ids.shape} and "
                         f"{counts.shape}")
    if n and (ids.dtype.kind not in "iu" or counts.dtype.kind not in "iu"):
        raise ValueError(f"a proposal ranking holds integers, got {ids.dtype} ids and {counts.dtype} counts")
    ids, counts = ids.astype(np.int64), counts.astype(np.int64)
    if n and not np.array_equal(np.sort(ids), np.arange(n)):
        raise ValueError(f"a proposal ranking lists each of the database's {n} entries once (ids 0 to {n - 1})")
    if n and counts.min() < 0:
        raise ValueError(f"a proposal ranking's counts are numbers of times, >= 0; got {counts.min()}")
    if "file" in info:  # it would name another file than the one written
        raise ValueError("save_proposals: file is the manifest's own (the ranking's file name), not a keyword")
    info = json_values(info, "save_proposals")  # before the old ranking is touched
    remove_stale_temps(directory, [PROPOSALS, MANIFEST])  # what a killed write of them left
    if read_manifest(directory).get("proposals"):  # a kill while the file is replaced leaves no ranking, never
        update_manifest(directory, lambda m: m.update(proposals=None))  # a new file under the old one's record
    atomic_save_npy(directory / PROPOSALS, np.stack([ids, counts], 1))
    update_manifest(directory, lambda m: m.update(proposals={"file": PROPOSALS, **info}))


def add_index(directory: str | Path, kind: str = "auto", *, train_size: int | None = None, seed: int = 0,
              progress: bool = True, **params: Any) -> dict:
    """Build a FAISS index over the database's shards, store it beside them and record it in the manifest."""
    from .faiss_index import INDEX_KINDS, build_index

    directory = Path(directory)
    db = Database.open(directory, backend="torch", device="cpu")
    if len(db) == 0:
        raise ValueError(f"database {directory} is empty: nothing to index")
    stale = [directory / f".index.{k}.tmp" for k in ("auto", *INDEX_KINDS)]  # what killed builds left (gigabytes)
    for stale_file in stale:
        stale_file.unlink(missing_ok=True)
    remove_stale_temps(directory, [*(file.name for file in stale), MANIFEST])  # and of the manifest's rewrites
    tmp = directory / f".index.{kind}.tmp"
    try:
        info = build_index(db.shard_arrays, kind, out=tmp, train_size=train_size, seed=seed, progress=progress,
                           **params)
        actual = info.get("kind", kind)
        file = f"index_{actual}.faiss"
        old = db.manifest.get("index")
        if old and old["file"] == file:  # replaced in place: a kill before the record below leaves no index,
            update_manifest(directory, lambda m: m.update(index=None))  # never the new file under the old record
        tmp.replace(directory / file)
    finally:
        tmp.unlink(missing_ok=True)
    entry = {"file": file, "kind": actual, "bytes": (directory / file).stat().st_size, "params": info}
    update_manifest(directory, lambda m: m.update(index=entry))
    # the old index, and any other kind's that a build killed before it recorded its file left unrecorded
    for other in ({f"index_{k}.faiss" for k in INDEX_KINDS} | ({old["file"]} if old else set())) - {file}:
        (directory / other).unlink(missing_ok=True)
    return entry
