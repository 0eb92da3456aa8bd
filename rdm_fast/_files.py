"""Writing files so that a crash or a full disk never leaves a half-written file under the final name."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

TEMP_SUFFIX = ".tmp"
LOCK_FILE = ".rdm_fast.lock"  # the file a run holds its --out by (rdm_fast._cli.OutDirLock)
CRC_BLOCK = 1 << 24  # bytes of a mapped .npz member checked at a time
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(target: str | Path, write: Callable[[str], object], *, fsync: bool = False) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then rename it into place.
    ``fsync=True`` also flushes the data to disk before the rename (survives a power loss, not only a kill)."""
    target = Path(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    except OSError as e:  # e.g. a missing folder
        raise _naming(e, target) from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; final files get the usual permissions
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # a serialiser's own error for a full disk or a failed write (torch, safetensors; NumPy's tofile under
        # np.save raises an OSError without errno, "12800 requested and 10176 written")
        if isinstance(e, Exception) and (not isinstance(e, OSError) or e.errno is None):
            raise OSError(f"cannot write {target}: {e}") from e
        if isinstance(e, OSError) and _unnamed(e, tmp):
            raise _naming(e, target) from e
        raise


@contextmanager
def naming_failed_writes(target: str | Path, tmp: str | None = None) -> Iterator[None]:
    """An OSError raised in the block that names no file (a failed write(2): a full disk, a file-size limit, an
    I/O error) or the temporary file ``tmp`` names ``target`` instead (the command lines print "FILE: reason")."""
    try:
        yield
    except OSError as e:
        if _unnamed(e, tmp):
            raise _naming(e, Path(target)) from e
        raise


def _unnamed(e: OSError, tmp: str | None) -> bool:
    """Whether ``e`` names the temporary file ``tmp`` or no file (a failed write(2): a full disk, a file-size
    limit, an I/O error), so that it should name the target instead."""
    return e.filename in (tmp, None) and e.errno is not None and e.strerror is not None


def _naming(e: OSError, target: Path) -> OSError:
    """``e`` about the file the user asked for instead of its temporary name (same type and errno)."""
    if e.errno is None or e.strerror is None:
        return e
    return type(e)(e.errno, e.strerror, str(target))


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries (the files renamed into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def claim_disk_space(path: str | Path) -> None:
    """Allocate the disk blocks of the file ``path`` (its size now) where the platform can, before it is written
    through a memory map: a full disk is then an OSError here, not a SIGBUS (the process killed without a
    message) when a write through the map reaches a block the disk has no room for."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def atomic_save_npy(target: str | Path, array: np.ndarray) -> None:
    """``np.save`` under a temporary name, then rename (np.save on a path would append ``.npy`` to it)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    atomic_write(target, write, fsync=True)


@contextmanager
def atomic_npy_memmap(target: str | Path, dtype: np.dtype | type, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """A zero-filled ``.npy`` array of ``shape`` to fill in place, memory-mapped from a temporary file beside
    ``target`` (so an array larger than RAM never sits in memory), flushed to disk and renamed to ``target`` when
    the block ends without an error; on an error the temporary file is removed."""
    target = Path(target)
    if 0 in shape:  # an empty file cannot be memory-mapped
        array = np.zeros(shape, dtype)
        yield array
        atomic_save_npy(target, array)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    writing = True  # not while the caller's block runs: its errors are its own
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        claim_disk_space(tmp)
        writing = False
        yield array
        writing = True
        array.flush()
        os.chmod(tmp, 0o666 & ~_UMASK)
        fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if writing and isinstance(e, OSError) and _unnamed(e, tmp):
            raise _naming(e, target) from e
        raise


def atomic_save_npz(target: str | Path, **arrays: np.ndarray) -> None:
    """Uncompressed ``np.savez`` written atomically (byte-identical for identical arrays)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub: the dict might hold allow_pickle
    atomic_write(target, write, fsync=True)


def atomic_write_json(target: str | Path, obj: Any) -> None:
    """Indented JSON with a trailing newline, written atomically."""
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(target, lambda tmp: Path(tmp).write_text(text), fsync=True)


def not_a_file(path: str | Path) -> str:
    """Why ``path`` is not a regular file, for an error message that starts with its name: it does not exist, is
    a broken link or a folder, or is a pipe, socket or device (``--list <(find ...)``: read more than once, or
    by every process of a run, and relative to no folder of its own)."""
    path = Path(path)
    if not path.exists():
        return f"is a broken link (to {os.readlink(path)})" if path.is_symlink() else "does not exist"
    if path.is_dir():
        return "is a directory"
    return "is not a regular file (a pipe, socket or device): save its contents to a file and give that"


def array_file_problem(path: str | Path, error: BaseException) -> str:
    """Why ``np.load(path, allow_pickle=False)`` failed, in words that do not invite unpickling a file that is
    simply not an array file (NumPy's own message suggests ``allow_pickle=True`` for any unknown bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        return e.strerror or str(e)
    if not head.startswith((b"\x93NUMPY", b"PK\x03\x04")):
        return "not a NumPy .npy or .npz file"
    if "pickle" in str(error):
        return "it holds Python objects (pickled), not numbers"
    return " ".join(str(error).split()) or type(error).__name__


def map_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive by name: members stored uncompressed (``np.savez``, as rdm_fast writes them)
    as read-only memory maps, so that opening a large file holds no copy of it; compressed members
    (``np.savez_compressed``) and unusual .npy versions read whole. Every member's CRC-32 is checked (a mapped
    one in blocks). ValueError for a damaged archive or member, or a member of Python objects; OSError where the
    file cannot be read."""
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            for info in archive.infolist():
                if info.filename.endswith(".npy"):
                    out[info.filename[:-4]] = _mapped_member(path, f, archive, info)
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a readable .npz archive ({e})") from None
    return out


def _mapped_member(path: Path, f: BinaryIO, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npy member of an .npz: mapped where stored as is in a version 1.0/2.0 .npy, else read (zipfile checks
    the CRC-32 of what it reads)."""
    def read() -> np.ndarray:
        with archive.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)

    if info.compress_type != zipfile.ZIP_STORED:
        return read()
    f.seek(info.header_offset)
    local = f.read(30)  # the local file header: its name and extra field precede the data
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"member {info.filename} has no local header")
    start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
    if start + info.file_size > os.fstat(f.fileno()).st_size:
        raise ValueError(f"member {info.filename} is truncated")
    crc = 0
    if info.file_size:  # checked through a map of the member: no copy of it in memory
        member = np.memmap(path, np.uint8, "r", start, (info.file_size,))
        for first in range(0, info.file_size, CRC_BLOCK):  # a flipped bit in an id would pass any other check
            crc = zlib.crc32(member[first:first + CRC_BLOCK].data, crc)
        del member
    if crc != info.CRC:
        raise ValueError(f"member {info.filename} is corrupted (its CRC-32 does not match)")
    f.seek(start)
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        return read()
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject:
        raise ValueError(f"member {info.filename} holds Python objects (pickled), not numbers")
    offset = f.tell()
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if offset + nbytes > start + info.file_size:
        raise ValueError(f"member {info.filename} is truncated")
    if not nbytes:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype, "r", offset, shape, "F" if fortran else "C")


def make_dirs(path: str | Path) -> None:
    """Create the folder ``path`` and its missing parents; where one of them is a file, NotADirectoryError
    "X is a file, not a folder" (instead of "File exists" or "Not a directory" naming the whole path)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (*reversed(path.parents), path) if p.exists() and not p.is_dir()), None)
        if blocker is None:
            raise
        raise NotADirectoryError(f"{blocker} is a file, not a folder") from None


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def remove_stale_temps(directory: str | Path, names: Sequence[str] | None = None) -> int:
    """Delete temporary files that :func:`atomic_write` left behind in ``directory`` when a process was killed
    mid-write (only those of the target files ``names``, glob patterns, where given); returns how many. Call only
    while no other process writes those files there."""
    patterns = [f".*{TEMP_SUFFIX}"] if names is None else [f".{n}.*{TEMP_SUFFIX}" for n in names]
    n = 0
    for pattern in patterns:
        for p in Path(directory).glob(pattern):
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n
