"""Embedding databases: on-disk format round trip, opening errors, search against an independent numpy
brute force, stored-data accessors, neighbours, proposal ranking. Also defines the small deterministic test
encoder used by the other database tests (importable as ``test_database:tiny_encoder``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from typing import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from faults import fail_writes_to

from rdm_fast.encoders import Encoder, embed_texts, register_encoder


class TinyEncoder(Encoder):
    """Fixed random 3x3 conv + ReLU + average pooling + linear on 32x32 resized images; text embedded from
    a CRC32-seeded random vector. Deterministic, fast, not normalised. RDM_TEST_ENCODER_DELAY (seconds per
    image batch) slows it down for tests that kill a build midway."""

    name, dim, normalized, image_size = "tiny-test", 16, False, 32

    def __init__(self, device="cpu") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8 * 4 * 4, self.dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.to(device)

    def encode_images(self, images: Tensor) -> Tensor:
        self.check_images(images)
        time.sleep(float(os.environ.get("RDM_TEST_ENCODER_DELAY", "0")))
        x = F.interpolate(images.float(), size=(32, 32), mode="bilinear", align_corners=False)
        x = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 4)
        return self.proj(x.flatten(1)).float()

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        out = [torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
               for t in texts]
        return torch.stack(out).to(self.device)


def tiny_encoder(*, device="cpu", checkpoint=None, pretrained=True) -> TinyEncoder:
    """Factory in the registry's signature (also used as ``test_database:tiny_encoder`` on command lines)."""
    return TinyEncoder(device)


register_encoder("tiny-test", tiny_encoder, replace=True)


from rdm_fast.retrieval import (Database, compute_neighbors, proposal_ranking, read_manifest,  # noqa: E402
                                save_proposals, write_database)
from rdm_fast.retrieval.search import exact_search, topk_lowest_id  # noqa: E402

INFO = {"name": "tiny-test", "dim": 16, "normalized": False}


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def brute_force(stored: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent float64 cosine search: order by (score desc, id asc)."""
    d = stored.astype(np.float64)
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    q = queries.astype(np.float64)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    s = q @ d.T
    ids = np.stack([np.lexsort((np.arange(len(d)), -row))[:k] for row in s])
    return np.take_along_axis(s, ids, 1), ids


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 16)).astype(np.float32)
    sources = [f"img/{i:03d}.jpg" for i in range(50)]
    classes = rng.integers(0, 5, 50)
    coords = rng.integers(0, 900, (50, 2))
    return emb, sources, classes, coords


@pytest.fixture
def db_dir(tmp_path, data):
    emb, sources, classes, coords = data
    return write_database(tmp_path / "db", emb, INFO, sources=sources, class_ids=classes, patch_coords=coords,
                          shard_size=13)


def test_round_trip(db_dir, data):
    emb, sources, classes, coords = data
    db = Database.open(db_dir, backend="torch", device="cpu", verify=True)
    assert (len(db), db.dim, db.encoder_name, db.normalized, db.backend) == (50, 16, "tiny-test", False,
                                                                            "torch-exact")
    assert db.encoder_info == INFO
    m = json.loads((db_dir / "manifest.json").read_text())
    assert m["format_version"] == 1 and [s["rows"] for s in m["shards"]] == [13, 13, 13, 11]
    assert m["has_sources"] and m["has_class_ids"] and m["has_patch_coords"]
    for j in range(4):
        shard = np.load(db_dir / f"emb_{j:05d}.npy", mmap_mode="r")
        assert isinstance(shard, np.memmap) and shard.dtype == np.float16
    ids = torch.tensor([[49, 0, 13], [12, 26, 26]])
    got = db.embeddings(ids)
    assert got.shape == (2, 3, 16) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), emb.astype(np.float16).astype(np.float32)[ids.numpy()])
    assert db.sources(ids) == [sources[i] for i in ids.reshape(-1).tolist()]
    np.testing.assert_array_equal(db.class_ids(ids).numpy(), classes[ids.numpy()])
    np.testing.assert_array_equal(db.patch_coords(ids).numpy(), coords[ids.numpy()])
    assert db.embeddings(torch.tensor([], dtype=torch.long)).shape == (0, 16)


def test_unknown_metadata_and_empty(tmp_path, data):
    db = Database.open(write_database(tmp_path / "plain", data[0], INFO), device="cpu")
    assert db.class_ids(torch.arange(3)).tolist() == [-1, -1, -1]
    assert db.patch_coords(torch.tensor([4])).tolist() == [[-1, -1]]
    with pytest.raises(ValueError) as e:
        db.sources(torch.arange(2))
    assert "no sources" in one_line(e)
    empty = Database.open(write_database(tmp_path / "empty", np.zeros((0, 16)), INFO), device="cpu")
    assert len(empty) == 0
    with pytest.raises(ValueError) as e:
        empty.search(torch.zeros(1, 16), 1)
    assert "empty" in one_line(e)


def _manifest(db_dir):
    return json.loads((db_dir / "manifest.json").read_text())


def _rewrite(db_dir, change):
    m = _manifest(db_dir)
    change(m)
    (db_dir / "manifest.json").write_text(json.dumps(m))


def test_open_errors(tmp_path, db_dir):
    with pytest.raises(FileNotFoundError) as e:
        Database.open(tmp_path / "nope")
    assert "does not exist" in one_line(e)
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        Database.open(tmp_path / "bare")
    assert "manifest.json is missing" in one_line(e)

    original = (db_dir / "manifest.json").read_text()
    (db_dir / "manifest.json").write_text(original[:200])
    with pytest.raises(ValueError) as e:
        Database.open(db_dir)
    assert "manifest.json is corrupted" in one_line(e)
    for change, expect in [(lambda m: m.update(format_version=2), "format_version 2"),
                           (lambda m: m.pop("dim"), "missing or malformed entry 'dim'"),
                           (lambda m: m.update(count=49), "do not add up"),
                           (lambda m: m["shards"][0].update(embeddings="../x.npy"), "not a plain file name"),
                           (lambda m: m.update(format="other"), "not an rdm_fast database manifest")]:
        (db_dir / "manifest.json").write_text(original)
        _rewrite(db_dir, change)
        with pytest.raises(ValueError) as e:
            Database.open(db_dir)
        assert expect in one_line(e), expect
    (db_dir / "manifest.json").write_text(original)

    shard = db_dir / "emb_00001.npy"
    content = shard.read_bytes()
    shard.write_bytes(content[:-10])
    with pytest.raises(ValueError) as e:
        Database.open(db_dir)
    assert "emb_00001.npy" in one_line(e) and "truncated" in str(e.value)
    altered = bytearray(content)
    altered[-1] ^= 0xFF
    shard.write_bytes(bytes(altered))
    Database.open(db_dir)  # same size: only the checksum notices
    with pytest.raises(ValueError) as e:
        Database.open(db_dir, verify=True)
    assert "emb_00001.npy" in one_line(e) and "SHA-256" in str(e.value)
    shard.unlink()
    with pytest.raises(FileNotFoundError) as e:
        Database.open(db_dir)
    assert "emb_00001.npy is missing" in one_line(e)
    shard.write_bytes(content)
    (db_dir / "meta_00002.npz").unlink()
    with pytest.raises(FileNotFoundError) as e:
        Database.open(db_dir)
    assert "meta_00002.npz is missing" in one_line(e)


@pytest.mark.parametrize("change, expect", [
    (lambda m: m.update(format_version="1"), "format_version is '1', expected an integer"),
    (lambda m: m["encoder"].update(dim=8), "encoder must be {name, dim (= dim), normalized}"),
    (lambda m: m["encoder"].update(normalized="yes"), "encoder must be {name, dim (= dim), normalized}"),
    (lambda m: m.update(dtype="float32"), "dtype 'float32' is not float16"),
    (lambda m: m.update(has_sources="yes"), "has_sources must be true or false"),
    (lambda m: m["shards"][0].update(meta="../meta.npz"), "metadata file '../meta.npz' is not a plain file name"),
    (lambda m: m["shards"][0].update(embeddings=".."), "shard file '..' is not a plain file name"),
    (lambda m: m["shards"][0].update(bytes=-1), "bytes -1 is not a size"),
    (lambda m: m.update(index={"file": "../i.faiss", "kind": "flat"}), "index file '../i.faiss' is not a plain"),
    (lambda m: m.update(proposals="proposals.npy"), "missing or malformed entry"),
    (lambda m: m.update(build="x"), "build 'x' is not a dict or null"),  # encoder_spec, db info, db search read it
    (lambda m: m.update(skipped={"count": "2"}), "skipped {'count': '2'} is not {count: int >= 0, files: list}"),
    (lambda m: m.update(image_root=5), "image_root 5 is not a directory (a string) or null"),
])
def test_every_manifest_field_is_checked(db_dir, change, expect):
    """From a database mutation audit: dropping any one of these checks of read_manifest passed every test. A
    manifest whose fields contradict each other or the format (an encoder of another width, a string version,
    float32 shards, a path out of the directory, a negative size, a string where an entry belongs) is reported as
    corrupted, naming the file, instead of being read on (or failing with a TypeError / AttributeError)."""
    _rewrite(db_dir, change)
    with pytest.raises(ValueError) as e:
        read_manifest(db_dir)
    assert "manifest.json is corrupted" in one_line(e) and expect in one_line(e)


def test_a_manifest_that_is_not_utf8_is_corrupted(db_dir):
    """From a database mutation audit: a manifest.json damaged into bytes that are not UTF-8 raised a bare
    UnicodeDecodeError, naming no file."""
    (db_dir / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(ValueError, match="manifest.json is corrupted: not valid JSON"):
        Database.open(db_dir)


def test_open_refuses_grown_or_retyped_shard_files_and_a_missing_ranking(db_dir):
    """From a database mutation audit (dropping each check passed every test): a metadata file larger than
    recorded (another shard's copied over it), an embeddings file of another dtype at the same size (int16 for
    float16) and a recorded proposal ranking whose file is gone are refused at open, not read on."""
    meta = db_dir / "meta_00003.npz"  # 11 rows; meta_00000.npz holds 13
    original = meta.read_bytes()
    shutil.copy(db_dir / "meta_00000.npz", meta)
    with pytest.raises(ValueError, match=r"meta_00003.npz has \d+ bytes but manifest.json records \d+"):
        Database.open(db_dir, device="cpu")
    meta.write_bytes(original)
    shard = db_dir / "emb_00001.npy"
    np.save(shard, np.zeros((13, 16), np.int16))  # the same number of bytes as the float16 shard
    with pytest.raises(ValueError, match=r"holds int16 \(13, 16\), but manifest.json records float16 \(13, 16\)"):
        Database.open(db_dir, device="cpu")
    np.save(shard, np.zeros((13, 16), np.float16))
    save_proposals(db_dir, np.arange(50), np.zeros(50, np.int64))
    Database.open(db_dir, device="cpu")  # undamaged again
    (db_dir / "proposals.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"proposals.npy is missing \(listed in manifest.json\)"):
        Database.open(db_dir, device="cpu")


def test_encoder_spec_and_info_are_the_recorded_ones(tmp_path, data):
    """From a database mutation audit: encoder_spec ignoring the builder's factory spec, and encoder_info handing
    out the manifest's own dict (a caller's edit changed the database's encoder), passed every test."""
    assert Database.open(write_database(tmp_path / "a", data[0], INFO), device="cpu").encoder_spec == "tiny-test"
    built = write_database(tmp_path / "b", data[0], INFO, build={"encoder_spec": "test_database:tiny_encoder"})
    db = Database.open(built, device="cpu")
    assert db.encoder_spec == "test_database:tiny_encoder"
    info = db.encoder_info
    info["name"] = "edited"
    assert db.encoder_name == "tiny-test" and db.encoder_info == INFO


def test_backend_choice_errors(db_dir):
    with pytest.raises(ValueError) as e:
        Database.open(db_dir, backend="scann")
    assert "unknown search backend" in one_line(e)
    with pytest.raises(ValueError) as e:
        Database.open(db_dir, backend="faiss")
    assert "has no FAISS index" in one_line(e)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError) as e:
            Database.open(db_dir, backend="triton")
        assert "unavailable" in one_line(e)
        assert Database.open(db_dir).backend == "torch-exact"  # auto on the CPU without an index


def test_search_errors(db_dir):
    db = Database.open(db_dir, device="cpu")
    q = torch.randn(2, 16)
    for call, expect in [(lambda: db.search(q, 3, encoder="clip-vit-b-32"), "holds 'tiny-test' embeddings"),
                         (lambda: db.search(torch.randn(2, 8), 3), "(Q, 16) float tensor"),
                         (lambda: db.search(q[0], 3), "(Q, 16) float tensor"),
                         (lambda: db.search(q, 51), "between 1 and the database size 50"),
                         (lambda: db.search(q, 0), "between 1 and the database size 50"),
                         (lambda: db.search(torch.cat([q, torch.full((1, 16), float("nan"))]), 3),
                          "query 2 holds NaN or infinite values"),
                         (lambda: db.search(torch.cat([torch.zeros(1, 16), q]), 3), "query 0 is all zeros"),
                         # the first bad query is named (a mutation audit: naming the last passed every test)
                         (lambda: db.search(torch.cat([q[:1], torch.full((2, 16), float("inf"))]), 3),
                          "query 1 holds NaN or infinite values")]:
        with pytest.raises(ValueError) as e:
            call()
        assert expect in one_line(e)
    with pytest.raises(ValueError, match=r"\(Q, 16\) float tensor or array .* got ndarray"):
        db.search(np.zeros((2, 16), np.int64), 3)
    scores, ids = db.search(q.double().numpy(), 3)  # an array: float32 CPU queries
    assert db.checked_queries(q.double().numpy()).dtype == torch.float32
    ref_scores, ref_ids = db.search(q, 3)
    assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)
    with pytest.raises(IndexError, match="id 50 is out of range"):
        db.embeddings(torch.tensor([3, 50]))
    with pytest.raises(IndexError, match="id -1 is out of range"):
        db.sources(torch.tensor([-1]))
    with pytest.raises(ValueError, match="ids must be integers, got torch.bool"):  # a mask is no list of ids
        db.embeddings(torch.tensor([True, False]))
    other = TinyEncoder()
    other.name = "other-encoder"
    with pytest.raises(ValueError) as e:
        db.search_images(other, torch.zeros(1, 3, 8, 8), 2)
    assert "'other-encoder'" in one_line(e)
    # search's encoder= also takes the Encoder that search_text takes: the database's own one was refused as another
    # encoder, its whole module repr in the message
    assert torch.equal(db.search(q, 3, encoder=TinyEncoder())[1], ref_ids)
    with pytest.raises(ValueError, match="queries come from encoder 'other-encoder', but .* holds 'tiny-test'"):
        db.search(q, 3, encoder=other)
    with pytest.raises(TypeError, match="search: encoder must be the queries' encoder name .* got dict"):
        db.search(q, 3, encoder=TinyEncoder().info())
    narrow = TinyEncoder()  # declares 16-d embeddings but makes 15-d ones
    narrow.encode_images = lambda images: torch.zeros(images.shape[0], 15)
    with pytest.raises(ValueError) as e:
        db.search_images(narrow, torch.zeros(2, 3, 8, 8), 2)
    assert "returned (2, 15) for 2 images; it declares 16-d embeddings" in one_line(e)
    wide = TinyEncoder()  # the database's encoder name, another width: refused before embedding anything
    wide.dim = 8
    for call in (lambda: db.search_images(wide, torch.zeros(2, 3, 8, 8), 2), lambda: db.search_text(wide, "a", 2)):
        with pytest.raises(ValueError, match="encoder 'tiny-test' makes 8-d embeddings, .* holds 16-d ones"):
            call()
    with pytest.raises(ValueError) as e:
        db.proposals(0.1)
    assert "no proposal ranking" in one_line(e)


@pytest.mark.parametrize("chunk_rows", [7, 13, 65536])
def test_search_matches_brute_force(db_dir, data, chunk_rows):
    db = Database.open(db_dir, backend="torch", device="cpu", chunk_rows=chunk_rows)
    stored = data[0].astype(np.float16)
    queries = np.random.default_rng(1).standard_normal((9, 16)).astype(np.float32)
    for k in (1, 5, 50):
        scores, ids = db.search(torch.from_numpy(queries), k, encoder="tiny-test")
        ref_scores, ref_ids = brute_force(stored, queries, k)
        assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (9, k)
        np.testing.assert_array_equal(ids.numpy(), ref_ids)
        np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-5)


def test_search_ties_by_lower_id(tmp_path):
    """Vectors with four +-1 entries: every cosine is an exact multiple of 1/16, so ties are exact in any
    summation order; duplicates are planted across shard and chunk boundaries."""
    rng = np.random.default_rng(3)
    base = np.zeros((40, 16), np.float32)
    for row in base:
        row[rng.choice(16, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    stored = np.concatenate([base, base[[5, 0, 22, 5, 31, 17]], base[:9]])  # many exact duplicates
    db = Database.open(write_database(tmp_path / "ties", stored, INFO, shard_size=11), backend="torch",
                       device="cpu", chunk_rows=4)
    queries = np.concatenate([base[[5, 0, 17, 31]], 2 * base[[22]]])
    for k in (1, 3, 8, 20):
        scores, ids = db.search(torch.from_numpy(queries), k)
        ref_scores, ref_ids = brute_force(stored, queries, k)
        np.testing.assert_array_equal(ids.numpy(), ref_ids)
        np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 10, 30, 31])
@pytest.mark.parametrize("values", [6, 1000])  # heavy ties; few (most rows need no fallback)
def test_topk_lowest_id(k, values):
    scores = torch.randint(0, values, (25, 31)).float()
    scores[3, 5] = float("nan")
    scores[4, :] = float("-inf")
    scores[5, [2, 9]] = float("inf")
    given = scores.clone()
    vals, idx = topk_lowest_id(scores, k)
    assert torch.equal(scores.isnan(), given.isnan())  # not changed unless inplace
    ranked = torch.nan_to_num(given, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")).numpy()
    for row, v, i in zip(ranked, vals.numpy(), idx.numpy(), strict=True):
        ref = np.lexsort((np.arange(31), -row))[:k]
        np.testing.assert_array_equal(i, ref)
        np.testing.assert_array_equal(v, row[ref])
    vals2, idx2 = topk_lowest_id(given, k, inplace=True)
    assert torch.equal(idx2, idx) and not given.isnan().any()


def test_search_images_and_text_use_the_encoder(db_dir):
    db = Database.open(db_dir, device="cpu")
    enc = TinyEncoder()
    images = torch.rand(3, 3, 20, 24) * 2 - 1
    scores, ids = db.search_images(enc, images, 4)
    ref = db.search(enc.encode_images(images), 4)
    torch.testing.assert_close(scores, ref[0])
    assert torch.equal(ids, ref[1])
    with pytest.raises(TypeError, match="got a single str"):
        embed_texts(enc, "a red bird")  # not five one-letter captions
    scores, ids = db.search_text(enc, "a red bird", 4)  # search_text takes one caption as a str
    ref = db.search(enc.encode_text(["a red bird"]), 4)
    assert torch.equal(ids, ref[1])


def _planted(tmp_path):
    """30 random vectors; entries 30..33 are near-duplicates (cosine > 0.99) of entries 3, 7, 7, 12."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((30, 16)).astype(np.float32)
    dups = base[[3, 7, 7, 12]] + 0.01 * rng.standard_normal((4, 16)).astype(np.float32)
    stored = np.concatenate([base, dups])
    return stored, Database.open(write_database(tmp_path / "planted", stored, INFO, shard_size=9),
                                 backend="torch", device="cpu")


def _filtered_brute_force(stored, k, exclude_self, threshold):
    s, ids = brute_force(stored.astype(np.float16), stored.astype(np.float16).astype(np.float32), len(stored))
    out_ids, out_scores = [], []
    for q, (row_s, row_i) in enumerate(zip(s, ids, strict=True)):
        keep = np.ones(len(row_i), bool)
        if exclude_self:
            keep &= row_i != q
        if threshold is not None:
            keep &= row_s <= threshold
        out_ids.append(row_i[keep][:k])
        out_scores.append(row_s[keep][:k])
    return np.stack(out_ids), np.stack(out_scores)


@pytest.mark.parametrize("exclude_self,threshold", [(True, None), (False, 0.95), (True, 0.95)])
def test_neighbors_exclusion_and_dedup(tmp_path, exclude_self, threshold):
    stored, db = _planted(tmp_path)
    ids, scores = compute_neighbors(db, k=5, exclude_self=exclude_self, dedup_threshold=threshold,
                                    batch_size=7, progress=False)
    ref_ids, ref_scores = _filtered_brute_force(stored, 5, exclude_self, threshold)
    assert ids.shape == (34, 5) and ids.dtype == torch.int64 and scores.dtype == torch.float32
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-5)
    if threshold is not None:  # the planted duplicates never appear as each other's neighbours
        assert 30 not in ids[3].tolist() and 3 not in ids[30].tolist() and 31 not in ids[32].tolist()
        assert (scores <= threshold).all()
    # a query never is its own neighbour: excluded by id, or (dedup alone) as a duplicate of itself (cosine 1)
    assert not (ids == torch.arange(34)[:, None]).any()


def test_neighbors_warn_of_copies_left_by_exclude_self(tmp_path, caplog):
    """exclude_self drops a query's own entry only: the planted near-copies (cosine above 0.99) of entries 3, 7,
    7 and 12 stay each other's nearest neighbours, which is named; a dedup threshold or distinct entries are
    not warned about."""
    caplog.set_level("WARNING", logger="rdm_fast.retrieval")
    stored, db = _planted(tmp_path)
    compute_neighbors(db, k=2, exclude_self=True, progress=False)
    assert "7 of 34 queries have a nearest neighbour with cosine similarity 0.99 or more" in caplog.text
    caplog.clear()
    compute_neighbors(db, k=2, exclude_self=True, dedup_threshold=0.95, progress=False)
    distinct = Database.open(write_database(tmp_path / "distinct", stored[:30], INFO), backend="torch", device="cpu")
    compute_neighbors(distinct, k=2, exclude_self=True, progress=False)
    assert caplog.text == ""
    one = Database.open(write_database(tmp_path / "one", stored[:1], INFO), backend="torch", device="cpu")
    with pytest.raises(ValueError, match="holds one entry: with exclude_self .* no entry is left"):  # "between 1 and 0"
        compute_neighbors(one, k=1, exclude_self=True, progress=False)


def test_neighbors_resume_after_a_kill(tmp_path, monkeypatch, caplog):
    """With ``resume_dir`` a run killed after some batches continues from them (searching only the rest) and
    gives the uninterrupted results; other settings start over."""
    caplog.set_level("INFO", logger="rdm_fast.retrieval")
    stored, db = _planted(tmp_path)
    ref_ids, ref_scores = compute_neighbors(db, k=5, exclude_self=True, batch_size=7, progress=False)
    searched, kill_at, real = [], [3], Database.search

    def search(self, queries, k, **kw):
        searched.append(len(queries))
        if len(searched) == kill_at[0]:
            raise KeyboardInterrupt  # the third batch: a kill
        return real(self, queries, k, **kw)

    monkeypatch.setattr(Database, "search", search)
    resume = tmp_path / "nn.progress"
    with pytest.raises(KeyboardInterrupt):
        compute_neighbors(db, k=5, exclude_self=True, batch_size=7, progress=False, resume_dir=resume)
    assert json.loads((resume / "state.json").read_text())["done"] == 14
    searched.clear()
    kill_at[0] = 0  # no kill this time
    ids, scores = compute_neighbors(db, k=5, exclude_self=True, batch_size=7, progress=False, resume_dir=resume)
    assert searched == [7, 7, 6]  # queries 14..33 only
    assert "resuming the neighbours at query 14 of 34" in caplog.text
    assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)
    searched.clear()
    ids, _ = compute_neighbors(db, k=4, exclude_self=True, batch_size=7, progress=False, resume_dir=resume)
    assert "other settings: starting over" in caplog.text and len(searched) == 5
    assert torch.equal(ids, ref_ids[:, :4])
    # the same arguments through another search (here: other index parameters) start over too
    caplog.clear()
    kill_at[0], searched[:] = 2, []
    with pytest.raises(KeyboardInterrupt):
        compute_neighbors(db, k=5, exclude_self=True, batch_size=7, progress=False, resume_dir=resume)
    other = Database.open(db.path, backend="torch", device="cpu", nprobe=3)
    assert other.search_settings == {**db.search_settings, "nprobe": 3}
    kill_at[0], searched[:] = 0, []
    compute_neighbors(other, k=5, exclude_self=True, batch_size=7, progress=False, resume_dir=resume)
    assert "other settings: starting over" in caplog.text and len(searched) == 5


@pytest.mark.parametrize("change", ["exclude_self", "dedup_threshold", "queries", "db"])
def test_neighbors_resume_starts_over_for_each_other_setting(tmp_path, monkeypatch, caplog, change):
    """The progress of a killed run is reused only by a run with its settings: each changed alone (the exclusion of
    the query, the near-duplicate threshold, the queries' or the searched database's contents, the same count
    of entries) starts over and gives that run's own results, not rows of the killed one."""
    stored, db = _planted(tmp_path)
    other = Database.open(write_database(tmp_path / "other", stored[::-1].copy(), INFO, shard_size=9),
                          backend="torch", device="cpu")  # the same entries in another order
    before = dict(db=db, queries_db=db, k=4, exclude_self=True, dedup_threshold=None, batch_size=7, progress=False)
    after = {**before, **{"exclude_self": dict(exclude_self=False), "dedup_threshold": dict(dedup_threshold=0.99),
                          "queries": dict(queries_db=other, exclude_self=False),
                          "db": dict(db=other, exclude_self=False)}[change]}
    if change in ("queries", "db"):
        before["exclude_self"] = False  # (only for a database's own entries) the databases alone differ
    expected = compute_neighbors(**after)
    real, calls = Database.search, []

    def search(self, queries, k, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed in the third batch
        return real(self, queries, k, **kw)

    monkeypatch.setattr(Database, "search", search)
    resume = tmp_path / "nn.progress"
    with pytest.raises(KeyboardInterrupt):
        compute_neighbors(**before, resume_dir=resume)
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="rdm_fast.retrieval"):
        ids, scores = compute_neighbors(**after, resume_dir=resume)
    assert "other settings: starting over" in caplog.text
    assert torch.equal(ids, expected[0]) and torch.equal(scores, expected[1])


def _killed_search(monkeypatch, kill_at: list[int]) -> list[int]:
    """Database.search raising KeyboardInterrupt (a kill) at its call number ``kill_at[0]`` (never at 0); returns
    the list that counts the calls (clear it to count anew)."""
    real, calls = Database.search, []

    def search(self, queries, k, **kw):
        calls.append(len(queries))
        if len(calls) == kill_at[0]:
            raise KeyboardInterrupt
        return real(self, queries, k, **kw)

    monkeypatch.setattr(Database, "search", search)
    return calls


def test_neighbors_never_resume_on_another_runs_files(tmp_path, monkeypatch):
    """A run with other settings forgets the old state before it replaces the progress files: killed before its
    first batch was done, it would leave the old run's state (14 queries done) beside its own files of zeros, and
    the old run's next try would resume on them and save rows of zeros."""
    _, db = _planted(tmp_path)
    ref_ids, ref_scores = compute_neighbors(db, k=5, exclude_self=True, batch_size=7, progress=False)
    run = {"k": 5, "exclude_self": True, "batch_size": 7, "progress": False, "resume_dir": tmp_path / "nn.progress"}
    kill_at = [3]
    calls = _killed_search(monkeypatch, kill_at)
    with pytest.raises(KeyboardInterrupt):
        compute_neighbors(db, **run)  # killed in its third batch
    calls.clear()
    kill_at[0] = 1
    with pytest.raises(KeyboardInterrupt):
        compute_neighbors(db, **{**run, "exclude_self": False})  # other settings, killed in its first batch
    monkeypatch.undo()
    ids, scores = compute_neighbors(db, **run)
    assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)


def test_neighbors_results_are_no_views_of_the_progress_files(tmp_path, caplog):
    """The results returned are in memory: changed by the caller, the progress files (and a rerun that finds them
    done) keep the search's. Progress that cannot be used (an unreadable state, files of another shape beside a
    matching state) starts over."""
    _, db = _planted(tmp_path)
    ref_ids, ref_scores = compute_neighbors(db, k=5, exclude_self=True, batch_size=7, progress=False)
    resume = tmp_path / "nn.progress"
    run = {"k": 5, "exclude_self": True, "batch_size": 7, "progress": False, "resume_dir": resume}
    ids, scores = compute_neighbors(db, **run)
    ids[:], scores[:] = -7, 0.5
    ids, scores = compute_neighbors(db, **run)  # done already: read back
    assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)
    np.save(resume / "ids.npy", np.zeros((34, 4), np.int64))
    with caplog.at_level("WARNING", logger="rdm_fast.retrieval"):
        ids, _ = compute_neighbors(db, **run)
    assert torch.equal(ids, ref_ids) and "unreadable progress (shapes differ): starting over" in caplog.text
    (resume / "state.json").write_text("{")  # cut short
    caplog.clear()
    with caplog.at_level("WARNING", logger="rdm_fast.retrieval"):
        ids, _ = compute_neighbors(db, **run)
    assert torch.equal(ids, ref_ids) and "unreadable progress" in caplog.text


def test_neighbors_skip_the_missing_results_of_an_approximate_search(tmp_path, monkeypatch):
    """An approximate index marks results it did not find with id -1 at the end of a row (FAISS): never taken as a
    neighbour; more candidates are searched until k found ones remain."""
    _, db = _planted(tmp_path)
    ref_ids, ref_scores = compute_neighbors(db, k=5, batch_size=7, progress=False)
    real = Database.search

    def padded(self, queries, k, **kw):
        scores, ids = real(self, queries, k, **kw)
        if k < len(self):
            ids[:, -1], scores[:, -1] = -1, float("-inf")
        return scores, ids

    monkeypatch.setattr(Database, "search", padded)
    ids, scores = compute_neighbors(db, k=5, batch_size=7, progress=False)
    assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)


def test_dedup_threshold_keeps_entries_exactly_at_it(tmp_path):
    """dedup_threshold drops entries whose cosine similarity to the query exceeds it; one exactly at it stays
    (one-hot vectors: cosines of exactly 1 and 0)."""
    emb = np.zeros((6, 16), np.float32)
    emb[np.arange(6), [0, 0, 1, 2, 3, 4]] = 1  # entries 0 and 1 point the same way, the others are orthogonal
    db = Database.open(write_database(tmp_path / "db", emb, INFO), backend="torch", device="cpu")
    ids, scores = compute_neighbors(db, k=2, exclude_self=True, dedup_threshold=1.0, progress=False)
    assert ids[0].tolist() == [1, 2] and scores[0].tolist() == [1.0, 0.0]
    ids, scores = compute_neighbors(db, k=2, exclude_self=True, dedup_threshold=0.0, progress=False)
    assert ids[0].tolist() == [2, 3] and scores[0].tolist() == [0.0, 0.0]


def test_database_digest_covers_every_shard(tmp_path):
    """Databases that differ in their last shard alone have different digests (training refuses a neighbours file
    of another database by them, and a resumed neighbours run its progress); a copy has the same digest."""
    from rdm_fast.retrieval.neighbors import database_digest

    emb = np.random.default_rng(4).standard_normal((20, 16)).astype(np.float32)
    a = Database.open(write_database(tmp_path / "a", emb, INFO, shard_size=8), device="cpu")
    emb[-1] *= -1
    b = Database.open(write_database(tmp_path / "b", emb, INFO, shard_size=8), device="cpu")
    shutil.copytree(a.path, tmp_path / "c")
    assert database_digest(a) == database_digest(Database.open(tmp_path / "c", device="cpu")) != database_digest(b)


def test_neighbors_starting_over_replaces_the_progress_files(tmp_path):
    """A run that starts over makes its progress files under temporary names and renames them into place: writing
    them in place truncated a file another run still mapped (a bus error there, or rows of zeros saved)."""
    _, db = _planted(tmp_path)
    resume = tmp_path / "nn.progress"
    ref_ids, _ = compute_neighbors(db, k=5, exclude_self=True, batch_size=7, progress=False)
    compute_neighbors(db, k=5, exclude_self=True, batch_size=7, progress=False, resume_dir=resume)
    mapped = np.load(resume / "ids.npy", mmap_mode="r")  # as the first run holds it
    ids, _ = compute_neighbors(db, k=4, exclude_self=True, batch_size=7, progress=False, resume_dir=resume)
    assert np.array_equal(mapped, ref_ids.numpy()) and torch.equal(ids, ref_ids[:, :4])
    assert sorted(p.name for p in resume.iterdir()) == ["ids.npy", "scores.npy", "state.json"]


def test_neighbors_progress_files_claim_their_disk_space(tmp_path, monkeypatch):
    """The progress files are written through memory maps: on a full disk a write through a map of a sparse file
    is a SIGBUS (the process killed without a message), so their space is claimed first, and a full disk is an
    OSError naming the file; nothing is left half-made, and the same call completes once there is room."""
    import errno
    import os

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")
    _, db = _planted(tmp_path)
    ref_ids, _ = compute_neighbors(db, k=5, exclude_self=True, batch_size=7, progress=False)
    real, claimed = os.posix_fallocate, []

    def full(fd, offset, length):
        claimed.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    resume = tmp_path / "nn.progress"
    with pytest.raises(OSError) as e:
        compute_neighbors(db, k=5, exclude_self=True, batch_size=7, progress=False, resume_dir=resume)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(resume / "ids.npy"))
    assert claimed == [128 + 34 * 5 * 8] and list(resume.iterdir()) == []
    monkeypatch.setattr(os, "posix_fallocate", real)
    ids, _ = compute_neighbors(db, k=5, exclude_self=True, batch_size=7, progress=False, resume_dir=resume)
    assert torch.equal(ids, ref_ids)


def test_a_failed_scores_write_leaves_no_scores_of_another_run(tmp_path, monkeypatch):
    """X.npy and X_scores.npy are two files: a full disk at the scores left an earlier save's scores beside the
    new ids, which training would refuse as "computed for other databases". The stale scores go."""
    from rdm_fast.data import load_neighbors
    from rdm_fast.retrieval import neighbors, save_neighbors

    save_neighbors(tmp_path / "nn.npy", torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2))
    fail_writes_to(monkeypatch, neighbors, "atomic_save_npy", "nn_scores.npy")
    with pytest.raises(OSError, match="No space left"):
        save_neighbors(tmp_path / "nn.npy", torch.ones(4, 2, dtype=torch.int64), torch.ones(4, 2))
    ids, scores, _ = load_neighbors(tmp_path / "nn.npy")
    assert ids.tolist() == [[1, 1]] * 4 and scores is None
    from rdm_fast._files import atomic_save_npy

    def interrupted(target, array):  # Ctrl-C during the scores' write: they go too
        if str(target).endswith("_scores.npy"):
            raise KeyboardInterrupt
        atomic_save_npy(target, array)

    monkeypatch.setattr(neighbors, "atomic_save_npy", atomic_save_npy)
    save_neighbors(tmp_path / "nn.npy", torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2))
    monkeypatch.setattr(neighbors, "atomic_save_npy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_neighbors(tmp_path / "nn.npy", torch.ones(4, 2, dtype=torch.int64), torch.ones(4, 2))
    assert not (tmp_path / "nn_scores.npy").exists()


def test_neighbors_other_queries_and_errors(tmp_path):
    stored, db = _planted(tmp_path)
    queries = stored[[3, 20]] * 2.0
    qdb = Database.open(write_database(tmp_path / "q", queries, INFO), device="cpu")
    ids, _ = compute_neighbors(db, qdb, k=3, progress=False)
    np.testing.assert_array_equal(ids.numpy(), brute_force(stored.astype(np.float16),
                                                           queries.astype(np.float16).astype(np.float32), 3)[1])
    with pytest.raises(ValueError) as e:
        compute_neighbors(db, qdb, k=3, exclude_self=True, progress=False)
    assert "only when the queries are the database's own entries" in one_line(e) and "dedup_threshold" in str(e.value)
    shutil.copytree(db.path, tmp_path / "copy")  # the same entries elsewhere: each query's own entry is excluded
    copy = Database.open(tmp_path / "copy", device="cpu")
    for got, want in zip(compute_neighbors(db, copy, k=3, exclude_self=True, progress=False),
                         compute_neighbors(db, k=3, exclude_self=True, progress=False)):
        assert torch.equal(got, want)
    with pytest.raises(TypeError, match="k must be an int, got 2.5"):
        compute_neighbors(db, k=2.5, progress=False)
    other = Database.open(write_database(tmp_path / "o", queries, {**INFO, "name": "other"}), device="cpu")
    with pytest.raises(ValueError) as e:
        compute_neighbors(db, other, k=3, progress=False)
    assert "'other'" in one_line(e)
    with pytest.raises(ValueError) as e:
        compute_neighbors(db, k=34, exclude_self=True, progress=False)
    assert "k must be between 1 and 33" in one_line(e)
    with pytest.raises(ValueError) as e:  # every entry is within 0.0 cosine of some query: too few left
        compute_neighbors(db, k=30, dedup_threshold=-0.2, progress=False)
    assert one_line(e) == "query 0 has fewer than 30 database entries left after excluding near-duplicates (cosine " \
                          "above -0.2)"  # not "itself": it is not excluded


def test_proposal_ranking_and_top_m(tmp_path, data):
    ids, counts = proposal_ranking(torch.tensor([[4, 1, 2], [1, 4, 0], [-1, 2, 4]]), 6)
    # counts: 0:1, 1:2, 2:2, 3:0, 4:3, 5:0 -> 4, then 1, 2 (tie, lower id first), 0, then 3, 5
    assert ids.tolist() == [4, 1, 2, 0, 3, 5] and counts.tolist() == [3, 2, 2, 1, 0, 0]
    with pytest.raises(ValueError, match="out of range"):
        proposal_ranking(np.array([[6]]), 6)
    path = write_database(tmp_path / "p", data[0], INFO)
    rng = np.random.default_rng(0)
    neighbor_ids = rng.integers(0, 50, (200, 4))
    ranked, counts = proposal_ranking(neighbor_ids, 50)
    ref_counts = np.bincount(neighbor_ids.ravel(), minlength=50)
    assert counts.tolist() == sorted(ref_counts.tolist(), reverse=True)
    assert all(ref_counts[i] == c for i, c in zip(ranked.tolist(), counts.tolist(), strict=True))
    save_proposals(path, ranked.numpy(), counts.numpy(), queries=200, k=4)
    db = Database.open(path, device="cpu")
    assert db.manifest["proposals"]["file"] == "proposals.npy"
    assert db.proposals(0.1).tolist() == ranked[:5].tolist()
    assert db.proposals(0.001).tolist() == ranked[:1].tolist()  # at least one
    assert db.proposals(0.05).tolist() == ranked[:3].tolist()  # 2.5 entries: ceil(m * N), not floor
    # m as the decimal it prints as: 0.14 * 50 is 7.000000000000001 in binary floats, 0.28 * 50 14.000000000000002
    assert len(db.proposals(0.14)) == 7 and len(db.proposals(np.float64(0.28))) == 14
    # also in float32 (a config or array value), which float() widened to 0.10000000149011612: 6 entries, not 5
    assert len(db.proposals(np.float32(0.1))) == 5 and len(db.proposals(np.float16(0.14))) == 7
    assert db.proposals(1.0).tolist() == ranked.tolist()
    with pytest.raises(ValueError) as e:
        db.proposals(0)
    assert "fraction" in one_line(e)
    with pytest.raises(ValueError, match=r"m must be a fraction in \(0, 1\], got 1.5"):  # a mutation audit's survivor
        db.proposals(1.5)


def test_proposal_ranking_breaks_ties_by_lower_id_in_large_rankings():
    """Ties go to the lower id also where the sort has many equal counts to order: an unstable sort keeps small
    inputs in order but not 2,000 entries of five distinct counts."""
    neighbor_ids = torch.arange(2000).repeat_interleave(torch.arange(2000) % 5)  # entry i occurs i % 5 times
    ids, counts = proposal_ranking(neighbor_ids[:, None], 2000)
    expected = sorted(range(2000), key=lambda i: (-(i % 5), i))
    assert ids.tolist() == expected and counts.tolist() == [i % 5 for i in expected]


def test_non_finite_embeddings_are_refused(tmp_path, data):
    """NaN, Inf and float32 values beyond float16's range (inf after the cast) never reach a shard."""
    for bad in (np.nan, np.inf, 70000.0):
        emb = data[0].copy()
        emb[29, 3] = bad
        with pytest.raises(ValueError) as e:
            write_database(tmp_path / f"bad{bad}", emb, INFO, shard_size=13)
        assert "embeddings row 29" in one_line(e) and "not finite" in str(e.value)
    assert write_database(tmp_path / "edge", np.full((2, 16), 65504.0), INFO)  # the largest float16 is fine


def test_exact_search_ranks_nan_scores_last():
    stored = np.random.default_rng(2).standard_normal((12, 16)).astype(np.float32)
    stored[[0, 5]] = np.nan  # e.g. a database written before non-finite rows were refused
    queries = torch.from_numpy(stored[[3, 7]].copy())
    scores, ids = exact_search(queries, [stored[:7], stored[7:]], 12, chunk=4)
    finite = np.array([i for i in range(12) if i not in (0, 5)])
    np.testing.assert_array_equal(ids[:, :10].numpy(), finite[brute_force(stored[finite], queries.numpy(), 10)[1]])
    assert ids[:, 10:].tolist() == [[0, 5], [0, 5]] and torch.isneginf(scores[:, 10:]).all()
    _, idx = topk_lowest_id(torch.tensor([[0.1, float("nan"), 0.3, float("-inf")]]), 3)
    assert idx.tolist() == [[2, 0, 1]]


def test_exact_search_and_proposals_check_argument_types(db_dir):
    """NumPy queries failed on ``.dim``, ``chunk=0`` in ``range()``, a string fraction on ``<``."""
    stored = np.random.default_rng(2).standard_normal((12, 16)).astype(np.float32)
    with pytest.raises(TypeError, match="queries must be a torch.Tensor .*got ndarray"):
        exact_search(stored[:2], stored, 3)
    for chunk in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"chunk must be a positive int .*got {chunk!r}"):
            exact_search(torch.from_numpy(stored[:2]), stored, 3, chunk=chunk)
    save_proposals(db_dir, np.arange(50), np.zeros(50, np.int64))
    with pytest.raises(TypeError, match="m must be a fraction in \\(0, 1\\], got '0.1'"):
        Database.open(db_dir, device="cpu").proposals("0.1")


def test_write_database_checks_metadata_lengths_first(tmp_path, data):
    emb = data[0]
    for kwargs, expect in [({"sources": ["a"] * 49}, "sources has 49 values, expected 50"),
                           ({"class_ids": np.zeros(51, np.int64)},
                            "class_ids must have shape (50,) for 50 embeddings, got (51,)"),
                           ({"patch_coords": np.zeros((50, 3), np.int64)},
                            "patch_coords must have shape (50, 2) for 50 embeddings, got (50, 3)")]:
        with pytest.raises(ValueError) as e:
            write_database(tmp_path / "db", emb, INFO, **kwargs)
        assert expect in one_line(e)
        assert not (tmp_path / "db").exists()


def test_k_must_be_an_integer(db_dir):
    db = Database.open(db_dir, device="cpu")
    for k in (2.0, True, "3"):
        with pytest.raises(TypeError, match="k must be an integer"):
            db.search(torch.randn(2, 16), k)
    assert db.search(torch.randn(2, 16), np.int64(3))[1].shape == (2, 3)


def test_open_file_and_unreadable_proposals(tmp_path, db_dir):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError) as e:
        Database.open(tmp_path / "afile")
    assert "is a file, not a database directory" in one_line(e)
    save_proposals(db_dir, np.arange(50), np.zeros(50, np.int64), queries=1, k=1)
    (db_dir / "proposals.npy").write_bytes((db_dir / "proposals.npy").read_bytes()[:100])
    with pytest.raises(ValueError) as e:
        Database.open(db_dir, device="cpu").proposal_ranking()
    assert "proposals.npy is not a readable .npy array" in one_line(e)
    np.save(db_dir / "proposals.npy", np.stack([np.r_[np.arange(49), 10**6], np.zeros(50, np.int64)], 1))
    with pytest.raises(ValueError) as e:  # when loaded, not as an IndexError when sampling reaches the id
        Database.open(db_dir, device="cpu").proposals(0.5)
    assert one_line(e).startswith(f"{db_dir / 'proposals.npy'} holds id 1000000, outside the database's 50 entries")
    assert f"python -m rdm_fast.db neighbors {db_dir} --k K --out FILE" in str(e.value)
    # from a mutation audit: an id one past the last entry and float ids were let through
    np.save(db_dir / "proposals.npy", np.stack([np.r_[50, np.arange(1, 50)], np.zeros(50, np.int64)], 1))
    with pytest.raises(ValueError, match="proposals.npy holds id 50, outside the database's 50 entries"):
        Database.open(db_dir, device="cpu").proposals(0.5)
    np.save(db_dir / "proposals.npy", np.stack([np.arange(50.0), np.zeros(50)], 1))
    with pytest.raises(ValueError, match=r"proposals.npy holds float64 \(50, 2\), expected int64 \(50, 2\)"):
        Database.open(db_dir, device="cpu").proposals(0.5)


def test_save_proposals_refuses_what_every_read_would_refuse(db_dir):
    """Ids outside the entries were recorded, and then every proposals() / proposal_ranking() failed on them."""
    perm = np.random.default_rng(0).permutation(50)
    for ids, counts, message in ((np.full(50, 99), np.zeros(50, np.int64), "lists each of the database's 50 entries"),
                                 (np.r_[perm[:49], perm[0]], np.zeros(50, np.int64), "each of the database's 50"),
                                 (perm, np.zeros(50), "holds integers, got int64 ids and float64 counts"),
                                 (perm, np.full(50, -1), "counts are numbers of times, >= 0; got -1"),
                                 (perm[:10], np.zeros(10, np.int64), "one id and count per entry (50)")):
        with pytest.raises(ValueError, match=re.escape(message)):
            save_proposals(db_dir, ids, counts)
    assert not read_manifest(db_dir).get("proposals") and not (db_dir / "proposals.npy").exists()
    save_proposals(db_dir, perm, np.arange(50)[::-1])
    assert Database.open(db_dir, device="cpu").proposals(0.1).tolist() == perm[:5].tolist()


def test_proposals_are_memory_mapped_and_checked_in_blocks(tmp_path, db_dir, monkeypatch):
    """The ranking stays on disk (a 20M-entry ranking is 320 MB), each block of ids is checked, and top-m reads
    only its rows."""
    from rdm_fast.retrieval import database
    monkeypatch.setattr(database, "SCAN_ROWS", 7)  # 50 rows: 8 blocks, the last one short
    ranking = np.random.default_rng(1).permutation(50)
    save_proposals(db_dir, ranking, np.arange(50)[::-1], queries=1, k=1)
    db = Database.open(db_dir, device="cpu")
    assert db.proposals(0.1).tolist() == ranking[:5].tolist()
    assert isinstance(db._proposals, np.memmap)
    ids, counts = db.proposal_ranking()
    assert ids.tolist() == ranking.tolist() and counts.tolist() == list(range(49, -1, -1))
    for row in (0, 6, 7, 49):  # first and last rows of blocks
        bad = np.stack([ranking, np.zeros(50, np.int64)], 1)
        bad[row, 0] = -1 - row
        np.save(db_dir / "proposals.npy", bad)
        with pytest.raises(ValueError, match=f"holds id {-1 - row}, outside"):
            Database.open(db_dir, device="cpu").proposals(0.1)


def test_neighbors_name_a_damaged_entry(tmp_path):
    """A NaN embedding (a damaged shard) is named as the database's entry, not as a query."""
    emb = np.random.default_rng(0).standard_normal((12, 16)).astype(np.float32)
    path = write_database(tmp_path / "db", emb, INFO, shard_size=5)
    shard = np.load(path / "emb_00001.npy", mmap_mode="r+")  # rows 5-9
    shard[2, 3] = np.nan
    shard.flush()
    del shard
    db = Database.open(path, device="cpu")
    with pytest.raises(ValueError, match=r"entry 7 of .*db holds NaN or infinite values: the database is damaged "
                                         r"\(check it with python -m rdm_fast.db info .*db --verify\)"):
        compute_neighbors(db, k=2, exclude_self=True, progress=False)


def test_search_images_warns_about_0_255_images_and_refuses_wrong_types(db_dir, caplog):
    """RDM.encode warns about images far outside [-1, 1]; the encoders' image path now does too (CPU images),
    and wrong argument types are TypeErrors naming the argument instead of AttributeErrors."""
    db = Database.open(db_dir, device="cpu")
    enc = TinyEncoder()
    images = torch.rand(2, 3, 20, 24)
    with caplog.at_level("WARNING", logger="rdm_fast.encoders"):
        db.search_images(enc, images * 2 - 1, 3)
    assert "expects values in [-1, 1]" not in caplog.text
    with caplog.at_level("WARNING", logger="rdm_fast.encoders"):
        db.search_images(enc, images * 255, 3)  # 0-255 floats: searched, but warned about
    assert "reach" in caplog.text and "expects values in [-1, 1]" in caplog.text
    with pytest.raises(TypeError, match="search_images: images must be a torch.Tensor") as e:
        db.search_images(enc, (images * 2 - 1).numpy(), 3)
    assert "ndarray" in one_line(e)
    for call in (lambda: db.search_images("tiny-test", images, 3), lambda: db.search_text("tiny-test", ["a"], 3)):
        with pytest.raises(TypeError, match=r"encoder must be an rdm_fast.encoders.Encoder, got str") as e:
            call()
        assert "get_encoder('tiny-test')" in one_line(e)
    with pytest.raises(TypeError, match="encoder must be an rdm_fast.encoders.Encoder, got NoneType"):
        db.search_text(None, ["a"], 3)


def test_open_checks_chunk_rows_device_and_path(db_dir):
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="chunk_rows must be an int >= 1") as e:
            Database.open(db_dir, device="cpu", backend="torch", chunk_rows=bad)
        assert repr(bad) in one_line(e)
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device") as e:
        Database.open(db_dir, device="gpu")
    one_line(e)
    with pytest.raises(TypeError, match="path must be a str or a path-like object.*NoneType"):
        Database.open(None)
    db = Database.open(str(db_dir), device="cpu", backend="torch", chunk_rows=1)
    assert db.search(torch.randn(2, 16), 3)[1].shape == (2, 3)
    db = Database.open(str(db_dir), device="cpu", backend="torch", chunk_rows=np.int64(2))  # e.g. from a config array
    assert db.search(torch.randn(2, 16), 3)[1].shape == (2, 3)


def test_search_refuses_integer_queries(db_dir):
    """The error says "float tensor or array"; integer tensors used to be searched anyway."""
    db = Database.open(db_dir, device="cpu")
    for q in (torch.ones(2, 16, dtype=torch.int64), torch.ones(2, 16, dtype=torch.bool), np.ones((2, 16), np.int64)):
        with pytest.raises(ValueError, match=r"queries must be a \(Q, 16\) float tensor or array") as e:
            db.search(q, 3)
        assert "int64" in one_line(e) or "bool" in one_line(e)
    assert db.search(torch.ones(2, 16, dtype=torch.float16), 3)[1].shape == (2, 3)


def test_write_database_names_missing_encoder_info_keys(tmp_path, data):
    with pytest.raises(ValueError, match="encoder_info lacks 'dim', 'normalized'") as e:
        write_database(tmp_path / "db", data[0], {"name": "e"})
    one_line(e)
    with pytest.raises(TypeError, match="encoder_info must be a dict"):
        write_database(tmp_path / "db", data[0], "tiny-test")
    assert not (tmp_path / "db").exists()


def test_same_entries_without_checksums(tmp_path):
    """Manifests need not record shard checksums: two such databases are not taken for copies (no KeyError)."""
    from rdm_fast.retrieval.neighbors import same_entries

    emb = np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)
    a, b = (Database.open(write_database(tmp_path / name, emb, INFO), device="cpu") for name in ("a", "b"))
    assert same_entries(a, b) and same_entries(a, a)
    for db in (a, b):
        db.manifest["shards"][0].pop("sha256")
    assert not same_entries(a, b) and same_entries(a, a)


def test_scattered_rows_are_read_through_their_own_maps(db_dir, data):
    """Gathers of scattered rows go through a second map of each shard, advised MADV_RANDOM (on a cold cache the
    default read-ahead read about 1.3 GB for 256 rows of a 3M-entry database: bench/cold_gather.py, RESULTS.md);
    the streaming scans keep the shards' default maps. The rows are the same."""
    db = Database.open(db_dir, backend="torch", device="cpu")
    ids = torch.tensor([[49, 0], [13, 12]])
    got = db.embeddings(ids)
    assert torch.equal(got, torch.from_numpy(data[0][ids.numpy()]).half().float())
    scattered = db._scattered_shards()
    assert len(scattered) == len(db.shard_arrays) and scattered is db._scattered_shards()
    assert all(a is not b and np.array_equal(a, b) for a, b in zip(scattered, db.shard_arrays))


@pytest.mark.parametrize("names", [["a/1.jpg", "b/22.png"], ["café/1.jpg", "b/22.png"], ["x\udce9.jpg", "b/2.png"],
                                   ["/" + "d/" * 150 + "long.jpg", "b/2.png"]])
def test_sources_round_trip_through_the_compact_metadata(tmp_path, names):
    """Sources are kept as UTF-8 bytes per process (ASCII by one cast, others element by element, file names
    that are not UTF-8 through their surrogates) and come back as the strings written."""
    path = write_database(tmp_path / "db", np.ones((2, 16), np.float32), INFO, sources=names, shard_size=1)
    db = Database.open(path, device="cpu")
    assert db.sources([1, 0, 1]) == [names[1], names[0], names[1]]
    assert all(v.dtype.kind == "S" for (_, key), v in db._meta.items() if key == "sources")


@pytest.mark.parametrize("keep", [0, 0.5])
def test_zeroed_metadata_file_is_named(db_dir, keep):
    """A metadata file whose bytes from some point on are zeros (what a crash of some file systems leaves) passes
    the size check at open and is named when read, not reported as a bare zipfile error."""
    meta = db_dir / read_manifest(db_dir)["shards"][1]["meta"]
    data = meta.read_bytes()
    cut = int(keep * len(data))
    meta.write_bytes(data[:cut] + bytes(len(data) - cut))
    db = Database.open(db_dir, device="cpu")
    assert db.sources([0]) == ["img/000.jpg"]  # shard 0 is intact
    with pytest.raises(ValueError) as e:
        db.sources([13])
    assert one_line(e).startswith(f"{meta} is not a readable metadata file (")


def test_compute_neighbors_takes_numpy_integers_as_k(db_dir):
    db = Database.open(db_dir, device="cpu")
    a = compute_neighbors(db, k=np.int64(3), exclude_self=True, progress=False)
    b = compute_neighbors(db, k=3, exclude_self=True, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(TypeError, match="k must be an int, got 3.0"):
        compute_neighbors(db, k=3.0, progress=False)


def test_write_database_refuses_what_is_no_embedding(tmp_path, data):
    """Integer, boolean and complex arrays (the imaginary part was dropped), non-integer class ids (0.5 was stored
    as 0) and encoder_info that is not what it says were written without a word."""
    emb = data[0]
    for kwargs, message in (({"embeddings": emb.astype(np.int32)}, "embeddings must be floating point, got int32"),
                            ({"embeddings": emb > 0}, "embeddings must be floating point, got bool"),
                            ({"embeddings": emb + 1j}, "embeddings must be floating point, got complex"),
                            ({"class_ids": np.full(50, 0.5)}, "class_ids must be integers, got float64"),
                            # values beyond the stored integer type wrapped (2**64 - 1 became -1, "no class")
                            ({"class_ids": np.full(50, 2**64 - 1, np.uint64)}, "class_ids are stored as int64"),
                            ({"patch_coords": np.full((50, 2), 2**40)}, "patch_coords are stored as int32, whose "
                             "range [-2147483648, 2147483647] does not hold 1099511627776 to 1099511627776"),
                            ({"encoder_info": {**INFO, "normalized": "no"}}, "normalized must be True or False"),
                            ({"encoder_info": {**INFO, "dim": 16.0}}, "dim must be a positive integer, got 16.0"),
                            ({"encoder_info": {**INFO, "dim": 0}}, "dim must be a positive integer, got 0"),
                            ({"encoder_info": {**INFO, "name": 3}}, "name must be a non-empty string, got 3"),
                            # from a database mutation audit: a bool dim (True made a 1-d database) and an empty
                            # name were accepted with their checks dropped
                            ({"encoder_info": {**INFO, "dim": True}}, "dim must be a positive integer, got True"),
                            ({"encoder_info": {**INFO, "name": ""}}, "name must be a non-empty string, got ''")):
        args = {"embeddings": emb, "encoder_info": INFO, **kwargs}
        with pytest.raises(ValueError) as e:
            write_database(tmp_path / "db", args.pop("embeddings"), args.pop("encoder_info"), **args)
        assert message in one_line(e)
        assert not (tmp_path / "db").exists()
    # a single string was split into one-letter sources; a float shard size failed deep inside
    with pytest.raises(TypeError, match="sources must be a sequence of strings"):
        write_database(tmp_path / "db", emb[:3], INFO, sources="abc")
    with pytest.raises(TypeError, match="shard_size must be an int, got 7.5"):
        write_database(tmp_path / "db", emb, INFO, shard_size=7.5)
    assert not (tmp_path / "db").exists()
    assert len(Database.open(write_database(tmp_path / "none", emb[:0], INFO, class_ids=[]), device="cpu")) == 0
    # from a database mutation audit: writing into an existing database replaced its shards under its manifest
    with pytest.raises(FileExistsError, match="manifest.json already exists: write the database into a new directory"):
        write_database(tmp_path / "none", emb, INFO)
    assert len(Database.open(tmp_path / "none", device="cpu", verify=True)) == 0


def test_write_database_checks_everything_before_writing(tmp_path):
    """Found by a Python API audit: keywords replacing the manifest's own keys gave a database every reader called
    corrupted; a NumPy scalar keyword, or a bad row in a later shard, failed after earlier shards were written;
    (2, N) corners were read as (N, 2) pairs; float corners were truncated; bfloat16 tensors were refused."""
    emb = np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)
    with pytest.raises(ValueError, match=r"write_database: count is the manifest.s own \(written by rdm_fast\)"):
        write_database(tmp_path / "a", emb, INFO, count=3)
    with pytest.raises(TypeError, match=r"write_database: note=<object .*> cannot be stored in the manifest"):
        write_database(tmp_path / "b", emb, INFO, note=object())
    circular: list = []
    circular.append(circular)  # json's ValueError, not a TypeError (found by a mutation audit: not tested)
    with pytest.raises(TypeError, match=r"write_database: note=\[\[...\]\] cannot be stored in the manifest"):
        write_database(tmp_path / "b", emb, INFO, note=circular)
    bad = emb.copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match=r"embeddings row 7: the embedding is not finite"):
        write_database(tmp_path / "c", bad, INFO, shard_size=3)
    corners = np.stack([np.arange(10), 100 + np.arange(10)])
    with pytest.raises(ValueError, match=r"patch_coords must have shape \(10, 2\) for 10 embeddings, got \(2, 10\)"):
        write_database(tmp_path / "d", emb, INFO, patch_coords=corners)
    with pytest.raises(ValueError, match="patch_coords must be integers"):
        write_database(tmp_path / "e", emb, INFO, patch_coords=np.full((10, 2), 1.7))
    for name, entry in (("h", {"build": "crop"}), ("i", {"skipped": 2}), ("j", {"image_root": 5}),
                        ("k", {"enlarged": [1]})):  # written, then Database.encoder_spec, db info, search failed
        with pytest.raises(ValueError, match=rf"write_database: {next(iter(entry))} .* is not"):
            write_database(tmp_path / name, emb, INFO, **entry)
    for name in "abcdehijk":  # refused before anything was written
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir())
    db = Database.open(write_database(tmp_path / "f", torch.from_numpy(emb).bfloat16(), INFO, note=np.int64(3),
                                      patch_coords=corners.T), device="cpu")
    assert db.manifest["note"] == 3 and db.patch_coords([0, 1]).tolist() == [[0, 100], [1, 101]]
    close = np.array([[1 + 2**-11 + 2**-40] + [0.5] * 15])  # float64 -> float32 -> float16 rounds it down
    for i, rows in enumerate((close, torch.from_numpy(close))):  # a float64 tensor is stored as its array is
        stored = Database.open(write_database(tmp_path / f"g{i}", rows, INFO), device="cpu").embeddings([0])
        assert stored[0, 0].item() == np.float16(close[0, 0]).item() == 1 + 2**-10


def test_a_refused_proposal_ranking_keeps_the_recorded_one(tmp_path):
    """save_proposals cleared the recorded ranking before its JSON write failed on a value it cannot hold."""
    path = write_database(tmp_path / "db", np.random.default_rng(1).standard_normal((6, 16)), INFO)
    ids, counts = np.arange(6)[::-1].copy(), np.arange(6)
    save_proposals(path, ids, counts, k=np.int64(3))  # NumPy scalars are stored as numbers
    assert read_manifest(path)["proposals"] == {"file": "proposals.npy", "k": 3}
    with pytest.raises(TypeError, match=r"save_proposals: k=.* cannot be stored in the manifest"):
        save_proposals(path, np.arange(6), counts, k={1, 2})
    with pytest.raises(ValueError, match="save_proposals: file is the manifest's own"):  # it recorded another name
        save_proposals(path, np.arange(6), counts, file="other.npy")
    assert read_manifest(path)["proposals"]["k"] == 3
    assert Database.open(path, device="cpu").proposals(1.0)[0] == 5  # the first ranking, unchanged


def test_neighbors_arguments_are_checked_by_name(tmp_path):
    """From a Python API audit: a float or None batch_size, a str threshold and a path for the database failed
    inside the computation ('float' object cannot be interpreted as an integer, no attribute 'check_encoder')."""
    path = write_database(tmp_path / "db", np.random.default_rng(3).standard_normal((10, 16)), INFO)
    db = Database.open(path, backend="torch", device="cpu")
    for kwargs, error, message in (({"batch_size": 2.5}, TypeError, "batch_size must be an int, got 2.5"),
                                   ({"batch_size": None}, TypeError, "batch_size must be an int, got None"),
                                   ({"batch_size": 0}, ValueError, "batch_size must be at least 1, got 0"),
                                   ({"dedup_threshold": "0.9"}, TypeError, "dedup_threshold is a cosine similarity"),
                                   ({"dedup_threshold": 1.5}, ValueError, r"cosine similarity in \[-1, 1\], got 1.5")):
        with pytest.raises(error, match=message):
            compute_neighbors(db, k=2, progress=False, **kwargs)
    with pytest.raises(TypeError, match=r"compute_neighbors: db must be a Database \(Database.open\(path\)\), got str"):
        compute_neighbors(str(path), k=2, progress=False)


def test_small_api_checks(tmp_path):
    """From a Python API audit: a non-callable factory was registered and failed at first use; float neighbour
    ids were truncated into a ranking; an empty id list was refused as float64."""
    from rdm_fast.encoders import register_encoder

    with pytest.raises(TypeError, match="register_encoder: factory must be callable"):
        register_encoder("never-callable", 3)
    with pytest.raises(ValueError, match="proposal_ranking: neighbour ids must be integers, got torch.float64"):
        proposal_ranking(np.array([[0.7, 1.9]]), 3)
    with pytest.raises(TypeError, match="proposal_ranking: n must be an int, got 2.5"):
        proposal_ranking(np.array([[0, 1]]), 2.5)
    db = Database.open(write_database(tmp_path / "db", np.ones((3, 16)), INFO), backend="torch", device="cpu")
    assert db.embeddings([]).shape == (0, 16) and db.patch_coords([]).shape == (0, 2)


def test_missing_paths_and_containers_are_named(tmp_path):
    """From a Python API audit: None paths gave pathlib's TypeError, naming no argument; a None caption list and
    database names instead of Database objects failed deep inside; a list as a config tree, an AttributeError."""
    from rdm_fast import RDM, RDMConfig
    from rdm_fast.retrieval import read_manifest, save_neighbors

    with pytest.raises(TypeError, match="a database directory must be a str or Path, got NoneType"):
        read_manifest(None)
    with pytest.raises(TypeError, match="a checkpoint path must be a str or Path, got NoneType"):
        RDM.from_pretrained(None)
    with pytest.raises(TypeError, match="the folder to save the model into must be a str or Path, got NoneType"):
        RDM.from_config("tiny").save_pretrained(None)
    with pytest.raises(TypeError, match="expected a list of captions, got NoneType"):
        embed_texts(TinyEncoder(), None)
    with pytest.raises(ValueError, match="databases must be .* as Database objects"):
        save_neighbors(tmp_path / "n.npz", torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1), databases=("a", "b"))
    with pytest.raises(TypeError, match="RDMConfig.from_dict: expected a dict"):
        RDMConfig.from_dict([1])
