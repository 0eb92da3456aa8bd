"""Building a database from image files: resumable, and split over processes under ``torchrun``.

Inputs are listed once in a deterministic order (a folder scanned recursively and sorted by relative path, or
a list file in its own order). Shard ``j`` always covers the same input files ``[j*F, (j+1)*F)`` with
``F = shard_size // crops_per_image``, and random crops are drawn from a generator seeded with
``(seed, file index)``, so any shard can be recomputed alone and gives the same bytes. Each finished shard is
renamed into place and then gets a done-record ``progress/shard_XXXXX.json`` (its checksums). A rerun with the
same arguments verifies the finished shards, skips them and computes the rest; a rerun with different
arguments is refused. Under ``torchrun`` rank ``r`` computes the shards ``j % world == r``; after a barrier,
rank 0 writes the manifest, so the result is identical to a single-process build.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import time
import warnings
from array import array
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence, overload

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .._distributed import Processes, process_device
from .._files import LOCK_FILE, TEMP_SUFFIX, atomic_write_json, make_dirs, not_a_file, remove_stale_temps, sha256_file
from ..encoders import Encoder, embed_images, resolve_encoder
from .database import MANIFEST, check_shard_file, new_manifest, read_manifest, write_manifest, write_shard
from .search import check_count

log = logging.getLogger("rdm_fast.retrieval")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CROP_MODES = ("random", "center", "none")
PROGRESS = "progress"
MAX_SKIPPED_IN_MANIFEST = 1000
MAX_CROP_SIZE = 4096  # px: 18x the CLIP encoders' 224 px input, 5x the largest released model's 768 px images
MAX_SQUARE = 8192  # px: the largest fit_square (the official OpenImages database used 1200)
MAX_UPSCALE = 4  # crops cut from images enlarged more than this are warned about (a crop size typo, or tiny images)
MAX_FIT_PIXELS = 1 << 26  # an image resized for its crop may have at most this many pixels (192 MiB as RGB)
UPSCALE_SAMPLE = 16  # images whose size is read up front for that warning
LIST_BLOCK = 1 << 24  # bytes of an image list parsed at a time
DIGEST_BLOCK = 1 << 16  # inputs hashed at a time


# ---------------------------------------------------------------------------------------------- inputs
class PathList(Sequence[str]):
    """Strings kept as one UTF-8 buffer (surrogates escaped back to their bytes) and their end offsets: about
    ``len + 8`` bytes each, against some 110 for a Python str and 300 more for its Path, so that the input list
    of a 20M-image build fits in about 1 GiB per process. A contiguous slice is a view of the buffer (and pickles
    only its part); forked data-loader workers share the buffer without touching its pages."""

    def __init__(self, data: np.ndarray, ends: np.ndarray) -> None:
        self._data, self._ends = data, ends  # item i is data[ends[i - 1] (0 for i = 0) : ends[i]]

    @classmethod
    def of(cls, strings: Iterable[str]) -> PathList:
        """The strings, in order."""
        data, ends = bytearray(), array("q")
        for s in strings:
            data += s.encode("utf-8", "surrogateescape")
            ends.append(len(data))
        return cls(np.frombuffer(data, np.uint8), np.frombuffer(ends, np.int64))

    def __len__(self) -> int:
        return len(self._ends)

    def _bounds(self, i: int) -> tuple[int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} paths")
        i %= len(self)
        return (int(self._ends[i - 1]) if i else 0), int(self._ends[i])

    def encoded(self, i: int) -> bytes:
        """Item ``i`` as the bytes it is stored as."""
        a, b = self._bounds(i)
        return self._data[a:b].tobytes()

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> PathList: ...

    def __getitem__(self, i: int | slice) -> str | PathList:
        if isinstance(i, slice):
            first, last, step = i.indices(len(self))
            if step != 1:
                raise ValueError("PathList slices must be contiguous")
            last = max(first, last)
            start = int(self._ends[first - 1]) if first else 0
            end = int(self._ends[last - 1]) if last > first else start
            return PathList(self._data[start:end], self._ends[first:last] - start)
        return self.encoded(i).decode("utf-8", "surrogateescape")


def _suffix(name: str) -> str:
    """A file name's suffix as pathlib gives it ("" for ".jpg" and "a.")."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


# what pathlib (3.11) takes to mean "no such file" rather than an error: a link loop, a link through a file
_NO_FILE_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)


def _no_file(check: Callable[[], bool]) -> bool:
    """``check()``, False where it fails with one of pathlib's "no such file" errors (others propagate)."""
    try:
        return check()
    except OSError as e:
        if e.errno not in _NO_FILE_ERRNOS:
            raise
        return False


def _is_file_or_broken_link(entry: os.DirEntry[str]) -> bool:
    """``Path.is_file() or (Path.is_symlink() and not Path.exists())``, as pathlib 3.11 answers it: links that loop or
    lead through a file count as broken (listed, then skipped and counted by the build)."""
    if _no_file(entry.is_file):
        return True
    return _no_file(entry.is_symlink) and not _no_file(lambda: os.stat(entry.path) is not None)


class _Chain(NamedTuple):
    """A folder's (device, inode) and its parent's chain, up to the root of a scan."""

    key: tuple[int, int]
    up: _Chain | None

    def holds(self, key: tuple[int, int]) -> bool:
        link: _Chain | None = self
        while link is not None and link.key != key:
            link = link.up
        return link is not None


def _enterable_folder(entry: os.DirEntry[str]) -> tuple[int, int] | None:
    """(device, inode) of the folder ``entry`` is or links to, or None where it is not one that can be looked at
    (a file, a broken link, a link this user may not follow, a name too long; os.walk passes those over too)."""
    try:
        if not entry.is_dir():
            return None
        st = os.stat(entry.path)  # not entry.stat(), which the folder's listing would keep for every entry
    except OSError:
        return None
    return st.st_dev, st.st_ino


def list_images(root: str | Path) -> PathList:
    """Image files (jpg, jpeg, png, webp; any case) under ``root``, recursively, as sorted relative paths.
    Hidden files count; links to files count, broken links too (the build skips and counts them); links to
    folders are followed (as torchvision's ImageFolder does), except a link back to a folder that contains it;
    folders that cannot be read are passed over, with one warning naming how many and one of them."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} " + ("is a file, not a folder (for a list of images, use "
                                                            "--list)" if root.exists() else "does not exist"))
    found: list[str] = []  # a walk of our own: Path.rglob holds a Path (~400 B) for every file until it ends
    st = root.stat()
    folders: list[tuple[str, _Chain]] = [("", _Chain((st.st_dev, st.st_ino), None))]
    unlisted: list[tuple[Path, str]] = []  # folders that could not be read, and why
    while folders:
        folder, chain = folders.pop()
        try:
            with os.scandir(root / folder) as it:
                entries = list(it)
        except OSError as e:
            unlisted.append((root / folder, str(e.strerror or e)))
            continue
        for entry in entries:
            key = _enterable_folder(entry)
            if key is not None:
                if chain.holds(key):
                    log.warning("not following %s: it links back to a folder that contains it", entry.path)
                else:
                    folders.append((folder + entry.name + "/", _Chain(key, chain)))
                continue
            if _suffix(entry.name).lower() in IMAGE_SUFFIXES and _is_file_or_broken_link(entry):
                found.append(folder + entry.name)
    if unlisted:  # a folder without read permission was left out without a word
        many = len(unlisted) != 1
        log.warning("%d folder%s could not be listed (%s%s: %s): the images in %s are left out", len(unlisted),
                    "s"[:many], "e.g. " * many, *unlisted[0], "them" if many else "it")
    found.sort()
    return PathList.of(found)


def read_list(file: str | Path) -> tuple[PathList, np.ndarray | None]:
    """Paths (one a line; relative ones are relative to the list's folder) and, when every line has a
    tab-separated second column, the class ids (int64). A UTF-8 byte-order mark at the start is skipped. Read in
    blocks of whole lines, so that a list of 20M paths is never held as Python strings."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"image list {file} {not_a_file(file)}")
    classes = array("q")

    def blocks() -> Iterator[bytes | memoryview]:
        """The file in pieces that end after a line break (or at the end): a piece never splits a line, and
        "\r" is a break only where the next byte is known not to be "\n"."""
        read, rest = 0, bytearray()
        with open(file, "rb") as f:
            if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8:  # as editors that save "UTF-8 with BOM" begin
                read = len(codecs.BOM_UTF8)                       # (it would join the first path's name)
            else:
                f.seek(0)
            while block := f.read(LIST_BLOCK):
                if b"\0" in block:  # binary (an image, an archive) or UTF-16: no path holds a NUL byte
                    raise ValueError(f"image list {file} is not a text file (NUL byte at offset "
                                     f"{read + block.index(0)}): it must be a text file of image paths, one per line")
                read += len(block)
                cut = max(block.rfind(b"\n"), block.rfind(b"\r", 0, len(block) - 1)) + 1
                if not cut:  # no break in this block (a long line): searched once, kept for the next one
                    rest += block
                    continue
                yield bytes(rest) + block[:cut] if rest else memoryview(block)[:cut]
                rest = bytearray(memoryview(block)[cut:])
        yield bytes(rest)

    def lines() -> Iterator[str]:
        n = 0
        for data in blocks():  # non-UTF-8 bytes kept as the folder scan keeps them (file names are bytes)
            for line in str(data, "utf-8", "surrogateescape").splitlines():
                n += 1
                if not line.strip():
                    continue
                path, _, cls = line.partition("\t")
                if cls.strip():
                    try:
                        classes.append(int(cls))
                    except (ValueError, OverflowError):
                        raise ValueError(f"{file}:{n}: class id {cls.strip()!r} is not a 64-bit integer") from None
                yield path

    paths = PathList.of(lines())
    if classes and len(classes) != len(paths):
        raise ValueError(f"{file}: {len(classes)} of {len(paths)} lines have a class id; give all or none")
    return paths, (np.frombuffer(classes, np.int64) if classes else None)


def _to_8bit(im: Image.Image) -> Image.Image:
    """A high-bit-depth grayscale image as mode "L" (``convert("RGB")`` would clip it to white): 16-bit modes
    (I;16*, and I, which is how PIL decodes 16-bit PNG/TIFF) keep their top 8 bits; F is taken as [0, 1]."""
    a = np.asarray(im)
    if im.mode == "F":
        a = np.round(np.nan_to_num(a, nan=0.0) * 255)
    else:
        a = a.astype(np.int64) >> 8
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


PILLOW_MAX_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)  # the size Pillow refuses by default (it warns from half)


def set_max_image_pixels(limit: int) -> None:
    """This process's guard against decompression bombs: images of more than ``limit`` pixels (rounded up to
    even) are refused, 0 lifts it. Pillow refuses from twice its ``MAX_IMAGE_PIXELS`` and warns, without naming
    the file, from once it; :func:`load_rgb` silences that warning. Large drawings can be legitimate (a few
    openclipart PNGs pass 600 million pixels)."""
    Image.MAX_IMAGE_PIXELS = -(-limit // 2) if limit else None


def current_max_image_pixels() -> int:
    """The decompression-bomb limit in force (:func:`set_max_image_pixels`), 0 for none."""
    return 0 if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def load_rgb(path: str | Path) -> Image.Image:
    """An image as RGB, upright per its EXIF orientation, with transparency composited on white; 16-bit and
    float grayscale images are first reduced to 8 bits (see :func:`_to_8bit`). PIL's DecompressionBombError, naming
    the option that raises the limit, for a file above it (:func:`set_max_image_pixels`)."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # Image.open would wait forever on a FIFO
        raise ValueError(f"{path} is not a regular file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # unnamed; the limit is the error
        try:
            return _load_rgb(path)
        except Image.DecompressionBombError as e:
            raise Image.DecompressionBombError(f"{e} (--max-image-pixels raises the limit, 0 lifts it, for trusted "
                                               "images)") from None


def _load_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as opened:
        opened.load()
        im = ImageOps.exif_transpose(opened)
        if im.mode.startswith("I") or im.mode == "F":
            im = _to_8bit(im)
        if im.has_transparency_data:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            white.alpha_composite(rgba)
            return white.convert("RGB")
        return im.convert("RGB")


def _fit(img: Image.Image, mode: str, size: int, square: int | None = None) -> Image.Image:
    """The image a ``mode`` crop of ``size`` px is cut from: resized to ``size`` x ``size`` (none), short side to
    ``size`` (center), short side up to ``size`` when smaller (random), else unchanged; with ``square``, first its
    central ``square`` x ``square`` after the short side is resized to ``square`` (the official OpenImages
    database's 1200 px squares, from which its 256 px patches were cut)."""
    if square is not None:
        img = fit_short_side(img, square, window="center")
        x, y = (img.size[0] - square) // 2, (img.size[1] - square) // 2
        img = img.crop((x, y, x + square, y + square))
    if mode == "none":
        return img.resize((size, size), Image.Resampling.BICUBIC)
    if mode == "center" or (mode == "random" and min(img.size) < size):
        return fit_short_side(img, size, window="center" if mode == "center" else None)
    return img


def fitted_size(w: int, h: int, size: int) -> tuple[int, int]:
    """The size of a ``w`` x ``h`` image once :func:`fit_short_side` has resized its short side to ``size``."""
    if min(w, h) == size:
        return w, h
    scale = size / min(w, h)
    return max(size, round(w * scale)), max(size, round(h * scale))


def fit_short_side(img: Image.Image, size: int, window: tuple[int, int] | str | None = None) -> Image.Image:
    """``img`` with its short side resized to ``size`` (bicubic; as it is where it already fits). An image so
    elongated that the result would pass MAX_FIT_PIXELS is refused (ValueError), unless the caller keeps only one
    ``size`` px square of the result, at corner ``window`` ((x, y), or "center"): then that square alone is
    resized and returned (PIL's resize of a source box: the same source-to-target mapping, though PIL's 8-bit
    rounding between its two passes can put narrow images several levels from the whole resize; such images
    take this path every time, at build and replay alike)."""
    w, h = img.size
    fit = fitted_size(w, h, size)
    if fit == (w, h):
        return img
    if fit[0] * fit[1] > MAX_FIT_PIXELS and window is not None:  # the mapping of the whole resize
        if window == "center":
            x, y = (fit[0] - size) // 2, (fit[1] - size) // 2
        elif isinstance(window, tuple) and len(window) == 2:
            x, y = window
        else:
            raise ValueError(f"window must be an (x, y) corner or 'center', got {window!r}")
        box = (x * w / fit[0], y * h / fit[1], (x + size) * w / fit[0], (y + size) * h / fit[1])
        return img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if fit[0] * fit[1] > MAX_FIT_PIXELS:  # a 20000x1 image of 143 bytes took 13 GB at 256 px
        raise ValueError(f"a {w}x{h} image would be resized to {fit[0]}x{fit[1]} (short side {size} px): too "
                         "elongated")
    return img.resize(fit, Image.Resampling.BICUBIC)


def random_fitted_window(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """The window of :func:`random_window` (the same draws from ``rng``) of ``img`` with its short side resized
    to ``size``, resizing only the window where the whole image is too elongated to resize."""
    fit = fitted_size(*img.size, size)
    x, y = int(rng.integers(0, fit[0] - size + 1)), int(rng.integers(0, fit[1] - size + 1))
    arr = np.asarray(fit_short_side(img, size, window=(x, y)))
    return arr if arr.shape[:2] == (size, size) else arr[y:y + size, x:x + size]  # the window alone, or all


def make_crops(img: Image.Image, mode: str, size: int, n: int, rng: np.random.Generator, square: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 3) uint8 crops and their (x, y) corners (-1 unless ``mode`` is "random").

    random: ``n`` windows of ``size`` px at native resolution (images whose short side is below ``size`` are
    first upscaled to it, and the corners refer to the upscaled image); center: short side resized to
    ``size``, then the central square; none: the whole image resized to ``size`` x ``size``. With ``square``
    every mode starts from the image's central square of that side (see :func:`_fit`), which the corners refer to.
    """
    coords = np.full((n, 2), -1, np.int32)
    if mode == "random":
        arr = np.asarray(_fit(img, mode, size, square))
        out = np.empty((n, size, size, 3), np.uint8)
        for c in range(n):
            out[c], coords[c] = random_window(arr, size, rng)
        return out, coords
    return replay_crop(img, mode, size, square=square)[None].repeat(n, 0), coords


def random_window(arr: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """A ``size`` x ``size`` window of the (H, W, C) image ``arr`` at a corner drawn from ``rng`` (x, then y), and
    that corner."""
    h, w = arr.shape[:2]
    x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    return arr[y:y + size, x:x + size], (x, y)


def replay_crop(img: Image.Image, mode: str, size: int, xy: tuple[int, int] | None = None,
                square: int | None = None) -> np.ndarray:
    """The (size, size, 3) uint8 crop that :func:`make_crops` made of ``img`` (``xy``: a random crop's corner)."""
    img = _fit(img, mode, size, square)
    w, h = img.size
    if mode == "random":
        if xy is None or not (0 <= xy[0] <= w - size and 0 <= xy[1] <= h - size):
            raise ValueError(f"random crop corner {xy} does not fit a {size} px crop into a {w}x{h} image")
        x, y = xy
    else:
        x, y = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((x, y, x + size, y + size)))


def error_line(e: BaseException) -> str:
    """A decoding error as "Type: message", first line only, at most 200 characters."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def query_image_size(manifest: dict, encoder: Encoder) -> int:
    """The size to cut a query image at for a database: its entries' crop size, so that the encoder then resizes
    the query as it did them; where the database records none (imported ones), the encoder's input size."""
    return (manifest.get("build") or {}).get("crop_size") or encoder.image_size


def load_query_image(path: str | Path, size: int) -> Tensor:
    """A query image as (3, size, size) in [-1, 1]: short side resized to ``size``, then the central square, as
    ``center`` database crops are made (pass the database's crop size, so that the encoder then resizes it as it
    did the entries). FileNotFoundError if missing, ValueError (one line) if it cannot be decoded: not an image,
    corrupt, or larger than PIL's decompression-bomb limit."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"query image {file} " + ("is a folder, not an image" if file.is_dir() else
                                                          not_a_file(file)))
    try:
        pixels = make_crops(load_rgb(file), "center", size, 1, np.random.default_rng(0))[0][0]
    except Exception as e:  # decoders raise many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise ValueError(f"query image {file} cannot be read ({error_line(e)})") from None
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float() / 127.5 - 1.0


class ImageCrops(Dataset):
    """File ``i`` of ``sources[first:last]`` (under ``root``) -> its crops as uint8 (n, 3, S, S); unreadable files
    give ok=False."""

    def __init__(self, root: Path, sources: PathList, first: int, crop: str, size: int, crops: int, seed: int,
                 square: int | None = None) -> None:
        self.root, self.sources, self.first = root, sources, first
        self.crop, self.size, self.crops, self.seed, self.square = crop, size, crops, seed, square
        self.max_pixels = current_max_image_pixels()  # for workers that do not inherit it (spawn, forkserver)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.first + i
        size = (0, 0)
        set_max_image_pixels(self.max_pixels)
        try:
            img = load_rgb(self.root / self.sources[i])
            size = img.size
            rng = np.random.default_rng([self.seed, index])
            pixels, coords = make_crops(img, self.crop, self.size, self.crops, rng, self.square)
            ok, error = True, ""
        except Exception as e:  # any decoding failure of any format: skip the file, never the build
            pixels = np.zeros((self.crops, self.size, self.size, 3), np.uint8)
            coords = np.full((self.crops, 2), -1, np.int32)
            ok, error = False, error_line(e)
        return {"pixels": torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))),
                "coords": torch.from_numpy(coords), "index": index, "ok": ok, "error": error,
                "size": torch.tensor(size)}


# ---------------------------------------------------------------------------------------------- bookkeeping

def _holds_files(progress: Path) -> bool:
    """Whether a build's ``progress/`` folder holds more than the temporary files of a killed first write (a build
    killed before it recorded its arguments left nothing to resume, and nothing to protect; nor does the lock of
    ``db build``, which a run takes before it looks)."""
    return not progress.is_dir() or any(not p.name.endswith(TEMP_SUFFIX) and p.name != LOCK_FILE
                                        for p in progress.iterdir())


# the precision the encoder embeds in, recorded with a build's arguments: shards of two precisions must not mix
PRECISION = "encoder_precision"
PRECISION_FOLLOWS = "the CLIP towers run in float16 on a GPU, float32 on the CPU"

MADE_BY = {"images": "db build", "npz": "db import-npz"}  # the command of each kind of recorded build

# recorded arguments that older versions kept otherwise: key -> whether a recorded config is of such a version
OLDER_RECORDS: dict[str, Callable[[dict], bool]] = {
    "encoder_checkpoint_sha256": lambda c: "encoder_checkpoint_bytes" in c,  # the checkpoint's size
    "parts": lambda c: any("crc32" not in p for p in c.get("parts") or ()),  # import-npz parts by size and rows
}


class ShardedBuild:
    """Resumable shard bookkeeping in ``out``: ``progress/config.json`` (the arguments that determine the
    result) and one done-record per finished shard. Used by image builds and npz imports."""

    def __init__(self, out: str | Path, config: dict, n_shards: int) -> None:
        self.out, self.n_shards = Path(out), n_shards
        self.config = json.loads(json.dumps(config))  # as it reads back from JSON
        self.progress = self.out / PROGRESS

    @staticmethod
    def check_arguments(out: Path, config: dict, *, partial: bool = False, ignore: Sequence[str] = ()) -> None:
        """ValueError where ``out`` holds a build whose recorded arguments differ from ``config`` (``partial``:
        compare only the keys ``config`` has, those known before a slow setup such as building the encoder; keys in
        ``ignore`` are not compared)."""
        config_file = out / PROGRESS / "config.json"
        if not config_file.is_file():
            return
        try:
            previous = json.loads(config_file.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{config_file} is corrupted: delete {out} and build again") from None
        config = json.loads(json.dumps(config))  # as it reads back from JSON
        if previous.get("kind") != config.get("kind") and {previous.get("kind"), config.get("kind")} <= set(MADE_BY):
            # not a list of differing arguments (and, for an import, a word on the encoder's precision it has none of)
            raise ValueError(f"{out} holds a database begun by {MADE_BY[previous['kind']]}, which "
                             f"{MADE_BY[config['kind']]} cannot continue: choose a new --out")
        if PRECISION in config and PRECISION not in previous and PRECISION not in ignore:
            # recorded on every device by builds since the key was added: an older build's precision is unknown
            log.warning("%s was begun by an older rdm_fast, which did not record the encoder's precision: it is not "
                        "checked; continue it on the kind of device it began on (%s)", out, PRECISION_FOLLOWS)
            ignore = (*ignore, PRECISION)
        names = set(config) if partial else set(previous) | set(config)
        keys = sorted(k for k in names - set(ignore) if previous.get(k) != config.get(k))
        older = [k for k in keys if k in OLDER_RECORDS and OLDER_RECORDS[k](previous)]
        if older:  # same arguments, recorded otherwise
            raise ValueError(f"{out} holds a build begun by an older rdm_fast, which recorded its inputs without "
                             f"{', '.join(older)} (contents that a rerun must match): build into a new --out")
        if keys:
            device = f" ({PRECISION} follows --device: {PRECISION_FOLLOWS})" if PRECISION in keys else ""
            raise ValueError(f"{out} holds a build made with different arguments (they differ in: "
                             f"{', '.join(keys)}{device}); rerun with the same arguments or choose a new --out")

    def prepare(self) -> bool:
        """Check ``out`` (empty, or a build with the same arguments), record the arguments, delete temporary
        files of killed writers. Returns True when the database is already complete. Rank 0 only."""
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file, not a folder")
        config_file = self.progress / "config.json"
        if config_file.is_file():
            self.check_arguments(self.out, self.config)
        elif self.out.is_dir() and any(p != self.progress or _holds_files(p) for p in self.out.iterdir()):
            raise ValueError(f"--out {self.out} is not empty and holds no resumable build: choose a new directory")
        try:
            make_dirs(self.progress)
        except NotADirectoryError as e:
            raise ValueError(f"--out {self.out}: {e}") from None
        removed = remove_stale_temps(self.out) + remove_stale_temps(self.progress)
        if removed:
            log.info("removed %d temporary files left by an interrupted build", removed)
        atomic_write_json(config_file, self.config)
        if not (self.out / MANIFEST).is_file():
            return False
        damaged = damaged_shard(self.out)
        if damaged is None:
            return True
        records = {key: record for key in ("index", "proposals") if (record := read_manifest(self.out).get(key))}
        log.warning("%s is missing or not the size %s records: computing its shard again%s", self.out / damaged,
                    MANIFEST, f" (the {' and '.join(records)} recorded there must be made again)" if records else "")
        (self.out / MANIFEST).unlink()  # the resume computes again the shards that no longer match their records
        for record in records.values():  # their files, no longer listed, would only take disk space
            (self.out / record["file"]).unlink(missing_ok=True)
        return False

    def record_file(self, j: int) -> Path:
        """Where shard ``j``'s done-record is kept."""
        return self.progress / f"shard_{j:05d}.json"

    def finished(self, j: int) -> dict | None:
        """Shard ``j``'s done-record when its files exist and match their checksums, else None."""
        file = self.record_file(j)
        if not file.is_file():
            return None
        try:
            record = json.loads(file.read_text())
            entry = record["entry"]
            for name, size, digest in ((entry["embeddings"], entry["bytes"], entry["sha256"]),
                                       (entry["meta"], entry["meta_bytes"], entry["meta_sha256"])):
                path = self.out / name
                if not path.is_file() or path.stat().st_size != size or sha256_file(path) != digest:
                    log.warning("shard %d: %s does not match its done-record; computing it again", j, name)
                    return None
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("shard %d: unreadable done-record %s; computing it again", j, file)
            return None
        return record

    def record(self, j: int, entry: dict, **extra: Any) -> None:
        """Mark shard ``j`` finished (after its files are in place)."""
        atomic_write_json(self.record_file(j), {"shard": j, "entry": entry, **extra})

    def records(self) -> list[dict]:
        """All done-records in shard order (after every process finished)."""
        out = []
        for j in range(self.n_shards):
            file = self.record_file(j)
            if not file.is_file():
                raise ValueError(f"shard {j} has no done-record {file} although every process finished: do all "
                                 "processes write to one shared --out?")
            out.append(json.loads(file.read_text()))
        return out


def damaged_shard(out: Path) -> str | None:
    """The first file the manifest of the database ``out`` lists that is missing or not the size it records (a
    stat, no reading: what Database.open refuses), the manifest's name where it is gone, or None."""
    try:
        shards = read_manifest(out)["shards"]
    except FileNotFoundError:  # removed since it was seen (by process 0 of a torchrun build, for a damaged shard)
        return MANIFEST
    for entry in shards:
        for name, size in ((entry["embeddings"], entry["bytes"]), (entry["meta"], entry["meta_bytes"])):
            try:
                check_shard_file(out / name, size, None, verify=False)
            except (FileNotFoundError, ValueError):
                return name
    return None


def inputs_digest(sources: PathList, classes: np.ndarray | None) -> str:
    """SHA-256 of the input list as lines "source<TAB>class id" (-1 without classes), to refuse resuming over a
    changed input set."""
    h = hashlib.sha256()
    for first in range(0, len(sources), DIGEST_BLOCK):
        last = min(len(sources), first + DIGEST_BLOCK)
        ids = classes[first:last].tolist() if classes is not None else [-1] * (last - first)
        h.update(b"".join(b"%s\t%d\n" % (sources.encoded(i), c) for i, c in zip(range(first, last), ids)))
    return h.hexdigest()


def _check_same_build(procs: Processes, state: ShardedBuild) -> None:
    """ValueError on every process unless each one was given rank 0's build arguments and inputs and sees the
    ``out`` rank 0 prepared (a node with other files, or without the shared file system, was found only after
    all the embedding, with a traceback and a half-built database)."""
    theirs = procs.from_rank0(state.config)
    differ = sorted(k for k in set(theirs) | set(state.config) if theirs.get(k) != state.config.get(k))
    unseen = not (state.progress / "config.json").is_file()
    if not int(procs.all_sum(torch.tensor(int(bool(differ)) + 2 * int(unseen))).item()):
        return
    if differ:
        raise ValueError(f"process {procs.rank} was given other build arguments or inputs than process 0 (they "
                         f"differ in: {', '.join(differ)}): every process must see the same command and files")
    if unseen:
        raise ValueError(f"--out {state.out} is not shared: process {procs.rank} cannot see what process 0 wrote "
                         "there (put --out on a file system every process shares)")
    raise ValueError("another process was given other build arguments or inputs, or cannot see --out (its error "
                     "says which)")


def _one_line(e: Exception) -> str:
    """An error as the command lines print it: an OSError naming a file as "FILE: reason" (not Python's
    "[Errno 27] File too large: 'FILE'"), as it reads where the error is raised again on every process."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def run_sharded(out: Path, config: dict, n_shards: int,
                compute: Callable[[list[int], ShardedBuild, Processes], None],
                finish: Callable[[list[dict]], None]) -> Path:
    """The resumable, distributed skeleton: prepare ``out`` (rank 0), ``compute(pending, state, processes)``
    this process's unfinished shards, barrier, then ``finish(done_records)`` writes the manifest (rank 0)."""
    procs = Processes()
    try:
        state = ShardedBuild(out, config, n_shards)
        complete, error = False, None
        if procs.rank == 0:
            try:
                complete = state.prepare()
            except (ValueError, OSError) as e:
                error = (isinstance(e, FileNotFoundError), _one_line(e))
        complete, error = procs.from_rank0((complete, error))
        if error is not None:  # raised on every rank, so no process waits for the others forever
            raise (FileNotFoundError if error[0] else ValueError)(error[1])
        if procs.world > 1:
            _check_same_build(procs, state)
        if complete:
            log.info("%s is already complete (same arguments): nothing to do", out)
            return out
        mine = [j for j in range(n_shards) if j % procs.world == procs.rank]
        recorded = [j for j in mine if state.record_file(j).is_file()]
        if recorded:  # each is checked against its checksums: a pass over those shards' bytes
            log.info("checking the %d shards an earlier run finished", len(recorded))
        pending = [j for j in mine if state.finished(j) is None]
        if len(pending) < len(mine):
            log.info("resuming: %d of %d shards of this process are already done", len(mine) - len(pending),
                     len(mine))
        if procs.world > 1:
            log.info("process %d of %d computes %d of the %d shards", procs.rank, procs.world, len(pending),
                     n_shards)
        compute(pending, state, procs)
        if procs.world > 1:  # a slow (or stuck) process keeps the others here (INFO lines come from rank 0 only)
            log.info("this process has finished its shards; waiting for the other processes")
        procs.barrier()
        if procs.rank == 0:
            try:
                finish(state.records())
            except (ValueError, OSError) as e:
                error = (isinstance(e, FileNotFoundError), _one_line(e))
        error = procs.from_rank0(error)
        if error is not None:  # on every rank, as above
            raise (FileNotFoundError if error[0] else ValueError)(error[1])
        return out
    finally:
        procs.close()


# ---------------------------------------------------------------------------------------------- image builds
def _folder_classes(sources: PathList, folder: Callable[[str], str | None]) -> tuple[np.ndarray, list[str]]:
    """Class ids from each source's ``folder`` name (names in sorted order are 0, 1, ...; None is -1) and the
    names. Keeps one small integer per source, not a string."""
    seen: dict[str, int] = {}
    ids = array("q")
    for s in sources:
        name = folder(s)
        ids.append(-1 if name is None else seen.setdefault(name, len(seen)))
    names = sorted(seen)
    final = {name: i for i, name in enumerate(names)}
    remap = np.array([final[name] for name in seen] + [-1], np.int64)  # the last entry maps -1 to itself
    return remap[np.frombuffer(ids, np.int64)], names


def _inputs(images: str | Path | None, image_list: str | Path | None, class_from_folder: bool
            ) -> tuple[Path, Path, PathList, np.ndarray | None, list[str] | None]:
    """(root relative sources are resolved against, the folder or list given, sources, class ids or None,
    class names or None). Folder classes: the top-level folder (images directly in a scanned root get -1);
    for a list, each file's parent folder (files directly in the list's folder get -1)."""
    if images is not None:
        inputs = root = Path(images).resolve()
        sources, classes = list_images(root), None

        def folder(s: str) -> str | None:
            return s.split("/", 1)[0] if "/" in s else None
    else:
        assert image_list is not None  # build_database checks that exactly one of the two is given
        inputs = Path(image_list).resolve()
        root = inputs.parent
        sources, classes = read_list(inputs)
        if class_from_folder and classes is not None:
            raise ValueError(f"{inputs} has class ids; do not also ask for classes from folders")

        def folder(s: str) -> str | None:
            parent = (root / s).parent
            return parent.name if parent != root and parent.name else None
    if not sources:
        raise ValueError(f"no images found in {inputs}" if images is not None else f"{inputs} lists no images")
    class_names = None
    if class_from_folder:
        classes, class_names = _folder_classes(sources, folder)
    return root, inputs, sources, classes, class_names


def _warn_upscaling(root: Path, sources: PathList, size: int, target: str) -> None:
    """Warn when ``target`` (``size`` px crops or squares) need more than MAX_UPSCALE times enlargement of some of
    an even sample of ``sources`` (only their headers are read): each such image is enlarged to ``size`` px."""
    sizes: dict[Path, tuple[int, int]] = {}
    for i in range(0, len(sources), max(1, len(sources) // UPSCALE_SAMPLE))[:UPSCALE_SAMPLE]:
        file = root / sources[i]
        if not file.is_file():  # missing, or a FIFO (whose open would block): the build skips and counts it
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # unnamed: see load_rgb
                with Image.open(file) as im:
                    sizes[file] = im.size
        except Exception:  # unreadable: the build skips and counts it
            continue
    small = [(file, wh) for file, wh in sizes.items() if size > MAX_UPSCALE * min(wh)]
    if small:
        file, (w, h) = small[0]
        log.warning("%s enlarge %d of %d sampled images more than %dx before cutting (e.g. %s, %dx%d): is that the "
                    "size you meant?", target, len(small), len(sizes), MAX_UPSCALE, file, w, h)


def build_database(out: str | Path, *, encoder: Encoder | str, images: str | Path | None = None,
                   image_list: str | Path | None = None, crop: str = "center", crop_size: int = 256,
                   crops_per_image: int = 1, batch_size: int = 64, shard_size: int = 100_000,
                   workers: int = 4, device: str = "auto", encoder_checkpoint: str | None = None,
                   class_from_folder: bool = False, seed: int = 0, fit_square: int | None = None,
                   progress: bool = True) -> Path:
    """Embed every image of the folder ``images`` (or the files of ``image_list``) with ``encoder`` (an
    Encoder, a registered name or ``"module:factory"``) into a database at ``out``. See the module docstring
    for resumption and ``torchrun``; unreadable images are skipped and counted. A CUDA ``device`` becomes the
    current CUDA device (``process_device``). ``fit_square``: random crops are cut from each image's central
    square of this side, its short side resized to it first (the official OpenImages database: 1200)."""
    began = time.perf_counter()
    if (images is None) == (image_list is None):
        raise ValueError("give exactly one of images (a folder) or image_list (a list file)")
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}")
    if not isinstance(encoder, (Encoder, str)):
        raise TypeError(f"encoder must be an Encoder or a registered name or 'module:factory', got "
                        f"{type(encoder).__name__}")
    crop_size, crops_per_image, batch_size, shard_size = (
        check_count(value, name) for name, value in (("crop_size", crop_size), ("crops_per_image", crops_per_image),
                                                     ("batch_size", batch_size), ("shard_size", shard_size)))
    workers = check_count(workers, "workers", 0)
    if not 0 <= seed < 2**63:  # a negative one failed every image's crop, reported as unreadable images
        raise ValueError(f"seed (--seed) must be in [0, 2**63), got {seed}")
    if crops_per_image > 1 and crop != "random":
        raise ValueError(f"crops_per_image {crops_per_image} needs crop='random' (other crops are all equal)")
    if fit_square is not None and (crop != "random" or not crop_size <= fit_square <= MAX_SQUARE):
        raise ValueError(f"fit_square (--fit-square) {fit_square} needs crop='random' (--crop random) and a side from "
                         f"crop_size ({crop_size}) to {MAX_SQUARE} px")
    if fit_square == crop_size and crops_per_image > 1:
        raise ValueError(f"fit_square (--fit-square) equal to crop_size makes all {crops_per_image} crops of an image "
                         "the same: use a larger square or one crop per image")
    if crop_size > MAX_CROP_SIZE:
        gib = batch_size * crop_size ** 2 * 3 * 5 / 2**30  # uint8 crops and their float32 copy
        raise ValueError(f"crop_size {crop_size} is above {MAX_CROP_SIZE} px: the encoder resizes every crop to its "
                         f"input size (224 px for CLIP) anyway, and a batch of {batch_size} such crops takes "
                         f"{gib:.0f} GiB; the released models use 256 (imagenet, ffhq) or 768 (rdm768)")
    root, inputs, sources, classes, class_names = _inputs(images, image_list, class_from_folder)
    target = f"{fit_square} px squares" if fit_square is not None else f"{crop_size} px crops"  # what images fit
    if int(os.environ.get("RANK", "0")) == 0:
        _warn_upscaling(root, sources, fit_square or crop_size, target)

    dev = process_device(device)
    files_per_shard = max(1, shard_size // crops_per_image)
    n_shards = -(-len(sources) // files_per_shard)
    if encoder_checkpoint and not Path(encoder_checkpoint).is_file():  # named before its hash's bare OSError
        raise FileNotFoundError(f"encoder checkpoint (--encoder-checkpoint) {encoder_checkpoint} "
                                f"{not_a_file(encoder_checkpoint)}")
    checkpoint = Path(encoder_checkpoint).resolve() if encoder_checkpoint else None
    limit = current_max_image_pixels()  # the process's (set_max_image_pixels; the command line's option)
    config: dict[str, Any] = {
        "kind": "images", "encoder_spec": encoder if isinstance(encoder, str) else encoder.name,
        "encoder_checkpoint": str(checkpoint) if checkpoint else None,
        # by content: two checkpoints of one architecture (CLIP weights of two trainings) have the same size
        "encoder_checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "inputs": str(inputs), "n_inputs": len(sources),
        "inputs_sha256": inputs_digest(sources, classes),
        "crop": crop, "crop_size": crop_size, "crops_per_image": crops_per_image, "shard_size": shard_size,
        "files_per_shard": files_per_shard, "class_from_folder": class_from_folder, "seed": seed,
        **({"fit_square": fit_square} if fit_square is not None else {}),  # absent: as builds before the option
        # which images are refused as too large (absent: Pillow's default, as builds before the option)
        **({"max_image_pixels": limit} if limit != PILLOW_MAX_PIXELS else {})}
    out = Path(out)
    ShardedBuild.check_arguments(out, config, partial=True)  # before the encoder is built (seconds to minutes)
    if isinstance(encoder, str) and (out / MANIFEST).is_file() and (out / PROGRESS / "config.json").is_file():
        # every argument but the encoder's info and precision, which follow from its name, checkpoint file and
        # device, compared here (a damaged shard's repair compares them too, once the encoder is built)
        ShardedBuild.check_arguments(out, config, ignore=("encoder", PRECISION))
        if damaged_shard(out) is None:  # else the build computes that shard again (ShardedBuild.prepare)
            log.info("%s is already complete (same arguments): nothing to do", out)
            return out
    enc = resolve_encoder(encoder, device=dev, checkpoint=encoder_checkpoint) if isinstance(encoder, str) else encoder
    config["encoder"] = enc.info()
    # shards embedded in another precision differ (float16 CLIP towers on a GPU, float32 on the CPU): a resume or
    # repair on another device must not mix them
    config[PRECISION] = str(getattr(enc, "dtype", torch.float32)).removeprefix("torch.")

    def compute(pending: list[int], state: ShardedBuild, procs: Processes) -> None:
        todo = sum(min(len(sources), (j + 1) * files_per_shard) - j * files_per_shard for j in pending)
        desc = "embedding" if procs.world == 1 else f"embedding (rank {procs.rank})"
        with tqdm(total=todo, desc=desc, unit="img", disable=not progress, position=procs.rank) as bar:
            for j in pending:
                first, last = j * files_per_shard, min(len(sources), (j + 1) * files_per_shard)
                entry, skipped, enlarged = _embed_shard(
                    out, j, enc, root, sources[first:last], None if classes is None else classes[first:last], first,
                    crop, crop_size, crops_per_image, batch_size, workers, seed, dev, bar, fit_square)
                # the count, and the first names only: all of a 20M-image build's could be gigabytes
                state.record(j, entry, skipped=skipped, enlarged=enlarged[:MAX_SKIPPED_IN_MANIFEST],
                             enlarged_count=len(enlarged))

    def finish(records: list[dict]) -> None:
        skipped = [s for r in records for s in r["skipped"]]
        if skipped and not any(r["entry"]["rows"] for r in records):
            _remove_build(out, records)  # nothing worth resuming: a rerun, once the images can be read, starts over
            relative = (f"; relative paths in a list are read from the list's folder, {root}" if image_list is not
                        None else "")
            raise ValueError(f"none of the {len(skipped)} images could be read (e.g. {root / skipped[0][0]}: "
                             f"{skipped[0][1]}){relative}; nothing was kept in {out}")
        if skipped:
            log.warning("skipped %d unreadable image%s (listed in %s), e.g. %s: %s", len(skipped),
                        "s"[:len(skipped) != 1], out / MANIFEST, *skipped[0])
        counted = [r for r in records if "enlarged_count" in r]  # shards finished by older versions count none
        n_enlarged = sum(r["enlarged_count"] for r in counted)
        enlarged = [e for r in counted for e in r["enlarged"]][:MAX_SKIPPED_IN_MANIFEST]
        uncounted = len(records) - len(counted)
        if enlarged:
            log.warning("%d image%s had to be enlarged more than %dx for %s (listed in %s), e.g. %s (%dx%d): their "
                        "entries are blurry%s", n_enlarged, "s"[:n_enlarged != 1], MAX_UPSCALE, target, out / MANIFEST,
                        *enlarged[0], f" ({uncounted} shards of an older version not counted)" if uncounted else "")
        manifest = new_manifest(enc.info(), [r["entry"] for r in records], has_sources=True,
                                has_class_ids=classes is not None, has_patch_coords=crop == "random",
                                image_root=str(root), skipped={"count": len(skipped),
                                                               "files": skipped[:MAX_SKIPPED_IN_MANIFEST]},
                                enlarged={"count": n_enlarged, "files": enlarged, "uncounted_shards": uncounted},
                                build=config, class_names=class_names)
        write_manifest(out, manifest)
        log.info("wrote %s: %d embeddings in %d shard%s (%.1f s for this run)", out, manifest["count"], len(records),
                 "s"[:len(records) != 1], time.perf_counter() - began)

    return run_sharded(out, config, n_shards, compute, finish)


def _remove_build(out: Path, records: list[dict]) -> None:
    """Delete what a build wrote to ``out``: its shards and its progress (the folder itself stays)."""
    for r in records:
        for name in (r["entry"]["embeddings"], r["entry"]["meta"]):
            (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PROGRESS, ignore_errors=True)


def _embed_shard(out: Path, j: int, encoder: Encoder, root: Path, sources: PathList,
                 classes: np.ndarray | None, first: int, crop: str, size: int, crops: int, batch_size: int,
                 workers: int, seed: int, device: torch.device, bar: tqdm, square: int | None
                 ) -> tuple[dict, list, list]:
    """Embed and write shard ``j``: its entry, the images skipped ([source, error]) and those enlarged more than
    MAX_UPSCALE times for their crops ([source, width, height])."""
    loader = DataLoader(ImageCrops(root, sources, first, crop, size, crops, seed, square),
                        batch_size=max(1, batch_size // crops), num_workers=workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # its workers' base seed: not a draw from the global RNG
    embs, srcs, cls, coords, skipped, enlarged = [], [], [], [], [], []
    for batch in loader:
        ok = batch["ok"]
        for index, good, error, (w, h) in zip(batch["index"].tolist(), ok.tolist(), batch["error"],
                                              batch["size"].tolist()):
            if not good:
                skipped.append([sources[index - first], error])
                log.debug("skipping %s (%s)", root / sources[index - first], error)
            elif (square or size) > MAX_UPSCALE * min(w, h):
                enlarged.append([sources[index - first], w, h])
        if ok.any():
            pixels = batch["pixels"][ok].flatten(0, 1).to(device, non_blocking=True)
            with torch.inference_mode():
                emb = embed_images(encoder, pixels.float() / 127.5 - 1.0)
            emb16 = emb.float().cpu().numpy().astype(np.float16)
            kept = batch["index"][ok].tolist()
            if not np.isfinite(emb16).all():
                bad = kept[int(np.nonzero(~np.isfinite(emb16).all(1))[0][0]) // crops]
                raise ValueError(f"encoder {encoder.name} gave non-finite embeddings (or values beyond float16) "
                                 f"for {root / sources[bad - first]}")
            embs.append(emb16)
            coords.append(batch["coords"][ok].flatten(0, 1).numpy())
            for index in kept:
                srcs += [sources[index - first]] * crops
                cls += [int(classes[index - first]) if classes is not None else -1] * crops
        bar.update(len(ok))
    emb_all = np.concatenate(embs) if embs else np.zeros((0, encoder.dim), np.float16)
    xy = np.concatenate(coords) if coords else np.zeros((0, 2), np.int32)
    entry = write_shard(out, j, emb_all, sources=srcs, class_ids=np.asarray(cls, np.int64), patch_coords=xy)
    return entry, skipped, enlarged
