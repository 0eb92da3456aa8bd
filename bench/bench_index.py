"""FAISS index benchmarks (CPU): build time and peak memory of each kind, search latency and recall@10 against
exact PyTorch search (``rdm_fast.retrieval.search.exact_search``, the baseline, timed in the same run).

Run ``pytest bench/bench_index.py --benchmark-only -s`` (recall, memory and build parameters go to each
benchmark's extra_info and are printed). Sizes come from the environment: RDM_BENCH_INDEX_N database vectors
(default 200000), RDM_BENCH_INDEX_DIM (512), RDM_BENCH_INDEX_Q queries per search batch (100).

Data (CLIP-like, stored as fp16 shards of uneven sizes): every vector mixes a shared direction (random pairs have
cosine ~0.45, like CLIP image embeddings), one of N/100 cluster directions (cluster mates ~0.75) and noise.
"planted" queries each have 30 near-duplicates at cosine 0.8-0.97 in the database; "fresh" queries are new
points of the same distribution, whose top 10 are tightly packed cluster mates (the harder case).

Each build runs in a child process (``python bench/bench_index.py --build KIND DIR``; its benchmark time
includes starting Python and importing torch and faiss, a few seconds, while extra_info "info.seconds" is the
build alone) that reports its own peak RSS (VmHWM of /proc/self/status: interpreter, libraries, and the
memory-mapped shard pages it touched, which the kernel can drop), its RSS after importing, and its peak
anonymous memory above that (RssAnon sampled every 20 ms: the index, training sample and buffers), next to the
computed ``estimate_memory`` of the same build. ``resource.getrusage`` is not used: a child's ru_maxrss on
Linux starts from its parent's resident size at fork (kept across exec), which here includes the benchmark's
own copy of the database.

Computed, not measured: expected build memory of the OpenImages database (20,927,907 x 512) with the default
ivfpq parameters (nlist 4096, m 64, nbits 8, training sample 262,144), from
``rdm_fast.retrieval.faiss_index.estimate_memory`` (``python bench/bench_index.py --estimate`` prints it):
PQ codes 1.25 GiB + int64 ids 0.16 GiB + up to 1.40 GiB of inverted-list growth slack + training sample and its
residuals 1.00 GiB (freed before adding) + L2 precomputed table 0.25 GiB + one 65,536-row chunk 0.31 GiB =
4.37 GiB at most, far below 24 GiB; the index file is about 1.4 GiB. The same database x 768: 6.40 GiB. A flat
index of it would need 40 GiB, HNSW 45 GiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script (build child, --estimate): import this checkout's rdm_fast
    sys.path.insert(0, str(ROOT))

pytest.importorskip("faiss")  # the GPU machines have no faiss
from rdm_fast.retrieval.faiss_index import FaissSearch, build_index, estimate_memory  # noqa: E402
from rdm_fast.retrieval.search import exact_search  # noqa: E402

N = int(os.environ.get("RDM_BENCH_INDEX_N", "200000"))
DIM = int(os.environ.get("RDM_BENCH_INDEX_DIM", "512"))
Q = int(os.environ.get("RDM_BENCH_INDEX_Q", "100"))
K = 10
KINDS = ("flat", "hnsw", "ivfpq")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_database(folder: Path, n: int = N, dim: int = DIM, n_queries: int = Q, seed: int = 0) -> None:
    """Write shards part_{i}.npy (fp16) and queries.npz (planted, fresh) into folder, shard by shard."""
    rng = np.random.default_rng(seed)
    shared = _unit(rng.standard_normal(dim))
    clusters = _unit(rng.standard_normal((max(1, n // 100), dim)))

    def points(count: int) -> np.ndarray:
        c = clusters[rng.integers(0, len(clusters), count)]
        noise = _unit(rng.standard_normal((count, dim)))
        return _unit(np.sqrt(0.45) * shared + np.sqrt(0.3) * c + np.sqrt(0.25) * noise)

    planted_q, fresh_q = points(n_queries), points(n_queries)
    a = rng.uniform(0.8, 0.97, (n_queries, 30, 1))
    u = rng.standard_normal((n_queries, 30, dim))
    u = _unit(u - np.einsum("qpd,qd->qp", u, planted_q)[..., None] * planted_q[:, None])
    near = (a * planted_q[:, None] + np.sqrt(1 - a**2) * u).reshape(-1, dim)
    slots = rng.choice(n, len(near), replace=False)
    bounds = [0, int(0.31 * n) + 7, int(0.77 * n) + 3, n]
    for i in range(3):
        lo, hi = bounds[i], bounds[i + 1]
        part = points(hi - lo) * rng.uniform(0.5, 2.0, (hi - lo, 1))
        inside = (slots >= lo) & (slots < hi)
        part[slots[inside] - lo] = near[inside]
        np.save(folder / f"part_{i}.npy", part.astype(np.float16))
    np.savez(folder / "queries.npz", planted=planted_q.astype(np.float32), fresh=fresh_q.astype(np.float32))


def load_shards(folder: Path) -> list[np.ndarray]:
    return [np.load(folder / f"part_{i}.npy", mmap_mode="r") for i in range(3)]


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, RssAnon), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {field}")


def child_build(kind: str, folder: Path) -> dict:
    """Build one index in this process; report the build info and its memory above the post-import RSS."""
    shards = load_shards(folder)
    import_rss, import_anon, peak = _status_kib("VmRSS"), _status_kib("RssAnon"), [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kib("RssAnon"))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    info = build_index(shards, kind, out=folder / f"{kind}.faiss", progress=False)
    stop.set()
    thread.join()
    n, dim = info["ntotal"], info["dim"]
    params = {key: info[key] for key in ("nlist", "m", "nbits", "M") if key in info}
    computed = estimate_memory(kind, n, dim, **params, train_size=info["train_size"] or None)["total"]
    return {"info": info, "rss_after_import_mib": import_rss / 1024,
            "peak_rss_mib": _status_kib("VmHWM") / 1024,
            "peak_anon_above_import_mib": (peak[0] - import_anon) / 1024, "computed_mib": computed / 2**20,
            "file_mib": (folder / f"{kind}.faiss").stat().st_size / 2**20}


def print_estimate() -> None:
    for dim in (512, 768):
        est = estimate_memory("ivfpq", 20_927_907, dim)
        parts = ", ".join(f"{key} {value / 2**30:.2f} GiB" for key, value in est.items())
        print(f"computed (not measured) ivfpq build memory, 20,927,907 x {dim}, default parameters: {parts}")


# --------------------------------------------------------------------------------------------- benchmarks
BUILDS: dict[str, dict] = {}  # build reports by kind, filled by test_build


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("index_bench")
    make_database(folder)
    shards = load_shards(folder)
    database = torch.from_numpy(np.concatenate([np.asarray(s) for s in shards]))
    queries = {key: torch.from_numpy(v) for key, v in np.load(folder / "queries.npz").items()}
    truth = {key: exact_search(q, database, K)[1].numpy() for key, q in queries.items()}
    return folder, shards, database, queries, truth


def _build(kind: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--build", kind, str(folder)], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    BUILDS[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    return BUILDS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_build(benchmark, data, kind):
    folder = data[0]
    benchmark.group = f"faiss build {N}x{DIM}"
    result = benchmark.pedantic(_build, args=(kind, folder), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(f"\n{kind} build: {json.dumps(result)}")


@pytest.mark.parametrize("impl", ("torch-exact", *KINDS))
def test_search(benchmark, data, impl):
    folder, shards, database, queries, truth = data
    benchmark.group = f"search {Q} queries k={K} over {N}x{DIM}"
    if impl == "torch-exact":
        def search(q):
            return exact_search(q, database, K)
    else:
        if impl not in BUILDS:
            _build(impl, folder)
        engine = FaissSearch.load(folder / f"{impl}.faiss", vectors=shards)

        def search(q):
            return engine.search(q, K)
    for key, q in queries.items():
        ids = search(q)[1].numpy()
        benchmark.extra_info[f"recall@{K}_{key}"] = float(np.mean(
            [len(set(a) & set(b)) / K for a, b in zip(ids, truth[key])]))
    benchmark(search, queries["fresh"])
    print(f"\n{impl}: {benchmark.extra_info}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:
        print(json.dumps(child_build(sys.argv[2], Path(sys.argv[3]))))
    elif sys.argv[1:] == ["--estimate"]:
        print_estimate()
    else:
        sys.exit("usage: bench_index.py --estimate | --build KIND DIR (benchmarks: pytest bench/bench_index.py)")
