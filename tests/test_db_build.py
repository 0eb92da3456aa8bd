"""Database builds from image folders and lists (embeddings recomputed independently), skipped files,
resumption after a failure or a kill, a 2-process torchrun build, and the streaming import of official parts."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from child_env import child_env
from test_database import INFO, TinyEncoder
from rdm_fast.retrieval import Database, build, build_database, import_npz
from rdm_fast.retrieval.npz_import import iter_row_ranges

ENV = child_env(OMP_NUM_THREADS="1")
SPEC = "test_database:tiny_encoder"


def _noise(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c), np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Nested folders of png/jpg/JPEG/webp images (one RGBA with transparency, one palette image with a
    transparent colour, one smaller than the crop), a corrupt .png, a truncated .jpg and a non-image file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "cats" / "deep").mkdir(parents=True)
    (root / "dogs").mkdir()
    for i in range(4):
        Image.fromarray(_noise(rng, 40 + i, 50)).save(root / "cats" / f"c{i}.png")
    Image.fromarray(_noise(rng, 45, 38)).save(root / "cats" / "c9.jpg", quality=95)
    rgba = _noise(rng, 44, 44, 4)
    rgba[..., 3] = np.where(rgba[..., 3] > 128, 255, rgba[..., 3])
    Image.fromarray(rgba, "RGBA").save(root / "cats" / "deep" / "t.webp", lossless=True)
    pal = Image.fromarray(_noise(rng, 36, 52)).quantize(16)
    pal.save(root / "dogs" / "p.png", transparency=3)
    for i in range(3):
        Image.fromarray(_noise(rng, 34, 60 + i)).save(root / "dogs" / f"d{i}.JPEG", quality=95)
    Image.fromarray(_noise(rng, 20, 40)).save(root / "dogs" / "small.png")
    Image.fromarray(_noise(rng, 33, 33)).save(root / "top.png")
    (root / "dogs" / "broken.png").write_bytes(b"this is not a png file")
    jpg = root / "cats" / "cut.jpg"
    Image.fromarray(_noise(rng, 40, 40)).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:300])
    (root / "dogs" / "readme.txt").write_text("not an image")
    return root


def reference_rgb(path: Path) -> np.ndarray:
    """Independent loading: float compositing of any transparency on white."""
    im = Image.open(path)
    if im.mode == "P" or im.mode in ("RGBA", "LA"):
        a = np.asarray(im.convert("RGBA")).astype(np.float64)
        rgb = a[..., :3] * a[..., 3:] / 255 + 255 * (1 - a[..., 3:] / 255)
        return np.round(rgb).astype(np.uint8)
    return np.asarray(im.convert("RGB"))


def reference_center(path: Path, size: int) -> np.ndarray:
    img = reference_rgb(path)
    h, w = img.shape[:2]
    if min(h, w) != size:
        s = size / min(h, w)
        img = np.asarray(Image.fromarray(img).resize((max(size, round(w * s)), max(size, round(h * s))),
                                                     Image.BICUBIC))
        h, w = img.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return img[y:y + size, x:x + size]


def encode(crops: list[np.ndarray]) -> np.ndarray:
    x = torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).copy()).float() / 127.5 - 1
    with torch.no_grad():
        return TinyEncoder().encode_images(x).numpy()


def files_of(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


GOOD = ["cats/c0.png", "cats/c1.png", "cats/c2.png", "cats/c3.png", "cats/c9.jpg", "cats/deep/t.webp",
        "dogs/d0.JPEG", "dogs/d1.JPEG", "dogs/d2.JPEG", "dogs/p.png", "dogs/small.png", "top.png"]


def test_build_center_crops_match_independent_embeddings(image_dir, tmp_path):
    encoder = TinyEncoder()
    state = torch.random.get_rng_state()
    out = build_database(tmp_path / "db", encoder=encoder, images=image_dir, crop="center", crop_size=32,
                         batch_size=5, shard_size=4, workers=0, device="cpu", class_from_folder=True,
                         progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # its loaders drew no seed from the global RNG
    db = Database.open(out, device="cpu", verify=True)
    assert len(db) == len(GOOD) and db.sources(torch.arange(len(db))) == GOOD  # sorted, corrupt ones skipped
    m = db.manifest
    assert m["skipped"]["count"] == 2
    assert sorted(s for s, _ in m["skipped"]["files"]) == ["cats/cut.jpg", "dogs/broken.png"]
    assert m["class_names"] == ["cats", "dogs"] and m["image_root"] == str(image_dir.resolve())
    assert db.class_ids(torch.arange(len(db))).tolist() == [0] * 6 + [1] * 5 + [-1]
    assert not m["has_patch_coords"] and m["has_class_ids"]
    assert len(m["shards"]) == 4  # 14 files, 4 per shard
    ref = encode([reference_center(image_dir / s, 32) for s in GOOD])
    got = db.embeddings(torch.arange(len(db))).numpy()
    np.testing.assert_allclose(got, ref, rtol=5e-3, atol=5e-3)


def test_build_none_crops_are_whole_images_resized(image_dir, tmp_path):
    """crop="none": each whole image resized (bicubic) to crop_size x crop_size, nothing cut off; no corners. The
    only builds of this mode replayed it with the same function, so an image not resized (then cut at its centre)
    or resized bilinearly passed."""
    out = build_database(tmp_path / "db", encoder=TinyEncoder(), images=image_dir, crop="none", crop_size=32,
                         shard_size=5, workers=0, device="cpu", progress=False)
    db = Database.open(out, device="cpu")
    assert db.sources(torch.arange(len(db))) == GOOD and not db.manifest["has_patch_coords"]
    ref = encode([np.asarray(Image.fromarray(reference_rgb(image_dir / s)).resize((32, 32), Image.BICUBIC))
                  for s in GOOD])
    np.testing.assert_allclose(db.embeddings(torch.arange(len(db))).numpy(), ref, rtol=5e-3, atol=5e-3)


def test_random_crops_coords_and_workers(image_dir, tmp_path):
    kw = dict(encoder=TinyEncoder(), images=image_dir, crop="random", crop_size=32, crops_per_image=3,
              batch_size=6, shard_size=9, device="cpu", progress=False)
    a = build_database(tmp_path / "a", workers=0, **kw)
    b = build_database(tmp_path / "b", workers=2, **kw)  # multi-process loading gives the same bytes
    assert files_of(a) == files_of(b)
    db = Database.open(a, device="cpu")
    n = len(db)
    assert n == 3 * len(GOOD) and db.manifest["has_patch_coords"]
    sources, coords = db.sources(torch.arange(n)), db.patch_coords(torch.arange(n)).numpy()
    crops = []
    for s, (x, y) in zip(sources, coords, strict=True):
        img = reference_rgb(image_dir / s)
        if min(img.shape[:2]) < 32:  # upscaled so the short side is the crop size
            h, w = img.shape[:2]
            img = np.asarray(Image.fromarray(img).resize((round(w * 32 / min(h, w)), 32), Image.BICUBIC))
        assert 0 <= x <= img.shape[1] - 32 and 0 <= y <= img.shape[0] - 32
        crops.append(img[y:y + 32, x:x + 32])
    np.testing.assert_allclose(db.embeddings(torch.arange(n)).numpy(), encode(crops), rtol=5e-3, atol=5e-3)
    assert len({tuple(c) for c in coords}) > n // 2  # crops differ
    other = Database.open(build_database(tmp_path / "c", workers=0, seed=1, **kw), device="cpu")
    assert not np.array_equal(other.patch_coords(torch.arange(n)).numpy(), coords)


def test_random_crops_of_fitted_squares(image_dir, tmp_path):
    """fit_square (the official OpenImages database's 1200 px squares): each image's short side is resized to S,
    its central S x S square kept, and the random patches cut from it, with corners in that square; training and
    contact sheets replay them; other crop modes and squares smaller than the crops are refused."""
    out = build_database(tmp_path / "db", encoder=TinyEncoder(), images=image_dir, crop="random", crop_size=32,
                         crops_per_image=2, fit_square=48, workers=0, device="cpu", progress=False)
    db = Database.open(out, device="cpu")
    assert db.manifest["build"]["fit_square"] == 48
    sources, coords = db.sources(torch.arange(len(db))), db.patch_coords(torch.arange(len(db))).numpy()
    crops = []
    for s, (x, y) in zip(sources, coords, strict=True):
        square = reference_center(image_dir / s, 48)  # short side to 48, central square: what the patches see
        assert 0 <= x <= 16 and 0 <= y <= 16
        crops.append(square[y:y + 32, x:x + 32])
    np.testing.assert_allclose(db.embeddings(torch.arange(len(db))).numpy(), encode(crops), rtol=5e-3, atol=5e-3)
    from rdm_fast.data import TrainingImages

    replayed = TrainingImages(db, 32, image_root=image_dir)
    for i in (0, 5):
        assert np.array_equal(replayed[i]["pixels"].numpy().transpose(1, 2, 0), crops[i])
    for crop, square in (("center", 48), ("random", 31), ("random", 8193)):
        with pytest.raises(ValueError, match=rf"fit_square \(--fit-square\) {square} needs crop='random' \(--crop "
                                             r"random\) and a side from crop_size \(32\) to 8192 px"):
            build_database(tmp_path / "bad", encoder=TinyEncoder(), images=image_dir, crop=crop, crop_size=32,
                           fit_square=square, workers=0, device="cpu", progress=False)
    with pytest.raises(ValueError, match="equal to crop_size makes all 3 crops of an image the same"):
        build_database(tmp_path / "bad", encoder=TinyEncoder(), images=image_dir, crop="random", crop_size=32,
                       crops_per_image=3, fit_square=32, workers=0, device="cpu", progress=False)
    for kwargs, error, message in (({"crop_size": None}, TypeError, "crop_size must be an int, got None"),
                                   ({"batch_size": "64"}, TypeError, "batch_size must be an int, got '64'"),
                                   ({"workers": -1}, ValueError, "workers must be at least 0, got -1"),
                                   ({"encoder": 42}, TypeError, "encoder must be an Encoder or a registered name")):
        with pytest.raises(error, match=message):  # raw comparisons and attribute errors before
            build_database(tmp_path / "bad", **{"encoder": TinyEncoder(), "images": image_dir, "device": "cpu",
                                                "progress": False, **kwargs})
    for seed in (-1, 2**63):  # -1 failed every crop, reported as "none of the images could be read"
        with pytest.raises(ValueError, match=rf"seed \(--seed\) must be in \[0, 2\*\*63\), got {seed}"):
            build_database(tmp_path / "bad", encoder=TinyEncoder(), images=image_dir, crop="random", crop_size=32,
                           seed=seed, workers=0, device="cpu", progress=False)


def test_random_crops_are_drawn_per_image_whatever_the_shards(image_dir, tmp_path):
    """An image's windows come from (seed, its index in the whole input list): the rows do not depend on the shard
    size, and images of one size (all fit_square squares) get different windows. A generator seeded with the
    index within the shard gave every shard's n-th image the same windows, one seeded with the seed alone every
    image: the tests used images of different sizes and compared builds of one shard size only."""
    kw = dict(encoder=TinyEncoder(), images=image_dir, crop="random", crop_size=32, crops_per_image=2,
              fit_square=48, workers=0, device="cpu", progress=False)
    a = Database.open(build_database(tmp_path / "a", shard_size=2, **kw), device="cpu")  # one image a shard
    b = Database.open(build_database(tmp_path / "b", shard_size=8, **kw), device="cpu")
    ids = torch.arange(len(a))
    assert len(a) == len(b) == 2 * len(GOOD) and len(a.manifest["shards"]) == 14 and len(b.manifest["shards"]) == 4
    assert a.sources(ids) == b.sources(ids)
    assert torch.equal(a.patch_coords(ids), b.patch_coords(ids)) and torch.equal(a.embeddings(ids), b.embeddings(ids))
    assert len({tuple(c) for c in a.patch_coords(ids).tolist()}) > len(GOOD)  # 24 windows, 17 x 17 places


def test_images_enlarged_for_their_crops_are_counted(image_dir, tmp_path, caplog, capsys):
    """Every image enlarged more than MAX_UPSCALE times for its crop is counted and named (the up-front check
    reads only a sample of the images): 96 px crops enlarge the 40x20 image 4.8 times, the others less."""
    caplog.set_level("WARNING", logger="rdm_fast.retrieval")
    out = build_database(tmp_path / "db", encoder=TinyEncoder(), images=image_dir, crop="center", crop_size=96,
                         workers=0, device="cpu", progress=False)
    enlarged = Database.open(out, device="cpu").manifest["enlarged"]
    assert enlarged == {"count": 1, "files": [["dogs/small.png", 40, 20]], "uncounted_shards": 0}
    assert "1 image had to be enlarged more than 4x for 96 px crops (listed in" in caplog.text
    assert "e.g. dogs/small.png (40x20): their entries are blurry" in caplog.text
    from rdm_fast import db as db_cli
    from rdm_fast._cli import run

    assert run(db_cli.main, ["info", str(out)]) == 0
    assert "enlarged   1 image, more than 4x for their crops or squares (listed in manifest.json)\n" \
        in capsys.readouterr().out
    normal = build_database(tmp_path / "normal", encoder=TinyEncoder(), images=image_dir, crop="center",
                            crop_size=32, workers=0, device="cpu", progress=False)
    assert Database.open(normal, device="cpu").manifest["enlarged"]["count"] == 0
    # with fit_square, what an image is enlarged to is its square: 96 px squares enlarge the 40x20 one 4.8 times
    # (counting by the 32 px crops counted none of them)
    squares = build_database(tmp_path / "squares", encoder=TinyEncoder(), images=image_dir, crop="random",
                             crop_size=32, fit_square=96, workers=0, device="cpu", progress=False)
    assert Database.open(squares, device="cpu").manifest["enlarged"] == {
        "count": 1, "files": [["dogs/small.png", 40, 20]], "uncounted_shards": 0}
    assert "1 image had to be enlarged more than 4x for 96 px squares (listed in" in caplog.text
    # a build resumed from shards an older version finished (their done-records count nothing) says so
    kw = dict(encoder=TinyEncoder(), images=image_dir, crop="center", crop_size=96, shard_size=4, workers=0,
              device="cpu", progress=False)
    resumed = build_database(tmp_path / "resumed", **kw)
    for record in sorted((resumed / "progress").glob("shard_*.json"))[:2]:
        old = json.loads(record.read_text())
        del old["enlarged"], old["enlarged_count"]
        record.write_text(json.dumps(old))
    (resumed / "manifest.json").unlink()
    build_database(resumed, **kw)
    assert Database.open(resumed, device="cpu").manifest["enlarged"]["uncounted_shards"] == 2
    assert run(db_cli.main, ["info", str(resumed)]) == 0
    assert "; 2 older shards not counted)" in capsys.readouterr().out


def test_build_from_list(image_dir, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{image_dir / 'top.png'}\t7\n\n{os.path.relpath(image_dir / 'dogs' / 'd1.JPEG', tmp_path)}\t3\n"
                   f"{image_dir / 'dogs' / 'broken.png'}\t1\n")
    db = Database.open(build_database(tmp_path / "db", encoder=TinyEncoder(), image_list=lst, crop="center",
                                      crop_size=32, workers=0, device="cpu", progress=False), device="cpu")
    assert len(db) == 2 and db.class_ids(torch.arange(2)).tolist() == [7, 3]
    assert db.manifest["skipped"]["count"] == 1
    ref = encode([reference_center(image_dir / "top.png", 32), reference_center(image_dir / "dogs/d1.JPEG", 32)])
    np.testing.assert_allclose(db.embeddings(torch.arange(2)).numpy(), ref, rtol=5e-3, atol=5e-3)
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png\t1\nb.png\n")
    with pytest.raises(ValueError, match="1 of 2 lines have a class id"):
        build_database(tmp_path / "x", encoder=TinyEncoder(), image_list=bad, workers=0, progress=False)


class FailingEncoder(TinyEncoder):
    """Raises on its (n+1)-th batch: a build that dies midway."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def encode_images(self, images):
        if self.left == 0:
            raise RuntimeError("injected failure")
        self.left -= 1
        return super().encode_images(images)


def test_resume_after_failure_is_byte_identical(image_dir, tmp_path, caplog):
    kw = dict(images=image_dir, crop="random", crop_size=32, crops_per_image=2, batch_size=4, shard_size=6,
              workers=0, device="cpu", progress=False)
    full = build_database(tmp_path / "full", encoder=TinyEncoder(), **kw)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="injected"):
        build_database(out, encoder=FailingEncoder(3), **kw)  # dies in shard 2 (2 images a batch, 3 a shard)
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in (out / "progress").glob("shard_*.json"))
    assert done == ["shard_00000.json", "shard_00001.json"]
    with pytest.raises(FileNotFoundError, match="rerun the same build command to resume"):
        Database.open(out)
    (out / ".emb_00002.npy.abc.tmp").write_bytes(b"half-written")  # left by a killed writer
    damaged = bytearray((out / "emb_00001.npy").read_bytes())
    damaged[-2] ^= 0xFF
    (out / "emb_00001.npy").write_bytes(bytes(damaged))  # a finished shard that no longer verifies
    caplog.clear()
    with caplog.at_level("INFO", logger="rdm_fast"):
        build_database(out, encoder=TinyEncoder(), **kw)
    assert files_of(out) == files_of(full)
    assert "checking the 2 shards an earlier run finished" in caplog.text  # said before the silent hashing
    build_database(out, encoder=TinyEncoder(), **kw)  # complete: nothing to do
    assert files_of(out) == files_of(full)
    with pytest.raises(ValueError, match=r"different arguments \(they differ in: seed\)"):
        build_database(out, encoder=TinyEncoder(), **{**kw, "seed": 3})
    import rdm_fast.retrieval.build as build_module

    def never(*a, **k):
        raise AssertionError("built the encoder")

    with pytest.MonkeyPatch.context() as m:  # a named encoder is built only after the arguments are found equal
        m.setattr(build_module, "resolve_encoder", never)
        with pytest.raises(ValueError, match=r"different arguments \(they differ in: encoder_spec, seed\)"):
            build_database(out, encoder="clip-vit-b-32", **{**kw, "seed": 3})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty and holds no resumable build"):
        build_database(tmp_path / "busy", encoder=TinyEncoder(), **kw)


class HalfEncoder(TinyEncoder):
    """TinyEncoder declaring float16 towers, as the CLIP encoders build them on a GPU (same outputs here)."""

    dtype = torch.float16


def test_resume_or_repair_in_another_encoder_precision_is_refused(image_dir, tmp_path, monkeypatch):
    """A build begun on a GPU (float16 CLIP towers) and rerun on the CPU (float32) resumed silently, mixing shards of
    two precisions in one database; a damaged shard's repair did the same. Both are refused; a complete database
    still reruns as "nothing to do" on either device."""
    kw = dict(images=image_dir, crop_size=32, batch_size=4, shard_size=3, workers=0, device="cpu", progress=False)
    out = tmp_path / "db"
    with pytest.raises(RuntimeError, match="injected"):
        build_database(out, encoder=FailingEncoder(1), **kw)  # float32 shard 0, then killed
    with pytest.raises(ValueError, match=r"differ in: encoder_precision \(encoder_precision follows --device"):
        build_database(out, encoder=HalfEncoder(), **kw)
    build_database(out, encoder=TinyEncoder(), **kw)  # the same precision resumes
    import rdm_fast.retrieval.build as build_module
    monkeypatch.setattr(build_module, "resolve_encoder", lambda *a, **k: HalfEncoder())
    half = build_database(tmp_path / "half", encoder=SPEC, **kw)
    assert json.loads((half / "progress" / "config.json").read_text())["encoder_precision"] == "float16"
    monkeypatch.setattr(build_module, "resolve_encoder", lambda *a, **k: TinyEncoder())
    assert build_database(half, encoder=SPEC, **kw) == half  # complete: nothing to do, whatever the device
    (half / "emb_00001.npy").unlink()
    with pytest.raises(ValueError, match=r"differ in: encoder_precision"):
        build_database(half, encoder=SPEC, **kw)


def test_a_build_begun_by_an_older_version_resumes_with_a_warning_on_precision(image_dir, tmp_path, caplog):
    """Builds begun before the encoder's precision was recorded (on every device) cannot be checked for it: they
    resume as before, with a warning saying what to keep the same, and from then on the precision is recorded."""
    kw = dict(images=image_dir, crop_size=32, batch_size=4, shard_size=3, workers=0, device="cpu", progress=False)
    out = tmp_path / "db"
    with pytest.raises(RuntimeError, match="injected"):
        build_database(out, encoder=FailingEncoder(1), **kw)
    config_file = out / "progress" / "config.json"
    recorded = json.loads(config_file.read_text())
    assert recorded.pop("encoder_precision") == "float32"  # recorded on the CPU too
    config_file.write_text(json.dumps(recorded))  # as an older rdm_fast wrote it
    with caplog.at_level(logging.WARNING, logger="rdm_fast"):
        build_database(out, encoder=HalfEncoder(), **kw)
    assert "did not record the encoder's precision" in caplog.text
    assert json.loads(config_file.read_text())["encoder_precision"] == "float16"


def test_resume_refuses_a_list_whose_class_ids_changed(image_dir, tmp_path):
    """The class ids of an image list (its second column) are part of the inputs' digest: a list rewritten with
    other ids for the same paths is refused on resume, else the remaining shards would carry the new ids."""
    files = [image_dir / "cats" / f"c{i}.png" for i in range(4)]
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{f}\t{i}\n" for i, f in enumerate(files)))
    kw = dict(image_list=lst, crop_size=32, batch_size=2, shard_size=2, workers=0, device="cpu", progress=False)
    with pytest.raises(RuntimeError, match="injected"):
        build_database(tmp_path / "db", encoder=FailingEncoder(1), **kw)  # shard 0 done, then killed
    lst.write_text("".join(f"{f}\t{i + 1}\n" for i, f in enumerate(files)))
    with pytest.raises(ValueError, match=r"differ in: inputs_sha256\)"):
        build_database(tmp_path / "db", encoder=TinyEncoder(), **kw)


def test_resume_refuses_other_crops_per_image_with_as_many_files_per_shard(image_dir, tmp_path):
    """Shards of one file each (shard_size 3 with 2 or 3 crops per image): the shard plan is the same, so only
    crops_per_image itself tells the rerun apart; it is refused rather than adding shards of 3 crops to ones of 2."""
    kw = dict(images=image_dir, crop="random", crop_size=32, batch_size=2, shard_size=3, workers=0, device="cpu",
              progress=False)
    with pytest.raises(RuntimeError, match="injected"):
        build_database(tmp_path / "db", encoder=FailingEncoder(1), crops_per_image=2, **kw)
    with pytest.raises(ValueError, match=r"differ in: crops_per_image\)"):
        build_database(tmp_path / "db", encoder=TinyEncoder(), crops_per_image=3, **kw)


def test_rerun_of_a_finished_build_does_not_build_the_encoder(image_dir, tmp_path, caplog, monkeypatch):
    kw = dict(images=image_dir, crop_size=32, batch_size=4, workers=0, device="cpu", progress=False)
    out = build_database(tmp_path / "db", encoder=SPEC, **kw)
    squares = build_database(tmp_path / "squares", encoder=SPEC, **{**kw, "crop": "random", "fit_square": 40})
    before = files_of(out)
    import rdm_fast.retrieval.build as build_module

    def never(*a, **k):
        raise AssertionError("built the encoder")

    monkeypatch.setattr(build_module, "resolve_encoder", never)
    with caplog.at_level("INFO", logger="rdm_fast"):
        assert build_database(out, encoder=SPEC, **kw) == out
    assert "already complete (same arguments): nothing to do" in caplog.text
    assert files_of(out) == before
    with pytest.raises(ValueError, match=r"different arguments \(they differ in: crop_size\)"):
        build_database(out, encoder=SPEC, **{**kw, "crop_size": 24})
    with pytest.raises(ValueError, match=r"different arguments \(they differ in: fit_square\)"):  # a key it lacks
        build_database(squares, encoder=SPEC, **{**kw, "crop": "random"})
    (out / "manifest.json").unlink()  # unfinished: the encoder is needed
    with pytest.raises(AssertionError, match="built the encoder"):
        build_database(out, encoder=SPEC, **kw)

    monkeypatch.undo()
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"a" * 64)
    with_weights = build_database(tmp_path / "w", encoder=SPEC, encoder_checkpoint=str(weights), **kw)
    weights.write_bytes(b"b" * 64)  # other weights of the same size at the same path
    with pytest.raises(ValueError, match=r"different arguments \(they differ in: encoder_checkpoint_sha256\)"):
        build_database(with_weights, encoder=SPEC, encoder_checkpoint=str(weights), **kw)


def test_missing_encoder_checkpoint_is_named(image_dir, tmp_path):
    """A mistyped --encoder-checkpoint failed in its hashing with a bare "PATH: No such file or directory", which
    did not say which option (--images and --list are named); a folder gave "PATH: Is a directory"."""
    kw = dict(images=image_dir, crop_size=32, workers=0, device="cpu", progress=False)
    with pytest.raises(FileNotFoundError, match=r"encoder checkpoint \(--encoder-checkpoint\) .*w\.pt does not exist"):
        build_database(tmp_path / "db", encoder=SPEC, encoder_checkpoint=str(tmp_path / "w.pt"), **kw)
    with pytest.raises(FileNotFoundError, match=r"\(--encoder-checkpoint\) .* is a directory"):
        build_database(tmp_path / "db", encoder=SPEC, encoder_checkpoint=str(image_dir), **kw)
    assert not (tmp_path / "db").exists()


def test_rerun_repairs_a_finished_build_with_a_damaged_shard(image_dir, tmp_path, caplog):
    """A finished database whose shard file was truncated or lost: the rerun of its build said "nothing to do", then
    everything refused the database, asking for a rebuild. It computes those shards again, to the same bytes."""
    kw = dict(images=image_dir, crop="random", crop_size=32, batch_size=4, shard_size=4, workers=0, device="cpu",
              progress=False)
    out = build_database(tmp_path / "db", encoder=SPEC, **kw)
    before = files_of(out)
    (out / "emb_00001.npy").write_bytes(before["emb_00001.npy"][:-10])
    (out / "meta_00002.npz").unlink()
    with caplog.at_level("INFO", logger="rdm_fast"):
        build_database(out, encoder=SPEC, **kw)
    assert f"{out / 'emb_00001.npy'} is missing or not the size manifest.json records: computing its shard again" \
        in caplog.text and "nothing to do" not in caplog.text
    assert "resuming: 2 of 4 shards of this process are already done" in caplog.text
    assert files_of(out) == before
    flipped = bytearray(before["emb_00003.npy"])  # corrupted in place (same size): --verify's advice repairs it
    flipped[-1] ^= 0xFF
    (out / "emb_00003.npy").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="it is corrupted; delete it, then rerun the db build or db import-npz"):
        Database.open(out, verify=True)
    (out / "emb_00003.npy").unlink()
    build_database(out, encoder=SPEC, **kw)
    assert files_of(out) == before


def _cli_build(out: Path, image_dir: Path) -> list[str]:
    return ["-m", "rdm_fast.db", "build", "--images", str(image_dir), "--encoder", SPEC, "--out", str(out),
            "--crop", "random", "--crop-size", "32", "--batch-size", "2", "--shard-size", "2", "--workers", "0",
            "--device", "cpu", "--no-progress"]


def test_resume_after_kill(image_dir, tmp_path):
    from rdm_fast import db as db_cli
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *_cli_build(out, image_dir)], cwd=tmp_path,
                            env={**ENV, "RDM_TEST_ENCODER_DELAY": "0.4"}, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "progress" / "shard_00001.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the build ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists() and not (out / "progress" / "shard_00006.json").exists()
    assert db_cli.main(_cli_build(out, image_dir)[2:]) == 0
    full = tmp_path / "full"
    assert db_cli.main(_cli_build(full, image_dir)[2:]) == 0
    assert files_of(out) == files_of(full)


def test_torchrun_two_processes_equal_one(image_dir, tmp_path):
    from rdm_fast import db as db_cli
    single = tmp_path / "single"
    assert db_cli.main(_cli_build(single, image_dir)[2:]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = tmp_path / "two"
    r = subprocess.run([*torchrun, *_cli_build(two, image_dir)], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "process 0 of 2 computes 4 of the 7 shards" in r.stderr
    assert "process 1 of 2" not in r.stderr  # INFO lines come from the main process only (not once per process)
    assert files_of(two) == files_of(single)
    # a refused resume fails on every rank instead of leaving one waiting
    args = _cli_build(two, image_dir) + ["--seed", "5"]
    r = subprocess.run([*torchrun, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and "different arguments" in r.stderr


def test_torchrun_processes_must_share_the_inputs_and_out(image_dir, tmp_path):
    """A process given other images, or an --out it cannot see (a node without the shared file system), was found
    only after all the embedding, with a traceback and a half-built database; now before any shard, on every
    process. The wrapper gives each rank its own argument: "A@@B" is A on rank 0 and B on rank 1."""
    wrapper = tmp_path / "per_rank.py"
    wrapper.write_text("import os, runpy, sys\nrank = int(os.environ['RANK'])\n"
                       "sys.argv = [sys.argv[1]] + [a.split('@@')[rank] if '@@' in a else a for a in sys.argv[2:]]\n"
                       "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")
    fewer = tmp_path / "fewer"
    shutil.copytree(image_dir / "dogs", fewer)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper)]
    for out, images, message in (
            (tmp_path / "mixed", f"{image_dir}@@{fewer}", "process 1 was given other build arguments or inputs than "
                                                          r"process 0 \(they differ in: inputs, inputs_sha256"),
            (f"{tmp_path / 'unshared'}@@{tmp_path / 'afile' / 'x'}", str(image_dir),
             r"--out .*x is not shared: process 1 cannot see what process 0 wrote there")):
        (tmp_path / "afile").write_text("x")
        args = [images if a == str(image_dir) else str(out) if a == "OUT" else a
                for a in _cli_build(Path("OUT"), image_dir)][1:]  # without "-m": the wrapper runs the module
        r = subprocess.run([*torchrun, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
        assert r.returncode != 0 and re.search(message, r.stderr), r.stderr[-3000:]
        assert "another process was given other build arguments" in r.stderr  # rank 0's line
        rank0_out = Path(str(out).split("@@")[0])
        assert not list(rank0_out.glob("emb_*.npy")) and not (rank0_out / "manifest.json").exists()


# ------------------------------------------------------------------------------------------ npz import
def _official_part(path: Path, rng, n: int, dim: int, compressed: bool, class_ids: bool):
    arrays = {"embedding": rng.standard_normal((n, dim)).astype(np.float32),
              "img_id": np.array([f"oi_{rng.integers(1e9):09d}" for _ in range(n)]),
              "patch_coords": rng.integers(0, 1000, (n, 2))}
    if class_ids:
        arrays["class_id"] = rng.integers(0, 1000, n)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


@pytest.fixture
def parts(tmp_path):
    rng = np.random.default_rng(7)
    a = _official_part(tmp_path / "30x16-part_0.npz", rng, 30, 16, compressed=False, class_ids=True)
    b = _official_part(tmp_path / "25x16-part_1.npz", rng, 25, 16, compressed=True, class_ids=True)
    return [tmp_path / "30x16-part_0.npz", tmp_path / "25x16-part_1.npz"], [a, b]


def test_row_ranges_stored_and_deflated(parts):
    (stored, deflated), (a, b) = parts
    with zipfile.ZipFile(stored) as z:
        assert z.getinfo("embedding.npy").compress_type == zipfile.ZIP_STORED
    with zipfile.ZipFile(deflated) as z:
        assert z.getinfo("embedding.npy").compress_type == zipfile.ZIP_DEFLATED
    for path, arrays in ((stored, a), (deflated, b)):
        chunks = [c for _, c in iter_row_ranges(path, [(0, None)], chunk_rows=7)]
        assert [len(c) for c in chunks][:-1] == [7] * (len(chunks) - 1)
        np.testing.assert_array_equal(np.concatenate(chunks), arrays["embedding"])
        middle = [c for _, c in iter_row_ranges(path, [(9, 20)], chunk_rows=4)]
        np.testing.assert_array_equal(np.concatenate(middle), arrays["embedding"][9:20])


def test_iter_row_ranges_reads_one_stream(parts):
    (stored, deflated), (a, b) = parts
    for path, arrays in ((stored, a), (deflated, b)):
        ranges = [(0, 3), (3, 4), (9, 20), (22, None)]
        got = {}
        for i, chunk in iter_row_ranges(path, ranges, chunk_rows=4):
            assert len(chunk) <= 4
            got.setdefault(i, []).append(chunk)
        emb = arrays["embedding"]
        for i, (start, stop) in enumerate(ranges):
            np.testing.assert_array_equal(np.concatenate(got[i]), emb[start:stop])
        with pytest.raises(ValueError, match="sorted and disjoint"):
            list(iter_row_ranges(path, [(5, 10), (8, 12)]))


def test_import_decompresses_each_part_once(parts, tmp_path, monkeypatch):
    """Every shard of a deflated part comes from one pass over its member (not a pass from its start per shard)."""
    from rdm_fast.retrieval import npz_import

    opened, real = [], npz_import._member_stream
    monkeypatch.setattr(npz_import, "_member_stream", lambda path, name: opened.append(path) or real(path, name))
    files, _ = parts
    import_npz(files, tmp_path / "db", INFO, shard_size=4, chunk_rows=3, progress=False)
    # per part: its header when it is listed, then one stream for all its shards (8 and 7 of them)
    assert sorted(map(str, opened)) == sorted(2 * [str(f.resolve()) for f in files])


def test_import_npz_equals_the_data(parts, tmp_path):
    files, arrays = parts
    out = import_npz(files[::-1], tmp_path / "db", INFO, shard_size=13, chunk_rows=7, progress=False)
    db = Database.open(out, device="cpu", verify=True)
    emb = np.concatenate([p["embedding"] for p in arrays])
    assert len(db) == 55 and [s["rows"] for s in db.manifest["shards"]] == [13, 13, 4, 13, 12]
    np.testing.assert_array_equal(db.embeddings(torch.arange(55)).numpy(), emb.astype(np.float16).astype(np.float32))
    assert db.sources(torch.arange(55)) == [str(s) for p in arrays for s in p["img_id"]]
    np.testing.assert_array_equal(db.patch_coords(torch.arange(55)).numpy(),
                                  np.concatenate([p["patch_coords"] for p in arrays]))
    np.testing.assert_array_equal(db.class_ids(torch.arange(55)).numpy(),
                                  np.concatenate([p["class_id"] for p in arrays]))
    assert db.manifest["has_class_ids"] and db.manifest["has_patch_coords"]
    # resume: a lost shard and its done-record are recomputed to the same bytes
    before = files_of(out)
    (out / "emb_00003.npy").unlink()
    (out / "progress" / "shard_00003.json").unlink()
    (out / "manifest.json").unlink()
    import_npz(files, out, INFO, shard_size=13, chunk_rows=5, progress=False)
    assert files_of(out) == before


@pytest.mark.parametrize("member", ["embedding", "img_id"])
def test_import_npz_names_a_part_whose_deflated_member_is_damaged(parts, tmp_path, member):
    """Damaged bytes inside a deflated member fail its CRC (or its deflate stream) only as they are read: that
    zipfile error (neither an OSError nor a ValueError) gave a traceback instead of a one-line error naming the
    part; under torchrun only the process importing that part's rows hits it."""
    files, _ = parts
    with zipfile.ZipFile(files[1]) as z:
        info = z.getinfo(f"{member}.npy")
    data = bytearray(files[1].read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + info.compress_size // 2, start + info.compress_size // 2 + 8):
        data[i] ^= 0x55
    files[1].write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(files[1])) + r".* is corrupted \("):
        import_npz(files, tmp_path / "db", INFO, shard_size=13, chunk_rows=7, progress=False)


def test_import_npz_of_parts_with_and_without_class_ids(tmp_path):
    """A part without class_id gives its rows -1, and the database then records no class ids (has_class_ids is
    true only where every part has them); the other part's ids are kept. Every import test gave all parts or no
    part class ids, so a manifest that claimed them where any part had them passed."""
    rng = np.random.default_rng(5)
    first = _official_part(tmp_path / "5x16-part_0.npz", rng, 5, 16, compressed=False, class_ids=True)
    _official_part(tmp_path / "4x16-part_1.npz", rng, 4, 16, compressed=True, class_ids=False)
    out = import_npz([tmp_path / "5x16-part_0.npz", tmp_path / "4x16-part_1.npz"], tmp_path / "db", INFO,
                     shard_size=3, progress=False)
    db = Database.open(out, device="cpu")
    assert not db.manifest["has_class_ids"]
    assert db.class_ids(torch.arange(9)).tolist() == first["class_id"].tolist() + [-1] * 4


def test_import_npz_refuses_to_resume_over_a_changed_part(parts, tmp_path):
    """A part rewritten with other values of the same shape keeps its size, which was all a resume compared: the
    shards imported from its old values were kept. Its members' CRC-32s tell it apart."""
    files, _ = parts
    out = import_npz(files, tmp_path / "db", INFO, shard_size=13, progress=False)
    (out / "manifest.json").unlink()  # as an import stopped after its last shard
    size = files[0].stat().st_size
    _official_part(files[0], np.random.default_rng(99), 30, 16, compressed=False, class_ids=True)
    assert files[0].stat().st_size == size
    with pytest.raises(ValueError, match="holds a build made with different arguments .*differ in: parts"):
        import_npz(files, out, INFO, shard_size=13, progress=False)


def test_builds_recorded_by_older_versions_are_named_as_such(parts, tmp_path):
    """A build or import recorded before its inputs were identified by content (parts without CRC-32s, an encoder
    checkpoint by size) is refused as an older version's, not as one of other arguments."""
    files, _ = parts
    out = import_npz(files, tmp_path / "db", INFO, shard_size=13, progress=False)
    config = out / "progress" / "config.json"
    recorded = json.loads(config.read_text())
    config.write_text(json.dumps({**recorded, "parts": [{k: v for k, v in p.items() if k != "crc32"}
                                                        for p in recorded["parts"]]}))
    with pytest.raises(ValueError, match="begun by an older rdm_fast, which recorded its inputs without parts"):
        import_npz(files, out, INFO, shard_size=13, progress=False)
    build.ShardedBuild.check_arguments(tmp_path, {"encoder_checkpoint_sha256": "ab"})  # no record: nothing to say
    (tmp_path / "progress").mkdir()
    (tmp_path / "progress" / "config.json").write_text(json.dumps({"encoder_checkpoint_bytes": 64}))
    with pytest.raises(ValueError, match="older rdm_fast, which recorded its inputs without encoder_checkpoint_sha"):
        build.ShardedBuild.check_arguments(tmp_path, {"encoder_checkpoint_sha256": "ab"})


def test_builds_and_imports_refuse_each_others_databases(image_dir, parts, tmp_path):
    """An image build into an import's --out (or the reverse) listed every argument of either as differing, and
    for an import added that the encoder's precision follows --device (which import-npz does not take): it names
    the command that began the database."""
    files, _ = parts
    imported = import_npz(files, tmp_path / "imported", INFO, progress=False)
    with pytest.raises(ValueError, match=r"imported holds a database begun by db import-npz, which db build cannot "
                                         r"continue: choose a new --out$"):
        build_database(imported, encoder=TinyEncoder(), images=image_dir, workers=0, device="cpu", progress=False)
    built = build_database(tmp_path / "built", encoder=TinyEncoder(), images=image_dir, crop_size=32, workers=0,
                           device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"built holds a database begun by db build, which db import-npz cannot "
                                         r"continue: choose a new --out$"):
        import_npz(files, built, INFO, progress=False)


def test_import_npz_rerun_repairs_a_damaged_shard(parts, tmp_path, caplog):
    """A finished import whose shard file was truncated: the rerun imports that shard again, and says that the
    proposal ranking recorded in the manifest it replaces must be made again."""
    from rdm_fast.retrieval import save_proposals

    files, _ = parts
    out = import_npz(files, tmp_path / "db", INFO, shard_size=13, progress=False)
    before = files_of(out)
    save_proposals(out, np.arange(55), np.zeros(55, np.int64))
    (out / "meta_00003.npz").write_bytes(before["meta_00003.npz"][:100])
    import_npz(files, out, INFO, shard_size=13, progress=False)
    assert "meta_00003.npz is missing or not the size manifest.json records: computing its shard again (the " \
        "proposals recorded there must be made again)" in caplog.text
    assert files_of(out) == before  # the ranking's file went with its record


def test_import_npz_errors(parts, tmp_path):
    files, _ = parts
    with pytest.raises(ValueError, match="hold 16-d embeddings but encoder 'tiny-test' makes 8-d"):
        import_npz(files, tmp_path / "a", {**INFO, "dim": 8}, progress=False)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x-part_3.npz", embedding=rng.standard_normal((4, 16)), patch_coords=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="lacks the array\\(s\\) img_id"):
        import_npz([tmp_path / "x-part_3.npz"], tmp_path / "b", INFO, progress=False)
    np.savez(tmp_path / "y-part_4.npz", img_id=np.arange(3))
    with pytest.raises(ValueError, match="has no 'embedding' array"):
        import_npz([tmp_path / "y-part_4.npz"], tmp_path / "c", INFO, progress=False)
    (tmp_path / "z-part_5.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable .npz"):
        import_npz([tmp_path / "z-part_5.npz"], tmp_path / "d", INFO, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_npz([tmp_path / "missing.npz"], tmp_path / "e", INFO, progress=False)
    for single in (str(files[0]), files[0]):  # a str was taken as one part per character
        with pytest.raises(TypeError, match="parts must be a list of .npz files, got the single path"):
            import_npz(single, tmp_path / "e", INFO, progress=False)
    np.savez(tmp_path / "w-part_6.npz", embedding=np.zeros((0, 16), np.float32), img_id=np.arange(0),
             patch_coords=np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"the part holds no embeddings \(0 rows\): nothing to import"):
        import_npz([tmp_path / "w-part_6.npz"], tmp_path / "e", INFO, progress=False)  # an empty database before
    assert not (tmp_path / "e").exists()
    # encoder_info is checked before anything is written: a missing key failed after every part was converted,
    # leaving shards that made the corrected rerun a "different build"; normalized="no" was stored as True
    for info, error, message in (({"name": "t", "dim": 16}, ValueError, "lacks 'normalized'"),
                                 ({**INFO, "normalized": "no"}, ValueError, "normalized must be True or False"),
                                 ({**INFO, "dim": "16"}, ValueError, "dim must be a positive integer"),
                                 ({**INFO, "name": ""}, ValueError, "name must be a non-empty string"),
                                 ("tiny-test", TypeError, "encoder_info must be a dict")):
        with pytest.raises(error, match=message):
            import_npz(files, tmp_path / "f", info, progress=False)
        assert not (tmp_path / "f").exists()
    assert len(Database.open(import_npz(files, tmp_path / "f", INFO, progress=False), device="cpu")) == 55


def test_import_npz_takes_the_official_builders_patch_boxes(tmp_path):
    """The official builder stores patch_coords as boxes (x_tl, y_tl, x_br, y_br), with the axes its collation
    made ((N, 1, 4), (N / n, n, 4) for n patches an image): their top-left corners are kept (these were refused as
    not (N, 2)); shapes whose last axis is not a corner or a box, which would give wrong corners, are refused."""
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((6, 16)).astype(np.float32)
    corners = rng.integers(0, 944, (6, 2))
    boxes = np.concatenate([corners, corners + 256], 1)
    for i, coords in enumerate((boxes, boxes[:, None], boxes[None], boxes.reshape(3, 2, 4), corners)):
        np.savez(tmp_path / f"6x16-part_{i}.npz", embedding=emb, img_id=np.arange(6), patch_coords=coords)
        db = Database.open(import_npz([tmp_path / f"6x16-part_{i}.npz"], tmp_path / f"db{i}", INFO, progress=False),
                           device="cpu")
        np.testing.assert_array_equal(db.patch_coords(torch.arange(6)).numpy(), corners)
    for j, bad in enumerate(((6, 3), (6, 2, 2), (4, 6), (6, 4, 1), (12,))):
        np.savez(tmp_path / f"6x16-part_{10 + j}.npz", embedding=emb, img_id=np.arange(6), patch_coords=np.zeros(bad))
        with pytest.raises(ValueError, match=r"patch_coords has shape \(.*\), expected 6 \(x, y\) corners or "
                                             r"\(x_tl, y_tl, x_br, y_br\) boxes along its last axis"):
            import_npz([tmp_path / f"6x16-part_{10 + j}.npz"], tmp_path / f"bad{j}", INFO, progress=False)


@pytest.mark.parametrize("compressed", [False, True])
def test_import_streams_rows(tmp_path, compressed):
    """A 25.6 MB part imported in 25k-row shards never holds its embeddings in memory at once (the
    per-row metadata, 1/D of the data, is read whole)."""
    rng = np.random.default_rng(1)
    n, dim = 100_000, 64
    path = tmp_path / f"{n}x{dim}-part_0.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED,
                         compresslevel=1) as z:  # what np.savez(_compressed) writes, faster to deflate
        for name, arr in (("embedding", rng.standard_normal((n, dim)).astype(np.float32)),
                          ("img_id", np.arange(n)), ("patch_coords", np.zeros((n, 2), np.int32))):
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr)
    tracemalloc.start()
    try:
        import_npz([path], tmp_path / "db", {**INFO, "dim": dim}, shard_size=25_000, chunk_rows=4096,
                   progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * n * dim * 4, peak
    assert len(Database.open(tmp_path / "db", device="cpu")) == n


def test_import_npz_refuses_non_finite_rows_and_repeated_parts(parts, tmp_path):
    files, _ = parts
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((9, 16)).astype(np.float32)
    emb[6, 2] = 1e5  # beyond float16: inf after the cast
    np.savez(tmp_path / "9x16-part_2.npz", embedding=emb, img_id=np.arange(9), patch_coords=np.zeros((9, 2)))
    with pytest.raises(ValueError, match=r"9x16-part_2.npz embedding row 6: the embedding is not finite"):
        import_npz([tmp_path / "9x16-part_2.npz"], tmp_path / "a", INFO, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="30x16-part_0.npz is given more than once"):
        import_npz([files[0], files[1], tmp_path / ".." / tmp_path.name / files[0].name], tmp_path / "b", INFO,
                   progress=False)
    assert not (tmp_path / "b").exists()


def test_decompression_bomb_limit_is_settable_and_named(tmp_path, monkeypatch):
    """load_rgb refuses images above the limit, naming the option that raises it; Pillow's unnamed warning (from
    half the limit) is silenced; 0 lifts the limit (a few openclipart drawings pass 600 million pixels)."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 20), "red").save(path)  # 600 pixels
    build.set_max_image_pixels(500)
    with pytest.raises(Image.DecompressionBombError, match="exceeds limit of 500 pixels.*--max-image-pixels raises"):
        build.load_rgb(path)
    build.set_max_image_pixels(1000)  # Pillow warns from 500
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.load_rgb(path).size == (30, 20)
    build.set_max_image_pixels(0)
    assert Image.MAX_IMAGE_PIXELS is None and build.load_rgb(path).size == (30, 20)


def test_max_image_pixels_reaches_workers_and_is_a_build_argument(tmp_path, monkeypatch):
    """The limit travels with the dataset (workers started by spawn or forkserver do not inherit the parent's), and
    a build records it when it is not Pillow's default: a rerun under another limit, which would skip other
    images, is refused as other arguments."""
    import pickle

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 40), "red").save(tmp_path / "images" / "big.png")  # 1600 pixels
    Image.new("RGB", (30, 30), "blue").save(tmp_path / "images" / "small.png")
    build.set_max_image_pixels(1000)
    crops = build.ImageCrops(tmp_path / "images", ["big.png"], 0, "center", 16, 1, 0)
    build.set_max_image_pixels(build.PILLOW_MAX_PIXELS)  # a fresh worker's
    item = pickle.loads(pickle.dumps(crops))[0]
    assert not item["ok"] and "DecompressionBombError" in item["error"]
    build.set_max_image_pixels(1000)
    kw = dict(encoder=TinyEncoder(), images=tmp_path / "images", crop_size=16, workers=0, device="cpu",
              progress=False)
    out = build_database(tmp_path / "db", **kw)
    assert Database.open(out).manifest["skipped"]["count"] == 1
    build.set_max_image_pixels(0)
    with pytest.raises(ValueError, match=r"different arguments \(they differ in: max_image_pixels\)"):
        build_database(out, **kw)
    build.set_max_image_pixels(build.PILLOW_MAX_PIXELS)  # the default is not recorded: older builds compare
    assert "max_image_pixels" not in json.loads((build_database(tmp_path / "d2", **kw) / "progress" /
                                                 "config.json").read_text())


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_load_rgb_reduces_high_bit_depth_grayscale(tmp_path, mode):
    """A 16-bit grayscale PNG (and 32-bit integer / float TIFFs) keep their gradient instead of turning white."""
    from rdm_fast.retrieval.build import load_rgb

    ramp = np.linspace(0, 65535, 8 * 64).astype(np.uint16).reshape(8, 64)
    if mode == "I;16":
        img, path, expect = Image.fromarray(ramp), tmp_path / "g.png", ramp >> 8
    elif mode == "I":
        img, path, expect = Image.fromarray(ramp.astype(np.int32), "I"), tmp_path / "g.tif", ramp >> 8
    else:
        img, path, expect = (Image.fromarray((ramp / 65535).astype(np.float32), "F"), tmp_path / "g.tif",
                             np.round(ramp / 65535 * 255))
    img.save(path)
    assert Image.open(path).mode == mode
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (8, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, np.repeat(expect[..., None], 3, 2))


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_load_rgb_gives_opaque_grayscale_bilevel_and_palette_images_their_colours(tmp_path, mode):
    """Grayscale, bilevel and palette PNGs without transparency (the other modes common in image folders) come
    out as their RGB colours: the only palette image of the tests had a transparent colour (the compositing
    path), so a loader that read an opaque palette image's indices, or took it as grayscale, passed."""
    from rdm_fast.retrieval.build import load_rgb

    rng = np.random.default_rng(9)
    if mode == "P":
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        index = rng.integers(0, 256, (12, 20), dtype=np.uint8)
        img, expect = Image.fromarray(index, "L"), palette[index]
        img.putpalette(palette.tobytes(), "RGB")  # makes it a palette image
    else:
        gray = rng.integers(0, 256, (12, 20), dtype=np.uint8)
        gray = np.where(gray > 127, 255, 0).astype(np.uint8) if mode == "1" else gray
        img, expect = Image.fromarray(gray).convert(mode), np.repeat(gray[..., None], 3, 2)
    img.save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == mode and not Image.open(tmp_path / "m.png").has_transparency_data
    rgb = np.asarray(load_rgb(tmp_path / "m.png"))
    assert rgb.shape == (12, 20, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, expect)


def test_list_class_from_folder_gives_files_beside_the_list_no_class(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "cats").mkdir()
    for name in ("cats/a.png", "b.png"):
        Image.fromarray(_noise(rng, 32, 32)).save(tmp_path / name)
    lst = tmp_path / "list.txt"
    lst.write_text(f"cats/a.png\nb.png\n{tmp_path / 'b.png'}\n")
    db = Database.open(build_database(tmp_path / "db", encoder=TinyEncoder(), image_list=lst, crop_size=32,
                                      workers=0, device="cpu", class_from_folder=True, progress=False), device="cpu")
    assert db.manifest["class_names"] == ["cats"] and db.class_ids(torch.arange(3)).tolist() == [0, -1, -1]


def test_broken_links_are_skipped_and_counted(tmp_path):
    """A symbolic link to a file that is gone is an unreadable input like a corrupt one, not a silent omission."""
    (tmp_path / "images").mkdir()
    Image.fromarray(_noise(np.random.default_rng(1), 40, 40)).save(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "gone.png").symlink_to(tmp_path / "deleted.png")
    db = Database.open(build_database(tmp_path / "db", encoder=TinyEncoder(), images=tmp_path / "images",
                                      crop_size=32, workers=0, device="cpu", progress=False), device="cpu")
    assert len(db) == 1 and db.manifest["skipped"]["count"] == 1
    assert db.manifest["skipped"]["files"][0][0] == "gone.png"


def test_elongated_images_and_fifos_are_skipped_not_fatal(tmp_path):
    """A 20000x1 PNG (143 bytes) was resized to 5,120,000x256 for a 256 px random crop: 13 GB, and the build died
    of the out-of-memory killer; a FIFO named in a list blocked the build forever. Both are skipped and counted now
    (a center crop of the thin image, which needs only its central square, is made: see the next test)."""
    from rdm_fast.retrieval.build import load_query_image, replay_crop

    Image.fromarray(_noise(np.random.default_rng(1), 40, 40)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((1, 20000, 3), np.uint8)).save(tmp_path / "thin.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "list.txt").write_text("a.png\nthin.png\npipe.png\n")
    db = Database.open(build_database(tmp_path / "db", encoder=TinyEncoder(), image_list=tmp_path / "list.txt",
                                      crop="random", crop_size=256, workers=0, device="cpu", progress=False),
                       device="cpu")
    skipped = dict(db.manifest["skipped"]["files"])
    assert len(db) == 1 and db.manifest["skipped"]["count"] == 2, skipped
    assert "would be resized to 5120000x256 (short side 256 px): too elongated" in skipped["thin.png"]
    assert "is not a regular file" in skipped["pipe.png"]
    assert load_query_image(tmp_path / "thin.png", 256).shape == (3, 256, 256)  # its centre (test below)
    thin = Image.open(tmp_path / "thin.png")
    with pytest.raises(ValueError, match="too elongated"):  # training replays crops through the same resize
        replay_crop(thin, "random", 256, (0, 0))
    assert replay_crop(thin, "center", 8).shape == (8, 8, 3)  # 160000x8: within the limit


def _float_fit_centre(img: Image.Image, size: int) -> np.ndarray:
    """The central ``size`` px square of ``img`` with its short side resized to ``size``: bicubic per channel in
    float32 (no 8-bit rounding between PIL's two passes), clipped, unrounded."""
    w, h = img.size
    fit = (max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h))))
    x, y = (fit[0] - size) // 2, (fit[1] - size) // 2
    channels = [Image.fromarray(np.asarray(img)[..., c].astype(np.float32)).resize(fit, Image.Resampling.BICUBIC)
                for c in range(3)]
    return np.stack([np.asarray(c.crop((x, y, x + size, y + size))) for c in channels], -1).clip(0, 255)


@pytest.mark.parametrize("size, wh", [(24, (3, 700)), (17, (900, 5)), (40, (2, 1000)), (33, (613, 7))])
def test_elongated_images_resize_only_their_central_square(monkeypatch, size, wh):
    """Where only the central square of the resized image is kept (center crops, --fit-square), an image too
    elongated to resize whole (above MAX_FIT_PIXELS) has just that square resized, within one level of an exact
    resize or as close as PIL's whole resize (before, such images were skipped; with --fit-square 1200, any beyond
    46:1). A random window may lie anywhere in the image: such images are still refused there."""
    import rdm_fast.retrieval.build as build_module

    img = Image.fromarray(_noise(np.random.default_rng(sum(wh)), wh[1], wh[0]))
    exact = _float_fit_centre(img, size)
    # PIL rounds and clips to 8 bits between its passes: its whole resize can be several levels off (up to 18 here)
    bound = max(1.06, np.abs(build_module.replay_crop(img, "center", size) - exact).max())
    monkeypatch.setattr(build_module, "MAX_FIT_PIXELS", size ** 2 * 3)  # each image's resize passes it
    for part in (build_module.replay_crop(img, "center", size),
                 build_module.replay_crop(img, "random", size, (0, 0), square=size)):
        assert part.shape == (size, size, 3)
        assert np.abs(part - exact).max() <= bound  # as close as PIL's whole resize, or one level
    square = build_module.replay_crop(img, "random", 8, (3, 5), square=size)
    assert np.array_equal(square, build_module.replay_crop(img, "random", size, (0, 0), square=size)[5:13, 3:11])
    with pytest.raises(ValueError, match="too elongated"):
        build_module.replay_crop(img.resize((wh[0] // 2 or 1, wh[1] // 2 or 1)), "random", size * 4, (0, 0))


@pytest.mark.parametrize("wh", [(37, 50), (50, 37), (24, 24), (10, 13), (900, 5), (613, 7)])
def test_random_fitted_windows_resize_only_the_window_of_elongated_images(monkeypatch, wh):
    """train --random-crop's windows: the same draws and pixels as resizing the whole image and cutting the window
    (random_window), also where only the window is resized because the image is too elongated to resize whole
    (which, before, left such an entry out of training; wide images come out within a level)."""
    import rdm_fast.retrieval.build as build_module

    img = Image.fromarray(_noise(np.random.default_rng(sum(wh)), wh[1], wh[0]))
    for seed in range(4):
        whole = build_module.random_window(np.asarray(build_module.fit_short_side(img, 24)), 24,
                                           np.random.default_rng(seed))[0]
        assert np.array_equal(build_module.random_fitted_window(img, 24, np.random.default_rng(seed)), whole)
        if min(wh) < 24 and max(wh) > 24 * 3:
            with monkeypatch.context() as m:
                m.setattr(build_module, "MAX_FIT_PIXELS", 24 ** 2 * 3)
                with pytest.raises(ValueError, match="too elongated"):
                    build_module.fit_short_side(img, 24)
                part = build_module.random_fitted_window(img, 24, np.random.default_rng(seed))
            assert np.abs(part.astype(int) - whole).max() <= 1  # the box's float corners: a level at most here


def test_list_files_are_text_with_any_file_name_bytes(tmp_path):
    """A list naming a file whose name is not UTF-8 (Linux file names are bytes) works like a folder scan of it;
    a binary file given as the list is refused, naming it."""
    name = os.fsdecode(b"caf\xe9.png")
    Image.fromarray(_noise(np.random.default_rng(2), 40, 40)).save(tmp_path / name)
    (tmp_path / "list.txt").write_bytes(b"caf\xe9.png\n")
    kw = dict(encoder=TinyEncoder(), crop_size=32, workers=0, device="cpu", progress=False)
    db = Database.open(build_database(tmp_path / "db", image_list=tmp_path / "list.txt", **kw), device="cpu")
    assert db.sources(torch.arange(1)) == [name] and db.manifest["skipped"]["count"] == 0
    with pytest.raises(ValueError, match=r"image list .*\.png is not a text file \(NUL byte at offset 8\): it "
                                         "must be a text file of image paths, one per line"):
        build_database(tmp_path / "db2", image_list=tmp_path / name, **kw)


def test_bad_factory_and_device(tmp_path):
    from rdm_fast.encoders import resolve_encoder

    with pytest.raises(ValueError, match=r"getcwd must be a factory callable as getcwd\(device=\.\.\."):
        resolve_encoder("os:getcwd")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"unknown device 'gpu': expected auto, cpu, cuda or cuda:N"):
        build_database(tmp_path / "db", encoder=TinyEncoder(), images=tmp_path, device="gpu")


def test_encoder_of_another_width_fails_the_build_not_the_database(tmp_path):
    """An encoder whose output is not as wide as it declares stops the build with a clear error; nothing that
    looks finished is left for a rerun to trust."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    wide = TinyEncoder()
    real = wide.encode_images
    wide.encode_images = lambda images: torch.cat([real(images), real(images)[:, :1]], 1)  # 17 columns
    with pytest.raises(ValueError, match=r"tiny-test returned \(1, 17\) for 1 images; it declares 16-d"):
        build_database(tmp_path / "db", encoder=wide, images=tmp_path, workers=0)
    assert not (tmp_path / "db" / "manifest.json").exists() and not list((tmp_path / "db").glob("emb_*"))
    build_database(tmp_path / "db", encoder=TinyEncoder(), images=tmp_path, workers=0)  # the rerun embeds it all
    assert len(Database.open(tmp_path / "db", device="cpu")) == 1


# ---------------------------------------------------------------------------------------------- the input list
# Each compact structure is checked against plain Python (the oracle): a folder scan with os.walk following links
# and pathlib's file tests, a list parsed by str.splitlines on the whole file, the digest over "source\tclass" lines.
def _walk_oracle(root: Path) -> list[str]:
    found = []
    for folder, _, names in os.walk(root, followlinks=True):  # no loop protection: trees without loops only
        for name in names:
            p = Path(folder) / name
            if p.suffix.lower() in build.IMAGE_SUFFIXES and (p.is_file() or (p.is_symlink() and not p.exists())):
                found.append(p.relative_to(root).as_posix())
    return sorted(found)


def _splitlines_oracle(file: Path) -> tuple[list[str], list[int] | None]:
    paths, classes = [], []
    for line in file.read_bytes().decode("utf-8", "surrogateescape").splitlines():
        if line.strip():
            path, _, cls = line.partition("\t")
            paths.append(path)
            if cls.strip():
                classes.append(int(cls))
    return paths, (classes or None)


STRINGS = ["", "a", "train/n01/x_1.JPEG", "été/ß.png", "日本/画像.webp", "raw\udcff\udc80.jpg", "tab\there", "z" * 300]


def test_path_list_round_trips_indexes_and_slices():
    paths = build.PathList.of(STRINGS)
    assert len(paths) == len(STRINGS) and list(paths) == STRINGS
    assert [paths[i] for i in range(-len(STRINGS), 0)] == STRINGS
    assert paths.encoded(5) == b"raw\xff\x80.jpg"
    for first in range(len(STRINGS) + 1):
        for last in range(len(STRINGS) + 2):
            part = paths[first:last]
            assert list(part) == STRINGS[first:last]
            for a in range(len(part) + 1):  # slices of slices re-base their offsets
                assert list(part[a:]) == STRINGS[first:last][a:] and list(part[:a]) == STRINGS[first:last][:a]
    assert list(paths[-3:]) == STRINGS[-3:] and list(paths[::1]) == STRINGS
    with pytest.raises(IndexError):
        paths[len(STRINGS)]
    with pytest.raises(IndexError):
        paths[-len(STRINGS) - 1]
    with pytest.raises(ValueError, match="contiguous"):
        paths[::2]
    assert len(build.PathList.of([])) == 0 and list(build.PathList.of([])[0:5]) == []


def test_path_list_slice_pickles_only_its_part():
    import pickle
    paths = build.PathList.of(f"folder/{i:07d}.jpg" for i in range(20_000))
    part = paths[10_000:10_010]
    assert list(pickle.loads(pickle.dumps(part))) == [f"folder/{i:07d}.jpg" for i in range(10_000, 10_010)]
    assert len(pickle.dumps(part)) < 2_000 < len(pickle.dumps(paths)) // 100


def test_list_images_equals_an_os_walk_scan(tmp_path):
    root = tmp_path / "images"
    names = ["a.jpg", "A.JPG", "b.Jpeg", "c.png", "d.webp", ".hidden.png", ".jpg", "..jpg", "e.jpg.", "f.gif",
             "no_suffix", "sub/x.png", "sub/deeper/y.JPEG", "sub.png/inside.png", "a/b.png", "a.b/c.png",
             "a-/z.jpg", "été/ß.png"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    os.mkdir(root / "dir.jpg")  # a folder with an image's suffix
    (root / "dir.jpg" / "in.png").write_bytes(b"x")
    (root / "link.png").symlink_to(root / "c.png")  # a link to a file counts
    (root / "gone.jpg").symlink_to(root / "missing.jpg")  # a broken link counts (and is skipped by the build)
    (root / "linked_dir").symlink_to(root / "sub")  # a link to a folder is entered
    (root / "linkdir.png").symlink_to(root / "sub")  # and not counted as a file
    (root / "sub" / "deeper" / "up").symlink_to(root / "a.b")  # nor is it a loop when it leads elsewhere
    (root / "loop.jpg").symlink_to(root / "loop.jpg")  # links that loop or lead through a file: broken links
    (root / "through.jpg").symlink_to(root / "c.png" / "x.jpg")
    raw = os.fsencode(str(root)) + b"/raw\xff.png"  # a file name that is not UTF-8
    with open(raw, "wb") as f:
        f.write(b"x")
    expected = _walk_oracle(root)
    assert {"raw\udcff.png", "gone.jpg", "dir.jpg/in.png", "loop.jpg", "through.jpg", "linked_dir/x.png",
            "linkdir.png/deeper/y.JPEG", "linked_dir/deeper/up/c.png", "sub/deeper/up/c.png"} <= set(expected)
    assert "linkdir.png" not in expected
    assert list(build.list_images(root)) == expected


def test_list_images_does_not_follow_links_back_up(tmp_path, caplog):
    root = tmp_path / "images"
    (root / "a" / "b").mkdir(parents=True)
    for name in ("top.png", "a/x.png", "a/b/y.png"):
        (root / name).write_bytes(b"x")
    (root / "a" / "b" / "to_root").symlink_to(root)
    (root / "a" / "b" / "to_a").symlink_to(root / "a")
    (root / "a" / "here").symlink_to(".")
    (root / "a" / "b" / "sideways").symlink_to(root / "a" / "b")  # itself: a loop too
    with caplog.at_level("WARNING", logger="rdm_fast.retrieval"):
        assert list(build.list_images(root)) == ["a/b/y.png", "a/x.png", "top.png"]
    assert sorted(m.split(" ")[2].rstrip(":") for m in caplog.messages) == [
        str(root / "a" / "b" / n) for n in ("sideways", "to_a", "to_root")] + [str(root / "a" / "here")]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 1 << 24])
def test_read_list_equals_whole_file_splitlines_in_any_blocks(tmp_path, monkeypatch, block):
    monkeypatch.setattr(build, "LIST_BLOCK", block)
    for content in [b"a.png\t1\r\nb/c.jpg\t2\n\n  \nraw\xff.png\t-3\rlast.png\t4",  # CRLF, CR, blank, no final EOL
                    b"x.png\x0cy.png\x1cz.png\xc2\x85w.png\xe2\x80\xa8v.png\n",  # splitlines' other breaks
                    "été/ß.png\n日本/画像.webp\n".encode(), b"\n\n", b"only.png",
                    b" lead.png\t1\ntrail.png \t2\n two words.jpg\t5\n"]:  # spaces belong to file names
        file = tmp_path / "list.txt"
        file.write_bytes(content)
        paths, classes = build.read_list(file)
        expected, expected_classes = _splitlines_oracle(file)
        assert list(paths) == expected
        assert (classes is None and expected_classes is None) or classes.tolist() == expected_classes


@pytest.mark.parametrize("block", [1, 3, 4, 1 << 24])
def test_read_list_skips_a_utf8_byte_order_mark(tmp_path, monkeypatch, block):
    """Lists saved as "UTF-8 with BOM" (Windows editors, spreadsheet exports): the mark joined the first path, so
    its image was skipped as unreadable. Offsets of errors still count from the file's first byte."""
    monkeypatch.setattr(build, "LIST_BLOCK", block)
    file = tmp_path / "list.txt"
    file.write_bytes(b"\xef\xbb\xbfa.png\t3\r\nb/c.png\t4\r\n")
    paths, classes = build.read_list(file)
    assert list(paths) == ["a.png", "b/c.png"] and classes.tolist() == [3, 4]
    file.write_bytes(b"\xef\xbb\xbf")
    assert list(build.read_list(file)[0]) == []
    file.write_bytes(b"a.png\n\xef\xbb\xbfb.png\n")  # only at the start: elsewhere it is part of a name
    assert list(build.read_list(file)[0]) == ["a.png", "\ufeffb.png"]
    file.write_bytes(b"\xef\xbb\xbfa.png\n\x00")
    with pytest.raises(ValueError, match=r"NUL byte at offset 9\)"):
        build.read_list(file)


@pytest.mark.parametrize("block", [3, 1 << 24])
def test_read_list_errors_name_the_place(tmp_path, monkeypatch, block):
    monkeypatch.setattr(build, "LIST_BLOCK", block)
    file = tmp_path / "list.txt"
    file.write_bytes(b"a.png\nb.png\nc\x00.png\n")
    with pytest.raises(ValueError, match=r"NUL byte at offset 13\)"):
        build.read_list(file)
    file.write_bytes(b"a.png\t1\n\nb.png\tx\n")
    with pytest.raises(ValueError, match=r"list.txt:3: class id 'x' is not a 64-bit integer"):
        build.read_list(file)
    file.write_bytes(b"a.png\t1\nb.png\t99999999999999999999\n")
    with pytest.raises(ValueError, match=r"list.txt:2: class id '99999999999999999999' is not a 64-bit"):
        build.read_list(file)
    file.write_bytes(b"a.png\t1\nb.png\t2.5\n")  # not truncated to 2
    with pytest.raises(ValueError, match=r"list.txt:2: class id '2.5' is not a 64-bit integer"):
        build.read_list(file)
    file.write_bytes(b"a.png\t4611686018427387905\n")  # exact: not through a float
    assert build.read_list(file)[1].tolist() == [4611686018427387905]
    file.write_bytes(b"a.png\t1\nb.png\n")
    with pytest.raises(ValueError, match="1 of 2 lines have a class id"):
        build.read_list(file)
    os.mkfifo(tmp_path / "pipe.txt")  # e.g. --list <(find ...): it was reported as missing
    with pytest.raises(FileNotFoundError, match=r"image list .*pipe.txt is not a regular file \(a pipe"):
        build.read_list(tmp_path / "pipe.txt")


@pytest.mark.parametrize("with_classes", [False, True])
def test_inputs_digest_equals_the_digest_of_source_class_lines(with_classes):
    import hashlib
    rng = np.random.default_rng(0)
    sources = STRINGS * 20_000  # more than one DIGEST_BLOCK
    classes = rng.integers(-1, 10**12, len(sources)) if with_classes else None
    lines = "".join(f"{s}\t{c}\n" for s, c in zip(sources, classes.tolist() if with_classes else [-1] * len(sources)))
    expected = hashlib.sha256(lines.encode("utf-8", "surrogateescape")).hexdigest()
    assert build.inputs_digest(build.PathList.of(sources), classes) == expected


def test_folder_classes_are_the_sorted_folder_names(tmp_path):
    sources = build.PathList.of(["b/1.png", "top.png", "a/2.png", "b/3.png", "c/d/4.png", "a/5.png"])
    classes, names = build._folder_classes(sources, lambda s: s.split("/", 1)[0] if "/" in s else None)
    assert names == ["a", "b", "c"] and classes.dtype == np.int64
    assert classes.tolist() == [1, -1, 0, 1, 2, 0]
    classes, names = build._folder_classes(build.PathList.of(["x.png"]), lambda s: None)
    assert names == [] and classes.tolist() == [-1]


@pytest.mark.parametrize("kind", ["list", "folder"])
def test_input_list_memory_per_image(tmp_path, monkeypatch, kind):
    """The build's input list costs about a path's UTF-8 bytes and 16 B per image (Python objects cost some 500 B),
    also at its peak (Path.rglob holds every Path it found until it ends; a list is parsed a block at a time, here
    1 MiB, a 25th of the list as the 16 MiB blocks are of a 20M-line list)."""
    monkeypatch.setattr(build, "LIST_BLOCK", 1 << 20)
    n = 100_000 if kind == "list" else 20_000
    sources = [f"train/n{i % 7:08d}/n{i % 7:08d}_{i}.JPEG" for i in range(n)]  # 33-39 bytes
    if kind == "list":
        (tmp_path / "list.txt").write_text("".join(f"{s}\t{i % 7}\n" for i, s in enumerate(sources)))
        args = (None, tmp_path / "list.txt", False)
    else:
        for s in sources:
            (tmp_path / s).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / s).touch()
        args = (tmp_path / "train", None, True)
    tracemalloc.start()
    try:
        inputs = build._inputs(*args)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    order = range(n) if kind == "list" else np.argsort(sources, kind="stable")  # a folder scan sorts
    assert list(inputs[2]) == [sources[i][6 * (kind == "folder"):] for i in order]
    assert inputs[3].tolist() == [i % 7 for i in order]
    assert kept / n < 80, f"{kept / n:.0f} B per image kept"
    assert peak / n < 250, f"{peak / n:.0f} B per image at the peak"


@pytest.mark.parametrize("shard_size", [1, 100])
def test_a_build_that_reads_no_image_fails_and_leaves_nothing(tmp_path, shard_size):
    """Every input unreadable (typically list paths relative to the wrong folder) is an error, not an empty
    database: nothing is kept, so that the same --out takes the corrected inputs."""
    (tmp_path / "lists").mkdir()
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(_noise(np.random.default_rng(i), 32, 32)).save(tmp_path / "imgs" / f"{i}.png")
    lst = tmp_path / "lists" / "l.txt"
    lst.write_text("imgs/0.png\nimgs/1.png\nimgs/2.png\n")  # relative to tmp_path, not to the list's folder
    kwargs = dict(encoder=TinyEncoder(), crop_size=32, workers=0, device="cpu", progress=False,
                  shard_size=shard_size)
    with pytest.raises(ValueError) as e:
        build_database(tmp_path / "db", image_list=lst, **kwargs)
    message = str(e.value)
    assert message.startswith(f"none of the 3 images could be read (e.g. {tmp_path / 'lists' / 'imgs' / '0.png'}: "
                              "FileNotFoundError")
    assert f"relative paths in a list are read from the list's folder, {tmp_path / 'lists'}" in message
    assert not any((tmp_path / "db").iterdir())
    lst.write_text("../imgs/0.png\n../imgs/1.png\n../imgs/2.png\n")
    assert len(Database.open(build_database(tmp_path / "db", image_list=lst, **kwargs), device="cpu")) == 3
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"none of the 1 images could be read \(e.g. .*x.png: "):
        build_database(tmp_path / "kept", images=tmp_path / "bad", **kwargs)
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_db_build_cli_exits_2_when_no_image_is_read(tmp_path, capsys):
    from rdm_fast import db as db_cli
    from rdm_fast._cli import run
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    code = run(db_cli.main, ["build", "--images", str(tmp_path / "bad"), "--encoder", SPEC, "--out",
                             str(tmp_path / "db"), "--workers", "0", "--device", "cpu", "--crop-size", "32",
                             "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: none of the 1 images could be read"), err


def test_list_images_passes_over_folders_it_cannot_enter(tmp_path):
    """Links into folders this user may not search, and link chains longer than the system's path limit, are
    passed over as os.walk(followlinks=True) passes them (they ended the whole build)."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"x")
    (root / "sub" / "b.png").write_bytes(b"x")
    chain = [root / (f"d{i:02d}" + "x" * 240) for i in range(20)]  # each links to the next: no loop, long paths
    for i, d in enumerate(chain):
        d.mkdir()
        (d / "c.png").write_bytes(b"x")
        if i + 1 < len(chain):
            (d / ("L" * 250)).symlink_to(chain[i + 1])
    expected = _walk_oracle(root)
    assert len(expected) > 20 and max(len(str(root / e)) for e in expected) < os.pathconf("/", "PC_PATH_MAX")
    assert list(build.list_images(root)) == expected
    if os.geteuid() == 0:
        with tempfile.TemporaryDirectory() as shared:  # pytest's folders are root's alone: one others may search
            _scan_as_another_user(Path(shared))


def test_folders_that_cannot_be_listed_are_warned_about_once(tmp_path, monkeypatch, caplog):
    """A folder without read permission dropped its images without a word; now one warning says how many folders
    were left out and names one."""
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"x")
    real = os.scandir

    def scandir(path):
        if Path(path).name in ("b", "c"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(build.os, "scandir", scandir)
    with caplog.at_level("WARNING", logger="rdm_fast"):
        assert list(build.list_images(tmp_path)) == ["a/x.png"]
    warned = [r.getMessage() for r in caplog.records if "could not be listed" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("2 folders could not be listed (e.g. ")
    assert "Permission denied): the images in them are left out" in warned[0]


def _scan_as_another_user(base: Path) -> None:
    root, secret = base / "images", base / "secret"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"x")
    (root / "sub" / "b.png").write_bytes(b"x")
    (secret / "inner").mkdir(parents=True)
    (secret / "inner" / "c.png").write_bytes(b"x")
    for p in (base, root, root / "sub"):
        os.chmod(p, 0o755)
    os.chmod(secret, 0o700)  # root's: uid 65534 may not search it
    (root / "shared").symlink_to(secret / "inner")  # e.g. a link into another group's tree
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the scan as another user
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, "\n".join(build.list_images(root)).encode())
        except BaseException as e:
            os.write(write, f"ERROR {type(e).__name__}: {e}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        got = f.read().decode()
    os.waitpid(pid, 0)
    assert got.split("\n") == ["a.png", "sub/b.png"], got[:300]


def test_fit_short_side_refuses_a_malformed_window():
    """A list or a misspelt string was taken as "center" (only too elongated images read the window)."""
    from rdm_fast.retrieval import build as build_module

    img = Image.fromarray(np.zeros((2, 900, 3), np.uint8))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(build_module, "MAX_FIT_PIXELS", 16 ** 2 * 3)
        for window in ([3, 0], "centre"):
            with pytest.raises(ValueError, match="window must be an \\(x, y\\) corner or 'center'"):
                build_module.fit_short_side(img, 16, window=window)
        assert build_module.fit_short_side(img, 16, window=(3, 0)).size == (16, 16)
