"""Exact GPU search: the Triton top-k kernel (``rdm_fast.kernels.knn``) and ``GPUExactSearch``.

Every case is compared with an independent brute force: float64 numpy scores of the same (already rounded)
inputs, fully ordered with ``np.lexsort`` by (score descending, id ascending). The data make every fp32 score
exact (small-integer vectors scaled by a power of two, or unit vectors with four entries of +-1/2), so ids must
match exactly, and the data are full of exact ties (few distinct values, plus planted duplicate rows) that
check the lower-id tie breaking. Random-float cases only require rank-wise scores within 2e-6 * D (fp32
accumulation order) and every returned id to carry its returned score.

As in test_triton_group_norm.py, the interpreter cases (TRITON_INTERPRET=1, float32/float16) run in a child
process started once by a module fixture (this file run as a script prints JSON). CUDA cases (compiled
kernel, float16/bfloat16/float32: the shape sweep with one tile configuration, every configuration on two
cases, the autotuned kernel through GPUExactSearch; no host synchronisation) run in process and skip without
a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rdm_fast.retrieval.gpu_search import GPUExactSearch
from rdm_fast.retrieval.search import exact_search

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")

RANDOM_TOL_PER_DIM = 2e-6


# ---------------------------------------------------------------------------------------------- data and oracle

def int_data(q: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and rows with entries in {-3/4, ..., 3/4} (exact in fp16/bf16, exact fp32 dot products) and
    duplicated rows (exact ties at distant ids)."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randint(-3, 4, (q, d), generator=gen) / 4
    rows = torch.randint(-3, 4, (n, d), generator=gen) / 4
    _plant_duplicates(rows, gen)
    return queries, rows


def unit_data(q: int, n: int, d: int, seed: int, scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors with exactly four entries of +-1 (norm 2, so L2-normalising gives exact +-1/2 entries and scores
    in multiples of 1/4: ties everywhere), plus duplicated rows. ``scale``: rows also get random positive
    scales (normalisation must remove them)."""
    gen = torch.Generator().manual_seed(seed)

    def sample(m: int) -> torch.Tensor:
        x = torch.zeros(m, d)
        pos = torch.rand(m, d, generator=gen).argsort(dim=1)[:, :4]
        x.scatter_(1, pos, torch.randint(0, 2, (m, 4), generator=gen).float() * 2 - 1)
        return x

    queries, rows = sample(q), sample(n)
    _plant_duplicates(rows, gen)
    if scale:
        rows *= torch.exp2(torch.randint(-4, 5, (n, 1), generator=gen).float())
    return queries, rows


def _plant_duplicates(rows: torch.Tensor, gen: torch.Generator) -> None:
    n = rows.shape[0]
    if n < 2:
        return
    src = torch.randint(0, n, (max(1, n // 8),), generator=gen)
    dst = torch.randint(0, n, (src.numel(),), generator=gen)
    rows[dst] = rows[src]


def brute_force(queries: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores float64, ids) of the k best rows per query by (score descending, id ascending)."""
    scores = queries.double().numpy() @ rows.double().numpy().T
    ids = np.arange(rows.shape[0])
    order = np.stack([np.lexsort((ids, -row))[:k] for row in scores]) if len(scores) else np.zeros((0, k), int)
    return np.take_along_axis(scores, order, 1), order


def normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.double().norm(dim=1, keepdim=True).clamp_min(1e-12).to(x.dtype)


def mismatch(scores: torch.Tensor, ids: torch.Tensor, queries: torch.Tensor, rows: torch.Tensor, k: int,
             exact: bool = True) -> str | None:
    """None when (scores, ids) is the exact top-k of the brute force, else a description."""
    if scores.dtype != torch.float32 or ids.dtype != torch.int64:
        return f"dtypes: got {scores.dtype} and {ids.dtype}, expected float32 and int64"
    if tuple(scores.shape) != (queries.shape[0], k) or tuple(ids.shape) != (queries.shape[0], k):
        return f"shapes: got {tuple(scores.shape)} and {tuple(ids.shape)}, expected ({queries.shape[0]}, {k})"
    ref_scores, ref_ids = brute_force(queries, rows, k)
    got_scores, got_ids = scores.cpu().double().numpy(), ids.cpu().numpy()
    if exact:
        if not np.array_equal(got_ids, ref_ids):
            bad = np.argwhere(got_ids != ref_ids)[0]
            return f"ids differ first at {tuple(bad)}: got {got_ids[bad[0]]}, expected {ref_ids[bad[0]]}"
        if not np.array_equal(got_scores, ref_scores):
            return f"scores differ, max abs diff {np.abs(got_scores - ref_scores).max():.3g} (exact data)"
        return None
    tol = RANDOM_TOL_PER_DIM * queries.shape[1]
    if np.abs(got_scores - ref_scores).max() > tol:
        return f"rank-wise scores differ by {np.abs(got_scores - ref_scores).max():.3g} > {tol:.3g}"
    if any(len(set(row)) != k for row in got_ids):
        return "repeated ids in a row"
    true = np.take_along_axis(queries.double().numpy() @ rows.double().numpy().T, got_ids, 1)
    if np.abs(true - got_scores).max() > tol:
        return f"returned ids do not carry their scores (max diff {np.abs(true - got_scores).max():.3g})"
    return None


# ----------------------------------------------------------------------------- Triton interpreter (child process)

# name -> (Q, N, D, k, dtype, num_splits or None, data kind)
KERNEL_CASES = {
    "q1-n1-d3-k1-float32": (1, 1, 3, 1, "float32", None, "int"),
    "q5-n7-d3-k7-float16": (5, 7, 3, 7, "float16", None, "int"),  # k == N
    "q5-n300-d64-k10-float32-3splits": (5, 300, 64, 10, "float32", 3, "int"),
    "q5-n300-d64-k10-float16-unit": (5, 300, 64, 10, "float16", None, "unit"),
    "q33-n1000-d100-k16-float16": (33, 1000, 100, 16, "float16", None, "int"),
    "q33-n1000-d100-k4-float32-unit": (33, 1000, 100, 4, "float32", None, "unit"),
    "q70-n333-d64-k4-float16-unit-2qblocks": (70, 333, 64, 4, "float16", 2, "unit"),
    "q1-n300-d64-k1-float16-10splits": (1, 300, 64, 1, "float16", 10, "unit"),
    "q4-n200-d64-k64-float32": (4, 200, 64, 64, "float32", 2, "int"),  # the largest k
    "q3-n45-d16-k33-float16-unit": (3, 45, 16, 33, "float16", None, "unit"),
    "q5-n300-d100-k10-float32-random": (5, 300, 100, 10, "float32", None, "random"),
    # queries the first 64 columns of a (5, 80) tensor: row stride 80, the database's 64
    "q5-n300-d64-k10-float32-3splits-query-view": (5, 300, 64, 10, "float32", 3, "int-query-view"),
}


def kernel_inputs(case: tuple, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    q, n, d, _, dtype, _, kind = case
    if kind.startswith("int"):
        queries, rows = int_data(q, n, d, seed=n + d)
    elif kind == "unit":
        queries, rows = (normalized(t) for t in unit_data(q, n, d, seed=n + d))
    else:
        gen = torch.Generator().manual_seed(n)
        queries, rows = torch.randn(q, d, generator=gen), torch.randn(n, d, generator=gen)
    dt = getattr(torch, dtype)
    queries, rows = queries.to(dt).to(device), rows.to(dt).to(device)
    if kind.endswith("query-view"):  # read in place: the kernel gets the queries' own row stride
        queries = torch.cat([queries, torch.full((q, 16), 3.0, dtype=dt, device=device)], dim=1)[:, :d]
    return queries, rows


def run_kernel_case(case: tuple, device: str = "cpu", config_index: int | None = None) -> str | None:
    """None when the kernel matches the brute force on ``case``; ``config_index``: that entry of CONFIGS
    instead of the autotuned choice."""
    from rdm_fast.kernels.knn import CONFIGS, topk_inner_product

    queries, rows = kernel_inputs(case, device)
    k, splits, kind = case[3], case[5], case[6]
    config = None if config_index is None else CONFIGS[config_index]
    scores, ids = topk_inner_product(queries, rows, k, num_splits=splits, config=config)
    if scores.device != queries.device or ids.device != queries.device:
        return f"results on {scores.device}/{ids.device}, expected {queries.device}"
    return mismatch(scores, ids, queries.cpu(), rows.cpu(), k, exact=kind != "random")


def run_class_interpreter_case() -> str | None:
    """GPUExactSearch on two CPU shards with RDM_FAST_OPS=fast: the kernel must run (in the interpreter)."""
    from rdm_fast.kernels import knn

    calls = []
    original = knn.topk_inner_product

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    knn.topk_inner_product = counting
    try:
        queries, rows = unit_data(6, 150, 32, seed=3)
        index = GPUExactSearch(rows.numpy(), devices=["cpu", "cpu"], dtype=torch.float32)
        scores, ids = index.search(queries, 8)
    finally:
        knn.topk_inner_product = original
    if len(calls) != 2:
        return f"expected the kernel to run once per shard, it ran {len(calls)} times"
    return mismatch(scores, ids, normalized(queries), normalized(rows), 8)


def _child_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    assert os.environ.get("RDM_FAST_OPS") == "fast", "run with RDM_FAST_OPS=fast"
    results = {name: run_kernel_case(case) for name, case in KERNEL_CASES.items()}
    results["explicit-config"] = run_kernel_case(KERNEL_CASES["q5-n300-d64-k10-float16-unit"], config_index=0)
    results["class-two-cpu-shards"] = run_class_interpreter_case()
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory) -> dict[str, str | None]:
    from triton_testing import run_child

    return run_child(Path(__file__).resolve(), tmp_path_factory.mktemp("knn"), timeout=600, RDM_FAST_OPS="fast")


@needs_triton
@pytest.mark.parametrize("name", [*KERNEL_CASES, "explicit-config", "class-two-cpu-shards"])
def test_triton_interpreter_matches_brute_force(interpreter_results, name):
    assert name in interpreter_results
    assert interpreter_results[name] is None, interpreter_results[name]


# ------------------------------------------------------------------------------------------ candidate merge order

@needs_triton
def test_merge_candidates_orders_by_score_then_id():
    from rdm_fast.kernels.knn import merge_candidates

    scores = torch.tensor([[0.5, -0.0, 0.5, 0.0, -1.0, float("-inf"), 0.5, 2.0]])
    ids = torch.tensor([[9, 2**31 - 2, 4, 3, 0, 2**31 - 1, 2**31 - 3, 7]])
    order = merge_candidates(scores, ids, 8)[0].tolist()
    # 2.0; the three 0.5 by id; -0.0 and 0.0 are equal: id 3 first; then -1; the empty slot (-inf) last
    assert ids[0, order].tolist() == [7, 4, 9, 2**31 - 3, 3, 2**31 - 2, 0, 2**31 - 1]


@needs_triton
def test_merge_candidates_ties_negative_zero_by_lower_id():
    """-0.0 equals 0.0 also when it carries the lower id: that candidate comes first."""
    from rdm_fast.kernels.knn import merge_candidates

    scores, ids = torch.tensor([[0.0, -0.0]]), torch.tensor([[5, 2]])
    assert ids[0, merge_candidates(scores, ids, 2)[0]].tolist() == [2, 5]


# -------------------------------------------------------------------------------------- GPUExactSearch on the CPU

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shards", [1, 3])
def test_cpu_search_matches_brute_force(dtype, shards):
    queries, rows = unit_data(9, 500, 32, seed=1, scale=True)
    index = GPUExactSearch(rows, devices=["cpu"] * shards, dtype=dtype)
    assert len(index) == 500 and index.dim == 32 and len(index.devices) == shards
    scores, ids = index.search(queries, 12)
    assert scores.device.type == "cpu" and ids.device.type == "cpu"
    err = mismatch(scores, ids, normalized(queries), normalized(rows), 12)
    assert err is None, err


def test_shard_merge_breaks_ties_across_boundaries_by_lower_id():
    queries, rows = unit_data(7, 60, 16, seed=2)
    # the same row at both ends of every shard boundary (shards [0, 20), [20, 40), [40, 60))
    for i, j in [(19, 20), (39, 40), (5, 45), (25, 59)]:
        rows[j] = rows[i]
    queries[:4] = rows[[19, 39, 5, 25]]  # each query's best score is an exact tie across shards
    single = GPUExactSearch(rows, devices=["cpu"], dtype=torch.float32).search(queries, 10)
    split = GPUExactSearch(rows, devices=["cpu"] * 3, dtype=torch.float32).search(queries, 10)
    assert torch.equal(split[1], single[1]) and torch.equal(split[0], single[0])
    for i, (a, b) in enumerate([(19, 20), (39, 40), (5, 45), (25, 59)]):
        copies = (rows == rows[a]).all(dim=1).nonzero().flatten().tolist()  # includes a, b (maybe more)
        assert a in copies and b in copies and split[1][i, :len(copies)].tolist() == copies
    err = mismatch(*split, normalized(queries), normalized(rows), 10)
    assert err is None, err


def test_more_shards_than_rows_and_k_equal_to_n():
    queries, rows = unit_data(3, 5, 16, seed=4)
    index = GPUExactSearch(rows, devices=["cpu"] * 8, dtype=torch.float32)
    assert len(index.devices) == 5  # empty shards are dropped
    err = mismatch(*index.search(queries, 5), normalized(queries), normalized(rows), 5)
    assert err is None, err


def test_normalisation_matches_cosine_reference():
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(400, 48, generator=gen) * torch.rand(400, 1, generator=gen) * 100
    queries = torch.randn(6, 48, generator=gen) * 7
    ref_scores, ref_ids = exact_search(queries, rows, 10)
    scores, ids = GPUExactSearch(rows, devices=["cpu", "cpu"], dtype=torch.float32).search(queries, 10)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=0)
    # a stored row queried with itself scores 1 (its norm was removed)
    self_scores, self_ids = GPUExactSearch(rows, devices=["cpu"], dtype=torch.float32).search(rows[:5], 1)
    assert self_ids[:, 0].tolist() == list(range(5))
    torch.testing.assert_close(self_scores[:, 0], torch.ones(5), atol=1e-6, rtol=0)


def test_normalize_false_keeps_unit_rows():
    queries, rows = (normalized(t) for t in unit_data(5, 100, 16, seed=6))
    a = GPUExactSearch(rows, devices=["cpu"], dtype=torch.float32, normalize=False).search(queries, 7)
    b = GPUExactSearch(rows, devices=["cpu"], dtype=torch.float32).search(queries, 7)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_memmap_input_streams_in_chunks(tmp_path):
    queries, rows = unit_data(4, 90, 16, seed=7, scale=True)
    path = tmp_path / "emb.npy"
    np.save(path, rows.numpy().astype(np.float16))
    mm = np.load(path, mmap_mode="r")
    assert not mm.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about non-writable numpy arrays
        index = GPUExactSearch(mm, devices=["cpu", "cpu"], chunk_rows=7)
        scores, ids = index.search(queries, 6)
    err = mismatch(scores, ids, normalized(queries), normalized(rows), 6)  # powers of two: exact in fp16
    assert err is None, err


def test_parts_are_one_database(tmp_path):
    queries, rows = unit_data(5, 100, 16, seed=13, scale=True)
    files = []
    for i, (a, b) in enumerate([(0, 30), (30, 33), (33, 80)]):
        np.save(tmp_path / f"part_{i}.npy", rows[a:b].numpy().astype(np.float16))
        files.append(np.load(tmp_path / f"part_{i}.npy", mmap_mode="r"))
    parts = [*files, rows[80:]]  # memory maps and a tensor; shard and chunk bounds cross the part bounds
    index = GPUExactSearch(parts, devices=["cpu"] * 3, chunk_rows=4)
    assert len(index) == 100
    err = mismatch(*index.search(queries, 9), normalized(queries), normalized(rows), 9)
    assert err is None, err


def test_query_dtypes_and_empty_batch():
    queries, rows = unit_data(3, 50, 16, seed=8)
    index = GPUExactSearch(rows.numpy(), devices=["cpu"])
    expected = index.search(queries, 4)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        got = index.search(queries.to(dt), 4)
        assert torch.equal(got[1], expected[1]), dt
    scores, ids = index.search(queries[:0], 4)
    assert scores.shape == (0, 4) and ids.shape == (0, 4)
    # tensors that require grad (e.g. straight from an encoder) are taken as data
    grad_index = GPUExactSearch(rows.clone().requires_grad_(), devices=["cpu"])
    scores, ids = grad_index.search(queries.clone().requires_grad_(), 4)
    assert not scores.requires_grad and torch.equal(ids, expected[1])


@needs_triton
def test_large_k_uses_reference(caplog, monkeypatch):
    from rdm_fast.ops import _dispatch
    from rdm_fast.retrieval import gpu_search

    monkeypatch.setattr(_dispatch, "_logged", set())
    monkeypatch.setattr(gpu_search, "_interpreter_forced", lambda: True)  # the kernel would take k <= 64
    queries, rows = unit_data(2, 300, 16, seed=9)
    with caplog.at_level("INFO", logger="rdm_fast.ops"):
        scores, ids = GPUExactSearch(rows, devices=["cpu", "cpu"], dtype=torch.float32).search(queries, 100)
    err = mismatch(scores, ids, normalized(queries), normalized(rows), 100)
    assert err is None, err
    assert "knn_search: reference (k > 64) (cpu, float32)" in caplog.text  # the path taken is logged once


def test_reference_path_runs_without_triton(caplog, monkeypatch):
    """The reference search (CPU shards; CUDA ones in reference mode) does not need triton: it had read the
    kernel's k limit for its log line, and failed with ModuleNotFoundError where triton is not installed."""
    from rdm_fast.ops import _dispatch
    from rdm_fast.retrieval import gpu_search

    def no_triton():
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    monkeypatch.setattr(_dispatch, "_logged", set())
    monkeypatch.setattr(gpu_search, "_kernel_max_k", no_triton)
    queries, rows = unit_data(2, 300, 16, seed=9)
    with caplog.at_level("INFO", logger="rdm_fast.ops"):
        scores, ids = GPUExactSearch(rows, devices=["cpu"], dtype=torch.float32).search(queries, 10)
    assert mismatch(scores, ids, normalized(queries), normalized(rows), 10) is None
    assert "knn_search: reference (cpu, float32)" in caplog.text


@pytest.mark.parametrize(
    "embeddings,kwargs,match",
    [
        (np.zeros(5, np.float32), {}, "2-D"),
        (np.zeros((4, 3), np.int64), {}, "floating"),
        (np.zeros((0, 8), np.float32), {}, "empty"),
        (np.zeros((4, 0), np.float32), {}, "empty"),
        (np.zeros((4, 3), np.float32), {"dtype": torch.float64}, "dtype"),
        (np.zeros((4, 3), np.float32), {"devices": []}, "at least one device"),
        (np.zeros((4, 3), np.float32), {"chunk_rows": 0}, "chunk_rows"),
        ([], {}, "empty"),
        ([np.zeros((4, 3), np.float32), np.zeros((2, 5), np.float32)], {}, "different dimensions"),
    ],
)
def test_bad_database(embeddings, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPUExactSearch(embeddings, **{"devices": ["cpu"], **kwargs})


def test_bad_queries():
    index = GPUExactSearch(np.eye(4, 3, dtype=np.float32), devices=["cpu"])
    for queries, k, match in [
        (torch.zeros(2, 4), 1, r"\(Q, 3\)"),
        (torch.zeros(3), 1, r"\(Q, 3\)"),
        (torch.zeros(2, 3, dtype=torch.int64), 1, "floating"),
        (torch.zeros(2, 3), 0, "between 1 and the database size 4"),
        (torch.zeros(2, 3), 5, "between 1 and the database size 4"),
    ]:
        with pytest.raises(ValueError, match=match):
            index.search(queries, k)
    with pytest.raises(TypeError, match="Tensor"):
        index.search(np.zeros((2, 3), np.float32), 1)
    with pytest.raises(TypeError, match="sequence"):
        GPUExactSearch(5, devices=["cpu"])


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only behaviour")
def test_without_cuda():
    assert "CUDA" in GPUExactSearch.unavailable() or "triton" in GPUExactSearch.unavailable()
    with pytest.raises(RuntimeError, match="devices=\\['cpu'\\]"):
        GPUExactSearch(np.eye(4, dtype=np.float32))


def test_explicit_gpu_too_small_is_refused_before_copying(monkeypatch):
    """An explicit CUDA device whose free memory cannot hold its share: a readable error, no allocation (the free
    memory is faked, so this runs without a GPU)."""
    free = {0: 10_000, 1: 1_000_000}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[torch.device(d).index], 2 * free[1]))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    rows = np.ones((1000, 16), np.float32)  # 1000 x (16 x 2 + 4) bytes = 36 kB in float16
    with pytest.raises(RuntimeError, match=r"rows for cuda:0 need .* GiB but it has .* usable .*without a device"):
        GPUExactSearch(rows, devices=["cuda:0"])
    with pytest.raises(RuntimeError, match=r"rows for cuda:0 need"):  # two shards on one device add up
        GPUExactSearch(rows, devices=["cuda:1", "cuda:0", "cuda:0"])
    monkeypatch.setattr(GPUExactSearch, "_load", lambda self, parts, start, stop, device, chunk: (
        torch.zeros(stop - start, 16), torch.ones(stop - start)))  # no GPU here to copy to
    GPUExactSearch(rows, devices=["cuda"])  # the current device, 1, has room


# ------------------------------------------------------------------------------------------------- CUDA (compiled)

GPU_KERNEL_CASES = {
    "q1-n1-d3-k1": (1, 1, 3, 1, None, None, "int"),
    "q5-n7-d100-k7": (5, 7, 100, 7, None, None, "int"),
    "q33-n5000-d384-k64": (33, 5000, 384, 64, None, None, "int"),
    "q64-n100003-d768-k10": (64, 100_003, 768, 10, None, None, "int"),
    "q130-n3001-d256-k16-unit": (130, 3001, 256, 16, None, None, "unit"),
    "q16-n20000-d512-k4-unit-1split": (16, 20_000, 512, 4, None, 1, "unit"),
    "q8-n4000-d768-k10-random": (8, 4000, 768, 10, None, None, "random"),
    "q9-n3000-d256-k10-query-view": (9, 3000, 256, 10, None, None, "int-query-view"),  # query row stride 272
}


@needs_cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("name", list(GPU_KERNEL_CASES))
def test_kernel_cuda_matches_brute_force(name, dtype):
    """The shape sweep with the first configuration (one compile per shape key instead of five)."""
    case = GPU_KERNEL_CASES[name]
    case = case[:4] + (dtype,) + case[5:]
    if case[6] == "random" and dtype != "float32":
        pytest.skip("random data: rounding to 16 bits makes near-ties; float32 only")
    err = run_kernel_case(case, "cuda", 0)
    assert err is None, err


@needs_cuda
@pytest.mark.parametrize("config_index", range(5))
@pytest.mark.parametrize("name,dtype", [("q64-n100003-d768-k10", "float16"), ("q33-n5000-d384-k64", "bfloat16")])
def test_kernel_cuda_every_config(name, dtype, config_index):
    from rdm_fast.kernels.knn import CONFIGS

    assert len(CONFIGS) == 5
    case = GPU_KERNEL_CASES[name]
    err = run_kernel_case(case[:4] + (dtype,) + case[5:], "cuda", config_index)
    assert err is None, err


@needs_cuda
def test_kernel_cuda_autotuned():
    case = GPU_KERNEL_CASES["q130-n3001-d256-k16-unit"]
    err = run_kernel_case(case[:4] + ("float16",) + case[5:], "cuda")
    assert err is None, err


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_class_cuda_two_shards(dtype):
    queries, rows = unit_data(20, 3000, 64, seed=10, scale=True)
    index = GPUExactSearch(rows.numpy(), devices=["cuda", "cuda"], dtype=dtype, chunk_rows=1000)
    assert all(d.type == "cuda" for d in index.devices)
    for q in (queries, queries.cuda()):  # CPU queries: results on the first database device
        scores, ids = index.search(q, 10)
        assert scores.device.type == "cuda" and ids.device.type == "cuda"
        err = mismatch(scores, ids, normalized(queries), normalized(rows), 10)
        assert err is None, err


@needs_cuda
def test_class_cuda_search_makes_no_host_sync():
    queries, rows = unit_data(16, 5000, 128, seed=11)
    index = GPUExactSearch(rows, devices=["cuda", "cuda"])
    q = queries.cuda()
    expected = index.search(q, 8)  # compiles and autotunes (which synchronises) outside the checked region
    stream = torch.cuda.Stream()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(stream):
            stream.wait_stream(torch.cuda.default_stream())
            got = index.search(q, 8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stream.synchronize()
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


@needs_cuda
def test_class_cuda_reference_mode(monkeypatch):
    """RDM_FAST_OPS=reference: the search runs the PyTorch path (the kernel is never called) and is exact."""
    from rdm_fast.kernels import knn

    queries, rows = unit_data(4, 700, 32, seed=12)
    index = GPUExactSearch(rows, devices=["cuda"], dtype=torch.float32)
    monkeypatch.setenv("RDM_FAST_OPS", "reference")
    monkeypatch.setattr(knn, "topk_inner_product", lambda *a, **k: pytest.fail("the kernel ran in reference mode"))
    err = mismatch(*index.search(queries, 5), normalized(queries), normalized(rows), 5)
    assert err is None, err


if __name__ == "__main__":
    _child_main()


def test_vectors_gathers_original_rows_across_shards():
    """vectors(ids) rebuilds the stored rows (normalised copy x norm) from every shard, any id shape."""
    rng = np.random.default_rng(5)
    data = (rng.standard_normal((23, 12)) * rng.uniform(0.1, 10, (23, 1))).astype(np.float32)
    index = GPUExactSearch(data, devices=["cpu", "cpu", "cpu"], dtype=torch.float32)
    ids = torch.tensor([[0, 22, 7], [8, 15, 16]])
    torch.testing.assert_close(index.vectors(ids), torch.from_numpy(data)[ids], rtol=1e-6, atol=1e-6)
    half = GPUExactSearch(data, devices=["cpu", "cpu"], dtype=torch.float16)
    torch.testing.assert_close(half.vectors(ids), torch.from_numpy(data)[ids], rtol=2e-3, atol=1e-3)


def test_float16_rows_are_normalised_in_float32():
    """Database shards are float16: their rows are upcast before the norm is taken and divided out, so a float32
    copy holds them to float32 precision (normalised in float16, vectors and self-scores were off by ~1e-4)."""
    rng = np.random.default_rng(7)
    data = (rng.standard_normal((40, 24)) * rng.uniform(0.1, 50, (40, 1))).astype(np.float16)
    index = GPUExactSearch(data, devices=["cpu", "cpu"], dtype=torch.float32)
    torch.testing.assert_close(index.vectors(torch.arange(40)), torch.from_numpy(data).float(), rtol=1e-6, atol=0)
    scores, ids = index.search(torch.from_numpy(data[:5]).float(), 1)
    assert ids[:, 0].tolist() == list(range(5))
    torch.testing.assert_close(scores[:, 0], torch.ones(5), rtol=0, atol=1e-6)


def test_non_finite_rows_are_refused():
    """The kernel cannot rank NaN scores (and merge_candidates would put them first): such rows fail at load."""
    emb = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    emb[7, 1] = np.nan
    with pytest.raises(ValueError, match="embedding row 7 is not finite"):
        GPUExactSearch([emb[:4], emb[4:]], devices=["cpu", "cpu"], chunk_rows=3)
    emb[7, 1] = 1e5  # finite in fp32, inf once stored unnormalised as fp16
    with pytest.raises(ValueError, match="embedding row 7 is not finite"):
        GPUExactSearch(emb, devices=["cpu"], normalize=False)
    assert len(GPUExactSearch(emb, devices=["cpu"])) == 10  # normalised first: stored finite
    with pytest.raises(TypeError, match="k must be an integer"):
        GPUExactSearch(emb, devices=["cpu"]).search(torch.zeros(1, 8), 2.0)


def test_rows_are_normalised_in_blocks_of_a_chunk(monkeypatch):
    """A chunk is normalised in blocks of _NORMALIZE_ROWS rows (65536; 4 here), each written at its own place."""
    from rdm_fast.retrieval import gpu_search

    queries, rows = unit_data(5, 90, 16, seed=11, scale=True)
    monkeypatch.setattr(gpu_search, "_NORMALIZE_ROWS", 4)
    index = GPUExactSearch(rows, devices=["cpu", "cpu"], dtype=torch.float32, chunk_rows=10)
    torch.testing.assert_close(index.vectors(torch.arange(90)), rows, rtol=1e-6, atol=0)
    err = mismatch(*index.search(queries, 7), normalized(queries), normalized(rows), 7)
    assert err is None, err


def test_float16_rows_give_float32_scores():
    """Rows stored as float16 are scored against the float32 queries in float32 (on the CPU path: the cosine of
    the stored row), not rounded to float16 (~1e-4 off), nor with queries rounded to float16."""
    gen = torch.Generator().manual_seed(12)
    rows, queries = torch.randn(300, 40, generator=gen), torch.randn(6, 40, generator=gen)
    stored = (rows / rows.norm(dim=1, keepdim=True)).half().double()
    stored /= stored.norm(dim=1, keepdim=True)
    scores, ids = GPUExactSearch(rows, devices=["cpu", "cpu"], dtype=torch.float16).search(queries, 9)
    expected = (queries.double() / queries.double().norm(dim=1, keepdim=True)) @ stored.T
    torch.testing.assert_close(scores.double(), expected.gather(1, ids), rtol=0, atol=1e-6)
    assert torch.equal(ids, expected.topk(9, dim=1).indices)


@needs_triton
def test_the_kernel_takes_k_up_to_its_limit(monkeypatch):
    """k = MAX_K (64) still runs the kernel (here a stand-in with its contract), only larger k the reference."""
    from rdm_fast.kernels import knn
    from rdm_fast.retrieval import gpu_search

    calls = []
    monkeypatch.setattr(gpu_search, "_interpreter_forced", lambda: True)
    monkeypatch.setattr(knn, "topk_inner_product", lambda q, db, k: calls.append(k) or exact_search(q, db, k))
    queries, rows = unit_data(2, 300, 16, seed=9)
    index = GPUExactSearch(rows, devices=["cpu"], dtype=torch.float32)
    for k in (knn.MAX_K, knn.MAX_K + 1):
        err = mismatch(*index.search(queries, k), normalized(queries), normalized(rows), k)
        assert err is None, err
    assert calls == [knn.MAX_K]
