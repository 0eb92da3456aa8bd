"""Exact nearest-neighbour search by cosine similarity in plain PyTorch (the reference every faster backend
is checked against): streams the database in chunks, so the full Q x N score matrix never exists."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def exact_search(queries: Tensor, database: Tensor, k: int, *, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Top-k database rows by cosine similarity to each query: (scores (Q, k) fp32, ids (Q, k) int64),
    best first, ties broken by the lower id. Rows are L2-normalised here; computed in fp32 on the queries' device."""
    if queries.dim() != 2 or database.dim() != 2:
        raise ValueError(f"queries must be (Q, D) and database (N, D), got {tuple(queries.shape)} and "
                         f"{tuple(database.shape)}")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dimensions but the database {database.shape[1]}")
    if not 1 <= k <= database.shape[0]:
        raise ValueError(f"k must be between 1 and the database size {database.shape[0]}, got {k}")
    q = F.normalize(queries.float(), dim=1)
    best_scores, best_ids = [], []
    for start in range(0, database.shape[0], chunk):
        block = F.normalize(database[start:start + chunk].to(q.device, torch.float32), dim=1)
        scores = q @ block.T
        # a stable descending sort keeps equal scores in id order; keep each chunk's k best
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores.append(scores.gather(1, order))
        best_ids.append(order + start)
    scores, ids = torch.cat(best_scores, dim=1), torch.cat(best_ids, dim=1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), ids.gather(1, order)
