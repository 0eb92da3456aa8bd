"""pytest-benchmark benchmarks of exact nearest-neighbour search (top-10 by inner product).

GPU (skips without CUDA): 64 fp16 queries against an N x 768 fp16 database resident on the GPU, the Triton
kernel (``rdm_fast.kernels.knn.topk_inner_product``; default split count and 2, 4, 16 splits per SM) against
``torch.topk(q @ db.T, 10)`` and against one read of the database (``db.amax()``, the memory-bound floor),
all in the same run and synchronised. N comes from
``RDM_BENCH_SEARCH_N`` (default 20,000,000, fewer when the GPU's free memory cannot hold the database and the
baseline's score matrix). ``extra_info`` holds the database bytes and the effective bandwidth (database bytes /
median time), and for the kernel the fraction of its ids that the torch baseline also returns.

CPU: the reference :func:`rdm_fast.retrieval.exact_search` against ``faiss.IndexFlatIP`` (when faiss imports)
on 100,000 x 512 fp32 with 256 queries. Read ratios within a group (``--benchmark-group-by=group``).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from rdm_fast.retrieval import exact_search

K = 10
GPU_QUERIES, GPU_DIM = 64, 768
CPU_N, CPU_DIM, CPU_QUERIES = 100_000, 512, 256

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None, reason="needs a CUDA GPU and triton"
)


def _gpu_rows() -> int:
    if os.environ.get("RDM_BENCH_SEARCH_N"):
        return int(os.environ["RDM_BENCH_SEARCH_N"])
    free = torch.cuda.mem_get_info()[0]
    per_row = GPU_DIM * 2 + 3 * GPU_QUERIES * 2  # the row, and the baseline's fp16 scores with topk temporaries
    return min(20_000_000, int(free * 0.8) // per_row // 1000 * 1000)


@pytest.fixture(scope="module")
def gpu_data():
    """(queries, database, torch baseline ids), unit-norm fp16 rows made on the GPU in 1M-row chunks."""
    n = _gpu_rows()
    gen = torch.Generator(device="cuda").manual_seed(0)
    db = torch.empty(n, GPU_DIM, dtype=torch.float16, device="cuda")
    for start in range(0, n, 1 << 20):
        block = torch.randn(min(1 << 20, n - start), GPU_DIM, device="cuda", generator=gen)
        db[start:start + block.shape[0]] = F.normalize(block, dim=1)
    queries = F.normalize(torch.randn(GPU_QUERIES, GPU_DIM, device="cuda", generator=gen), dim=1).half()
    baseline_ids = torch.topk(queries @ db.T, K).indices
    yield queries, db, baseline_ids
    del db
    torch.cuda.empty_cache()


def _record_bandwidth(benchmark, nbytes: int) -> None:
    benchmark.extra_info["db_bytes"] = nbytes
    if benchmark.stats is not None:  # absent under --benchmark-disable
        benchmark.extra_info["effective_GBps"] = round(nbytes / benchmark.stats.stats.median / 1e9, 1)


@needs_cuda
@pytest.mark.parametrize("impl", ["triton-exact", "triton-exact-splits2xSM", "triton-exact-splits4xSM",
                                  "triton-exact-splits16xSM", "torch-matmul-topk", "read-db-once"])
def test_search_gpu(benchmark, gpu_data, impl):
    """The kernel with its default split count (8 programs per SM) and others, the baselines."""
    queries, db, baseline_ids = gpu_data
    if impl.startswith("triton-exact"):
        from rdm_fast.kernels.knn import topk_inner_product

        splits = None
        if "splits" in impl:
            sms = torch.cuda.get_device_properties(db.device).multi_processor_count
            splits = int(impl.split("splits")[1].split("x")[0]) * sms

        def fn():
            return topk_inner_product(queries, db, K, num_splits=splits)
    elif impl == "torch-matmul-topk":
        def fn():
            return torch.topk(queries @ db.T, K)
    else:
        def fn():
            return db.amax()

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    out = run()  # compile and autotune outside the timed rounds
    if impl.startswith("triton-exact"):
        same = (out[1][:, :, None] == baseline_ids[:, None, :]).any(dim=2).float().mean().item()
        benchmark.extra_info["ids_also_in_torch_topk"] = round(same, 4)
    benchmark.group = f"search-gpu-top{K}-{GPU_QUERIES}q-{db.shape[0]}x{GPU_DIM}-fp16"
    benchmark.extra_info["rows"] = db.shape[0]
    benchmark(run)
    _record_bandwidth(benchmark, db.numel() * db.element_size())


@pytest.fixture(scope="module")
def cpu_data():
    gen = torch.Generator().manual_seed(0)
    db = F.normalize(torch.randn(CPU_N, CPU_DIM, generator=gen), dim=1)
    queries = F.normalize(torch.randn(CPU_QUERIES, CPU_DIM, generator=gen), dim=1)
    return queries, db


@pytest.mark.parametrize("impl", ["exact_search", "faiss-IndexFlatIP"])
def test_search_cpu(benchmark, cpu_data, impl):
    queries, db = cpu_data
    if impl == "exact_search":
        def fn():
            return exact_search(queries, db, K)
    else:
        faiss = pytest.importorskip("faiss")
        index = faiss.IndexFlatIP(CPU_DIM)
        index.add(db.numpy())
        q = queries.numpy()

        def fn():
            return index.search(q, K)
    benchmark.group = f"search-cpu-top{K}-{CPU_QUERIES}q-{CPU_N}x{CPU_DIM}-fp32"
    benchmark.pedantic(fn, rounds=2, iterations=1)  # seconds per call on a small CPU
    _record_bandwidth(benchmark, db.numel() * db.element_size())
