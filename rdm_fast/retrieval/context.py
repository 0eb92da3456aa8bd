"""Conditioning contexts from a database: the retrieval half of sampling an RDM.

Conventions of the released models (:class:`rdm_fast.RDMConfig`):

* without a text token (imagenet, ffhq; ``k_nn`` = 4): ``[query, k_nn - 1 nearest entries]``, unnormalised;
* with a text token (rdm768; ``k_nn`` = 10): ``[text or query embedding, k_nn nearest entries]``, L2-normalised.

Queries are embeddings from the database's encoder: a caption's, an image's, or, for unconditional "top-m"
sampling, a database entry drawn from the m most often retrieved ones (its own entry is then excluded from its
neighbours). Search and gather run on the queries' device; on a GPU with the Triton backend nothing here
waits for the GPU, so the next batch's retrieval can be queued while the current batch denoises.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import RDMConfig
from .database import MANIFEST, Database
from .search import check_count, first_kept

log = logging.getLogger("rdm_fast.retrieval")

HOME_ENV = "RDM_FAST_HOME"


def databases_dir() -> Path:
    """Where named databases live: ``$RDM_FAST_HOME/databases`` (default ``~/.cache/rdm_fast/databases``)."""
    home = os.environ.get(HOME_ENV) or Path.home() / ".cache" / "rdm_fast"
    return Path(home) / "databases"


def locate_database(name_or_path: str | Path) -> Path:
    """A database directory given as a path, or by name under :func:`databases_dir` (``--db imagenet``). A bare
    name that is also a folder here: the folder where it holds a database, else the named database (with a log
    line), else the folder (whose error then says what it lacks)."""
    path = Path(name_or_path)
    named = databases_dir() / str(name_or_path)
    if path.exists():
        if len(path.parts) == 1 and not (path / MANIFEST).is_file() and (named / MANIFEST).is_file():
            log.info("%s here holds no database: using the database named %r, %s", path, str(name_or_path), named)
            return named
        return path
    if len(path.parts) > 1:  # a path, not a name
        raise FileNotFoundError(f"database directory {path} does not exist")
    if named.exists():
        return named
    known = sorted(p.name for p in databases_dir().glob("*") if (p / MANIFEST).is_file())
    raise FileNotFoundError(f"no database {str(name_or_path)!r}: neither a directory nor a database in "
                            f"{databases_dir()} ({'it holds ' + ', '.join(known) if known else 'none there'}; build "
                            "one with python -m rdm_fast.db build, or import the official parts with python -m "
                            "rdm_fast.db import-npz, then pass its path or put it there)")


def default_neighbors(cfg: RDMConfig, *, include_query: bool = True) -> int:
    """Neighbours per context by the model's conventions: k_nn with a text token; without one, as many as fill
    the k_nn slots beside the query (all k_nn when the query is left out)."""
    return cfg.k_nn if cfg.text_token or not include_query else cfg.k_nn - 1


def check_database_embeddings(db: Database, cfg: RDMConfig) -> None:
    """Raise ValueError unless ``db``'s embeddings are the kind the model was trained on (width, encoder); the
    first half of :func:`check_database_for_model`, and what :func:`model_context` checks on every call."""
    if not isinstance(db, Database):
        raise TypeError(f"expected db to be a rdm_fast.retrieval.Database (Database.open(path)), got "
                        f"{type(db).__name__}")
    if db.dim != cfg.context_dim:
        raise ValueError(f"{db.path} holds {db.dim}-d embeddings but the model expects {cfg.context_dim}-d "
                         "(its context_dim)")
    if cfg.retrieval_encoder is not None and db.encoder_name != cfg.retrieval_encoder:
        raise ValueError(f"{db.path} was made by encoder {db.encoder_name!r} but the model was trained on "
                         f"{cfg.retrieval_encoder!r} embeddings")


def check_database_for_model(db: Database, cfg: RDMConfig, neighbors: int | None = None, *,
                             own_entry: bool = True) -> None:
    """Raise ValueError unless ``db``'s embeddings are the kind the model was trained on and it holds more than
    ``neighbors`` entries (default: the model's convention); at least ``neighbors`` without ``own_entry``, for
    queries that are no database entries (captions, query images), whose neighbours may be every entry."""
    check_database_embeddings(db, cfg)
    needed = default_neighbors(cfg) if neighbors is None else neighbors
    if len(db) < needed + own_entry:
        raise ValueError(f"{db.path} holds {len(db)} entries; contexts with {needed} neighbours need at least "
                         f"{needed + own_entry}")


def neighbour_context(db: Database, queries: Tensor, k: int, *, query_ids: Tensor | None = None,
                      normalize: bool = False, include_query: bool = True) -> Tensor:
    """(Q, 1 + k, D) contexts: each query embedding followed by its k nearest entries; (Q, k, D), the neighbours
    alone, without ``include_query``. ``k = 0`` gives the queries alone (e.g. a caption's embedding).

    ``query_ids`` (Q,) marks queries that are database entries themselves: their own entry is skipped (one extra
    neighbour is retrieved and the query's id dropped, on the device, without synchronising). ValueError for
    queries that are not (Q, D) float of the database's width, ``query_ids`` that are not (Q,) integer ids, and
    (on the CPU, where checking costs no synchronisation) values out of range; and approximate searches that found
    fewer than k neighbours (on the CPU, and after FAISS searches, which synchronise anyway, on any device).
    """
    queries = db.checked_queries(queries)  # once: the searches below take them as checked
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {k!r}")  # as the searches say it
    if k < 0 or (k == 0 and not include_query):
        raise ValueError(f"k must be an int >= {int(not include_query)}"
                         f"{' without the query' if not include_query else ''}, got {k!r}")
    k = int(k)
    if query_ids is not None and k >= len(db) > 0:  # the search asks for one more, the query's own entry
        raise ValueError(f"k must be at most {len(db) - 1} (the database size {len(db)} less the query's own "
                         f"entry, which is left out), got {k}")
    parts = [queries.float()[:, None]] if include_query else []
    if k > 0:
        if query_ids is None:
            _, ids = db.search_checked(queries, k)
        else:
            own = _checked_query_ids(db, query_ids, len(queries))
            _, ids = db.search_checked(queries, k + 1)
            ids = ids.gather(1, first_kept(ids != own.to(ids.device)[:, None], k))
        # an approximate index marks missing results -1; a FAISS search waits for the host anyway (its queries and
        # ids pass through it), so checking CUDA ids after one adds no stall to a loop that has none
        if (ids.device.type == "cpu" or db.backend.startswith("faiss")) and bool((ids < 0).any()):
            short = int((ids < 0).any(1).nonzero()[0, 0])
            raise ValueError(f"the {db.backend} search of {db.path} found fewer than {k} neighbours for query "
                             f"{short}: search more of the index (e.g. a larger nprobe) or ask for fewer")
        parts.append(db.embeddings(ids).to(queries.device).float())
    ctx = torch.cat(parts, dim=1)
    return F.normalize(ctx, dim=-1) if normalize else ctx


def _checked_query_ids(db: Database, query_ids: Tensor | np.ndarray | Sequence[int], n: int) -> Tensor:
    """``query_ids`` as a (n,) integer tensor (arrays and lists converted), ids in range where they are on the CPU."""
    ids = query_ids if isinstance(query_ids, Tensor) else torch.as_tensor(np.asarray(query_ids))
    if ids.shape == (0,) == (n,):
        return ids.long()  # no queries: an empty list is float64 to NumPy
    if ids.shape != (n,) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"query_ids must be the ({n},) integer entry ids of the queries, got {ids.dtype} "
                         f"{tuple(ids.shape)}")
    if ids.device.type == "cpu" and n and (int(ids.min()) < 0 or int(ids.max()) >= len(db)):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"query_ids holds {bad}, not an entry id of {db.path} ([0, {len(db)}))")
    return ids


def model_context(db: Database, cfg: RDMConfig, queries: Tensor, *, query_ids: Tensor | None = None,
                  k: int | None = None, include_query: bool = True) -> Tensor:
    """Contexts laid out as model ``cfg`` was trained with (see the module docstring), normalised where it says.
    ``k`` (default :func:`default_neighbors`) and ``include_query`` are the reference's sampling options: more or
    fewer neighbours, the neighbours without the query, or (``k = 0``) the query alone, e.g. a caption.
    ValueError unless ``db`` holds the embeddings ``cfg`` was trained on (:func:`check_database_embeddings`:
    width and encoder; too few entries for ``k`` are reported by the search)."""
    if not isinstance(cfg, RDMConfig):
        raise TypeError(f"cfg must be the model's RDMConfig (e.g. rdm.config), got {type(cfg).__name__}")
    check_database_embeddings(db, cfg)
    k = default_neighbors(cfg, include_query=include_query) if k is None else k
    return neighbour_context(db, queries, k, query_ids=query_ids, normalize=cfg.normalized_embeddings,
                             include_query=include_query)


def draw_pseudo_queries(db: Database, n: int, top_m: float, generator: torch.Generator | None) -> Tensor:
    """n entry ids drawn uniformly from the top fraction ``top_m`` of the database's proposal ranking (every
    entry when the database has no ranking, with a warning). TypeError/ValueError for an ``n`` that is not an int
    >= 0, a ``top_m`` outside (0, 1] (also without a ranking) or a ``generator`` that is no torch.Generator."""
    n = check_count(n, "draw_pseudo_queries: n", 0)
    if isinstance(top_m, bool) or not isinstance(top_m, numbers.Real):
        raise TypeError(f"draw_pseudo_queries: top_m must be a fraction in (0, 1], got {top_m!r}")
    if not 0 < top_m <= 1:
        raise ValueError(f"draw_pseudo_queries: top_m must be a fraction in (0, 1], got {top_m!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"draw_pseudo_queries: generator must be a torch.Generator, got {type(generator).__name__}")
    if db.manifest.get("proposals"):
        pool = db.proposals(top_m)
        log.info("pseudo-queries drawn from the top %g of the proposal ranking of %s: %d of %d entries", top_m,
                 db.path.name, len(pool), len(db))
        if len(pool) < n:
            log.warning("%d samples from only %d distinct pseudo-quer%s (top %g of %d entries): some repeat; "
                        "raise --top-m for more variety", n, len(pool), "ies" if len(pool) != 1 else "y", top_m,
                        len(db))
    else:
        log.warning("%s has no proposal ranking (python -m rdm_fast.db neighbors ...): drawing pseudo-queries "
                    "uniformly from all %d entries instead of the top %g", db.path, len(db), top_m)
        pool = torch.arange(len(db))
    return pool[torch.randint(0, len(pool), (n,), generator=generator)]
