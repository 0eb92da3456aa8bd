"""Writing images: [-1, 1] tensors to PNG files (atomically) and contact grids."""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from ._files import atomic_write

log = logging.getLogger("rdm_fast.images")


def check_image_range(images: Tensor, what: str, expects: str) -> None:
    """ValueError when CPU images hold NaN or infinite values; a warning when they reach far beyond [-1, 1] (0-255
    pixels passed as floats). ``expects`` names who takes [-1, 1]. CUDA images are not read (that would
    synchronise with the host)."""
    if images.device.type != "cpu" or not images.numel() or not images.is_floating_point():
        return
    peak = float(images.detach().abs().amax())  # not the autograd tensor (PyTorch warns of float() on it)
    if not math.isfinite(peak):  # amax propagates NaN
        raise ValueError(f"{what}: the images hold NaN or infinite values")
    if peak > 1.5:
        log.warning("%s: the images reach %.3g; %s expects values in [-1, 1] (uint8 pixels: x / 127.5 - 1)", what,
                    peak, expects)


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 (NaN becomes 0: check for it before, as sampling does).

    Quantised as the reference sampling scripts save their images, whose files gave the published FIDs:
    ``(255 * clamp((x + 1) / 2, 0, 1)).astype(uint8)`` in float32, truncating (not rounding) the levels."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"to_uint8: images must be a (B, 3, H, W) tensor, got {shape}")
    x = (((images.detach().float() + 1) / 2).clamp(0, 1) * 255).byte()  # float to uint8 truncates, as NumPy's
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (B, H, W, 3) uint8 images into one (rows, columns) image with a white border; ``columns`` default:
    about the square root of B."""
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"grid: images must be (B, H, W, C) with B >= 1, got {images.shape}")
    if columns is not None and columns < 1:
        raise ValueError(f"grid: columns must be at least 1, got {columns}")
    b, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return out


def save_png(image: np.ndarray, path: str | Path, *, text: dict[str, str] | None = None,
             fsync: bool = False) -> None:
    """Write an (H, W, 3) uint8 image atomically, with ``text`` entries in its header (``fsync``: its data on
    disk before it takes its name)."""
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG", pnginfo=info), fsync=fsync)


class PngWriter:
    """Writes PNGs (atomically, :func:`save_png`, flushed to disk before they take their names: an image that
    exists is whole, even after a power loss, which ``sample --resume`` relies on) on background threads, so that
    a sampling loop queues its next batch on the GPU while the last one is compressed: Pillow's zlib compression
    releases the GIL, and a 768x768 PNG takes about 0.16 s of CPU (bench/bench_images.py). At most
    ``max_pending`` images wait to be written (``write`` blocks until one is done); the first failure is raised
    by a later ``write`` or by ``close``. Use as a context manager."""

    def __init__(self, max_pending: int = 64, workers: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1),
                                        thread_name_prefix="png-writer")
        self._pending: deque[Future] = deque()
        self._max_pending = max(1, max_pending)

    def write(self, image: np.ndarray, path: str | Path, text: dict[str, str] | None = None) -> None:
        """Queue ``image`` (H, W, 3) uint8 for ``path``, with ``text`` entries in its header."""
        while self._pending and (self._pending[0].done() or len(self._pending) >= self._max_pending):
            self._pending.popleft().result()  # raises a failed write's error
        self._pending.append(self._pool.submit(save_png, image, path, text=text, fsync=True))

    def close(self) -> None:
        """Wait for every queued image; raise the first failure."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leaving on an error (or Ctrl-C): drop what is not yet written, keep the original exception
            self._pool.shutdown(wait=True, cancel_futures=True)


def contact_sheet(tiles: list[tuple[Image.Image, str]], columns: int | None = None) -> Image.Image:
    """A grid of (image, caption) tiles, each caption written under its image."""
    if not tiles:
        raise ValueError("contact_sheet: no tiles")
    if columns is not None and columns < 1:
        raise ValueError(f"contact_sheet: columns must be at least 1, got {columns}")
    size = tiles[0][0].size[0]
    columns = columns or min(len(tiles), math.ceil(math.sqrt(len(tiles))) + 1)
    rows = math.ceil(len(tiles) / columns)
    pad, text_h = 4, 14
    sheet = Image.new("RGB", (columns * (size + pad) + pad, rows * (size + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(tiles):
        r, c = divmod(i, columns)
        x, y = pad + c * (size + pad), pad + r * (size + text_h + pad)
        sheet.paste(img, (x, y))
        draw.text((x + 2, y + size + 1), caption, fill="black")
    return sheet
