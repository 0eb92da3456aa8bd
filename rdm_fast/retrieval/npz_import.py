"""Importing the official database parts ``{N}x{D}-part_{i}.npz`` (arrays ``embedding`` (N, D), ``img_id``,
``patch_coords`` and optionally ``class_id``) into the rdm_fast format, without loading a part's
embeddings into memory: the ``embedding`` member of the zip is read row chunk by row chunk (its .npy header is
parsed with numpy.lib.format; stored and deflated members both stream). The per-row metadata arrays are 1/D
of the data and are loaded whole. Resumable and ``torchrun``-splittable like image builds (see build.py).

``patch_coords`` may be (N, 2) (x, y) corners or, as the official builder writes them, (N, 4) boxes
(x_tl, y_tl, x_br, y_br), of which the top-left corners are kept. The official corners are positions in the
1200 x 1200 square each image was resized and cropped to before its patches were cut (not in the original
file), and its ``img_id`` is a row of the builder's image list, which was not released."""

from __future__ import annotations

import io
import logging
import re
import struct
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np
from numpy.lib import format as npformat
from tqdm.auto import tqdm

from .._distributed import Processes
from .._files import not_a_file
from .build import ShardedBuild, run_sharded
from .database import check_encoder_info, new_manifest, write_manifest, write_shard
from .search import check_count

log = logging.getLogger("rdm_fast.retrieval")


def part_order(path: str | Path) -> tuple[int, str]:
    """Sort key: the number after ``part_`` in the file name, then the name."""
    m = re.search(r"part_(\d+)", Path(path).name)
    return (int(m.group(1)) if m else -1, Path(path).name)


def _member_name(zf: zipfile.ZipFile, file: Path, name: str) -> str:
    for candidate in (f"{name}.npy", name):
        if candidate in zf.namelist():
            return candidate
    present = ", ".join(n.removesuffix(".npy") for n in zf.namelist())
    raise ValueError(f"{file} has no {name!r} array (it has {present})")


def _read_header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = npformat.read_magic(f)
        if version == (1, 0):
            return npformat.read_array_header_1_0(f)
        if version == (2, 0):
            return npformat.read_array_header_2_0(f)
    except ValueError as e:
        raise ValueError(f"{where} is not a valid .npy member ({e})") from None
    raise ValueError(f"{where} uses .npy format version {version}; expected 1.0 or 2.0")


@contextmanager
def _member_stream(path: Path, name: str) -> Iterator[IO[bytes]]:
    """A readable stream of the member ``name``'s bytes: for a stored (uncompressed) member the zip file itself,
    positioned at the member's data (so skipping rows is a seek); else the zip module's decompressing reader."""
    with _open_zip(path) as zf:
        info = zf.getinfo(_member_name(zf, path, name))
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            try:
                with zf.open(info) as f:
                    yield f
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a damaged member: its CRC or its deflate data
                raise ValueError(f"{path}:{name} is corrupted ({e})") from None
            return
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"{path}: corrupted zip entry {info.filename}")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            yield f


def _skip(f: IO[bytes], nbytes: int, where: str) -> None:
    if not isinstance(f, zipfile.ZipExtFile):
        f.seek(nbytes, io.SEEK_CUR)
        return
    while nbytes:  # decompress and drop, 1 MiB at a time (ZipExtFile.seek would buffer up to 16 MiB)
        nbytes -= len(_read_exact(f, min(nbytes, 1 << 20), where))


def member_info(path: str | Path, name: str = "embedding") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array ``name`` in the .npz ``path``, from its header only."""
    path = Path(path)
    with _member_stream(path, name) as f:
        shape, _, dtype = _read_header(f, f"{path}:{name}")
    return shape, dtype


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise FileNotFoundError(f"{path} {not_a_file(path)}")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a readable .npz file ({e})") from None


def _read_exact(f: IO[bytes], n: int, where: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            raise ValueError(f"{where} is truncated: {n - got} bytes missing")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def iter_row_ranges(path: str | Path, ranges: Sequence[tuple[int, int | None]], name: str = "embedding", *,
                    chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """``(i, chunk)`` for the rows of each range ``i`` (``[start, stop)``, sorted and disjoint; ``stop`` None or
    past the end: to the end) of the 2-D array ``name``, in chunks of at most ``chunk_rows`` rows, from one pass
    over the member: a deflated member is decompressed once, not from its start again for every range."""
    path = Path(path)
    where = f"{path}:{name}"
    with _member_stream(path, name) as f:
        shape, fortran, dtype = _read_header(f, where)
        if len(shape) != 2:
            raise ValueError(f"{where} has shape {shape}; expected (N, D)")
        if fortran and shape[0] > 1 and shape[1] > 1:
            raise ValueError(f"{where} is stored in Fortran order; rows cannot be streamed (re-save it in C order)")
        if dtype.hasobject:
            raise ValueError(f"{where} holds Python objects, not numbers")
        n, dim = shape
        row_bytes = dtype.itemsize * dim
        at = 0  # the stream's position, in rows
        for i, (start, stop) in enumerate(ranges):
            stop = n if stop is None else min(stop, n)
            if start < at:
                raise ValueError(f"row ranges must be sorted and disjoint, got {list(ranges)}")
            _skip(f, (start - at) * row_bytes, where)
            for s in range(start, stop, chunk_rows):
                rows = min(chunk_rows, stop - s)
                yield i, np.frombuffer(_read_exact(f, rows * row_bytes, where), dtype=dtype).reshape(rows, dim)
            at = max(start, stop)


class Part:
    """One official part: its embedding header and its (small) per-row metadata."""

    def __init__(self, path: Path, allow_pickle: bool) -> None:
        self.path = path
        (self.n, *rest), dtype = member_info(path, "embedding")
        if len(rest) != 1:
            raise ValueError(f"{path}: 'embedding' has shape {(self.n, *rest)}; expected (N, D)")
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"{path}: 'embedding' holds {dtype}; expected floats")
        self.dim = rest[0]
        self.allow_pickle = allow_pickle
        with _open_zip(path) as zf:  # from the zip's directory: a part rewritten with other values keeps its size
            self.crc32 = {info.filename: info.CRC for info in zf.infolist()}

    def metadata(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(img ids (N,), class ids or None, patch coords (N, 2) int32); ids become strings per shard."""
        try:
            with np.load(self.path, allow_pickle=self.allow_pickle) as z:
                missing = [k for k in ("img_id", "patch_coords") if k not in z.files]
                if missing:
                    raise ValueError(f"{self.path} lacks the array(s) {', '.join(missing)}")
                img_id, coords = z["img_id"], z["patch_coords"]
                class_id = z["class_id"] if "class_id" in z.files else None
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise ValueError(f"{self.path} is corrupted ({e})") from None
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise ValueError(f"{self.path} stores Python objects (pickled); pass --allow-pickle if you trust "
                                 "the file") from None
            raise
        if img_id.reshape(-1).shape[0] != self.n:
            raise ValueError(f"{self.path}: img_id has {img_id.size} entries for {self.n} embeddings")
        coords = np.asarray(coords)
        # the last axis holds a row's corner or box; the others, in any layout the builder's collation made
        # ((N, 4), (N / n, n, 4) for n patches an image), count the N rows
        if coords.ndim < 2 or coords.shape[-1] not in (2, 4) or coords.size // coords.shape[-1] != self.n:
            raise ValueError(f"{self.path}: patch_coords has shape {coords.shape}, expected {self.n} (x, y) corners "
                             f"or (x_tl, y_tl, x_br, y_br) boxes along its last axis, e.g. ({self.n}, 4)")
        coords = coords.reshape(self.n, -1)[:, :2]  # the builder's boxes: their top-left corners
        if class_id is not None and np.asarray(class_id).reshape(-1).shape[0] != self.n:
            raise ValueError(f"{self.path}: class_id has {class_id.size} entries for {self.n} embeddings")
        ids = img_id.reshape(-1)
        if ids.dtype.hasobject:
            ids = np.array([x.decode() if isinstance(x, bytes) else str(x) for x in ids.tolist()], dtype=np.str_)
        return ids, (None if class_id is None else np.asarray(class_id, np.int64).reshape(-1)), coords.astype(np.int32)


def import_npz(parts: Sequence[str | Path], out: str | Path, encoder_info: dict, *, encoder_spec: str | None = None,
               shard_size: int = 100_000, chunk_rows: int = 65536, allow_pickle: bool = False,
               progress: bool = True) -> Path:
    """Convert official part files (sorted by part number; each given once) into a database at ``out`` whose
    vectors are recorded as made by the encoder ``encoder_info`` ({name, dim, normalized}; dim must match the
    data). A non-finite row (NaN, Inf, beyond float16) stops the import with an error naming it."""
    if isinstance(parts, (str, Path)):  # a str would be read as one part per character
        raise TypeError(f"import_npz: parts must be a list of .npz files, got the single path {str(parts)!r} "
                        "(wrap it in a list)")
    if not parts:
        raise ValueError("give at least one .npz part file")
    check_encoder_info(encoder_info, "import_npz")
    shard_size, chunk_rows = check_count(shard_size, "shard_size"), check_count(chunk_rows, "chunk_rows")
    files = sorted((Path(p).resolve() for p in parts), key=part_order)
    repeated = sorted({str(f) for f in files if files.count(f) > 1})
    if repeated:
        raise ValueError(f"part {repeated[0]} is given more than once: each part may be imported only once")
    loaded = [Part(f, allow_pickle) for f in files]
    dims = {p.dim for p in loaded}
    if len(dims) != 1:
        raise ValueError(f"the parts have different embedding dimensions: {sorted(dims)}")
    if dims != {int(encoder_info["dim"])}:
        raise ValueError(f"the parts hold {dims.pop()}-d embeddings but encoder {encoder_info['name']!r} makes "
                         f"{encoder_info['dim']}-d ones")
    if not sum(p.n for p in loaded):  # an empty database fails at every later use
        raise ValueError(f"the part{'s' * (len(loaded) > 1)} hold{'s' * (len(loaded) == 1)} no embeddings (0 rows): "
                         "nothing to import")
    plan = [(i, s, min(s + shard_size, p.n)) for i, p in enumerate(loaded) for s in range(0, p.n, shard_size)]
    config = {"kind": "npz", "encoder": dict(encoder_info), "encoder_spec": encoder_spec or encoder_info["name"],
              "parts": [{"file": str(p.path), "bytes": p.path.stat().st_size, "rows": p.n, "crc32": p.crc32}
                        for p in loaded],
              "shard_size": shard_size}
    out = Path(out)

    def compute(pending: list[int], state: ShardedBuild, procs: Processes) -> None:
        todo = sum(plan[j][2] - plan[j][1] for j in pending)
        with tqdm(total=todo, desc="importing", unit="row", unit_scale=True, disable=not progress,
                  position=procs.rank) as bar:
            for i, part in enumerate(loaded):
                mine = [j for j in pending if plan[j][0] == i]
                if not mine:
                    continue
                ids, class_id, coords = part.metadata()

                def store(j: int, emb: np.ndarray, part: Part = part) -> None:
                    s, e = plan[j][1:]
                    entry = write_shard(out, j, emb, sources=ids[s:e], patch_coords=coords[s:e],
                                        class_ids=None if class_id is None else class_id[s:e],
                                        row_name=lambda r: f"{part.path} embedding row {s + r}")
                    state.record(j, entry, has_class_ids=class_id is not None)

                current, emb, at = -1, None, 0  # this process's shards of the part, in row order, from one stream
                for r, chunk in iter_row_ranges(part.path, [plan[j][1:] for j in mine], chunk_rows=chunk_rows):
                    if r != current:
                        if emb is not None:
                            store(mine[current], emb)
                        current, at = r, 0
                        emb = np.empty((plan[mine[r]][2] - plan[mine[r]][1], part.dim), np.float16)
                    assert emb is not None  # allocated at the first chunk (r != current = -1)
                    with np.errstate(over="ignore"):  # beyond float16 becomes inf: write_shard refuses it
                        emb[at:at + len(chunk)] = chunk
                    at += len(chunk)
                    bar.update(len(chunk))
                if emb is not None:
                    store(mine[current], emb)

    def finish(records: list[dict]) -> None:
        has_class = {r["has_class_ids"] for r in records}
        manifest = new_manifest(encoder_info, [r["entry"] for r in records], has_sources=True,
                                has_class_ids=has_class == {True}, has_patch_coords=True, build=config)
        write_manifest(out, manifest)
        log.info("wrote %s: %d embeddings from %d part%s in %d shard%s", out, manifest["count"], len(loaded),
                 "s"[:len(loaded) != 1], len(records), "s"[:len(records) != 1])

    return run_sharded(out, config, len(plan), compute, finish)
