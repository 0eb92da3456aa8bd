"""FAISS nearest-neighbour indexes over an embedding database, searched by cosine similarity.

Three kinds (``INDEX_KINDS``), picked by size with ``choose_kind`` when the kind is "auto":

- ``flat``: exact search (IndexFlatIP over the L2-normalised vectors, fp32). Ties go to the lower id, like
  :func:`rdm_fast.retrieval.search.exact_search`.
- ``hnsw``: a graph index (IndexHNSWFlat, inner product) holding the fp32 vectors and the graph in RAM.
- ``ivfpq``: an inverted file of product-quantised codes (IndexIVFPQ, L2 on the normalised vectors, which ranks
  like cosine and lets k-means train the coarse cells with its own metric). Like the official ScaNN setup
  (partitions, search a fraction of them, quantised scoring, exact re-ranking), the candidates it returns are
  re-ranked with the exact vectors when :meth:`FaissSearch.load` is given the database shards.

Building streams the shards in row chunks and normalises each chunk on its own, so no full fp32 copy of the
database exists (20.9M x 512 would be 41 GB); only the index itself and the training sample are held in RAM.

Memory mapping in faiss 1.15.1 (checked on each kind: resident memory after ``read_index`` and the process's
file mappings): ``IO_FLAG_MMAP_IFC`` maps the flat vectors, the HNSW vector storage (its graph is still read into
RAM) and the IVF inverted lists (codes and ids); ``IO_FLAG_MMAP`` maps only IVF inverted lists, and the two
flags cannot be combined. :meth:`FaissSearch.load` therefore uses ``IO_FLAG_MMAP_IFC``. A memory-mapped HNSW or
flat index that is not in the page cache is slow to search (random disk reads): those kinds are meant to fit
in RAM.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .._files import atomic_write, not_a_file

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivfpq", "hnsw")

# choose_kind thresholds. flat: at most 512 MiB of fp32 vectors (262,144 x 512, 174,762 x 768), whose exact scan
# costs 0.27 GFLOP per query (milliseconds with BLAS) and needs no training. hnsw: while the fp32 vectors plus
# the graph stay under 8 GiB (a third of a 24 GiB machine, leaving room for the model and the page cache):
# 3,702,558 x 512 or 2,568,760 x 768 with M = 32, which covers ImageNet's 1.28M database. Beyond that
# (OpenImages, 20.9M): ivfpq, whose codes take 72 bytes per 512-d vector.
FLAT_MAX_BYTES = 512 * 2**20
HNSW_MAX_BYTES = 8 * 2**30

DEFAULT_CHUNK = 65536  # rows read, normalised and added per step (128 MiB of fp32 at 512-d)
HNSW_DEFAULTS = {"M": 32, "ef_construction": 80, "ef_search": 128}
IVFPQ_NBITS = 8
MIN_POINTS_PER_CENTROID = 39  # below this faiss's k-means warns that the centroids are poorly trained
MIN_NPROBE = 8  # IVF cells searched per query by default, whatever nlist / 20 gives (capped by nlist)
RERANK_MIN = 100  # ivfpq re-ranks max(RERANK_MIN, RERANK_FACTOR * k) PQ candidates with the exact vectors
RERANK_FACTOR = 10

_PARAMS = {"flat": {"chunk"}, "ivfpq": {"chunk", "nlist", "m", "nbits", "nprobe"},
           "hnsw": {"chunk", "M", "ef_construction", "ef_search"}}


def hnsw_bytes_per_vector(dim: int, M: int = HNSW_DEFAULTS["M"]) -> int:
    """RAM of one vector in an IndexHNSWFlat: fp32 vector, 2M level-0 links plus about one upper-level link
    list share (int32), offsets and level (16 bytes)."""
    return 4 * dim + 8 * M + 16


def choose_kind(n: int, dim: int) -> str:
    """The "auto" kind for ``n`` vectors of ``dim`` dimensions: "flat" while the fp32 vectors take at most
    FLAT_MAX_BYTES, "hnsw" while vectors plus graph take at most HNSW_MAX_BYTES, else "ivfpq"."""
    if n < 1 or dim < 1:
        raise ValueError(f"need at least one vector of at least one dimension, got n={n}, dim={dim}")
    if 4 * n * dim <= FLAT_MAX_BYTES:
        return "flat"
    if n * hnsw_bytes_per_vector(dim) <= HNSW_MAX_BYTES:
        return "hnsw"
    return "ivfpq"


# ----------------------------------------------------------------------------------------------- parameters
def _int_param(params: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"index parameter {name} must be an integer {bound}, got {value!r}")
    return int(value)


def _pow2_at_most(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(x, 1))))


def _default_m(dim: int) -> int:
    """Largest divisor of dim that gives sub-vectors of at least 8 dimensions (8 for 512-d: m = 64)."""
    return max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)


def _ivfpq_params(n: int, dim: int, params: dict, train_size: int | None) -> dict:
    """Resolve nlist, m, nbits, nprobe and the training sample size of an IVF-PQ index over n vectors."""
    forced_nlist = _int_param(params, "nlist", 1)
    nbits = _int_param(params, "nbits", 1, 16) or IVFPQ_NBITS
    m = _int_param(params, "m", 1)
    if m is None:
        m = _default_m(dim)
    elif dim % m:
        raise ValueError(f"PQ m={m} does not divide the dimension {dim}; pick a divisor of {dim} "
                         f"(default {_default_m(dim)})")
    # about sqrt(N) cells like the official ScaNN tree (4096 for 20.9M)
    nlist = forced_nlist or 1 << max(0, round(math.log2(math.sqrt(n))))
    t = min(n, train_size if train_size is not None else max(64 * nlist, 16384))
    if nlist * MIN_POINTS_PER_CENTROID > t and nlist > 1:  # one cell is the fewest: said "using nlist=1" for 1
        smaller = max(1, t // MIN_POINTS_PER_CENTROID)
        smaller = smaller if forced_nlist else _pow2_at_most(smaller)
        log.warning("ivfpq: %d training vectors are too few for nlist=%d (%d per cell wanted); using nlist=%d",
                    t, nlist, MIN_POINTS_PER_CENTROID, smaller)
        nlist = smaller
    if t < 1 << nbits:
        raise ValueError(f"ivfpq needs at least {1 << nbits} training vectors for {nbits}-bit PQ codebooks, got "
                         f"{t}; use kind 'flat' (db index --kind flat) or more vectors")
    if t < MIN_POINTS_PER_CENTROID << nbits:
        log.warning("ivfpq: %d training vectors give poorly trained %d-bit PQ codebooks (%d wanted)", t, nbits,
                    MIN_POINTS_PER_CENTROID << nbits)
    # ScaNN searches 1/20 of the cells; at least MIN_NPROBE (of a small database's few cells, 1 in 8 lost 30 % of
    # the exact neighbours)
    nprobe = _int_param(params, "nprobe", 1) or max(MIN_NPROBE, math.ceil(nlist / 20))
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nprobe, nlist), "train_size": t}


def estimate_memory(kind: str, n: int, dim: int, **params: Any) -> dict[str, int]:
    """Computed (not measured) peak RAM of building an index of n x dim vectors, in bytes, by component, with
    "total". ``params``: as for :func:`build_index`, plus ``train_size``.

    ivfpq: PQ codes (m bytes per vector at 8 bits) and int64 ids, counted twice for the growth of the inverted
    lists while adding; the fp32 training sample plus its residual copy; the L2 precomputed table
    (nlist x m x 2^nbits floats); one chunk of fp16 input, fp32 vectors and fp32 residuals. flat and hnsw: the
    vectors (and graph), one chunk, and the growth of faiss's vector storage: it is reallocated by doubling as
    chunks are added, so while the last copy is made it holds up to three times the vectors (1.7x measured at
    1M x 512).
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(INDEX_KINDS)}")
    chunk = _int_param(params, "chunk", 1) or DEFAULT_CHUNK
    p = _ivfpq_params(n, dim, params, params.get("train_size")) if kind == "ivfpq" else params
    return _memory(kind, n, dim, chunk, p)


def _memory(kind: str, n: int, dim: int, chunk: int, p: dict) -> dict[str, int]:
    out = {"chunk": chunk * dim * (2 + 4 + 4)}
    if kind == "flat":
        out["vectors"] = 4 * n * dim
    elif kind == "hnsw":
        out["vectors_and_graph"] = n * hnsw_bytes_per_vector(dim, p.get("M") or HNSW_DEFAULTS["M"])
    if kind in ("flat", "hnsw"):
        out["storage_growth"] = 2 * 4 * n * dim  # the old and the doubled buffer during a reallocation
    else:
        code = math.ceil(p["m"] * p["nbits"] / 8)
        out.update(codes=n * code, ids=8 * n, list_growth=n * (code + 8), training=2 * 4 * p["train_size"] * dim,
                   precomputed_table=(4 * p["nlist"] * p["m"]) << p["nbits"])
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------------------- reading
def _check_shards(shards: Sequence[Any]) -> tuple[int, np.ndarray]:
    """(dim, row offsets of the shards with the total last) after checking they are float (n_i, D) arrays."""
    shards = list(shards)
    if not shards:
        raise ValueError("no database shards given")
    dims = set()
    for i, s in enumerate(shards):
        shape, dtype = getattr(s, "shape", None), getattr(s, "dtype", None)
        if shape is None or len(shape) != 2 or dtype is None or not np.issubdtype(dtype, np.floating):
            raise ValueError(f"shard {i} must be a float (n, D) array, got {dtype} of shape {shape}")
        dims.add(int(shape[1]))
    if len(dims) != 1:
        raise ValueError(f"the shards have different dimensions: {sorted(dims)}")
    offsets = np.concatenate([[0], np.cumsum([int(s.shape[0]) for s in shards])]).astype(np.int64)
    if offsets[-1] == 0:
        raise ValueError("the database shards hold no vectors")
    return dims.pop(), offsets


def _normalise(rows: Any) -> np.ndarray:
    """C-contiguous fp32 rows scaled to unit L2 norm with the same op as the exact torch search."""
    return F.normalize(torch.from_numpy(np.asarray(rows, dtype=np.float32)), dim=1).numpy()


def _chunks(shards: Sequence[Any], chunk: int) -> Iterator[np.ndarray]:
    for s in shards:
        for start in range(0, int(s.shape[0]), chunk):
            yield _normalise(s[start:start + chunk])


def _gather(shards: Sequence[Any], offsets: np.ndarray, ids: np.ndarray, chunk: int) -> np.ndarray:
    """Normalised fp32 rows at sorted global ``ids``, read shard by shard at most ``chunk`` rows at a time."""
    out = np.empty((len(ids), int(shards[0].shape[1])), dtype=np.float32)
    which = np.searchsorted(offsets, ids, side="right") - 1
    for s in np.unique(which):
        pos = np.flatnonzero(which == s)
        local = ids[pos] - offsets[s]
        for b in range(0, len(pos), chunk):
            out[pos[b:b + chunk]] = _normalise(shards[s][local[b:b + chunk]])
    return out


def _physical_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------------ building
def build_index(shards: Sequence[np.ndarray], kind: str = "auto", *, out: str | Path, train_size: int | None = None,
                seed: int = 0, progress: bool = True, **params: Any) -> dict:
    """Build a FAISS index over the database ``shards`` ((n_i, D) arrays in id order; ids are global row
    numbers) and write it atomically to ``out``. Returns the info dict to store in the database manifest.

    ``kind``: "auto" (:func:`choose_kind`) or one of INDEX_KINDS. ``train_size``: vectors sampled (seeded,
    without replacement, across all shards) to train an ivfpq index (default max(64 nlist, 16384), at most N).
    ``params`` override the defaults: ``chunk`` (rows added per step, 65536); ivfpq ``nlist`` (the power of two
    nearest sqrt(N)), ``m`` (PQ sub-quantizers; the largest divisor of D with >= 8 dims each, 64 for 512-d),
    ``nbits`` (8), ``nprobe`` (nlist / 20, rounded up, stored in the index); hnsw ``M`` (32),
    ``ef_construction`` (80), ``ef_search`` (128, stored in the index).
    """
    t0 = time.perf_counter()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):  # 1.5: a SWIG TypeError, "1": '<='
        raise TypeError(f"seed (--seed) must be an int, got {seed!r}")
    if not 0 <= seed < 2**31 - 1:  # FAISS keeps seed and seed + 1 as C ints
        raise ValueError(f"seed (--seed) must be in [0, 2**31 - 1), got {seed}")
    dim, offsets = _check_shards(shards)
    shards, n = list(shards), int(offsets[-1])
    if kind == "auto":
        kind = choose_kind(n, dim)
    elif kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected auto or one of {', '.join(INDEX_KINDS)}")
    unknown = set(params) - _PARAMS[kind]
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(sorted(unknown))} for a {kind} index; accepted: "
                         f"{', '.join(sorted(_PARAMS[kind]))}")
    if train_size is not None and (isinstance(train_size, bool) or not isinstance(train_size, (int, np.integer))
                                   or train_size < 1):
        raise ValueError(f"train_size must be a positive integer, got {train_size!r}")
    chunk = _int_param(params, "chunk", 1) or DEFAULT_CHUNK
    info: dict[str, Any] = {"kind": kind, "metric": "cosine", "dim": dim, "ntotal": n,
                            "faiss_version": faiss.__version__}
    if kind == "flat":
        p = {"train_size": 0}
    elif kind == "hnsw":
        p = {key: _int_param(params, key, low) or HNSW_DEFAULTS[key]
             for key, low in (("M", 2), ("ef_construction", 1), ("ef_search", 1))}
        p["train_size"] = 0
    else:
        p = _ivfpq_params(n, dim, params, train_size)
    need, ram = _memory(kind, n, dim, chunk, p)["total"], _physical_ram()
    if ram is not None and need > ram:
        raise ValueError(f"a {kind} index of {n} x {dim} vectors needs about {need / 2**30:.1f} GiB of RAM to build, "
                         f"more than this machine's {ram / 2**30:.1f} GiB; use kind='ivfpq'")
    info.update(p)

    train_seconds = 0.0
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = p["ef_construction"], p["ef_search"]
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, p["nlist"], p["m"], p["nbits"])
        index.nprobe = p["nprobe"]
        index.cp.seed, index.pq.cp.seed = seed, seed + 1
        index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1  # warned above instead
        rng = np.random.default_rng(seed)
        sample_ids = np.sort(rng.choice(n, size=p["train_size"], replace=False))
        sample = _gather(shards, offsets, sample_ids, chunk)
        log.info("ivfpq: training nlist=%d, m=%d, nbits=%d on %d vectors", p["nlist"], p["m"], p["nbits"],
                 len(sample))
        t1 = time.perf_counter()
        index.train(sample)
        train_seconds = time.perf_counter() - t1
        del sample
    t1 = time.perf_counter()
    with tqdm(total=n, desc=f"faiss {kind}", unit="vec", unit_scale=True, disable=not progress) as bar:
        for x in _chunks(shards, chunk):
            index.add(x)
            bar.update(len(x))
    info.update(train_seconds=round(train_seconds, 3), add_seconds=round(time.perf_counter() - t1, 3))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: faiss.write_index(index, tmp), fsync=True)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return info


# ------------------------------------------------------------------------------------------------ searching
def _kind_of(index: faiss.Index) -> str | None:
    if isinstance(index, faiss.IndexFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT:
        return "flat"
    if isinstance(index, faiss.IndexHNSWFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT:
        return "hnsw"
    if isinstance(index, faiss.IndexIVFPQ) and index.metric_type == faiss.METRIC_L2:
        return "ivfpq"
    return None


def _best_first(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best by score, equal scores by lower id, missing results (id -1) last with -inf."""
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


class FaissSearch:
    """Top-k cosine search with an index written by :func:`build_index` (``name`` "faiss-<kind>")."""

    def __init__(self, index: faiss.Index, kind: str, *, vectors: Sequence[np.ndarray] | None = None,
                 nprobe: int | None = None, ef_search: int | None = None, rerank: int | None = None) -> None:
        self.index, self.kind, self.name = index, kind, f"faiss-{kind}"
        self.ntotal, self.dim = int(index.ntotal), int(index.d)
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search), ("rerank", rerank)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        ivf, hnsw = cast(faiss.IndexIVF, index), cast(faiss.IndexHNSW, index)  # the type ``kind`` names (_kind_of)
        self.nprobe = min(nprobe or ivf.nprobe, ivf.nlist) if kind == "ivfpq" else None
        self.ef_search = (ef_search or hnsw.hnsw.efSearch) if kind == "hnsw" else None
        self.rerank = rerank
        self.vectors, self._offsets = None, None
        if vectors is not None:  # the database's: an index of another database (or size) is refused
            dim, offsets = _check_shards(vectors)
            if dim != self.dim or offsets[-1] != self.ntotal:
                raise ValueError(f"the database holds {offsets[-1]} x {dim} vectors, but the index holds "
                                 f"{self.ntotal} x {self.dim}: rebuild the index for this database")
            if kind == "ivfpq":  # re-ranked exactly against them
                self.vectors, self._offsets = list(vectors), offsets
        elif kind == "ivfpq":
            log.warning("ivfpq index loaded without the database vectors: scores and ranking come from the PQ "
                        "codes (lower recall); pass vectors= to re-rank candidates exactly")
        self._gpu: tuple[Any, Any] | None = None

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = True, nprobe: int | None = None, ef_search: int | None = None,
             vectors: Sequence[np.ndarray] | None = None, rerank: int | None = None) -> FaissSearch:
        """Open an index file. ``mmap`` maps it instead of reading it into RAM (IO_FLAG_MMAP_IFC; see the
        module notes). ``nprobe`` / ``ef_search`` override the defaults stored at build time. ``vectors``: the
        database shards, with which ivfpq re-ranks ``rerank`` candidates (default max(100, 10 k)) exactly."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FAISS index {path} {not_a_file(path)}")
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        except RuntimeError as e:
            detail = str(e).strip().splitlines()[0].split("Error: ")[-1].split(" at /")[0][:160]
            raise ValueError(f"{path} is not a readable FAISS index (truncated or corrupt file: {detail})") from None
        kind = _kind_of(index)
        if kind is None:
            raise ValueError(f"{path} holds a {type(index).__name__} (metric {index.metric_type}), not an index "
                             "written by rdm_fast build_index")
        return cls(index, kind, vectors=vectors, nprobe=nprobe, ef_search=ef_search, rerank=rerank)

    def _search_index(self, q: np.ndarray, k: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        index = self._gpu_index(device) if device.type == "cuda" else None
        if index is not None and k <= 2048:  # faiss GPU indexes return at most 2048 results
            return index.search(q, k)
        if self.kind == "ivfpq":
            assert self.nprobe is not None  # set for ivfpq
            ivf_params = faiss.SearchParametersIVF()
            ivf_params.nprobe = self.nprobe
            return self.index.search(q, k, params=ivf_params)
        if self.kind == "hnsw":
            assert self.ef_search is not None  # set for hnsw
            hnsw_params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from faiss's stub
            hnsw_params.efSearch = max(self.ef_search, k)
            return self.index.search(q, k, params=hnsw_params)
        return self.index.search(q, k)

    def _gpu_index(self, device: torch.device) -> Any:
        """The index copied to the queries' CUDA device (flat and ivfpq; faiss has no GPU HNSW) when the
        installed faiss has GPU support; None otherwise or when the copy fails."""
        if self.kind == "hnsw" or faiss.get_num_gpus() < 1:
            return None
        if self._gpu is None:
            try:
                res = faiss.StandardGpuResources()
                ordinal = device.index if device.index is not None else torch.cuda.current_device()
                options = faiss.GpuClonerOptions()
                # fp16 PQ lookup tables let large m fit in shared memory; re-ranking restores exact scores.
                # flat stays fp32 so that its scores and ties stay exact.
                options.useFloat16 = self.kind == "ivfpq"
                gpu = faiss.index_cpu_to_gpu(res, ordinal, self.index, options)
                if self.kind == "ivfpq":
                    assert self.nprobe is not None  # set for ivfpq
                    faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", self.nprobe)
                self._gpu = (res, gpu)
            except (RuntimeError, AttributeError) as e:
                log.warning("cannot move the %s index to the GPU (%s); searching on the CPU", self.kind,
                            str(e).strip().splitlines()[0][:160])
                self._gpu = (None, None)
        return self._gpu[1]

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine scores of the candidate ids from the fp16 shards, then the k best."""
        uniq = np.unique(cand[cand >= 0])
        if len(uniq) == 0:
            return _best_first(np.zeros(cand.shape, np.float32), cand, k)
        assert self.vectors is not None and self._offsets is not None  # search re-ranks only with the vectors
        rows = torch.from_numpy(_gather(self.vectors, self._offsets, uniq, DEFAULT_CHUNK))
        pos = torch.from_numpy(np.searchsorted(uniq, np.maximum(cand, 0)))
        qt, scores = torch.from_numpy(q), np.empty(cand.shape, dtype=np.float32)
        step = max(1, 2**24 // (cand.shape[1] * self.dim))  # queries per block: at most 64 MiB of gathered rows
        for a in range(0, len(q), step):
            scores[a:a + step] = torch.bmm(rows[pos[a:a + step]], qt[a:a + step, :, None])[:, :, 0].numpy()
        return _best_first(scores, cand, k)

    def _flat_search(self, q: np.ndarray, k: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k with equal scores by lower id. faiss keeps an arbitrary subset of a tie group cut by the
        k-th place, so each query retrieves more results until one of them scores strictly below its k-th."""
        scores, ids = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        pending, kk = np.arange(len(q)), min(self.ntotal, 2 * k + 16)
        while len(pending):
            dist, cand = self._search_index(q[pending], kk, device)
            s, i = _best_first(dist, cand, k)
            done = (dist[:, -1] < s[:, -1]) | (kk == self.ntotal)
            scores[pending[done]], ids[pending[done]] = s[done], i[done]
            pending, kk = pending[~done], min(self.ntotal, 4 * kk)
        return scores, ids

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(scores float32 (Q, k), ids int64 (Q, k)) of the k most cosine-similar database rows per query, best
        first, on the queries' device. Queries are L2-normalised here. Results an approximate index cannot fill
        get id -1 and score -inf."""
        if not isinstance(queries, Tensor) or queries.dim() != 2:
            raise ValueError(f"queries must be a (Q, D) tensor, got {getattr(queries, 'shape', type(queries))}")
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have {queries.shape[1]} dimensions but the index {self.dim}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be between 1 and the index size {self.ntotal}, got {k!r}")
        device = queries.device
        q = F.normalize(queries.detach().float(), dim=1).cpu().numpy()
        if len(q) == 0:
            return (torch.empty((0, k), dtype=torch.float32, device=device),
                    torch.empty((0, k), dtype=torch.int64, device=device))
        if self.kind == "ivfpq" and self.vectors is not None:
            r = min(self.ntotal, max(k, self.rerank or max(RERANK_MIN, RERANK_FACTOR * k)))
            _, cand = self._search_index(q, r, device)
            scores, ids = self._rerank(q, cand, k)
        elif self.kind == "ivfpq":
            dist, cand = self._search_index(q, k, device)
            scores, ids = _best_first(1 - dist / 2, cand, k)  # |q - x|^2 = 2 - 2 cos for unit vectors
        elif self.kind == "flat":
            scores, ids = self._flat_search(q, k, device)
        else:
            scores, ids = _best_first(*self._search_index(q, k, device), k)
        return torch.from_numpy(scores).to(device), torch.from_numpy(ids).to(device)
