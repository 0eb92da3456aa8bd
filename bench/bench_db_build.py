"""pytest-benchmark: database build throughput (images/s) on generated JPEGs, CPU.

``rdm_fast.retrieval.build_database`` (DataLoader workers decoding and cropping while the encoder runs,
float16 shards written with checksums) against the plain PyTorch baseline in the same run: one process
that decodes, crops and encodes batch after batch and keeps the embeddings in memory. The encoder is
``offline-lite0-minilm`` when its weights are installed, else CLIP ViT-B/32 with random weights (same
compute as the real one); the benchmark skips when neither can be built. ``RDM_BENCH_DB_IMAGES`` sets the
number of images (default 256), ``RDM_BENCH_DB_WORKERS`` the loader processes (default 2).
Run: ``pytest bench/bench_db_build.py --benchmark-only --benchmark-group-by=group``; the images/s figures
are in each result's ``extra_info``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rdm_fast.encoders import EncoderUnavailable, get_encoder
from rdm_fast.retrieval import build_database
from rdm_fast.retrieval.build import list_images, load_rgb, make_crops

N_IMAGES = int(os.environ.get("RDM_BENCH_DB_IMAGES", "256"))
WORKERS = int(os.environ.get("RDM_BENCH_DB_WORKERS", "2"))
BATCH = 64


@pytest.fixture(scope="module")
def encoder():
    for name, pretrained in (("offline-lite0-minilm", True), ("clip-vit-b-32", False)):
        try:
            return get_encoder(name, device="cpu", pretrained=pretrained)
        except (EncoderUnavailable, ValueError):
            continue
    pytest.skip("neither offline-lite0-minilm nor clip-vit-b-32 can be built here")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Photo-sized JPEGs (smooth colour fields plus noise) in a few nested folders."""
    root = tmp_path_factory.mktemp("bench_images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:400] / 300.0
    for i in range(N_IMAGES):
        folder = root / f"class_{i % 8}"
        folder.mkdir(exist_ok=True)
        a, b, c = rng.uniform(0, 6, 3)
        field = np.stack([np.sin(a * xx + b), np.cos(b * yy + c), np.sin(c * (xx + yy))], -1)
        pixels = (127 + 100 * field + rng.normal(0, 12, field.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def _naive(encoder, root: Path) -> np.ndarray:
    """Baseline: decode, centre-crop and encode in one process, batch after batch."""
    files = [root / s for s in list_images(root)]
    out, rng = [], np.random.default_rng(0)
    for start in range(0, len(files), BATCH):
        crops = np.concatenate([make_crops(load_rgb(f), "center", encoder.image_size, 1, rng)[0]
                                for f in files[start:start + BATCH]])
        x = torch.from_numpy(crops.transpose(0, 3, 1, 2).copy()).float() / 127.5 - 1
        with torch.inference_mode():
            out.append(encoder.encode_images(x).numpy())
    return np.concatenate(out)


def record_rate(benchmark, **info) -> None:
    """``info`` and, when the run was timed, images/s from the median round into ``extra_info`` (``benchmark.stats``
    is None under ``--benchmark-disable``)."""
    if benchmark.stats is not None:
        info["images_per_s"] = round(N_IMAGES / benchmark.stats["median"], 2)
    benchmark.extra_info.update(info)


def test_db_build(benchmark, encoder, images, tmp_path_factory):
    benchmark.group = f"db-build-{encoder.name}-{N_IMAGES}"
    benchmark.pedantic(
        lambda out: build_database(out, encoder=encoder, images=images, crop="center", crop_size=encoder.image_size,
                                   batch_size=BATCH, workers=WORKERS, device="cpu", progress=False),
        setup=lambda: ((tmp_path_factory.mktemp("db"),), {}), rounds=2, iterations=1)
    record_rate(benchmark, workers=WORKERS, encoder=encoder.name)


def test_db_build_baseline_loop(benchmark, encoder, images):
    benchmark.group = f"db-build-{encoder.name}-{N_IMAGES}"
    emb = benchmark.pedantic(_naive, args=(encoder, images), rounds=2, iterations=1)
    assert emb.shape == (N_IMAGES, encoder.dim)
    record_rate(benchmark, workers=0, encoder=encoder.name)
