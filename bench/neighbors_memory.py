"""Memory the training contexts take to open a neighbours file: anonymous memory kept after ``TrainingContexts``
opened it (over the process's before), and the peak of what Python and NumPy allocated meanwhile (tracemalloc;
pages of memory-mapped files are the kernel's page cache, not counted). A synthetic database
of N random 64-d entries (the ``tiny`` config's width) is both the training and the retrieval database; the .npz
holds K random neighbours per entry with scores (true cosines at the rows the contexts check). Makes both first
if WORKDIR does not hold them.

    python bench/neighbors_memory.py WORKDIR [--entries 2000000] [--k 20]
"""

from __future__ import annotations

import argparse
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from rdm_fast import RDMConfig
from rdm_fast.data import NEIGHBOR_CHECK_ROWS, TrainingContexts
from rdm_fast.retrieval import save_neighbors
from rdm_fast.retrieval.database import write_database


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def make(db: Path, nn: Path, n: int, k: int) -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb.astype(np.float16)
    write_database(db, emb, {"name": "toy64", "dim": 64, "normalized": True}, shard_size=500_000)
    ids = (np.arange(n)[:, None] + rng.integers(1, n, (n, k))) % n  # never the entry itself
    scores = rng.random((n, k), np.float32)
    rows = np.unique(np.linspace(0, n - 1, min(n, NEIGHBOR_CHECK_ROWS)).round().astype(np.int64))
    e = emb.astype(np.float32)
    scores[rows] = np.einsum("qd,qkd->qk", e[rows], e[ids[rows]])
    save_neighbors(nn, torch.from_numpy(ids), torch.from_numpy(scores))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--entries", type=int, default=2_000_000)
    p.add_argument("--k", type=int, default=20)
    args = p.parse_args()
    db, nn = args.workdir / f"db_{args.entries}", args.workdir / f"nn_{args.entries}_{args.k}.npz"
    if not nn.is_file():
        make(db, nn, args.entries, args.k)
    cfg = RDMConfig.resolve("tiny")
    base = status("RssAnon")
    tracemalloc.start()
    contexts = TrainingContexts(cfg, db, db, nn)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    kept = status("RssAnon") - base
    print(f"{args.entries} entries x {args.k} neighbours (k_nn {contexts.k}): kept {kept / 2**20:.0f} MiB, "
          f"peak allocated {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
