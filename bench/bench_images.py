"""Writing sample images: 8 PNGs of 768x768 (rdm768's output size, the sample command's default batch) one after
another with ``images.save_png`` (the baseline: how ``sample`` wrote them before) against ``images.PngWriter``
(background threads), in the same run. The images are a smooth pattern with noise, which compresses like a
photograph more than pure noise does. CPU only: no GPU is involved in either.

Run: ``pytest bench/bench_images.py --benchmark-only``.
"""

from __future__ import annotations

import numpy as np
import pytest

from rdm_fast.images import PngWriter, save_png

N_IMAGES, SIZE = 8, 768


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    base = np.stack([(xx / 3) % 256, (yy / 3) % 256, ((xx + yy) / 6) % 256], -1).astype(int)
    return [np.clip(base + rng.integers(-8, 8, base.shape), 0, 255).astype(np.uint8) for _ in range(N_IMAGES)]


@pytest.mark.parametrize("writer", ["save_png-serial", "PngWriter"])
def test_write_pngs(benchmark, images, tmp_path, writer):
    benchmark.group = f"write {N_IMAGES} PNGs of {SIZE}x{SIZE}"
    benchmark.extra_info.update(images=N_IMAGES, size=SIZE, writer=writer)

    def serial():
        for i, image in enumerate(images):
            save_png(image, tmp_path / f"s{i}.png", fsync=True)  # as PngWriter writes them

    def background():
        with PngWriter(max_pending=2 * N_IMAGES) as w:
            for i, image in enumerate(images):
                w.write(image, tmp_path / f"w{i}.png")

    benchmark.pedantic(serial if writer == "save_png-serial" else background, rounds=3, iterations=1,
                       warmup_rounds=1)
