"""Context assembly from a database (rdm_fast.retrieval.context) against an independent numpy brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rdm_fast import RDMConfig
from rdm_fast.retrieval.context import (check_database_for_model, default_neighbors, draw_pseudo_queries,
                                        locate_database, model_context)
from rdm_fast.retrieval.database import Database, save_proposals, write_database
from rdm_fast.retrieval.neighbors import compute_neighbors

ENC = {"name": "test-64", "dim": 64, "normalized": False}


@pytest.fixture(scope="module")
def db_and_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((37, 64)).astype(np.float16)
    emb[20] = emb[5]  # an exact duplicate of entry 5: ties broken by the lower id
    path = write_database(tmp_path_factory.mktemp("db") / "db", emb, ENC, shard_size=10)
    return Database.open(path, backend="torch", device="cpu"), emb.astype(np.float64)


def brute_force(data: np.ndarray, query: np.ndarray, k: int, exclude: int | None = None) -> list[int]:
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    scores = unit @ (query / np.linalg.norm(query))
    order = np.lexsort((np.arange(len(data)), -np.round(scores, 6)))  # score descending, then lower id
    return [int(i) for i in order if i != exclude][:k]


def config(text_token: bool, k_nn: int, normalized: bool) -> RDMConfig:
    tree = RDMConfig.preset("tiny").to_dict()
    tree["model"]["params"].update(text_token=text_token, k_nn=k_nn, normalized_embeddings=normalized)
    return RDMConfig.from_dict(tree)


def test_query_first_then_neighbours_excluding_itself(db_and_data):
    """imagenet layout: [query entry, k_nn - 1 nearest other entries], unnormalised stored vectors."""
    db, data = db_and_data
    cfg = config(text_token=False, k_nn=4, normalized=False)
    ids = torch.tensor([5, 0, 36])
    ctx = model_context(db, cfg, db.embeddings(ids), query_ids=ids)
    assert ctx.shape == (3, 4, 64)
    for row, q in enumerate(ids.tolist()):
        expect = [q] + brute_force(data, data[q], 3, exclude=q)
        torch.testing.assert_close(ctx[row], torch.from_numpy(data[expect]).float())
    # entry 5's duplicate (20) is its first neighbour; entry 20 itself would list 5 first
    assert torch.equal(ctx[0, 1], torch.from_numpy(data[20]).float())


def test_own_entry_is_left_out_by_id_not_as_the_first_result(tmp_path):
    """A query's own entry need not be its first result: an earlier entry pointing the same way (entry 9 is twice
    entry 2: the same cosine, ties by lower id) ranks before it. Contexts and training neighbours drop the own
    entry by its id, keeping the earlier entry (dropping the first result instead kept the query itself)."""
    emb = np.random.default_rng(3).standard_normal((12, 64)).astype(np.float16)
    emb[9] = emb[2] * 2
    db = Database.open(write_database(tmp_path / "db", emb, ENC), backend="torch", device="cpu")
    data = emb.astype(np.float64)
    nearest = brute_force(data, data[9], 3, exclude=9)
    assert nearest[0] == 2
    ctx = model_context(db, config(text_token=False, k_nn=4, normalized=False), db.embeddings(torch.tensor([9])),
                        query_ids=torch.tensor([9]))
    torch.testing.assert_close(ctx[0], torch.from_numpy(data[[9] + nearest]).float())
    ids, _ = compute_neighbors(db, k=3, exclude_self=True, progress=False)
    assert ids[9].tolist() == nearest


def test_text_token_layout_normalised(db_and_data):
    """rdm768 layout: [text embedding, k_nn nearest entries], all L2-normalised."""
    db, data = db_and_data
    cfg = config(text_token=True, k_nn=5, normalized=True)
    text = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 64))).float()
    ctx = model_context(db, cfg, text)
    assert ctx.shape == (2, 6, 64)
    torch.testing.assert_close(ctx.norm(dim=-1), torch.ones(2, 6))
    for row in range(2):
        expect = brute_force(data, text[row].double().numpy(), 5)
        unit = data[expect] / np.linalg.norm(data[expect], axis=1, keepdims=True)
        torch.testing.assert_close(ctx[row, 1:], torch.from_numpy(unit).float())
        torch.testing.assert_close(ctx[row, 0], text[row] / text[row].norm())


def test_context_options_k_and_no_query(db_and_data):
    """``k`` neighbours instead of the convention, the neighbours without the query, or (k = 0) the query alone;
    without a query slot the default k fills it (imagenet: 4 neighbours)."""
    db, data = db_and_data
    q = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 64))).float()
    cfg = config(text_token=False, k_nn=4, normalized=False)
    assert default_neighbors(cfg) == 3 and default_neighbors(cfg, include_query=False) == 4
    text_cfg = config(text_token=True, k_nn=10, normalized=True)
    assert default_neighbors(text_cfg) == default_neighbors(text_cfg, include_query=False) == 10
    alone = model_context(db, cfg, q, k=0)
    torch.testing.assert_close(alone, q[:, None])
    torch.testing.assert_close(model_context(db, text_cfg, q, k=0), torch.nn.functional.normalize(q, dim=-1)[:, None])
    without = model_context(db, cfg, q, include_query=False)
    assert without.shape == (2, 4, 64)
    for row in range(2):
        expect = brute_force(data, q[row].double().numpy(), 4)
        torch.testing.assert_close(without[row], torch.from_numpy(data[expect].astype(np.float32)), rtol=1e-3,
                                   atol=1e-3)  # stored as float16
    torch.testing.assert_close(model_context(db, cfg, q, k=6)[:, 1:5], without)  # nearest first
    with pytest.raises(ValueError, match="k must be an int >= 1 without the query"):
        model_context(db, cfg, q, k=0, include_query=False)
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        model_context(db, cfg, q, k=-1)
    with pytest.raises(TypeError, match="k must be an int, got 2.0"):  # as Database.search says it
        model_context(db, cfg, q, k=2.0)
    # leaving out the queries' own entries: the message counted the extra result the search asks for
    n = len(db)
    with pytest.raises(ValueError, match=f"k must be at most {n - 1} .*the query's own entry.*got {n}$"):
        model_context(db, cfg, q, k=n, query_ids=torch.tensor([0, 1]))
    assert model_context(db, cfg, q, k=n - 1, query_ids=torch.tensor([0, 1])).shape == (2, n, 64)


def test_checks_and_pseudo_queries(db_and_data, tmp_path, monkeypatch, caplog):
    db, _ = db_and_data
    cfg = config(text_token=False, k_nn=4, normalized=False)
    check_database_for_model(db, cfg)
    with pytest.raises(ValueError, match="contexts with 38 neighbours need at least 39"):
        check_database_for_model(db, config(text_token=True, k_nn=38, normalized=False))
    check_database_for_model(db, config(text_token=True, k_nn=38, normalized=False), 36)
    with pytest.raises(ValueError, match="contexts with 37 neighbours need at least 38"):
        check_database_for_model(db, cfg, 37)
    g = torch.Generator().manual_seed(0)
    assert set(draw_pseudo_queries(db, 200, 0.1, g).tolist()) == set(range(37))  # no ranking: all, warned
    assert "no proposal ranking" in caplog.text
    path = tmp_path / "ranked"
    write_database(path, np.random.default_rng(2).standard_normal((10, 64)).astype(np.float16), ENC)
    save_proposals(path, np.arange(10)[::-1], np.arange(10)[::-1])
    ranked = Database.open(path, backend="torch", device="cpu")
    assert set(draw_pseudo_queries(ranked, 100, 0.2, g).tolist()) == {9, 8}
    # checked with or without a ranking (without one, top_m 5 and "x" were taken; n -1 and 2.0 failed in torch)
    for database in (db, ranked):
        for args, error, message in (((4, 5.0, g), ValueError, "top_m must be a fraction in"),
                                     ((4, "x", g), TypeError, "top_m must be a fraction in"),
                                     ((-1, 0.1, g), ValueError, "n must be at least 0, got -1"),
                                     ((2.0, 0.1, g), TypeError, "n must be an int, got 2.0"),
                                     ((2, 0.1, 0), TypeError, "generator must be a torch.Generator, got int")):
            with pytest.raises(error, match=f"draw_pseudo_queries: {message}"):
                draw_pseudo_queries(database, *args)
    monkeypatch.setenv("RDM_FAST_HOME", str(tmp_path))
    (tmp_path / "databases").mkdir()
    (tmp_path / "databases" / "named").symlink_to(path)
    assert locate_database("named") == tmp_path / "databases" / "named"
    with pytest.raises(FileNotFoundError, match="no database 'absent'"):
        locate_database("absent")


def test_model_context_checks_the_database_against_the_model(db_and_data):
    """model_context built contexts from a database of another width or encoder; sampling failed later."""
    db, _ = db_and_data
    q = torch.randn(2, 64)
    cfg = config(text_token=False, k_nn=4, normalized=False)
    tree = cfg.to_dict()
    tree["model"]["params"]["unet_config"]["params"]["context_dim"] = 32
    narrow = RDMConfig.from_dict(tree)  # a 32-d model
    assert narrow.context_dim == 32
    with pytest.raises(ValueError, match="holds 64-d embeddings but the model expects 32-d"):
        model_context(db, narrow, q)
    other = RDMConfig.preset("tiny").to_dict()
    other["model"]["params"]["retrieval_encoder"] = "clip-vit-b-32"
    with pytest.raises(ValueError, match="made by encoder 'test-64' but the model was trained on 'clip-vit-b-32'"):
        model_context(db, RDMConfig.from_dict(other), q)
    with pytest.raises(TypeError, match="expected db to be a rdm_fast.retrieval.Database"):
        model_context(str(db.path), config(text_token=False, k_nn=4, normalized=False), q)


def test_contexts_refuse_bad_queries_and_query_ids(db_and_data):
    """query_ids that do not mark each query's own entry would let it through as its own neighbour (a (1,) tensor
    was broadcast over every query): refused, as are queries of another width, also with k = 0."""
    db, data = db_and_data
    cfg = config(text_token=False, k_nn=3, normalized=False)
    ids = torch.tensor([0, 1])
    queries = db.embeddings(ids)
    torch.testing.assert_close(model_context(db, cfg, queries, query_ids=[0, 1]),  # a list is taken as ids
                               model_context(db, cfg, queries, query_ids=ids))
    torch.testing.assert_close(model_context(db, cfg, queries, k=np.int64(2)),  # NumPy integers as k, as search
                               model_context(db, cfg, queries, k=2))
    assert model_context(db, cfg, queries[:0], query_ids=[]).shape == (0, 3, 64)  # [] is float64 to NumPy
    for bad, message in (([0], r"query_ids must be the \(2,\) integer entry ids of the queries, got torch.int64 \(1,\)"),
                         (torch.tensor([[0, 1]]), r"got torch.int64 \(1, 2\)"),
                         (torch.tensor([0.5, 1.5]), r"got torch.float32 \(2,\)"),
                         (torch.tensor([True, False]), r"got torch.bool \(2,\)"),
                         (torch.tensor([0, 37]), r"query_ids holds 37, not an entry id of .* \(\[0, 37\)\)"),
                         (torch.tensor([-1, 1]), r"query_ids holds -1")):
        with pytest.raises(ValueError, match=message):
            model_context(db, cfg, queries, query_ids=bad)
    for k in (0, 2):
        with pytest.raises(ValueError, match=r"queries must be a \(Q, 64\) float tensor or array"):
            model_context(db, cfg, torch.randn(2, 32), k=k)
        with pytest.raises(ValueError, match="query 1 holds NaN"):
            model_context(db, cfg, torch.tensor([[1.0] * 64, [float("nan")] * 64]), k=k)
    with pytest.raises(TypeError, match=r"cfg must be the model's RDMConfig \(e.g. rdm.config\), got str"):
        model_context(db, "tiny", queries)


@pytest.mark.parametrize("device,backend", [("cpu", None), ("cuda", "faiss-ivfpq")])
def test_contexts_refuse_an_approximate_search_that_found_too_few(db_and_data, monkeypatch, device, backend):
    """An approximate index pads missing results with id -1: named as too few neighbours, not as a bad id; for
    FAISS also with CUDA queries (its ids come from the host, so the check costs no synchronisation)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    db, _ = db_and_data
    cfg = config(text_token=False, k_nn=3, normalized=False)

    def padded(queries, k):
        scores, ids = Database.search_checked(db, queries, k)
        ids[1, -1], scores[1, -1] = -1, float("-inf")
        return scores, ids

    monkeypatch.setattr(db, "search_checked", padded)
    if backend is not None:  # the ids as FAISS returns them, on the queries' device
        monkeypatch.setattr(Database, "backend", property(lambda self: backend))
    with pytest.raises(ValueError, match=rf"the {backend or 'torch-exact'} search of .* found fewer than 2 neighbours "
                                         r"for query 1: search more of the index \(e.g. a larger nprobe\) or ask for "
                                         r"fewer"):
        model_context(db, cfg, db.embeddings(torch.tensor([0, 1])).to(device))


def test_contexts_are_float32_whatever_the_queries_dtype(db_and_data):
    """Half- or double-precision queries give the float32 contexts of float32 queries (within the rounding of the
    queries themselves), also for the query alone (k = 0), where no float32 neighbour promotes the result."""
    db, _ = db_and_data
    cfg = config(text_token=False, k_nn=4, normalized=False)
    q = torch.from_numpy(np.random.default_rng(6).standard_normal((2, 64))).float()
    for k in (0, 3):
        for dtype in (torch.float16, torch.float64):
            ctx = model_context(db, cfg, q.to(dtype), k=k)
            assert ctx.dtype == torch.float32, (k, dtype)
            torch.testing.assert_close(ctx, model_context(db, cfg, q.to(dtype).float(), k=k))


def test_normalisation_follows_normalized_embeddings_not_the_text_token(db_and_data):
    """Contexts are L2-normalised where the model's normalized_embeddings says so, whether or not it has a text
    token (the released models couple the two; a config may not)."""
    db, _ = db_and_data
    q = torch.from_numpy(np.random.default_rng(7).standard_normal((2, 64))).float() * 3
    unit = torch.ones(2, 5)
    for text_token, normalized in ((False, True), (True, False)):
        ctx = model_context(db, config(text_token=text_token, k_nn=4, normalized=normalized), q, k=4)
        assert torch.allclose(ctx.norm(dim=-1), unit, atol=1e-5) == normalized, (text_token, normalized)


def test_pseudo_queries_follow_the_generator(db_and_data, tmp_path):
    """The same seeded generator draws the same pseudo-queries (resumed sample runs rely on it), another seed
    others; with and without a proposal ranking."""
    db, _ = db_and_data
    path = write_database(tmp_path / "ranked", np.random.default_rng(2).standard_normal((40, 64)).astype(np.float16),
                          ENC)
    save_proposals(path, np.arange(40)[::-1], np.arange(40)[::-1])
    for database in (db, Database.open(path, backend="torch", device="cpu")):
        draws = [draw_pseudo_queries(database, 50, 0.5, torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
        assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_a_short_search_names_the_query_it_failed(db_and_data, monkeypatch):
    """The message names the query whose search came back short (the third of three here), not a column."""
    db, _ = db_and_data

    def padded(queries, k):
        scores, ids = Database.search_checked(db, queries, k)
        ids[2, -1], scores[2, -1] = -1, float("-inf")
        return scores, ids

    monkeypatch.setattr(db, "search_checked", padded)
    with pytest.raises(ValueError, match="found fewer than 2 neighbours for query 2:"):
        model_context(db, config(text_token=False, k_nn=3, normalized=False), db.embeddings(torch.tensor([0, 1, 2])))
