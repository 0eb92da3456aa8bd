"""Conditioning contexts from a database: the retrieval half of sampling an RDM.

Conventions of the released models (RDM_FACTS.md, :class:`rdm_fast.RDMConfig`):

* without a text token (imagenet, ffhq; ``k_nn`` = 4): ``[query, k_nn - 1 nearest entries]``, unnormalised;
* with a text token (rdm768; ``k_nn`` = 10): ``[text or query embedding, k_nn nearest entries]``, L2-normalised.

Queries are embeddings from the database's encoder: a caption's, an image's, or, for unconditional "top-m"
sampling, a database entry drawn from the m most often retrieved ones (its own entry is then excluded from its
neighbours). Search and gather run on the queries' device; on a GPU with the Triton backend nothing here
waits for the GPU, so the next batch's retrieval can be queued while the current batch denoises.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import RDMConfig
from .database import Database
from .search import first_kept

log = logging.getLogger("rdm_fast.retrieval")

HOME_ENV = "RDM_FAST_HOME"


def databases_dir() -> Path:
    """Where named databases live: ``$RDM_FAST_HOME/databases`` (default ``~/.cache/rdm_fast/databases``)."""
    home = os.environ.get(HOME_ENV) or Path.home() / ".cache" / "rdm_fast"
    return Path(home) / "databases"


def locate_database(name_or_path: str | Path) -> Path:
    """A database directory given as a path, or by name under :func:`databases_dir` (``--db imagenet``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if len(path.parts) > 1:  # a path, not a name
        raise FileNotFoundError(f"database directory {path} does not exist")
    named = databases_dir() / str(name_or_path)
    if named.exists():
        return named
    raise FileNotFoundError(f"no database {str(name_or_path)!r}: neither a directory nor a database in "
                            f"{databases_dir()} (build one with python -m rdm_fast.db build, or import the official "
                            f"parts with python -m rdm_fast.db import-npz, then pass its path or put it there)")


def check_database_for_model(db: Database, cfg: RDMConfig) -> None:
    """Raise ValueError unless ``db``'s embeddings are the kind the model was trained on."""
    if db.dim != cfg.context_dim:
        raise ValueError(f"{db.path} holds {db.dim}-d embeddings but the model expects {cfg.context_dim}-d "
                         "(its context_dim)")
    if cfg.retrieval_encoder is not None and db.encoder_name != cfg.retrieval_encoder:
        raise ValueError(f"{db.path} was made by encoder {db.encoder_name!r} but the model was trained on "
                         f"{cfg.retrieval_encoder!r} embeddings")
    needed = cfg.k_nn if cfg.text_token else cfg.k_nn - 1
    if len(db) < needed + 1:
        raise ValueError(f"{db.path} holds {len(db)} entries; this model's contexts need at least {needed + 1}")


def neighbour_context(db: Database, queries: Tensor, k: int, *, query_ids: Tensor | None = None,
                      normalize: bool = False) -> Tensor:
    """(Q, 1 + k, D) contexts: each query embedding followed by its k nearest entries.

    ``query_ids`` (Q,) marks queries that are database entries themselves: their own entry is skipped (one extra
    neighbour is retrieved and the query's id dropped, on the device, without synchronising).
    """
    if queries.dim() != 2:
        raise ValueError(f"queries must be (Q, D), got {tuple(queries.shape)}")
    if query_ids is None:
        _, ids = db.search(queries, k)
    else:
        _, ids = db.search(queries, k + 1)
        ids = ids.gather(1, first_kept(ids != query_ids.to(ids.device)[:, None], k))
    ctx = torch.cat([queries.float()[:, None], db.embeddings(ids).to(queries.device)], dim=1)
    return F.normalize(ctx, dim=-1) if normalize else ctx


def model_context(db: Database, cfg: RDMConfig, queries: Tensor, *, query_ids: Tensor | None = None) -> Tensor:
    """Contexts laid out as model ``cfg`` was trained with (see the module docstring)."""
    k = cfg.k_nn if cfg.text_token else cfg.k_nn - 1
    return neighbour_context(db, queries, k, query_ids=query_ids, normalize=cfg.normalized_embeddings)


def draw_pseudo_queries(db: Database, n: int, top_m: float, generator: torch.Generator) -> Tensor:
    """n entry ids drawn uniformly from the top fraction ``top_m`` of the database's proposal ranking (every
    entry when the database has no ranking, with a warning)."""
    if db.manifest.get("proposals"):
        pool = db.proposals(top_m)
        log.info("pseudo-queries drawn from the top %g of %s's proposal ranking: %d of %d entries", top_m,
                 db.path.name, len(pool), len(db))
        if len(pool) < n:
            log.warning("%d samples from only %d distinct pseudo-queries (top %g of %d entries): some repeat; "
                        "raise --top-m for more variety", n, len(pool), top_m, len(db))
    else:
        log.warning("%s has no proposal ranking (python -m rdm_fast.db neighbors ...): drawing pseudo-queries "
                    "uniformly from all %d entries instead of the top %g", db.path, len(db), top_m)
        pool = torch.arange(len(db))
    return pool[torch.randint(0, len(pool), (n,), generator=generator)]
