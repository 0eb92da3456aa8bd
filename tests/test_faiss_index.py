"""FAISS index backend (rdm_fast.retrieval.faiss_index): build from fp16 memory-mapped shards, save, memory-map,
search; checked against an independent numpy float64 brute force.

Recall data: a Gaussian background with, around each query, 30 planted neighbours at cosine similarity 0.6-0.95
(clusters of near-duplicates), rows scaled by random norms so that normalisation matters, stored as fp16 in
shards of uneven sizes. Each kind uses the smallest database where its defaults are meaningful (ivfpq: 20k
vectors, enough to train 128 cells and 256-centroid PQ codebooks).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")  # the optional FAISS dependency (setup.py extra "retrieval")

from rdm_fast.retrieval.faiss_index import INDEX_KINDS, FaissSearch, build_index, choose_kind, estimate_memory
from rdm_fast.retrieval.search import exact_search

DIM = 64
RECALL_N = {"flat": 5000, "hnsw": 8000, "ivfpq": 20000}


def planted(n: int, dim: int, n_queries: int = 100, per_query: int = 30, seed: int = 0):
    """(database (n, dim) fp16, queries (Q, dim) fp32): background plus per_query neighbours per query."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n_queries, dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    a = rng.uniform(0.6, 0.95, (n_queries, per_query, 1))
    u = rng.standard_normal((n_queries, per_query, dim))
    u -= np.einsum("qpd,qd->qp", u, q)[..., None] * q[:, None]
    u /= np.linalg.norm(u, axis=2, keepdims=True)
    near = (a * q[:, None] + np.sqrt(1 - a**2) * u).reshape(-1, dim)
    x = np.concatenate([rng.standard_normal((n - len(near), dim)), near])
    x *= rng.uniform(0.5, 2.0, (n, 1))
    return x[rng.permutation(n)].astype(np.float16), q.astype(np.float32)


def save_shards(x: np.ndarray, folder: Path, cuts: tuple[float, ...] = (0.137, 0.61)) -> list[np.ndarray]:
    """x split at uneven fractions into .npy files, reopened as read-only memory maps."""
    bounds = [0, *(int(c * len(x)) + 1 for c in cuts), len(x)]
    out = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        np.save(folder / f"part_{i}.npy", x[a:b])
        out.append(np.load(folder / f"part_{i}.npy", mmap_mode="r"))
    return out


def cosine(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(Q, N) float64 cosine similarities."""
    xd = x.astype(np.float64)
    xd /= np.linalg.norm(xd, axis=1, keepdims=True)
    qd = q.astype(np.float64)
    qd /= np.linalg.norm(qd, axis=1, keepdims=True)
    return qd @ xd.T


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 cosine top-k, equal scores by lower id."""
    s = cosine(x, q)
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), s.shape), -s), axis=-1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def recall(ids: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / ref.shape[1] for a, b in zip(ids, ref, strict=True)]))


def is_mapped(path: Path) -> bool:
    maps = Path("/proc/self/maps").read_text()
    return str(path) in maps


@pytest.fixture(scope="module", params=INDEX_KINDS)
def built(request, tmp_path_factory):
    """(kind, shards, queries, index path, info) with default parameters."""
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    x, q = planted(RECALL_N[kind], DIM)
    shards = save_shards(x, folder)
    out = folder / "index.faiss"
    info = build_index(shards, kind, out=out, progress=False)
    return kind, shards, q, out, info


def test_build_load_search_recall(built):
    kind, shards, q, out, info = built
    x = np.concatenate([np.asarray(s) for s in shards])
    assert info["kind"] == kind and info["ntotal"] == len(x) and info["dim"] == DIM
    expected = {"flat": set(), "hnsw": {"M", "ef_construction", "ef_search"},
                "ivfpq": {"nlist", "m", "nbits", "nprobe"}}[kind]
    assert expected <= set(info)
    engine = FaissSearch.load(out, mmap=True, vectors=shards)
    assert is_mapped(out)
    assert (engine.kind, engine.name, engine.ntotal, engine.dim) == (kind, f"faiss-{kind}", len(x), DIM)
    scores, ids = engine.search(torch.from_numpy(q), 10)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (len(q), 10)
    _, ref_ids = brute_force(x, q, 10)
    r = recall(ids.numpy(), ref_ids)
    print(f"{kind}: recall@10 {r:.4f} with defaults {info}")
    assert r >= 0.95
    # every kind returns the exact cosine scores of the ids it returns (fp32 arithmetic on the fp16 rows)
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(cosine(x, q), ids.numpy(), 1), atol=2e-6)
    assert np.all(np.diff(scores.numpy(), axis=1) <= 0)


@pytest.mark.parametrize("built", ["ivfpq"], indirect=True)
def test_ivfpq_needs_vectors_for_recall(built, caplog):
    """Without the database vectors, ivfpq ranks by PQ codes alone: approximate scores, ids still valid."""
    _, shards, q, out, _ = built
    with caplog.at_level(logging.WARNING):
        engine = FaissSearch.load(out)
    assert "without the database vectors" in caplog.text
    scores, ids = engine.search(torch.from_numpy(q), 10)
    x = np.concatenate([np.asarray(s) for s in shards])
    assert np.all(ids.numpy() >= 0)
    err = np.abs(scores.numpy() - np.take_along_axis(cosine(x, q), ids.numpy(), 1))
    print(f"ivfpq without re-ranking: recall@10 {recall(ids.numpy(), brute_force(x, q, 10)[1]):.4f}, "
          f"score error mean {err.mean():.4f} max {err.max():.4f}")
    assert err.mean() < 0.1 and err.max() < 0.3


def test_search_parameters_and_inputs(built):
    kind, shards, q, out, info = built
    engine = FaissSearch.load(out, mmap=False, vectors=shards, nprobe=3, ef_search=20, rerank=50)
    if kind == "ivfpq":
        assert engine.nprobe == 3 and FaissSearch.load(out, vectors=shards).nprobe == info["nprobe"]
    if kind == "hnsw":
        assert engine.ef_search == 20 and FaissSearch.load(out).ef_search == info["ef_search"]
    _, i32 = engine.search(torch.from_numpy(q), 5)
    s16, i16 = engine.search(torch.from_numpy(q).half() * 3, 5)  # any float dtype, normalised here
    assert s16.dtype == torch.float32 and (i16 == i32).float().mean() > 0.95
    empty_s, empty_i = engine.search(torch.empty(0, DIM), 5)
    assert empty_s.shape == (0, 5) and empty_i.shape == (0, 5)
    with pytest.raises(ValueError, match="dimensions"):
        engine.search(torch.zeros(2, DIM + 1), 5)
    with pytest.raises(ValueError, match="k must be"):
        engine.search(torch.from_numpy(q), engine.ntotal + 1)
    with pytest.raises(ValueError, match="k must be"):
        engine.search(torch.from_numpy(q), 0)
    with pytest.raises(ValueError, match="nprobe"):
        FaissSearch.load(out, nprobe=0)


@pytest.mark.skipif(not torch.cuda.is_available() or faiss.get_num_gpus() < 1,
                    reason="needs CUDA and a faiss build with GPU support")
def test_cuda_queries(built):
    """CUDA queries: results come back on the queries' device and agree with the CPU search."""
    kind, shards, q, out, _ = built
    engine = FaissSearch.load(out, vectors=shards)
    cpu_scores, cpu_ids = engine.search(torch.from_numpy(q), 10)
    scores, ids = engine.search(torch.from_numpy(q).cuda(), 10)
    assert scores.is_cuda and ids.is_cuda
    # GPU rounding may swap results whose scores differ by ~1e-7, so exact search compares sorted scores
    assert recall(ids.cpu().numpy(), cpu_ids.numpy()) >= (0.99 if kind == "flat" else 0.95)
    if kind == "flat":
        np.testing.assert_allclose(scores.cpu().numpy(), cpu_scores.numpy(), atol=1e-5)


def test_flat_exact_ids_and_ties(tmp_path):
    """+-1 vectors: every score is exact in fp32 and most are tied, so ranks cut through tie groups; flat must
    return exactly the brute-force order with ties by lower id (also across shard boundaries), like
    exact_search. 30 queries take faiss's BLAS path, 5 its sequential one."""
    rng = np.random.default_rng(1)
    x = rng.choice([-1.0, 1.0], (3001, DIM)).astype(np.float16)
    x[rng.choice(len(x), 400, replace=False)] = x[rng.integers(0, len(x), 400)]  # exact duplicates
    shards = save_shards(x, tmp_path, cuts=(0.2, 0.2003, 0.71))
    info = build_index(shards, "flat", out=tmp_path / "flat.faiss", progress=False)
    assert info["kind"] == "flat"
    engine = FaissSearch.load(tmp_path / "flat.faiss")
    for nq in (30, 5):
        q = rng.choice([-1.0, 1.0], (nq, DIM)).astype(np.float32)
        q[: nq // 2] = x[rng.integers(0, len(x), nq // 2)]
        for k in (1, 17, 64):
            scores, ids = engine.search(torch.from_numpy(q), k)
            ref_scores, ref_ids = brute_force(x, q, k)
            np.testing.assert_array_equal(ids.numpy(), ref_ids)
            np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-6)
            _, t_ids = exact_search(torch.from_numpy(q), torch.from_numpy(x.astype(np.float32)), k)
            np.testing.assert_array_equal(ids.numpy(), t_ids.numpy())


@pytest.mark.parametrize(("n", "dim", "kind"), [
    (262_144, 512, "flat"), (262_145, 512, "hnsw"), (1_281_200, 512, "hnsw"), (3_702_558, 512, "hnsw"),
    (3_702_559, 512, "ivfpq"), (20_927_907, 512, "ivfpq"), (174_762, 768, "flat"), (174_763, 768, "hnsw"),
    (2_568_760, 768, "hnsw"), (2_568_761, 768, "ivfpq"), (20_927_907, 768, "ivfpq"), (1, 1, "flat"),
])
def test_choose_kind_thresholds(n, dim, kind):
    """The documented thresholds: flat up to 512 MiB of fp32 vectors, hnsw up to 8 GiB of vectors + graph."""
    assert choose_kind(n, dim) == kind


def test_auto_kind_and_bad_arguments(tmp_path):
    x, _ = planted(600, DIM, n_queries=5)
    shards = save_shards(x, tmp_path)
    assert build_index(shards, out=tmp_path / "a.faiss", progress=False)["kind"] == "flat"
    with pytest.raises(ValueError, match="unknown index kind 'ivf'"):
        build_index(shards, "ivf", out=tmp_path / "b.faiss")
    with pytest.raises(ValueError, match="unknown parameter"):
        build_index(shards, "hnsw", out=tmp_path / "b.faiss", nlist=4)
    with pytest.raises(ValueError, match="m=7 does not divide the dimension 64"):
        build_index(shards, "ivfpq", out=tmp_path / "b.faiss", m=7)
    with pytest.raises(ValueError, match="at least 256 training vectors"):
        build_index(shards[:1], "ivfpq", out=tmp_path / "b.faiss")
    with pytest.raises(ValueError, match="different dimensions"):
        build_index([shards[0], np.zeros((3, DIM + 1), np.float16)], out=tmp_path / "b.faiss")
    with pytest.raises(ValueError, match="float"):
        build_index([np.zeros((3, DIM), np.int32)], out=tmp_path / "b.faiss")
    with pytest.raises(ValueError, match="train_size"):
        build_index(shards, "ivfpq", out=tmp_path / "b.faiss", train_size=0)
    for seed in (-1, 2**31 - 1):  # FAISS's C ints: an OverflowError traceback, or numpy's nameless message
        with pytest.raises(ValueError, match=rf"seed \(--seed\) must be in \[0, 2\*\*31 - 1\), got {seed}"):
            build_index(shards, "ivfpq", out=tmp_path / "b.faiss", seed=seed)
    for seed in (1.5, "1"):  # "in method 'ClusteringParameters_seed_set', argument 2 of type 'int'", or '<=' on str
        with pytest.raises(TypeError, match=rf"seed \(--seed\) must be an int, got {seed!r}"):
            build_index(shards, "ivfpq", out=tmp_path / "b.faiss", seed=seed)
    with pytest.raises(ValueError, match="choose_kind|at least one"):
        choose_kind(0, 512)
    assert not (tmp_path / "b.faiss").exists()


def test_ivfpq_small_train_and_default_m(tmp_path, caplog):
    """Too few training vectors for the asked nlist: a smaller nlist with a warning (none at nlist 1). A dimension
    without a divisor near D/8 still gets a valid PQ m by default."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2000, 100)).astype(np.float16)
    shards = save_shards(x, tmp_path)
    with caplog.at_level(logging.WARNING):
        info = build_index(shards, "ivfpq", out=tmp_path / "i.faiss", progress=False, nlist=100, train_size=1000)
    assert info["nlist"] == 1000 // 39 and "too few for nlist=100" in caplog.text
    assert info["m"] == 10 and info["train_size"] == 1000
    engine = FaissSearch.load(tmp_path / "i.faiss", vectors=shards)
    q = x[:20].astype(np.float32)
    _, ids = engine.search(torch.from_numpy(q), 3)
    assert (ids[:, 0].numpy() == np.arange(20)).all()  # each row finds itself with exact re-ranking
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # one cell cannot be made fewer: "too few for nlist=1; using nlist=1" was
        info = build_index(shards[:1], "ivfpq", out=tmp_path / "j.faiss", progress=False, nlist=1, nbits=2,
                           train_size=20)
    assert info["nlist"] == 1 and "too few for nlist" not in caplog.text and "poorly trained" in caplog.text


class RecordingShard:
    """Wraps an array; records the largest number of rows one indexing request asked for, and refuses to be
    converted whole."""

    def __init__(self, array: np.ndarray, log: list) -> None:
        self.array, self.log = array, log
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key):
        rows = self.array[key]
        self.log.append(len(rows))
        return rows

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole shard was converted to an array")


def test_build_streams_in_chunks(tmp_path):
    """Building (training sample and adding) never asks a shard for more than `chunk` rows at once, samples
    its training set from every shard, and the same seed gives the same index."""
    x, q = planted(9000, DIM, n_queries=20)
    arrays = save_shards(x, tmp_path)
    results = []
    for run in range(2):
        logs = [[] for _ in arrays]
        shards = [RecordingShard(a, lg) for a, lg in zip(arrays, logs, strict=True)]
        info = build_index(shards, "ivfpq", out=tmp_path / f"s{run}.faiss", progress=False, train_size=3000,
                           nlist=16, nbits=6, chunk=700, seed=5)
        assert info["train_size"] == 3000
        assert max(max(lg) for lg in logs) <= 700
        assert all(len(lg) > 1 for lg in logs) and sum(sum(lg) for lg in logs) == len(x) + 3000
        results.append(FaissSearch.load(tmp_path / f"s{run}.faiss").search(torch.from_numpy(q), 10)[1])
    assert torch.equal(results[0], results[1])


class FailingShard(RecordingShard):
    def __getitem__(self, key):
        if isinstance(key, slice) and key.start:
            raise OSError("disk read failed")
        return super().__getitem__(key)


def test_atomic_write(tmp_path):
    x, _ = planted(3000, DIM, n_queries=5)
    arrays = save_shards(x, tmp_path)
    out = tmp_path / "out" / "index.faiss"
    bad = [arrays[0], FailingShard(arrays[1], [])]
    with pytest.raises(OSError, match="disk read failed"):
        build_index(bad, "flat", out=out, progress=False, chunk=500)
    assert not out.exists()
    build_index(arrays, "flat", out=out, progress=False)
    before = out.read_bytes()
    with pytest.raises(OSError, match="disk read failed"):
        build_index(bad, "hnsw", out=out, progress=False, chunk=500)
    assert out.read_bytes() == before  # the previous index is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.faiss"]  # no temporary file left


def test_load_errors(tmp_path):
    x, _ = planted(2000, DIM, n_queries=5)
    shards = save_shards(x, tmp_path)
    good = tmp_path / "good.faiss"
    build_index(shards, "hnsw", out=good, progress=False, M=8, ef_construction=16)
    data = good.read_bytes()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FaissSearch.load(tmp_path / "missing.faiss")
    for name, content in (("truncated", data[: len(data) // 2]), ("header", data[:20]),
                          ("garbage", np.random.default_rng(0).bytes(4096)), ("empty", b"")):
        path = tmp_path / f"{name}.faiss"
        path.write_bytes(content)
        for mmap in (True, False):
            with pytest.raises(ValueError, match="not a readable FAISS index") as e:
                FaissSearch.load(path, mmap=mmap)
            assert "\n" not in str(e.value)
    foreign = tmp_path / "l2.faiss"
    faiss.write_index(faiss.IndexFlatL2(DIM), str(foreign))
    with pytest.raises(ValueError, match="not an index written by rdm_fast"):
        FaissSearch.load(foreign)
    ivf = tmp_path / "ivf.faiss"
    build_index(shards, "ivfpq", out=ivf, progress=False, nlist=8, train_size=500)
    for index in (ivf, good):  # an index of another (or a changed) database, whatever its kind
        with pytest.raises(ValueError, match="rebuild the index for this database"):
            FaissSearch.load(index, vectors=shards[:2])
        with pytest.raises(ValueError, match=f"x {DIM - 1} vectors, but the index holds 2000 x {DIM}"):
            FaissSearch.load(index, vectors=[s[:, 1:] for s in shards])


def test_estimate_memory_20m():
    """The computed build memory of the OpenImages database (20,927,907 x 512) with default ivfpq parameters
    stays far below 24 GiB, while a flat index would not fit."""
    est = estimate_memory("ivfpq", 20_927_907, 512)
    assert est["codes"] == 20_927_907 * 64 and est["ids"] == 20_927_907 * 8
    assert est["total"] < 6 * 2**30
    flat = estimate_memory("flat", 20_927_907, 512)
    assert flat["total"] > 3 * flat["vectors"] > 24 * 2**30  # the storage is reallocated by doubling as it grows
    assert estimate_memory("hnsw", 1000, 64)["storage_growth"] == 2 * 4 * 1000 * 64


def test_default_nprobe_searches_at_least_eight_cells():
    """nlist / 20 cells (ScaNN's share) of a small database's few cells was one: a third of the exact neighbours
    were lost. The default searches at least 8 (all of fewer), an explicit nprobe is kept."""
    from rdm_fast.retrieval.faiss_index import _ivfpq_params

    assert _ivfpq_params(10_000, 64, {"nlist": 8}, None)["nprobe"] == 8
    assert _ivfpq_params(10_000, 64, {"nlist": 4}, None)["nprobe"] == 4
    assert _ivfpq_params(10**6, 64, {"nlist": 4096}, None)["nprobe"] == 205
    assert _ivfpq_params(10_000, 64, {"nlist": 16, "nprobe": 1}, None)["nprobe"] == 1


def test_db_index_help_lists_each_kinds_parameters():
    """`db index --help` lists the parameters build_index takes per kind (they were only in an error message)."""
    from rdm_fast.db import INDEX_PARAMS
    from rdm_fast.retrieval.faiss_index import _PARAMS

    listed = {kind: set(names.split(", ")) for kind, names in (part.split(": ") for part in INDEX_PARAMS.split("; "))}
    assert listed == _PARAMS


@pytest.fixture(scope="module")
def small_ivfpq(tmp_path_factory):
    """(shards, queries, index path) of an ivfpq index of 16 cells over 3000 planted vectors in three shards."""
    folder = tmp_path_factory.mktemp("small_ivfpq")
    x, q = planted(3000, DIM, n_queries=300, per_query=5)
    shards = save_shards(x, folder)
    build_index(shards, "ivfpq", out=folder / "i.faiss", progress=False, nlist=16, nbits=4)
    return shards, q, folder / "i.faiss"


def test_ivfpq_search_parameters_reach_the_search(small_ivfpq):
    """Every cell searched (nprobe = nlist, above the stored 8) and every vector re-ranked (rerank = N) is the
    exact search, also for more queries than one re-ranking block holds (2**24 / (N D) = 87 here); the stored
    nprobe searches fewer cells."""
    shards, q, out = small_ivfpq
    x = np.concatenate([np.asarray(s) for s in shards])
    ref_scores, ref_ids = brute_force(x, q, 10)
    engine = FaissSearch.load(out, vectors=shards, nprobe=16, rerank=len(x))
    assert engine.nprobe == 16 and FaissSearch.load(out).nprobe == 8
    scores, ids = engine.search(torch.from_numpy(q), 10)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=2e-6)
    _, ids = FaissSearch.load(out, vectors=shards, rerank=len(x)).search(torch.from_numpy(q), 10)
    assert recall(ids.numpy(), ref_ids) < 1  # half the cells: some neighbours are missed


@pytest.mark.parametrize("rerank", [True, False])
def test_ivfpq_missing_results_come_last(small_ivfpq, rerank):
    """One cell of 16 holds fewer than k = 400 vectors: the rest of each row is id -1 with score -inf, after the
    found ids (distinct, with their cosine scores when re-ranked), whether or not candidates are re-ranked."""
    shards, q, out = small_ivfpq
    x = np.concatenate([np.asarray(s) for s in shards])
    engine = FaissSearch.load(out, vectors=shards if rerank else None, nprobe=1, rerank=len(x))
    scores, ids = (t.numpy() for t in engine.search(torch.from_numpy(q[:20]), 400))
    found = ids >= 0
    assert not found.all() and found.any(axis=1).all()
    assert (np.sort(~found, axis=1, kind="stable") == ~found).all()  # the found ids first
    assert (scores[~found] == -np.inf).all() and np.isfinite(scores[found]).all()
    assert all(len(set(row[row >= 0])) == int((row >= 0).sum()) for row in ids)
    if rerank:
        np.testing.assert_allclose(scores[found], np.take_along_axis(cosine(x, q[:20]), np.maximum(ids, 0), 1)[found],
                                   atol=2e-6)


def test_hnsw_ef_search_reaches_the_search(tmp_path):
    """ef_search given at load is the one searched with (an exhaustive one finds the exact neighbours where the
    stored one does not), and it is raised to k: faiss returns fewer than k results (id -1) below it."""
    x, q = planted(2000, DIM, n_queries=100, per_query=10)
    shards = save_shards(x, tmp_path)
    build_index(shards, "hnsw", out=tmp_path / "h.faiss", progress=False, M=16, ef_construction=40, ef_search=1)
    _, ref_ids = brute_force(x, q, 10)
    _, ids = FaissSearch.load(tmp_path / "h.faiss").search(torch.from_numpy(q), 10)
    assert recall(ids.numpy(), ref_ids) < 1
    _, ids = FaissSearch.load(tmp_path / "h.faiss", ef_search=len(x)).search(torch.from_numpy(q), 10)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    _, ids = FaissSearch.load(tmp_path / "h.faiss", ef_search=4).search(torch.from_numpy(q), 200)
    assert (ids >= 0).all()


def test_ivfpq_training_sample_comes_from_every_shard(tmp_path):
    """The training vectors are drawn across all shards, about in proportion to their sizes (a sample of the first
    rows or shards trains the cells on one part of a database built from differently ordered sources)."""
    x, _ = planted(6000, DIM, n_queries=5)
    arrays = save_shards(x, tmp_path)
    logs = [[] for _ in arrays]

    class SampleRecordingShard(RecordingShard):
        def __getitem__(self, key):  # the training sample is gathered with index arrays, the adding with slices
            rows = self.array[key]
            if not isinstance(key, slice):
                self.log.append(len(rows))
            return rows

    shards = [SampleRecordingShard(a, lg) for a, lg in zip(arrays, logs, strict=True)]
    build_index(shards, "ivfpq", out=tmp_path / "i.faiss", progress=False, train_size=1500, nlist=8, nbits=4)
    drawn = np.array([sum(lg) for lg in logs])
    assert drawn.sum() == 1500
    np.testing.assert_allclose(drawn / 1500, [len(a) / len(x) for a in arrays], atol=0.05)


def test_flat_ties_cut_by_the_index_are_searched_again(tmp_path, monkeypatch):
    """faiss may keep any subset of a tie group cut by its last place (this CPU build keeps the lowest ids; a
    stand-in keeps the highest): flat searches again with more results until the k-th tie group is whole."""
    x = np.repeat(np.eye(4, DIM, dtype=np.float16), 100, axis=0)  # four groups of 100 equal rows
    shards = save_shards(x, tmp_path)
    build_index(shards, "flat", out=tmp_path / "flat.faiss", progress=False)
    engine = FaissSearch.load(tmp_path / "flat.faiss")

    def highest_ids_of_ties(q, kk, device):
        d, i = FaissSearch._search_index(engine, q, len(x), device)
        order = np.lexsort((-i, -d), axis=-1)[:, :kk]
        return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)

    monkeypatch.setattr(engine, "_search_index", highest_ids_of_ties)
    q = np.eye(4, DIM, dtype=np.float32)[[2, 0]] + np.eye(4, DIM, dtype=np.float32)[[3, 1]] / 2
    for k in (10, 150):  # the k-th tie group cut by the first search's 2 k + 16 results (36), or not (316)
        _, ids = engine.search(torch.from_numpy(q), k)
        np.testing.assert_array_equal(ids.numpy(), np.array([[*range(200, 400)], [*range(200)]])[:, :k])
