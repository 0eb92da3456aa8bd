"""Writing images: [-1, 1] tensors to PNG files (atomically) and contact grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from ._files import atomic_write


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (B, H, W, 3) uint8 images into one (rows, columns) image with a white border."""
    b, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return out


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write an (H, W, 3) uint8 image atomically."""
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def contact_sheet(tiles: list[tuple[Image.Image, str]], columns: int | None = None) -> Image.Image:
    """A grid of (image, caption) tiles, each caption written under its image."""
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
