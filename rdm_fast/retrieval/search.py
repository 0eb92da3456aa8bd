"""Exact nearest-neighbour search by cosine similarity in plain PyTorch: the reference search, which is the CPU
backend of a database and the GPU search's fallback (k > 64, reference mode); the tests check it, the Triton
kernel and the FAISS re-ranking against float64 brute force. The database is streamed in row chunks (from
tensors or memory-mapped arrays), so neither it nor the Q x N score matrix is ever held whole."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Rows = Tensor | np.ndarray


def check_k(k: object, n: int) -> None:
    """TypeError unless ``k`` is an integer (not a bool or float), ValueError unless 1 <= k <= n."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the database size {n}, got {k}")


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an int; TypeError unless it is an integer (not a bool or float), ValueError below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def topk_lowest_id(scores: Tensor, k: int, *, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """Top-k columns of (Q, n) ``scores``, best first, equal scores ordered (and chosen) by lower column; NaN
    scores count as -inf (ranked last; torch.topk would rank them first), replaced in ``scores`` itself when
    ``inplace``. Takes ``torch.topk`` of k + 1 and falls back to a stable sort only for rows whose (k+1)-th score
    equals the k-th (a tie across the selection's edge): no pass over the whole score matrix besides topk's."""
    inf = float("inf")
    scores = scores.nan_to_num_(-inf, inf, -inf) if inplace else torch.nan_to_num(scores, -inf, inf, -inf)
    n = scores.shape[1]
    vals, idx = torch.topk(scores, min(k + 1, n), dim=1)
    if n > k:
        tied = vals[:, k] == vals[:, k - 1]  # an equal score outside the selection
        vals, idx = vals[:, :k], idx[:, :k]
        if tied.any():
            rows = tied.nonzero().squeeze(1)
            idx[rows] = torch.sort(scores[rows], dim=1, descending=True, stable=True).indices[:, :k]
            vals[rows] = scores[rows].gather(1, idx[rows])
    by_col = torch.sort(idx, dim=1).indices  # order the selection by (score desc, column asc)
    idx, vals = idx.gather(1, by_col), vals.gather(1, by_col)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx.gather(1, order)


def first_kept(keep: Tensor, k: int) -> Tensor:
    """Column indices of the first ``k`` True entries of each row of (Q, n) ``keep``, in column (rank) order;
    rows with fewer than k fill up with False columns. Runs on keep's device, without host synchronisation."""
    return torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :k]


def merge_topk(best: tuple[Tensor, Tensor] | None, scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Merge sorted candidate lists; ``best`` holds lower ids than ``ids``, so a stable sort keeps ties by id."""
    if best is not None:
        scores, ids = torch.cat([best[0], scores], 1), torch.cat([best[1], ids], 1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), ids.gather(1, order)


def exact_search(queries: Tensor, database: Rows | Sequence[Rows], k: int, *,
                 chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Top-k database rows by cosine similarity to each query: (scores (Q, k) fp32, ids (Q, k) int64), best
    first, ties broken by the lower id. ``database`` is one (N, D) tensor/array or a list of parts in id order
    (e.g. memory-mapped shards). Rows are L2-normalised here; computed in fp32 on the queries' device."""
    parts = list(database) if isinstance(database, (list, tuple)) else [cast(Rows, database)]
    if not isinstance(queries, Tensor):
        raise TypeError(f"queries must be a torch.Tensor (Q, D), got {type(queries).__name__}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (database rows per block), got {chunk!r}")
    if queries.dim() != 2 or any(p.ndim != 2 for p in parts):
        raise ValueError(f"queries must be (Q, D) and the database (N, D), got {tuple(queries.shape)} and "
                         f"{[tuple(p.shape) for p in parts]}")
    if any(p.shape[1] != queries.shape[1] for p in parts):
        raise ValueError(f"queries have {queries.shape[1]} dimensions but the database {parts[0].shape[1]}")
    check_k(k, sum(p.shape[0] for p in parts))
    q = F.normalize(queries.float(), dim=1)
    best, offset = None, 0
    for part in parts:
        for start in range(0, part.shape[0], chunk):
            block = part[start:start + chunk]
            block = torch.from_numpy(np.asarray(block, np.float32)) if isinstance(block, np.ndarray) else block
            block = F.normalize(block.to(q.device, torch.float32), dim=1)
            scores, cols = topk_lowest_id(q @ block.T, min(k, block.shape[0]), inplace=True)
            best = merge_topk(best, scores, cols + (offset + start), k)
        offset += part.shape[0]
    assert best is not None  # check_k: the database has at least k >= 1 rows
    return best
