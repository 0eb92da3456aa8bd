"""Training neighbours and the top-m proposal list.

RDM training conditions each training image on its k nearest database entries, found once in advance and
excluding the image itself (and, optionally, near-duplicates of it). Unconditional "top-m" sampling draws its
pseudo-queries from the database entries that were retrieved most often as such neighbours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._files import (TEMP_SUFFIX, atomic_save_npy, atomic_save_npz, atomic_write_json, claim_disk_space,
                      naming_failed_writes)
from .database import Database
from .search import check_count, first_kept

log = logging.getLogger("rdm_fast.retrieval")


def same_entries(a: Database, b: Database) -> bool:
    """Whether ``a`` and ``b`` hold the same entries in the same order: one database, or a copy of it."""
    if a is b or a.path.resolve() == b.path.resolve():
        return True
    sums = [[s.get("sha256") for s in db.manifest["shards"]] for db in (a, b)]
    return None not in sums[0] and sums[0] == sums[1]  # database_digest's content, where both record it


def _fresh_memmap(target: Path, dtype: type, shape: tuple[int, int]) -> np.memmap:
    """A new memory-mapped ``.npy`` array, made under a temporary name and renamed to ``target``: a file of that
    name that another process still maps is replaced, not truncated under it. Its disk space is claimed first
    (a full disk is an OSError naming ``target``, not a SIGBUS when the search writes its results)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    try:
        with naming_failed_writes(target, tmp):
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            claim_disk_space(tmp)
            os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return array


class _Results:
    """The (ids, scores) of a neighbours run: in memory, or with ``directory`` in memory-mapped files there,
    with ``state.json`` recording how many queries are done, so that a killed run resumes where it stopped.
    Those files are flushed before the count is written; a run with other settings starts over."""

    def __init__(self, n: int, k: int, directory: str | Path | None, settings: dict) -> None:
        self.directory, self.done = None if directory is None or n == 0 else Path(directory), 0
        if self.directory is None:
            self.ids, self.scores = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.state = self.directory / "state.json"
        files = (self.directory / "ids.npy", self.directory / "scores.npy")
        self.settings = settings
        try:
            state = json.loads(self.state.read_text()) if self.state.is_file() else None
            if state is not None and state.get("settings") == settings:
                self.ids, self.scores = (np.lib.format.open_memmap(f, mode="r+") for f in files)
                if self.ids.shape != (n, k) or self.scores.shape != (n, k):
                    raise ValueError("shapes differ")
                self.done = int(state["done"])
                log.info("resuming the neighbours at query %d of %d (progress in %s)", self.done, n, self.directory)
                return
            if state is not None:
                log.warning("%s holds the progress of a neighbours run with other settings: starting over",
                            self.directory)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: unreadable progress (%s): starting over", self.directory, e)
        self.state.unlink(missing_ok=True)
        self.ids, self.scores = (_fresh_memmap(f, dt, (n, k)) for f, dt in zip(files, (np.int64, np.float32)))

    def finished(self, done: int) -> None:
        """Queries [0, done) are filled in."""
        self.done = done
        if self.directory is not None:
            assert isinstance(self.ids, np.memmap) and isinstance(self.scores, np.memmap)  # opened in __init__
            self.ids.flush()
            self.scores.flush()
            atomic_write_json(self.state, {"settings": self.settings, "done": done})

    def discard_if_unrecorded(self) -> None:
        """Remove the result files of a run that stopped before it recorded any queries: nothing in them can be
        resumed (a run that failed on its first batch left two arrays of the full size behind)."""
        if self.directory is not None and not self.state.is_file():
            for name in ("ids.npy", "scores.npy"):
                (self.directory / name).unlink(missing_ok=True)


def compute_neighbors(db: Database, queries_db: Database | None = None, *, k: int, exclude_self: bool = False,
                      dedup_threshold: float | None = None, batch_size: int = 1024, progress: bool = True,
                      resume_dir: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """The k nearest entries of ``db`` for every entry of ``queries_db`` (default: ``db`` itself), as
    (ids (N_q, k) int64, scores (N_q, k) float32) CPU tensors, best first. Note the order: ids first, as the
    neighbours files store them (``Database.search`` returns scores first).

    ``exclude_self`` drops each query's own entry (only when the queries are ``db`` or a copy of it: see
    :func:`same_entries`); ``dedup_threshold`` drops entries whose cosine similarity to the query exceeds it
    (near-duplicates). More candidates are retrieved as needed so that k remain; ValueError when the database
    has fewer than k acceptable entries.
    ``resume_dir``: a folder where the results are kept as they come (memory-mapped), so that a run of the same
    arguments continues after a kill instead of starting over; the caller removes it once the results are saved,
    and lets one run at a time use it (``db neighbors`` holds a lock there).
    """
    queries_db = db if queries_db is None else queries_db
    for name, value in (("db", db), ("queries_db", queries_db)):
        if not isinstance(value, Database):  # a path failed with "'str' object has no attribute 'check_encoder'"
            raise TypeError(f"compute_neighbors: {name} must be a Database (Database.open(path)), got "
                            f"{type(value).__name__}")
    batch_size = check_count(batch_size, "batch_size")
    if exclude_self and not same_entries(db, queries_db):
        raise ValueError("exclude_self applies only when the queries are the database's own entries (the database "
                         "itself or a copy of it); to leave out entries that duplicate queries of another database, "
                         "pass dedup_threshold (e.g. 0.95)")
    db.check_encoder(queries_db.encoder_name)
    if queries_db.dim != db.dim:
        raise ValueError(f"{queries_db.path} holds {queries_db.dim}-d embeddings, {db.path} {db.dim}-d ones")
    if dedup_threshold is not None and (isinstance(dedup_threshold, bool) or not isinstance(
            dedup_threshold, numbers.Real)):
        raise TypeError(f"dedup_threshold is a cosine similarity in [-1, 1], got {dedup_threshold!r}")
    if dedup_threshold is not None and not -1 <= dedup_threshold <= 1:
        raise ValueError(f"dedup_threshold is a cosine similarity in [-1, 1], got {dedup_threshold}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {k!r}")
    k = int(k)
    if exclude_self and len(db) == 1:
        raise ValueError(f"{db.path} holds one entry: with exclude_self (--exclude-self) no entry is left to be its "
                         "neighbour")
    if not 1 <= k <= len(db) - (1 if exclude_self else 0):
        raise ValueError(f"k must be between 1 and {len(db) - (1 if exclude_self else 0)} for {db.path} "
                         f"({len(db)} entries{', one excluded as the query' if exclude_self else ''}), got {k}")
    first_k = min(len(db), k + int(exclude_self) + (max(4, k // 2) if dedup_threshold is not None else 0))
    n = len(queries_db)
    settings = {"db": database_digest(db), "queries": database_digest(queries_db), "k": k, "exclude_self":
                exclude_self, "dedup_threshold": dedup_threshold, "batch_size": batch_size, "n": n,
                "search": db.search_settings}  # an approximate index's results differ from another search's
    results = _Results(n, k, resume_dir, settings)
    all_ids, all_scores = torch.from_numpy(results.ids), torch.from_numpy(results.scores)  # views: filled in place
    try:
        with tqdm(total=n, initial=results.done, desc="neighbours", unit="query", disable=not progress) as bar:
            for start in range(results.done, n, batch_size):
                end = min(n, start + batch_size)
                all_ids[start:end], all_scores[start:end] = _batch_neighbors(
                    db, queries_db, torch.arange(start, end), k, first_k, exclude_self, dedup_threshold)
                results.finished(end)
                bar.update(end - start)
    except BaseException:
        results.discard_if_unrecorded()
        raise
    if exclude_self and dedup_threshold is None and n:
        _warn_duplicates(all_scores[:, 0], db)
    if results.directory is None:
        return all_ids, all_scores
    return all_ids.clone(), all_scores.clone()  # in memory, not views of files the caller may remove


def _batch_neighbors(db: Database, queries_db: Database, qids: Tensor, k: int, first_k: int, exclude_self: bool,
                     dedup_threshold: float | None) -> tuple[Tensor, Tensor]:
    """The (ids, scores) of the k kept neighbours of the entries ``qids`` of ``queries_db``: searched for the
    ``first_k`` nearest, then twice as many for the rows that kept fewer than k, up to the whole database."""
    queries = queries_db.embeddings(qids)
    bad = ~torch.isfinite(queries).all(1)
    if bool(bad.any()):
        raise ValueError(f"entry {int(qids[bad][0])} of {queries_db.path} holds NaN or infinite values: the "
                         f"database is damaged (check it with python -m rdm_fast.db info {queries_db.path} --verify)")
    out_ids, out_scores = torch.empty(len(qids), k, dtype=torch.int64), torch.empty(len(qids), k)
    rows, kk = torch.arange(len(qids)), first_k
    while len(rows):
        scores, ids = db.search(queries[rows], kk)
        scores, ids = scores.cpu(), ids.cpu()
        keep = ids >= 0  # approximate indexes mark missing results with -1
        if exclude_self:
            keep &= ids != qids[rows, None]
        if dedup_threshold is not None:
            keep &= scores <= dedup_threshold
        done = keep.sum(1) >= k
        pick = first_kept(keep[done], k)  # the first k kept candidates of each finished row, in rank order
        out_ids[rows[done]] = ids[done].gather(1, pick)
        out_scores[rows[done]] = scores[done].gather(1, pick)
        rows = rows[~done]
        if len(rows) and kk == len(db):
            excluded = (["itself"] if exclude_self else []) + (
                [f"near-duplicates (cosine above {dedup_threshold})"] if dedup_threshold is not None else [])
            left = (f"left after excluding {' and '.join(excluded)}" if excluded else
                    f"found by the {db.backend} search")
            raise ValueError(f"query {int(qids[rows[0]])} has fewer than {k} database entries {left}")
        kk = min(len(db), 2 * kk)
    return out_ids, out_scores


DUPLICATE_COSINE = 0.99  # a nearest neighbour this similar to its query is taken for a copy of the same image


def _warn_duplicates(first_scores: Tensor, db: Database) -> None:
    """Warn where ``exclude_self`` left copies of queries as their neighbours: a path listed twice or a file
    stored twice is a separate entry, which training would condition on as the image itself."""
    copies = int((first_scores >= DUPLICATE_COSINE).sum())
    if copies:
        log.warning("%d of %d queries have a nearest neighbour with cosine similarity %g or more to them (%s holds "
                    "copies of the same images, e.g. a file listed twice): training conditions such queries on "
                    "themselves; a dedup_threshold (db neighbors --dedup-threshold, e.g. 0.95) leaves them out",
                    copies, len(first_scores), DUPLICATE_COSINE, db.path)


def proposal_ranking(neighbor_ids: Tensor | np.ndarray, n: int) -> tuple[Tensor, Tensor]:
    """Every id in ``[0, n)`` ranked by how often it occurs in ``neighbor_ids`` (descending count, ties by lower
    id): (ids (n,) int64, counts (n,) int64). Negative ids (missing results) are ignored."""
    n = check_count(n, "proposal_ranking: n", 0)
    flat = torch.as_tensor(np.asarray(neighbor_ids)).reshape(-1)
    if flat.numel() and (flat.is_floating_point() or flat.is_complex() or flat.dtype == torch.bool):
        raise ValueError(f"proposal_ranking: neighbour ids must be integers, got {flat.dtype}")  # were truncated
    flat = flat.long()
    flat = flat[flat >= 0]
    if flat.numel() and int(flat.max()) >= n:
        raise ValueError(f"neighbour id {int(flat.max())} is out of range for a database of {n} entries")
    counts = torch.bincount(flat, minlength=n)
    order = torch.sort(counts, descending=True, stable=True).indices
    return order, counts[order]


DIGEST_KEYS = ("db", "queries")  # the databases a .npz of save_neighbors records


def neighbor_files(path: str | Path) -> list[Path]:
    """The files :func:`save_neighbors` writes for ``path`` (ValueError for an unsupported suffix)."""
    path = Path(path)
    if path.suffix == ".npz":
        return [path]
    if path.suffix == ".npy":
        return [path, path.with_name(f"{path.stem}_scores.npy")]
    raise ValueError(f"neighbours file {path} must end in .npz (ids and scores) or .npy (ids; scores beside it)")


def database_digest(db: Database) -> str:
    """SHA-256 naming a database's content (its shards' checksums)."""
    return hashlib.sha256(json.dumps([s["sha256"] for s in db.manifest["shards"]]).encode()).hexdigest()


def save_neighbors(path: str | Path, ids: Tensor, scores: Tensor, *,
                   databases: tuple[Database, Database] | None = None) -> list[Path]:
    """Write neighbour ids (int64) and scores (float32) atomically: ``X.npz`` with arrays ``ids`` and
    ``scores``, or ``X.npy`` (ids) plus ``X_scores.npy``. Returns the written paths. ``databases`` (the searched
    database, the queries' database) are recorded in a .npz as ``db_digest`` and ``queries_digest``
    (:func:`database_digest`), so that training can refuse the file for other databases."""
    files = neighbor_files(path)
    ids_t, scores_t = torch.as_tensor(ids).cpu(), torch.as_tensor(scores).cpu()
    if ids_t.dim() != 2 or ids_t.is_floating_point() or ids_t.is_complex() or ids_t.dtype == torch.bool:
        raise ValueError(f"neighbour ids must be an (N, K) integer array, got {ids_t.dtype} {tuple(ids_t.shape)}")
    if scores_t.shape != ids_t.shape or not scores_t.is_floating_point():
        raise ValueError(f"neighbour scores must be float, one per id {tuple(ids_t.shape)}, got {scores_t.dtype} "
                         f"{tuple(scores_t.shape)}")
    if ids_t.numel() and int(ids_t.min()) < 0:
        raise ValueError(f"neighbour ids must be entry ids (>= 0), got {int(ids_t.min())}")
    if databases is not None and (len(databases) != 2 or not all(isinstance(d, Database) for d in databases)):
        raise ValueError("databases must be (the searched database, the queries' database) as Database objects, "
                         f"got {databases!r}")
    ids_np = np.ascontiguousarray(ids_t.numpy(), dtype=np.int64)
    scores_np = np.ascontiguousarray(scores_t.numpy(), dtype=np.float32)
    if len(files) == 1:
        digests = {} if databases is None else {f"{k}_digest": np.array(database_digest(db))
                                                for k, db in zip(DIGEST_KEYS, databases)}
        atomic_save_npz(files[0], ids=ids_np, scores=scores_np, **digests)
    else:
        atomic_save_npy(files[0], ids_np)
        try:
            atomic_save_npy(files[1], scores_np)
        except BaseException:  # an earlier save's scores would pass for these ids' (training checks them)
            files[1].unlink(missing_ok=True)
            raise
    return files
