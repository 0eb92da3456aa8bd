"""pytest-benchmark benchmarks of the encoders: images/s of each encoder against its bare tower.

``pytest bench/bench_encoders.py --benchmark-only --benchmark-group-by=group``. Each group holds the full
``encode_images`` call (resize + normalisation + tower + projection) and the PyTorch baseline of the same
run: the bare tower on an already preprocessed batch, so the difference is the encoder's own overhead.
CLIP uses random weights (``pretrained=False``: same cost as the real ones); the offline encoder needs its
optional packages and is skipped without them. Images/s = batch / mean time. CPU: batch 8 at 256x256;
CUDA (when available): batch 64, CLIP in its default float16 and, for comparison, in float32. ViT-L/14 runs on
CUDA only (about 80 GFLOP per image).
"""

from __future__ import annotations

import pytest
import torch

from rdm_fast.encoders import EncoderUnavailable, get_encoder

# (encoder, device, batch, CLIP precision: None for the device's default)
CASES = [("clip-vit-b-32", "cpu", 8, None), ("offline-lite0-minilm", "cpu", 8, None),
         ("clip-vit-b-32", "cuda", 64, None), ("clip-vit-b-32", "cuda", 64, "fp32"),
         ("clip-vit-l-14", "cuda", 64, None), ("clip-vit-l-14", "cuda", 64, "fp32"),
         ("offline-lite0-minilm", "cuda", 64, None)]
_ENCODERS: dict[tuple[str, str, str | None], object] = {}


def _encoder(name: str, device: str, precision: str | None):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if name.startswith("offline"):
        pytest.importorskip("sentence_transformers")
        pytest.importorskip("efficientnet_lite_pytorch")
    key = (name, device, precision)
    if key not in _ENCODERS:
        try:
            if precision is None:
                _ENCODERS[key] = get_encoder(name, device=device, pretrained=not name.startswith("clip"))
            else:
                from rdm_fast.encoders.clip import build

                _ENCODERS[key] = build(name, device=device, pretrained=False, precision=precision)
        except (EncoderUnavailable, ImportError) as e:  # packages missing (e.g. open_clip on the GPU machines)
            pytest.skip(str(e))
    return _ENCODERS[key]


def _run(benchmark, fn, device: str, batch: int) -> None:
    def call():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    call()  # warm-up (lazy CUDA/cuDNN initialisation)
    benchmark.pedantic(call, rounds=5 if device == "cpu" else 20, iterations=1)
    if benchmark.stats is not None:  # absent under --benchmark-disable
        benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.mean, 1)


def _group(name: str, device: str, batch: int, precision: str | None) -> str:
    return f"{name} {device} batch {batch}" + (f" {precision}" if precision else "")


@pytest.mark.parametrize("name,device,batch,precision", CASES)
def test_encode_images(benchmark, name, device, batch, precision):
    enc = _encoder(name, device, precision)
    benchmark.group = _group(name, device, batch, precision)
    images = torch.rand(batch, 3, 256, 256, device=device) * 2 - 1
    _run(benchmark, lambda: enc.encode_images(images), device, batch)


@pytest.mark.parametrize("name,device,batch,precision", CASES)
def test_bare_tower_baseline(benchmark, name, device, batch, precision):
    enc = _encoder(name, device, precision)
    benchmark.group = _group(name, device, batch, precision)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=getattr(enc, "dtype", torch.float32))
    tower = enc.model.encode_image if name.startswith("clip") else enc.image_tower

    def bare():
        with torch.no_grad():
            return tower(x)

    _run(benchmark, bare, device, batch)
