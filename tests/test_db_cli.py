"""``python -m rdm_fast.db`` end to end: build, info, search (text, image, contact sheet), neighbors, index,
import-npz, and one-line errors with exit status 2; FAISS and Triton search backends wired into Database."""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from child_env import child_env
from faults import fail_writes_to
from test_database import INFO, TinyEncoder, brute_force
from rdm_fast import db as db_cli
from rdm_fast._cli import run
from rdm_fast.retrieval import Database, compute_neighbors, write_database
from rdm_fast.retrieval.build import PILLOW_MAX_PIXELS, current_max_image_pixels, load_query_image

SPEC = "test_database:tiny_encoder"


def cli(*argv: str) -> int:
    return run(db_cli.main, list(argv))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A folder of 10 noise images in two class folders and a database built from it by the CLI."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = root / "images" / ("a" if i < 6 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 40 + i, 3), np.uint8)).save(folder / f"{i}.png")
    assert cli("build", "--images", str(root / "images"), "--encoder", SPEC, "--out", str(root / "db"),
               "--crop", "random", "--crop-size", "32", "--shard-size", "4", "--workers", "0", "--device", "cpu",
               "--class-from-folder", "--no-progress") == 0
    return root


def test_build_fit_square_is_recorded_and_shown(built, tmp_path, capsys):
    """--fit-square and --seed reach the build, which db info shows; without --crop random it is one error
    line."""
    common = ["--images", str(built / "images"), "--encoder", SPEC, "--crop-size", "32", "--workers", "0",
              "--device", "cpu", "--no-progress"]
    assert cli("build", *common, "--out", str(tmp_path / "sq"), "--crop", "random", "--fit-square", "40") == 0
    capsys.readouterr()
    # --seed reaches the build: its windows are another seed's (the build records the seed it drew them with)
    assert cli("build", *common, "--out", str(tmp_path / "s3"), "--crop", "random", "--fit-square", "40",
               "--seed", "3") == 0
    seeded, default = (Database.open(tmp_path / name, device="cpu") for name in ("s3", "sq"))
    assert seeded.manifest["build"]["seed"] == 3 and default.manifest["build"]["seed"] == 0
    assert not torch.equal(seeded.patch_coords(torch.arange(10)), default.patch_coords(torch.arange(10)))
    assert cli("info", str(tmp_path / "sq")) == 0
    assert "crops      random, 32 px, of 40 px squares\n" in capsys.readouterr().out
    assert "fit_square (--fit-square) 40 needs crop='random' (--crop random)" in _error(
        capsys, "build", *common, "--out", str(tmp_path / "c"), "--fit-square", "40")


def test_commands_find_databases_by_name(built, tmp_path, capsys, monkeypatch):
    """The db argument of every command takes a name under $RDM_FAST_HOME/databases, as sample's --db does."""
    home = tmp_path / "home"
    shutil.copytree(built / "db", home / "databases" / "mydb")
    monkeypatch.setenv("RDM_FAST_HOME", str(home))
    assert cli("info", "mydb") == 0 and "entries    10 x 16" in capsys.readouterr().out
    assert cli("search", "mydb", "--text", "x", "--k", "2", "--device", "cpu") == 0
    assert "no database 'other': neither a directory nor a database in" in _error(capsys, "info", "other")
    assert "(it holds mydb; build one" in _error(capsys, "info", "other")  # the names there are listed
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydb").mkdir()  # e.g. the image folder the database was built from: the named database is meant
    assert cli("info", "mydb") == 0 and "entries    10 x 16" in capsys.readouterr().out
    shutil.copytree(built / "db", tmp_path / "here", dirs_exist_ok=True)
    (home / "databases" / "here").mkdir()  # a database in the folder given wins over a name
    assert cli("info", "here") == 0 and "database   here" in capsys.readouterr().out


def test_import_checks_its_parts_before_building_the_encoder(tmp_path, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("built the encoder")

    monkeypatch.setattr(db_cli, "_encoder_info", never)
    assert f"part file {tmp_path / 'none.npz'} does not exist" in _error(
        capsys, "import-npz", str(tmp_path / "none.npz"), "--out", str(tmp_path / "db"), "--encoder", SPEC)
    (tmp_path / "dir.npz").mkdir()
    assert f"part file {tmp_path / 'dir.npz'} is a directory" in _error(
        capsys, "import-npz", str(tmp_path / "dir.npz"), "--out", str(tmp_path / "db"), "--encoder", SPEC)


def test_info(built, tmp_path, capsys):
    assert cli("info", str(built / "db"), "--verify") == 0
    out = capsys.readouterr().out
    for expect in ("entries    10 x 16 float16", "encoder    tiny-test (16-d, not normalised)",
                   "shards     3 (2-4 rows each)", "sources, class ids, patch coords", "index      none",
                   "proposals  none", "skipped    no unreadable inputs", "crops      random, 32 px\n",
                   "verified   every shard's embeddings and metadata match their SHA-256"):
        assert expect in out, expect
    assert cli("info", str(built / "db"), "--json") == 0
    assert json.loads(capsys.readouterr().out)["count"] == 10
    plain = write_database(tmp_path / "plain", np.ones((3, 16)), INFO)
    assert cli("info", str(plain)) == 0
    out = capsys.readouterr().out
    assert "\nmetadata   none\n" in out and "\nshards     1 (3 rows)\n" in out and "crops" not in out  # no build


def _rows(out: str) -> list[list[str]]:
    lines = out.strip().splitlines()
    assert lines[0] == "rank\tscore\tid\tsource"
    return [line.split("\t") for line in lines[1:]]


def test_image_search_cuts_the_query_like_the_entries(built, tmp_path, capsys):
    """A database of 48 px centre crops (the encoder resizes them to its 32 px): searching with one of its own
    images finds that image first, at cosine 1, because the query is cut at the database's crop size too."""
    assert cli("build", "--images", str(built / "images"), "--encoder", SPEC, "--out", str(tmp_path / "db"),
               "--crop", "center", "--crop-size", "48", "--workers", "0", "--device", "cpu", "--no-progress") == 0
    capsys.readouterr()
    db = Database.open(tmp_path / "db", device="cpu")
    for i, query in enumerate(db.sources(torch.arange(3))):
        assert cli("search", str(tmp_path / "db"), "--image", str(built / "images" / query), "--k", "2",
                   "--device", "cpu") == 0
        first = _rows(capsys.readouterr().out)[0]
        assert int(first[2]) == i and float(first[1]) > 0.9999, first


def test_search_text_and_image_with_contact_sheet(built, tmp_path, capsys):
    db = Database.open(built / "db", device="cpu")
    assert cli("search", str(built / "db"), "--text", "a red bird", "--k", "3", "--device", "cpu") == 0
    rows = _rows(capsys.readouterr().out)
    ref_scores, ref_ids = db.search(TinyEncoder().encode_text(["a red bird"]), 3)
    assert [int(r[2]) for r in rows] == ref_ids[0].tolist() and [r[0] for r in rows] == ["1", "2", "3"]
    assert [r[3] for r in rows] == db.sources(ref_ids[0])
    np.testing.assert_allclose([float(r[1]) for r in rows], ref_scores[0].numpy(), atol=1e-4)
    assert cli("search", str(built / "db"), "--text", "a red bird", "--k", "3", "--device", "cpu", "--json") == 0
    found = json.loads(capsys.readouterr().out)  # with the class ids and random crops' corners the database holds
    assert [(f["rank"], f["id"], f["source"]) for f in found] == [(int(r[0]), int(r[2]), r[3]) for r in rows]
    assert [f["class_id"] for f in found] == db.class_ids(ref_ids[0]).tolist()
    assert [f["patch_coords"] for f in found] == db.patch_coords(ref_ids[0]).tolist()
    np.testing.assert_allclose([f["score"] for f in found], ref_scores[0].numpy(), atol=1e-4)

    sheet = tmp_path / "sheet.png"
    query = built / "images" / "b" / "7.png"
    assert cli("search", str(built / "db"), "--image", str(query), "--k", "5", "--device", "cpu",
               "--contact-sheet", str(sheet)) == 0
    rows = _rows(capsys.readouterr().out)
    img = np.asarray(Image.open(query).convert("RGB"))
    h, w = img.shape[:2]
    s = 32 / min(h, w)  # the query is the centre square, resized to the encoder's 32 px
    img = np.asarray(Image.fromarray(img).resize((max(32, round(w * s)), max(32, round(h * s))), Image.BICUBIC))
    y, x = (img.shape[0] - 32) // 2, (img.shape[1] - 32) // 2
    q = torch.from_numpy(img[y:y + 32, x:x + 32].transpose(2, 0, 1).copy()).float()[None] / 127.5 - 1
    assert [int(r[2]) for r in rows] == db.search(TinyEncoder().encode_images(q), 5)[1][0].tolist()
    png = Image.open(sheet)
    assert png.format == "PNG" and png.size[0] >= 4 * 128 and np.asarray(png).std() > 10

    moved = tmp_path / "elsewhere.png"
    assert cli("search", str(built / "db"), "--image", str(query), "--k", "2", "--device", "cpu",
               "--contact-sheet", str(moved), "--image-root", str(tmp_path / "nothing-here")) == 0
    # sources unreachable: warned, and the sheet still shows the query and the ranks, ids and scores (grey tiles)
    sheet = np.asarray(Image.open(moved))
    assert sheet.shape[1] == 3 * (128 + 4) + 4 and (sheet == 200).all(-1).sum() >= 2 * 128 * 128
    jpeg = tmp_path / "sheet.jpg"  # the file name's format (a .jpg held PNG bytes)
    assert cli("search", str(built / "db"), "--text", "x", "--k", "2", "--device", "cpu", "--contact-sheet",
               str(jpeg)) == 0
    assert Image.open(jpeg).format == "JPEG"
    capsys.readouterr()
    assert cli("search", str(built / "db"), "--text", "x", "--k", "2", "--device", "cpu", "--contact-sheet",
               str(tmp_path / "sheet.docx")) == 2
    assert ".docx is not an image type Pillow writes" in capsys.readouterr().err


def test_contact_sheet_of_a_database_without_sources(built, tmp_path, caplog, capsys):
    """Embeddings without source images (e.g. imported): grey tiles, and a warning that says so rather than
    pointing at --image-root; --json gives null for the fields the database does not hold (not TSV's "-")."""
    write_database(tmp_path / "bare", np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32),
                   {"name": "tiny-test", "dim": 16, "normalized": False})
    sheet = tmp_path / "sheet.png"
    assert cli("search", str(tmp_path / "bare"), "--encoder", SPEC, "--image",
               str(built / "images" / "a" / "0.png"), "--k", "2", "--device", "cpu", "--contact-sheet",
               str(sheet)) == 0
    assert "records no source images" in caplog.text and "--image-root" not in caplog.text
    assert sheet.is_file()
    capsys.readouterr()
    assert cli("search", str(tmp_path / "bare"), "--encoder", SPEC, "--text", "x", "--k", "2", "--device", "cpu",
               "--json") == 0
    found = json.loads(capsys.readouterr().out)
    assert [(f["source"], f["class_id"], f["patch_coords"]) for f in found] == [(None, None, None)] * 2


def test_neighbors_and_proposals(built, tmp_path, capsys, caplog):
    work = tmp_path / "db"
    shutil.copytree(built / "db", work)
    out = tmp_path / "nb.npz"
    top = tmp_path / "top.npy"
    assert cli("neighbors", str(work), "--k", "3", "--exclude-self", "--out", str(out), "--top-m-out", str(top),
               "--batch-size", "4", "--device", "cpu", "--no-progress") == 0
    assert capsys.readouterr().out == (f"wrote 10 x 3 neighbours to {out}; proposal ranking in "
                                       f"{work / 'proposals.npy'}\n")
    with np.load(out) as z:
        ids, scores = z["ids"], z["scores"]
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (10, 3)
    stored = np.concatenate([np.load(work / f"emb_{j:05d}.npy") for j in range(3)])
    _, ref = brute_force(stored, stored.astype(np.float32), 4)
    np.testing.assert_array_equal(ids, np.stack([r[r != i][:3] for i, r in enumerate(ref)]))
    counts = np.bincount(ids.ravel(), minlength=10)
    ranking = np.load(top)
    assert ranking.shape == (10, 2) and ranking[:, 1].tolist() == sorted(counts.tolist(), reverse=True)
    db = Database.open(work, device="cpu")
    assert db.proposals(0.2).tolist() == ranking[:2, 0].tolist()
    assert db.manifest["proposals"]["k"] == 3 and db.manifest["proposals"]["exclude_self"]
    assert cli("info", str(work)) == 0
    assert "proposals  ranking from 10 queries x k=3 (exclude-self)" in capsys.readouterr().out

    pair = tmp_path / "nb.npy"
    assert not any("--exclude-self is not given" in r.getMessage() for r in caplog.records)
    assert cli("neighbors", str(work), "--queries", str(built / "db"), "--k", "2", "--out", str(pair),
               "--device", "cpu", "--no-progress") == 0  # a copy of the database, without --exclude-self: warned
    assert any("own entries and --exclude-self is not given: each entry's first neighbour is itself"
               in r.getMessage() for r in caplog.records)
    assert np.load(pair).shape == (10, 2) and np.load(tmp_path / "nb_scores.npy").dtype == np.float32
    assert "replacing the proposal ranking of" in caplog.text and "(from 10 queries x k=3) with this run's " \
        "(10 x k=2): top-m sampling draws its pseudo-queries from it" in caplog.text  # the first run's ranking
    caplog.clear()
    assert cli("neighbors", str(work), "--queries", str(built / "db"), "--k", "2", "--out", str(pair),
               "--device", "cpu", "--no-progress") == 0  # the same ranking again: nothing to warn about
    assert "replacing the proposal ranking" not in caplog.text
    kept, record = np.load(work / "proposals.npy"), Database.open(work).manifest["proposals"]
    capsys.readouterr()
    assert cli("neighbors", str(work), "--k", "3", "--exclude-self", "--out", str(tmp_path / "val.npz"),
               "--no-proposals", "--device", "cpu", "--no-progress") == 0  # e.g. a validation split's neighbours
    assert "the proposal ranking of" in capsys.readouterr().out and "replacing" not in caplog.text
    assert np.array_equal(np.load(work / "proposals.npy"), kept) and Database.open(work).manifest["proposals"] == record
    assert (tmp_path / "val.npz").is_file() and not (tmp_path / "val.npz.progress").exists()
    # the queries may be the database itself given again (so --exclude-self applies); the ranking records its path
    assert cli("neighbors", str(work), "--queries", str(work), "--exclude-self", "--k", "2", "--out", str(pair),
               "--device", "cpu", "--no-progress") == 0
    assert Database.open(work, device="cpu").manifest["proposals"]["queries_db"] == str(work.resolve())


def test_import_npz_cli(tmp_path, capsys):
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((21, 16)).astype(np.float32)
    np.savez(tmp_path / "21x16-part_0.npz", embedding=emb, img_id=np.arange(100, 121),
             patch_coords=rng.integers(0, 99, (21, 2)))
    assert cli("import-npz", str(tmp_path / "21x16-part_0.npz"), "--out", str(tmp_path / "db"), "--encoder", SPEC,
               "--shard-size", "8", "--chunk-rows", "5", "--no-progress") == 0
    assert "21 embeddings (16-d, tiny-test) in 3 shards" in capsys.readouterr().out
    assert cli("import-npz", str(tmp_path / "21x16-part_0.npz"), "--out", str(tmp_path / "one"), "--encoder", SPEC,
               "--no-progress") == 0
    assert "21 embeddings (16-d, tiny-test) in 1 shard\n" in capsys.readouterr().out  # not "1 shards"
    db = Database.open(tmp_path / "db", device="cpu")
    np.testing.assert_array_equal(db.embeddings(torch.arange(21)).numpy(), emb.astype(np.float16).astype(np.float32))
    assert db.sources(torch.tensor([0, 20])) == ["100", "120"] and not db.manifest["has_class_ids"]
    # an encoder that cannot be built on the meta device (for its name and dimension) is built on the CPU
    assert cli("import-npz", str(tmp_path / "21x16-part_0.npz"), "--out", str(tmp_path / "cpu"), "--encoder",
               "test_db_cli:meta_less_encoder", "--no-progress") == 0


def test_import_npz_cli_takes_pickled_img_ids_with_allow_pickle(tmp_path, capsys):
    """img_id arrays of Python objects (bytes, str, numbers) are refused without --allow-pickle, naming it, and with
    it stored as the strings they hold (bytes decoded, not "b'...'"). No test imported pickled ids."""
    rng = np.random.default_rng(4)
    part = tmp_path / "3x16-part_0.npz"
    np.savez(part, embedding=rng.standard_normal((3, 16)).astype(np.float32),
             img_id=np.array([b"oi_01", "oi_02", 3], dtype=object), patch_coords=np.zeros((3, 2), np.int64))
    common = ["import-npz", str(part), "--encoder", SPEC, "--no-progress"]
    assert "stores Python objects (pickled); pass --allow-pickle if you trust the file" in _error(
        capsys, *common, "--out", str(tmp_path / "refused"))
    assert cli(*common, "--out", str(tmp_path / "db"), "--allow-pickle") == 0
    assert Database.open(tmp_path / "db", device="cpu").sources([0, 1, 2]) == ["oi_01", "oi_02", "3"]


@pytest.mark.parametrize("crop", ["random", "none"])
def test_contact_sheet_tiles_replay_the_build_crop(tmp_path, capsys, caplog, crop):
    """Each tile shows the crop that was embedded: a random crop of an image smaller than the crop size is
    taken from the upscaled image, crop mode none squashes the whole image; an unreadable image is grey."""
    from rdm_fast.retrieval.build import load_rgb, make_crops, replay_crop

    rng = np.random.default_rng(6)
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(tmp_path / "wide.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    corners = {"small.png": (0, 5), "wide.png": (7, 3), "broken.png": (0, 0)}
    names = list(corners)
    path = write_database(tmp_path / "db", rng.standard_normal((3, 16)), INFO, sources=names,
                          patch_coords=np.array(list(corners.values())) if crop == "random" else None,
                          image_root=str(tmp_path), build={"crop": crop, "crop_size": 32})
    sheet = tmp_path / "sheet.png"
    assert cli("search", str(path), "--text", "x", "--k", "3", "--device", "cpu", "--contact-sheet", str(sheet)) == 0
    assert "broken.png cannot be shown" in caplog.text
    png = np.asarray(Image.open(sheet).convert("RGB"))
    caption = png[4:4 + 128, 4:4 + 128]  # the query's tile: the caption in black on white
    assert (caption == 255).all(-1).mean() > 0.9 and (caption < 100).all(-1).any()
    for r, row in enumerate(_rows(capsys.readouterr().out), 1):
        y, x = 4 + r // 3 * (128 + 14 + 4), 4 + r % 3 * 132  # 3 tiles a row, 4 px apart, captions 14 px high
        tile = png[y:y + 128, x:x + 128]
        name = row[3]
        if name == "broken.png":
            assert (tile == 200).all()
            continue
        xy = corners[name] if crop == "random" else None
        crop_px = replay_crop(load_rgb(tmp_path / name), crop, 32, xy)
        expect = make_crops(Image.fromarray(crop_px), "center", 128, 1, np.random.default_rng(0))[0][0]
        np.testing.assert_array_equal(tile, expect)


def test_max_image_pixels_option(built, tmp_path, capsys, monkeypatch):
    """--max-image-pixels sets the decompression-bomb limit of the commands that decode images; a query image
    above it is refused with the option named."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the commands set it for the process
    query = built / "images" / "a" / "0.png"  # 40 x 48
    assert "--max-image-pixels raises the limit" in _error(capsys, "search", str(built / "db"), "--image",
                                                           str(query), "--max-image-pixels", "1000")
    assert cli("search", str(built / "db"), "--image", str(query), "--max-image-pixels", "0") == 0
    assert cli("search", str(built / "db"), "--text", "x", "--device", "cpu") == 0  # without it: Pillow's limit
    assert current_max_image_pixels() == PILLOW_MAX_PIXELS
    assert "--max-image-pixels must be 0 (no limit) or more" in _error(
        capsys, "search", str(built / "db"), "--image", str(query), "--max-image-pixels", "-1")


def _error(capsys, *argv: str) -> str:
    assert cli(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


def test_one_line_errors(built, tmp_path, capsys):
    db = str(built / "db")
    assert "does not exist" in _error(capsys, "info", str(tmp_path / "missing"))
    newer = tmp_path / "newer"
    shutil.copytree(built / "db", newer)
    m = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**m, "format_version": 7}))
    assert "format_version 7" in _error(capsys, "info", str(newer))
    (newer / "manifest.json").write_text("{")
    assert "manifest.json is corrupted" in _error(capsys, "search", str(newer), "--text", "x")
    assert "unknown encoder 'nope'" in _error(capsys, "search", db, "--text", "x", "--encoder", "nope")
    assert "no module named 'nope_mod'" in _error(capsys, "search", db, "--text", "x",
                                                  "--encoder", "nope_mod:f").lower()
    assert "holds 'tiny-test' embeddings" in _error(capsys, "search", db, "--text", "x",
                                                    "--encoder", "test_db_cli:renamed_encoder")
    assert "query image" in _error(capsys, "search", db, "--image", str(tmp_path / "none.png"))
    assert "between 1 and the database size 10" in _error(capsys, "search", db, "--text", "x", "--k", "11")
    assert "not empty and holds no resumable build" in _error(
        capsys, "build", "--images", str(built / "images"), "--encoder", SPEC, "--out", str(tmp_path))
    assert "different arguments" in _error(capsys, "build", "--images", str(built / "images"), "--encoder", SPEC,
                                           "--out", db, "--crop-size", "16", "--workers", "0")
    assert "needs crop='random'" in _error(capsys, "build", "--images", str(built / "images"), "--encoder", SPEC,
                                           "--out", str(tmp_path / "n"), "--crops-per-image", "2")
    # without the optional dependency, its absence is said first
    unparsable = "--param 'x'" if importlib.util.find_spec("faiss") else "FAISS indexes are unavailable"
    assert unparsable in _error(capsys, "index", db, "--param", "x")
    np.savez(tmp_path / "8d-part_0.npz", embedding=np.zeros((3, 8)), img_id=np.arange(3),
             patch_coords=np.zeros((3, 2)))
    assert "8-d embeddings but encoder 'tiny-test' makes 16-d" in _error(
        capsys, "import-npz", str(tmp_path / "8d-part_0.npz"), "--out", str(tmp_path / "i"), "--encoder", SPEC)
    other = write_database(tmp_path / "other", np.random.default_rng(1).standard_normal((4, 16)), INFO)
    refused = _error(capsys, "neighbors", db, "--queries", str(other), "--k", "2", "--exclude-self", "--out",
                     str(tmp_path / "x.npz"))
    assert "--exclude-self applies only" in refused and "use --dedup-threshold" in refused
    assert "must end in .npz" in _error(capsys, "neighbors", db, "--k", "2", "--out", str(tmp_path / "x.txt"))
    for command in (["search", db, "--text", "x"], ["neighbors", db, "--k", "2", "--out", str(tmp_path / "x.npz")],
                    ["build", "--images", str(built / "images"), "--encoder", SPEC, "--out", str(tmp_path / "g")]):
        assert "unknown device 'gpu'" in _error(capsys, *command, "--device", "gpu")
        for other in ("mps", "meta"):  # names torch knows: the first tensor moved there failed, with a traceback
            assert f"device '{other}' is not supported: rdm_fast runs on 'cpu' or CUDA GPUs" in _error(
                capsys, *command, "--device", other)
    assert "--contact-sheet " + str(tmp_path) + " is a directory" in _error(
        capsys, "search", db, "--text", "x", "--contact-sheet", str(tmp_path))
    assert "getcwd must be a factory callable as getcwd(device=..., checkpoint=..., pretrained=...)" in _error(
        capsys, "build", "--images", str(built / "images"), "--encoder", "os:getcwd", "--out", str(tmp_path / "f"))
    assert "is a file, not a database directory" in _error(capsys, "info", str(tmp_path / "8d-part_0.npz"))
    assert "is given more than once" in _error(capsys, "import-npz", str(tmp_path / "8d-part_0.npz"),
                                               str(tmp_path / "8d-part_0.npz"), "--out", str(tmp_path / "i2"),
                                               "--encoder", SPEC)


def test_neighbors_rerun_removes_the_temporary_files_a_killed_run_left(built, tmp_path):
    """A run killed while it wrote --out, --top-m-out or a progress file left that write's temporary file (named as
    atomic_write names them); the rerun, which resumes from the progress, kept those beside --out and --top-m-out
    for good (a copy of the results each) where build, sample, train and convert remove theirs."""
    work = tmp_path / "db"
    shutil.copytree(built / "db", work)
    out, top, progress = tmp_path / "nb.npz", tmp_path / "top.npy", tmp_path / "nb.npz.progress"
    progress.mkdir()
    left = [tmp_path / ".nb.npz.k1ll3d00.tmp", tmp_path / ".top.npy.k1ll3d01.tmp", progress / ".ids.npy.k1ll3d02.tmp",
            progress / ".state.json.k1ll3d03.tmp"]
    for file in left:
        file.write_bytes(b"PK\x03\x04 cut short")
    other = tmp_path / ".other.npz.k1ll3d04.tmp"  # another output's: not this run's to remove
    other.write_bytes(b"")
    assert cli("neighbors", str(work), "--k", "2", "--exclude-self", "--out", str(out), "--top-m-out", str(top),
               "--device", "cpu", "--no-progress") == 0
    assert not [file for file in left if file.exists()] and other.exists() and not progress.exists()
    assert np.load(out)["ids"].shape == (10, 2) and np.load(top).shape == (10, 2)


def test_neighbors_checks_outputs_and_queries_first(built, tmp_path, capsys):
    """Bad output paths and an empty query database fail before the search, leaving the database as it was."""
    work = tmp_path / "db"
    shutil.copytree(built / "db", work)
    assert cli("neighbors", str(work), "--k", "2", "--out", str(tmp_path / "new" / "dir" / "nb.npz"),
               "--device", "cpu", "--no-progress") == 0  # a missing output folder is created
    assert (tmp_path / "new" / "dir" / "nb.npz").is_file()
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    (tmp_path / "top.npy").mkdir()
    assert "--top-m-out " + str(tmp_path / "top.npy") + " is a directory" in _error(
        capsys, "neighbors", str(work), "--k", "3", "--out", str(tmp_path / "nb2.npz"), "--top-m-out",
        str(tmp_path / "top.npy"), "--device", "cpu")
    (tmp_path / "nb3.npz").mkdir()
    assert "--out " + str(tmp_path / "nb3.npz") + " is a directory" in _error(
        capsys, "neighbors", str(work), "--k", "3", "--out", str(tmp_path / "nb3.npz"), "--device", "cpu")
    assert f"--top-m-out {tmp_path / 'top.txt'} must end in .npy" in _error(
        capsys, "neighbors", str(work), "--k", "3", "--out", str(tmp_path / "nb5.npz"), "--top-m-out",
        str(tmp_path / "top.txt"), "--device", "cpu")
    assert "--dedup-threshold is a cosine similarity in [-1, 1], got 1.5" in _error(
        capsys, "neighbors", str(work), "--k", "3", "--out", str(tmp_path / "nb6.npz"), "--dedup-threshold", "1.5",
        "--device", "cpu")
    empty = write_database(tmp_path / "empty", np.zeros((0, 16)), INFO)
    assert "--queries " + str(empty) + " is empty" in _error(
        capsys, "neighbors", str(work), "--queries", str(empty), "--k", "3", "--out", str(tmp_path / "nb4.npz"),
        "--device", "cpu")
    assert not any((tmp_path / f"nb{i}.npz").is_file() for i in (2, 4, 5, 6)) and not (tmp_path / "top.txt").exists()
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before


def test_neighbors_outputs_never_replace_the_databases_or_each_others_files(built, tmp_path, capsys):
    """--out or --top-m-out naming a file of the database (a shard, its index or proposal ranking) overwrote it
    after the search, damaging the database; --top-m-out naming --out's ids or scores file replaced the neighbours
    just written, under a message that they were written. Both are refused before the search."""
    work = tmp_path / "db"
    shutil.copytree(built / "db", work)
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    for option, name in (("--out", "emb_00000.npy"), ("--out", "meta_00001.npz"), ("--top-m-out", "proposals.npy"),
                         ("--top-m-out", "emb_00002.npy")):
        outputs = {"--out": str(tmp_path / "nb.npz"), option: str(work / name)}
        assert f"{option} {work / name} is a file of the database {work}" in _error(
            capsys, "neighbors", str(work), "--k", "2", "--exclude-self", "--device", "cpu", "--no-progress",
            *(x for pair in outputs.items() for x in pair))
    assert f"is a file of the database {work}" in _error(  # of the queries' database too
        capsys, "neighbors", str(built / "db"), "--queries", str(work), "--k", "2", "--device", "cpu",
        "--no-progress", "--out", str(work / "emb_00000.npy"))
    for top in ("nb.npy", "nb_scores.npy"):
        assert f"--top-m-out {tmp_path / top} is a file of --out {tmp_path / 'nb.npy'}" in _error(
            capsys, "neighbors", str(work), "--k", "2", "--exclude-self", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "nb.npy"), "--top-m-out", str(tmp_path / top))
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before
    assert Database.open(work, device="cpu", verify=True) is not None
    assert not list(tmp_path.glob("nb*")) and not list(work.glob("*.progress"))


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb to PIL, without the memory."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, then its CRC
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_unreadable_query_images_are_one_line_errors(built, tmp_path, capsys):
    """A decompression bomb, a file that is no image and a truncated image: one line naming the file."""
    bomb = _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    (tmp_path / "text.png").write_text("not an image")
    good = (built / "images" / "a" / "0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[:len(good) // 2])
    for name, reason in (("bomb.png", "DecompressionBombError"), ("text.png", "cannot identify image file"),
                         ("cut.png", "truncated")):
        message = _error(capsys, "search", str(built / "db"), "--image", str(tmp_path / name), "--device", "cpu")
        assert f"query image {tmp_path / name} cannot be read" in message and reason in message, message
    assert f"query image {tmp_path} is a folder, not an image" in _error(capsys, "search", str(built / "db"),
                                                                          "--image", str(tmp_path))
    (tmp_path / "dangling.png").symlink_to(tmp_path / "moved.png")
    assert f"query image {tmp_path / 'dangling.png'} is a broken link (to {tmp_path / 'moved.png'})" in _error(
        capsys, "search", str(built / "db"), "--image", str(tmp_path / "dangling.png"))
    with pytest.raises(ValueError, match="bomb.png cannot be read"):
        load_query_image(bomb, 32)  # what sample --image calls


def test_neighbors_of_a_copy_and_the_training_advice(built, tmp_path, capsys):
    """A training database that is a copy of the retrieval database: the neighbours computed without excluding
    each entry are refused by training with a command that, run as given, computes acceptable ones."""
    from rdm_fast.config import RDMConfig
    from rdm_fast.data import TrainingContexts

    copy = tmp_path / "copy"
    shutil.copytree(built / "db", copy)
    tree = RDMConfig.preset("tiny").to_dict()
    tree["model"]["params"]["unet_config"]["params"]["context_dim"] = 16
    cfg = RDMConfig.resolve(tree)
    nn = tmp_path / "nn.npz"
    assert cli("neighbors", str(built / "db"), "--queries", str(copy), "--k", "3", "--out", str(nn),
               "--device", "cpu", "--no-progress") == 0
    work = tmp_path / "db"  # the retrieval database (its proposal ranking is rewritten below)
    shutil.copytree(built / "db", work)
    with pytest.raises(ValueError) as e:
        TrainingContexts(cfg, copy, work, nn)
    advice = str(e.value).split("python -m rdm_fast.db ")[1]
    assert advice.startswith(f"neighbors {work} --queries {copy} ") and "--exclude-self" in advice
    assert cli(*[str(nn) if a == "FILE" else a for a in shlex.split(advice)], "--device", "cpu",
               "--no-progress") == 0
    capsys.readouterr()
    contexts = TrainingContexts(cfg, copy, work, nn)
    assert not (contexts.ids == torch.arange(10)[:, None]).any()
    with np.load(nn) as z:  # the same as excluding each entry from the database itself
        ids, _ = compute_neighbors(Database.open(work, device="cpu"), k=3, exclude_self=True, progress=False)
        np.testing.assert_array_equal(z["ids"], ids.numpy())


def test_outputs_below_a_file_and_unreadable_shards(built, tmp_path, capsys):
    """An output path through a regular file names that file; a shard of random bytes is "not a NumPy file",
    never advice to unpickle it."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile / "x.npz", afile / "sub" / "x.npz"):
        assert f"{afile} is a file, not a folder" in _error(capsys, "neighbors", str(built / "db"), "--k", "2",
                                                            "--out", str(out), "--device", "cpu")
    assert f"--out {afile / 'db'}: {afile} is a file, not a folder" in _error(
        capsys, "build", "--images", str(built / "images"), "--encoder", SPEC, "--out", str(afile / "db"),
        "--workers", "0", "--device", "cpu", "--no-progress")
    broken = tmp_path / "broken"
    shutil.copytree(built / "db", broken)
    shard = broken / "emb_00001.npy"
    shard.write_bytes(np.random.default_rng(0).bytes(shard.stat().st_size))
    message = _error(capsys, "info", str(broken))
    assert f"{shard} is not a readable .npy array (not a NumPy .npy or .npz file)" in message
    assert "pickle" not in message


def test_build_refuses_typo_crop_sizes_and_binary_lists(built, tmp_path, capsys, caplog):
    """A crop size above MAX_CROP_SIZE fails at once (before the encoder is built); one that enlarges the images
    many times is warned about before the build; a binary --list names the file and what it must hold."""
    images = str(built / "images")
    message = _error(capsys, "build", "--images", images, "--encoder", "no_such_module:f", "--out",
                     str(tmp_path / "a"), "--crop", "random", "--crop-size", "20000")
    assert "crop_size 20000 is above 4096 px" in message and not (tmp_path / "a").exists()
    assert cli("build", "--images", images, "--encoder", SPEC, "--out", str(tmp_path / "b"), "--crop", "random",
               "--crop-size", "200", "--workers", "0", "--device", "cpu", "--no-progress") == 0
    assert "200 px crops enlarge 10 of 10 sampled images more than 4x" in caplog.text
    caplog.clear()
    assert cli("build", "--images", images, "--encoder", SPEC, "--out", str(tmp_path / "c"), "--crop-size", "160",
               "--workers", "0", "--device", "cpu", "--no-progress") == 0
    assert "enlarges" not in caplog.text  # 40 px images at 160 px: 4x, not more
    listed = built / "images" / "a" / "0.png"
    assert (f"image list {listed} is not a text file (NUL byte at offset 8): it must be a text file of image "
            "paths, one per line") in _error(capsys, "build", "--list", str(listed), "--encoder", SPEC, "--out",
                                             str(tmp_path / "d"))


def renamed_encoder(*, device="cpu", checkpoint=None, pretrained=True) -> TinyEncoder:
    """The test encoder under another name (a database must refuse its queries)."""
    enc = TinyEncoder(device)
    enc.name = "renamed"
    return enc


def test_subprocess_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rdm_fast.db", "info", str(tmp_path / "missing")], cwd=tmp_path,
                       env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: database directory "
                                                                    f"{tmp_path / 'missing'} does not exist"]


# ------------------------------------------------------------------------------------------ backends
@pytest.fixture
def random_db(tmp_path):
    emb = np.random.default_rng(4).standard_normal((300, 16)).astype(np.float32)
    return emb, write_database(tmp_path / "r", emb, INFO, shard_size=70)


def test_an_index_that_is_not_the_databases_is_named(random_db, tmp_path, caplog, capsys):
    """Another database's index file copied in (another size than the manifest records): auto search falls back to
    exact search with a warning, as for a missing file, and the faiss backend and info --verify name the file and
    the command that rebuilds it (the search had failed under auto with an error naming neither)."""
    pytest.importorskip("faiss")
    from rdm_fast.retrieval.database import add_index

    _, path = random_db
    other = write_database(tmp_path / "other", np.ones((50, 16), np.float32), INFO)
    add_index(path, "flat")
    add_index(other, "flat")
    shutil.copy(other / "index_flat.faiss", path / "index_flat.faiss")
    assert Database.open(path, device="cpu").backend == "torch-exact"
    assert "index_flat.faiss holds" in caplog.text and "not this database's index" in caplog.text
    with pytest.raises(ValueError, match="not this database's index; rebuild it with python -m rdm_fast.db index"):
        Database.open(path, backend="faiss", device="cpu")
    assert "not this database's index" in _error(capsys, "info", str(path), "--verify")


def test_an_index_recorded_without_its_size_is_used(random_db):
    """Indexes recorded before their size was are taken as they are (from a database mutation audit: taking a
    missing size for another database's index passed every test; auto search then fell back to exact search)."""
    pytest.importorskip("faiss")
    from rdm_fast.retrieval.database import add_index, update_manifest

    _, path = random_db
    add_index(path, "flat")
    update_manifest(path, lambda m: m["index"].pop("bytes"))
    assert Database.open(path, device="cpu", verify=True).backend == "faiss-flat"

@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_faiss_index_backend(random_db, capsys, kind):
    pytest.importorskip("faiss")
    emb, path = random_db
    assert cli("index", str(path), "--kind", kind, "--no-progress") == 0
    assert f"{kind} index written to index_{kind}.faiss" in capsys.readouterr().out
    db = Database.open(path, device="cpu")
    if not torch.cuda.is_available():
        assert db.backend == f"faiss-{kind}"  # auto on the CPU with an index
    faiss_db = Database.open(path, backend="faiss", device="cpu")
    assert faiss_db.manifest["index"]["kind"] == kind and (path / f"index_{kind}.faiss").is_file()
    queries = np.random.default_rng(5).standard_normal((6, 16)).astype(np.float32)
    scores, ids = faiss_db.search(torch.from_numpy(queries), 5)
    ref_scores, ref_ids = brute_force(emb.astype(np.float16), queries, 5)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)  # flat is exact; hnsw is exact at this size
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-4)
    assert cli("info", str(path)) == 0
    shown = {"flat": "", "hnsw": ", M 32, ef_search 128"}[kind]  # the parameters it was built with
    assert f"index      {kind} (index_{kind}.faiss{shown})" in capsys.readouterr().out


def test_the_search_backend_is_logged_by_the_searches(random_db, tmp_path, caplog):
    """The search backend is logged where a search runs, not when a database is opened: commands that only read
    one (db info, the build's summary, training) open it with the torch backend, and their log said "search
    backend torch-exact" of a database that db search (and sample --db) search with its FAISS index."""
    pytest.importorskip("faiss")
    from rdm_fast.retrieval.database import add_index

    emb, path = random_db
    add_index(path, "flat")
    with caplog.at_level("INFO", logger="rdm_fast"):
        assert cli("info", str(path)) == 0
        assert "opened" in caplog.text and "torch-exact" not in caplog.text
        db = Database.open(path, backend="faiss", device="cpu")
        db.search(torch.from_numpy(emb[:2]), 3)
        db.search(torch.from_numpy(emb[2:4]), 3)
    assert caplog.text.count(f"searching {path} with faiss-flat on cpu") == 1  # once, at the first search


def test_nprobe_reaches_the_ivfpq_search_and_is_warned_about_elsewhere(random_db, tmp_path, monkeypatch, caplog):
    pytest.importorskip("faiss")
    from rdm_fast.retrieval.faiss_index import FaissSearch

    _, path = random_db
    seen = []
    real = FaissSearch.load.__func__
    monkeypatch.setattr(FaissSearch, "load", classmethod(lambda cls, *a, **kw: seen.append(kw["nprobe"]) or
                                                         real(cls, *a, **kw)))
    assert cli("index", str(path), "--kind", "flat", "--no-progress") == 0
    args = ["neighbors", str(path), "--k", "3", "--backend", "faiss", "--no-progress", "--nprobe", "3"]
    assert cli(*args, "--out", str(tmp_path / "a.npz")) == 0
    assert "--nprobe applies to ivfpq indexes only; this search runs faiss-flat" in caplog.text
    caplog.clear()
    assert cli("index", str(path), "--kind", "ivfpq", "--param", "nlist=4", "--param", "m=4", "--param", "nbits=4",
               "--no-progress") == 0
    assert cli(*args, "--out", str(tmp_path / "b.npz")) == 0
    assert seen[-1] == 3 and "--nprobe applies" not in caplog.text
    assert np.load(tmp_path / "b.npz")["ids"].shape == (300, 3)


def test_neighbors_warns_about_long_exact_cpu_searches(random_db, tmp_path, monkeypatch, caplog):
    _, path = random_db
    args = ["neighbors", str(path), "--k", "3", "--backend", "torch", "--device", "cpu", "--no-progress"]
    assert cli(*args, "--out", str(tmp_path / "a.npz")) == 0
    assert "exact search on the CPU" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "r"]  # the progress folder is gone
    monkeypatch.setattr(db_cli, "EXACT_CPU_WARNING", 300 * 300 * 16 - 1)
    assert cli(*args, "--out", str(tmp_path / "b.npz")) == 0
    assert "exact search on the CPU: 300 queries against 300 entries are 1.4e+06 multiply-adds" in caplog.text


def test_a_missing_index_file_is_named(random_db, capsys, caplog):
    """An index file deleted by hand: the automatic backend says it searches exactly instead (it did so
    silently) and db info --verify names the file (it reported the database verified)."""
    pytest.importorskip("faiss")
    _, path = random_db
    assert cli("index", str(path), "--kind", "flat", "--no-progress") == 0
    (path / "index_flat.faiss").unlink()
    if not torch.cuda.is_available():  # on a GPU the automatic backend is the Triton search, which needs no index
        assert Database.open(path, device="cpu").backend == "torch-exact"
        assert "its flat index cannot be used" in caplog.text and "index_flat.faiss is missing" in caplog.text
    assert "index_flat.faiss is missing (listed in manifest.json): rebuild it with python -m rdm_fast.db index" \
        in _error(capsys, "info", str(path), "--verify")


def test_replacing_an_index_removes_the_old_file(random_db):
    pytest.importorskip("faiss")
    _, path = random_db
    assert cli("index", str(path), "--kind", "flat", "--no-progress") == 0
    # killed builds, one of them while it rewrote the manifest (which a rerun left behind for good)
    killed = [path / ".index.hnsw.tmp", path / "..index.hnsw.tmp.k1ll.tmp", path / ".index.auto.tmp",
              path / ".manifest.json.k1ll.tmp"]
    for f in killed:
        f.write_bytes(b"partial index")
    assert cli("index", str(path), "--kind", "hnsw", "--param", "M=8", "--no-progress") == 0
    assert not (path / "index_flat.faiss").exists() and not any(f.exists() for f in killed)
    assert Database.open(path, backend="faiss", device="cpu").manifest["index"]["params"]["M"] == 8
    # a build of another kind killed after its file took its name, before the manifest recorded it: a later
    # build (here of the recorded kind) removes that unrecorded index too (it stayed for good, as large as the index)
    (path / "index_flat.faiss").write_bytes(b"an unrecorded index")
    assert cli("index", str(path), "--kind", "hnsw", "--param", "M=8", "--no-progress") == 0
    assert not (path / "index_flat.faiss").exists() and (path / "index_hnsw.faiss").is_file()


def test_index_holds_the_database(random_db, capsys):
    """db index takes the lock a build of the database holds: a second index run (or a build) meanwhile deleted the
    first's temporary index file as stale. A database without a progress folder is left without one."""
    pytest.importorskip("faiss")
    from rdm_fast._cli import OutDirLock

    _, path = random_db
    held = OutDirLock(path / "progress", path)  # what a running build (or index run) of the database holds
    message = _error(capsys, "index", str(path), "--kind", "flat", "--no-progress")
    assert message.startswith(f"error: database {path} is in use by another run (process ") and \
        message.endswith("wait for it to end"), message  # no advice to choose another --out: it takes none
    assert Database.open(path, device="cpu").manifest["index"] is None
    held.release()
    shutil.rmtree(path / "progress")
    assert cli("index", str(path), "--kind", "flat", "--no-progress") == 0
    assert Database.open(path, device="cpu").manifest["index"]["kind"] == "flat"
    assert not (path / "progress").exists()


def test_an_index_replaced_in_place_is_never_recorded_with_the_old_ones_settings(random_db, monkeypatch):
    """A failure (or kill) between replacing index_hnsw.faiss and recording the new index leaves none recorded,
    never the new file under the old one's record (its build parameters), and an empty database is not indexed
    (from a database mutation audit: dropping either step passed every test)."""
    pytest.importorskip("faiss")
    from rdm_fast.retrieval import database

    _, path = random_db
    database.add_index(path, "hnsw", M=8, progress=False)
    real = database.update_manifest

    def failing(directory, change):  # the record of the new index is not written: a full disk
        probe: dict = {}
        change(probe)
        if probe.get("index"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, change)

    monkeypatch.setattr(database, "update_manifest", failing)
    with pytest.raises(OSError):
        database.add_index(path, "hnsw", M=16, progress=False)
    assert database.read_manifest(path)["index"] is None
    empty = write_database(path.parent / "empty", np.zeros((0, 16), np.float32), INFO)
    with pytest.raises(ValueError, match="is empty: nothing to index"):
        database.add_index(empty, "flat", progress=False)

def test_triton_backend_wiring_on_cpu_shards(random_db, monkeypatch):
    """GPUExactSearch gets the memory-mapped shards as the parts of one database; on this machine its CPU path
    stands in for the GPU (availability is forced, devices=['cpu'])."""
    pytest.importorskip("triton")  # the kernel's block limits come from its module
    emb, path = random_db
    monkeypatch.setattr(Database, "_triton_unavailable", staticmethod(lambda device: None))
    db = Database.open(path, backend="triton", device="cpu")
    assert db.backend == "triton-exact"
    queries = np.random.default_rng(6).standard_normal((7, 16)).astype(np.float32)
    scores, ids = db.search(torch.from_numpy(queries), 9)
    ref_scores, ref_ids = brute_force(emb.astype(np.float16), queries, 9)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=2e-3)  # the GPU path stores fp16 unit rows


def test_ctrl_c_says_whether_the_same_command_continues(built, tmp_path, capsys, caplog, monkeypatch):
    """Ctrl-C in a command that resumes (build, import-npz, neighbors) says that rerunning it continues; the
    others stop with 'interrupted' alone."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(db_cli, "compute_neighbors", interrupt)
    monkeypatch.setitem(db_cli.COMMANDS, "info", interrupt)
    assert cli("neighbors", str(built / "db"), "--k", "2", "--exclude-self", "--out", str(tmp_path / "nb.npz"),
               "--device", "cpu", "--no-progress") == 130
    assert "stopped: the same command continues where this one stopped" in caplog.text
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    caplog.clear()
    assert cli("info", str(built / "db")) == 130
    assert "the same command continues" not in caplog.text


def test_interrupted_writes_of_neighbors_and_builds_resume(built, tmp_path, capsys, monkeypatch):
    """A kill while the proposal ranking is replaced leaves no ranking, never the new file under the old record;
    neighbors keeps its search results until the ranking is written (a failed write reruns without a new search);
    a build killed before it recorded its arguments (progress/ holding nothing else) is started again."""
    from rdm_fast.retrieval import database

    work = tmp_path / "db"
    shutil.copytree(built / "db", work)
    args = ["neighbors", str(work), "--k", "3", "--exclude-self", "--out", str(tmp_path / "nb.npz"),
            "--device", "cpu", "--no-progress"]
    assert cli(*args) == 0 and Database.open(work, device="cpu").manifest["proposals"]["k"] == 3
    real = database.atomic_save_npy

    def killed(target, array):
        raise OSError(28, "No space left on device", str(target))

    monkeypatch.setattr(database, "atomic_save_npy", killed)
    args[args.index("--k") + 1] = "1"
    assert cli(*args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert Database.open(work, device="cpu").manifest["proposals"] is None
    progress = tmp_path / "nb.npz.progress"
    assert progress.is_dir()  # the search is not repeated
    monkeypatch.setattr(database, "atomic_save_npy", real)
    for name in (".proposals.npy.k1.tmp", ".manifest.json.k2.tmp"):  # what a kill mid-write leaves
        (work / name).write_bytes(b"half")
    searched = []
    monkeypatch.setattr(db_cli, "compute_neighbors", lambda *a, **k: searched.append(k["resume_dir"]) or
                        compute_neighbors(*a, **k))
    assert cli(*args) == 0 and not progress.exists() and searched == [progress]
    assert Database.open(work, device="cpu").manifest["proposals"]["k"] == 1 and not list(work.glob(".*.tmp"))

    out = tmp_path / "new"
    (out / "progress").mkdir(parents=True)
    (out / "progress" / ".config.json.k1.tmp").write_text("{")
    assert cli("build", "--images", str(built / "images"), "--encoder", SPEC, "--out", str(out), "--crop", "random",
               "--crop-size", "32", "--shard-size", "4", "--workers", "0", "--device", "cpu", "--class-from-folder",
               "--no-progress") == 0
    a, b = Database.open(out, device="cpu"), Database.open(built / "db", device="cpu")
    assert torch.equal(a.embeddings(torch.arange(len(b))), b.embeddings(torch.arange(len(b))))


def test_neighbors_refuses_an_out_in_use(built, tmp_path, capsys):
    """Two neighbours runs into one --out rewrote each other's progress files (rows of zeros saved with exit status
    0): the second is refused while the first holds --out, and leaves the first's progress as it was."""
    from rdm_fast._cli import OutDirLock

    progress = tmp_path / "nb.npz.progress"
    args = ["neighbors", str(built / "db"), "--k", "3", "--exclude-self", "--out", str(tmp_path / "nb.npz"),
            "--device", "cpu", "--no-progress"]
    held = OutDirLock(progress, tmp_path / "nb.npz")  # what a running neighbours command holds
    (progress / "state.json").write_text("{}")
    assert f"--out {tmp_path / 'nb.npz'} is in use by another run (process" in _error(capsys, *args)
    assert sorted(p.name for p in progress.iterdir()) == [".rdm_fast.lock", "state.json"]
    assert not (tmp_path / "nb.npz").exists()
    held.release()
    shutil.rmtree(progress)
    args[args.index("--k") + 1] = "100"
    assert "k must be between 1 and" in _error(capsys, *args)
    assert not progress.exists()  # no progress folder is left by a run that stopped before its search
    args[args.index("--k") + 1] = "3"
    # a search that fails on its first batch: its full-size result files hold nothing to resume
    assert "query 0 has fewer than 3 database entries left" in _error(capsys, *args, "--dedup-threshold", "-1")
    assert not progress.exists() and not (tmp_path / "nb.npz").exists()
    assert cli(*args) == 0 and not progress.exists()
    assert cli(*args) == 0  # the finished run let go of --out


@pytest.mark.parametrize("argv", [["neighbors", "DB", "--k", "2", "--out", "OUT/nn.npz"], ["index", "DB"],
                                  ["info", "DB"], ["search", "DB", "--text", "x"]])
def test_one_process_commands_refuse_torchrun(tmp_path, monkeypatch, capsys, argv):
    """Under torchrun every process would run the whole command and write the same files (neighbours runs
    collided on their progress files): refused on every process, before anything is read or written."""
    from rdm_fast import convert
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = [a.replace("DB", str(tmp_path / "missing")).replace("OUT", str(tmp_path)) for a in argv]
    assert run(db_cli.main, argv) == 2
    assert capsys.readouterr().err.strip() == (f"error: db {argv[0]} runs in one process (under torchrun each "
                                               "process would do all of it, writing the same outputs): run it with "
                                               "python, not torchrun")
    assert run(convert.main, [str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.startswith("error: convert runs in one process")
    assert list(tmp_path.iterdir()) == []


def test_unknown_options_show_the_subcommands_usage(capsys):
    """An option a subcommand does not take is reported with that subcommand's usage (it was the top level's,
    "python -m rdm_fast.db [-h] COMMAND ...", which does not show the options that exist)."""
    with pytest.raises(SystemExit) as e:
        db_cli.main(["search", "db", "--text", "x", "--verify"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: python -m rdm_fast.db search" in err
    assert "unrecognized arguments: --verify" in err


def test_a_failed_write_of_a_build_is_one_plain_line(built, tmp_path, capsys, monkeypatch):
    """A build's writes of its arguments and manifest fail as the other writes do: "FILE: reason" (they are passed
    to every process as text, which gave Python's "[Errno 27] File too large: 'FILE'"); a rerun completes."""
    from rdm_fast.retrieval import database

    real = fail_writes_to(monkeypatch, database, "atomic_write_json", "manifest.json", errno.EFBIG)
    out = tmp_path / "db"
    args = ["build", "--images", str(built / "images"), "--encoder", SPEC, "--out", str(out), "--crop", "random",
            "--crop-size", "32", "--shard-size", "4", "--workers", "0", "--device", "cpu", "--class-from-folder",
            "--no-progress"]
    assert _error(capsys, *args) == f"error: {out / 'manifest.json'}: File too large"
    monkeypatch.setattr(database, "atomic_write_json", real)
    assert cli(*args) == 0 and len(Database.open(out, device="cpu")) == 10


def test_auto_backend_takes_the_triton_search_before_an_index(random_db, monkeypatch):
    """Where the Triton search can run, "auto" takes it (exact) even when the database has a FAISS index."""
    pytest.importorskip("faiss")
    from rdm_fast.retrieval.database import add_index

    _, path = random_db
    add_index(path, "flat", progress=False)
    monkeypatch.setattr(Database, "_triton_unavailable", staticmethod(lambda device: None))
    assert Database.open(path, device="cpu").backend == "triton-exact"


def test_faiss_backend_re_ranks_ivfpq_and_passes_ef_search(random_db):
    """Database's FAISS backend gives an ivfpq index the database's vectors, so its scores are the exact cosine
    similarities of the returned entries (PQ scores are ~0.05 off), and passes ef_search on to an hnsw index."""
    pytest.importorskip("faiss")
    from rdm_fast.retrieval.database import add_index

    emb, path = random_db
    queries = np.random.default_rng(7).standard_normal((8, 16)).astype(np.float32)
    cos = brute_force(emb.astype(np.float16), queries, len(emb))
    exact = np.take_along_axis(cos[0], np.argsort(cos[1], axis=1), 1)  # (Q, N) scores in id order
    add_index(path, "ivfpq", progress=False, nlist=4, m=4, nbits=4)
    scores, ids = Database.open(path, backend="faiss", device="cpu").search(torch.from_numpy(queries), 5)
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(exact, ids.numpy(), 1), atol=1e-5)
    add_index(path, "hnsw", progress=False, M=8)
    db = Database.open(path, backend="faiss", device="cpu", ef_search=7)
    db.search(torch.from_numpy(queries), 5)
    assert db._search_engine().ef_search == 7


def test_triton_backend_normalises_for_the_kernel(random_db, monkeypatch):
    """The kernel scores rows as given (here a stand-in with its contract: plain inner products): the Triton
    backend stores the database's unnormalised rows normalised and normalises the queries, so it ranks by cosine."""
    pytest.importorskip("triton")
    from rdm_fast.kernels import knn
    from rdm_fast.retrieval import gpu_search
    from rdm_fast.retrieval.search import topk_lowest_id

    emb, path = random_db
    monkeypatch.setattr(Database, "_triton_unavailable", staticmethod(lambda device: None))
    monkeypatch.setattr(gpu_search, "_interpreter_forced", lambda: True)
    monkeypatch.setattr(knn, "topk_inner_product", lambda q, rows, k: topk_lowest_id(q.float() @ rows.float().T, k))
    queries = np.random.default_rng(8).standard_normal((7, 16)).astype(np.float32) * 5
    scores, ids = Database.open(path, backend="triton", device="cpu").search(torch.from_numpy(queries), 9)
    ref_scores, ref_ids = brute_force(emb.astype(np.float16), queries, 9)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=2e-3)  # unit rows stored in fp16


def test_counts_workers_and_defaults_of_the_command_line(built, tmp_path, capsys):
    """Counts are at least 1, refused by argparse naming the option (--k 0 reached the search); --workers may be 0
    but not negative, refused before the build. The defaults that decide what a database holds and what a search
    returns are the ones --help states (a plain ``db build --list`` relies on them)."""
    with pytest.raises(SystemExit) as e:
        db_cli.main(["search", str(built / "db"), "--text", "x", "--k", "0"])
    assert e.value.code == 2 and "argument --k: must be at least 1, got 0" in capsys.readouterr().err
    assert "--workers must be at least 0, got -1" in _error(
        capsys, "build", "--images", str(built / "images"), "--encoder", SPEC, "--out", str(tmp_path / "w"),
        "--workers", "-1", "--device", "cpu", "--no-progress")
    assert not (tmp_path / "w").exists()
    parser = db_cli.build_parser()
    build = parser.parse_args(["build", "--images", "i", "--encoder", "e", "--out", "o"])
    assert (build.crop, build.crop_size, build.crops_per_image, build.fit_square, build.seed, build.shard_size,
            build.batch_size) == ("center", 256, 1, None, 0, 100_000, 64)
    assert parser.parse_args(["search", "d", "--text", "x"]).k == 8
    assert parser.parse_args(["neighbors", "d", "--k", "2", "--out", "o"]).batch_size == 1024


def test_build_prints_one_summary_line(built, tmp_path, capsys):
    """db build ends with one line on stdout: entries, dimension, encoder, shards and the images it skipped as
    unreadable (listed in the manifest)."""
    images = tmp_path / "images"
    shutil.copytree(built / "images" / "a", images)
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "db"
    assert cli("build", "--images", str(images), "--encoder", SPEC, "--out", str(out), "--crop-size", "32",
               "--workers", "0", "--device", "cpu", "--no-progress") == 0
    assert capsys.readouterr().out == (f"{out}: 6 embeddings (16-d, tiny-test) in 1 shard; skipped 1 unreadable "
                                       "image (see manifest.json)\n")


def test_info_details(built, tmp_path, capsys):
    """db info's size on disk, image folder, equal shards ("each"), crops per image, and each index parameter and
    proposal option it records (a dedup threshold of 0 is one; the queries' database is named)."""
    assert cli("info", str(built / "db")) == 0
    out = capsys.readouterr().out
    size = sum(f.stat().st_size for f in (built / "db").rglob("*") if f.is_file())
    assert f"\non disk    {db_cli._human(size)}\n" in out and f"\nimages     {built / 'images'}\n" in out
    even = write_database(tmp_path / "even", np.ones((8, 16)), INFO, shard_size=4,
                          build={"crop": "random", "crop_size": 32, "crops_per_image": 3})
    assert cli("info", str(even)) == 0
    out = capsys.readouterr().out
    assert "\nshards     2 (4 rows each)\n" in out and "\ncrops      random, 32 px, 3 per image\n" in out
    params = {"nlist": 512, "m": 8, "nbits": 6, "nprobe": 26, "M": 32, "ef_search": 128, "chunk": 4096}
    assert db_cli._index_params({"params": params}) == ", nlist 512, m 8, nbits 6, nprobe 26, M 32, ef_search 128"
    assert db_cli._index_params({}) == ""
    assert db_cli._proposal_options({"exclude_self": True, "dedup_threshold": 0.0, "queries_db": "/d/train"}) == \
        " (exclude-self, dedup-threshold 0.0, queries from /d/train)"
    assert db_cli._proposal_options({"exclude_self": False, "dedup_threshold": None, "queries_db": None}) == ""


def test_sizes_are_shown_in_binary_units():
    """db info's "on disk": bytes below 1 KiB, then KiB to TiB with one decimal (TiB also past 1024 TiB)."""
    sizes = (0, 1023, 1024, 1536, 5 * 1024 ** 3, 3 * 1024 ** 4, 2048 * 1024 ** 4)
    assert [db_cli._human(n) for n in sizes] == ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 GiB", "3.0 TiB",
                                                 "2048.0 TiB"]


def test_contact_sheet_names_are_checked_before_the_search(built, tmp_path, capsys, monkeypatch):
    """The sheet's format follows its suffix in either case (.JPG), PNG without one; a suffix Pillow reads but
    cannot write (.psd), an unknown one or a folder is refused before the encoder is built."""
    common = ["search", str(built / "db"), "--text", "x", "--k", "2", "--device", "cpu", "--contact-sheet"]
    assert cli(*common, str(tmp_path / "sheet")) == 0 and Image.open(tmp_path / "sheet").format == "PNG"
    assert cli(*common, str(tmp_path / "sheet.JPG")) == 0 and Image.open(tmp_path / "sheet.JPG").format == "JPEG"

    def never(*a, **k):
        raise AssertionError("built the encoder")

    monkeypatch.setattr(db_cli, "query_encoder", never)
    assert ".psd is not an image type Pillow writes" in _error(capsys, *common, str(tmp_path / "sheet.psd"))
    assert ".docx is not an image type Pillow writes" in _error(capsys, *common, str(tmp_path / "sheet.docx"))
    assert f"--contact-sheet {tmp_path} is a directory" in _error(capsys, *common, str(tmp_path))
    assert not (tmp_path / "sheet.psd").exists()


def test_index_params_are_parsed_as_numbers_where_they_can_be():
    """--param KEY=VALUE: an int where the value is one (nlist=4.0 would reach FAISS as a float), else a float,
    else the text; an empty key or no "=" is refused."""
    from rdm_fast._cli import CLIError

    parsed = [db_cli._parse_param(t) for t in ("nlist=4096", "ratio=0.5", "metric=ip", "a=b=c", "s=")]
    assert parsed == [("nlist", 4096), ("ratio", 0.5), ("metric", "ip"), ("a", "b=c"), ("s", "")]
    assert type(parsed[0][1]) is int
    for bad in ("nlist", "=4"):
        with pytest.raises(CLIError, match="expected KEY=VALUE"):
            db_cli._parse_param(bad)


def meta_less_encoder(*, device="cpu", checkpoint=None, pretrained=True) -> TinyEncoder:
    """The test encoder, except on the meta device, where it cannot be built (as some encoders' layers cannot)."""
    if str(device) == "meta":
        raise NotImplementedError("cannot be built on the meta device")
    return TinyEncoder(device)


def test_caption_tiles_end_in_an_ellipsis_where_the_words_do_not_fit(monkeypatch):
    """A caption longer than the query's tile holds is cut to the lines that fit, the last ending in "..."."""
    from PIL import ImageDraw

    drawn = []
    monkeypatch.setattr(ImageDraw.ImageDraw, "multiline_text", lambda self, xy, text, **kw: drawn.append(text))
    db_cli._text_tile("a red bird", 128)
    db_cli._text_tile(" ".join(["word"] * 200), 128)
    assert drawn[0] == "a red bird"
    lines = drawn[1].split("\n")
    assert len(lines) == (128 - 8) // 12 and lines[-1].endswith("...") and len(lines[-1]) <= 128 // 7


def test_builds_refuse_an_out_in_use_and_leave_no_lock_behind(built, tmp_path, capsys):
    """A second build (or import) into the --out of a running one is refused instead of deleting the first's
    temporary files and racing it to the manifest; the first's progress stays as it was. A build that stops before
    it records its arguments (a folder that is no build) leaves no progress folder, nor an --out it made; a
    finished build lets go of --out, so that it resumes (here: nothing to do)."""
    from rdm_fast._cli import OutDirLock

    out, progress = tmp_path / "db", tmp_path / "db" / "progress"
    args = ["build", "--images", str(built / "images"), "--encoder", SPEC, "--out", str(out), "--crop-size", "32",
            "--workers", "0", "--device", "cpu", "--no-progress"]
    held = OutDirLock(progress, out)  # what a running build holds
    (progress / "config.json").write_text("{}")
    assert f"--out {out} is in use by another run (process" in _error(capsys, *args)
    part = tmp_path / "3x16-part_0.npz"
    np.savez(part, embedding=np.ones((3, 16), np.float32), img_id=np.arange(3), patch_coords=np.zeros((3, 2), int))
    assert f"--out {out} is in use by another run (process" in _error(
        capsys, "import-npz", str(part), "--out", str(out), "--encoder", SPEC, "--no-progress")
    assert sorted(p.name for p in progress.iterdir()) == [".rdm_fast.lock", "config.json"]
    held.release()
    shutil.rmtree(out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    other = [*args[:args.index("--out") + 1], str(tmp_path / "other"), *args[args.index("--out") + 2:]]
    assert "is not empty and holds no resumable build" in _error(capsys, *other)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]  # no progress folder left there
    (tmp_path / "empty").mkdir()
    assert "no images" in _error(capsys, args[0], "--images", str(tmp_path / "empty"), *args[3:])
    assert not out.exists()  # made for the lock, removed with it
    nested = [*args[:args.index("--out") + 1], str(tmp_path / "new" / "db"), *args[args.index("--out") + 2:]]
    nested[nested.index("--images") + 1] = str(tmp_path / "empty")
    assert "no images" in _error(capsys, *nested)
    assert not (tmp_path / "new").exists()  # every folder made for the lock
    assert cli(*args) == 0 and cli(*args) == 0  # the finished build let go of --out
    (tmp_path / "afile").write_text("")
    assert f"--out {tmp_path / 'afile'} is a file, not a folder" in _error(
        capsys, *args[:args.index("--out") + 1], str(tmp_path / "afile"), *args[args.index("--out") + 2:])
