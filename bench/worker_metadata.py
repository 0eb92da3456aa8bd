"""Memory a training data-loader worker holds for a training database's metadata: a ``TrainingImages`` over a
synthetic image database (ImageNet-style source paths, 8-d embeddings, shards of 100,000 rows), opened lazily as
in a worker, fetching random items (the images do not exist: each fetch reads the metadata, then is skipped).
Prints the process's anonymous memory (RssAnon) before and after. Makes the database first if DB does not exist.

    python bench/worker_metadata.py DB [--entries 3000000] [--items 1000]
"""

from __future__ import annotations

import argparse
import logging
import pickle
import time
from pathlib import Path

import numpy as np

from rdm_fast.data import TrainingImages
from rdm_fast.retrieval import Database
from rdm_fast.retrieval.database import write_database


def make(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    cls = rng.integers(0, 1000, n)
    wnid = np.char.add("n", np.char.zfill(cls.astype(str), 8))
    sources = np.char.add(np.char.add(np.char.add("train/", wnid), np.char.add("/", wnid)),
                          np.char.add("_", np.char.add(np.arange(n).astype(str), ".JPEG")))
    emb = rng.standard_normal((n, 8)).astype(np.float16)
    write_database(path, emb, {"name": "toy8", "dim": 8, "normalized": False}, sources=sources, class_ids=cls,
                   shard_size=100_000, build={"kind": "images", "crop": "center", "crop_size": 256},
                   image_root="/nonexistent")


def rss_anon_mb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("RssAnon"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("db", type=Path)
    p.add_argument("--entries", type=int, default=3_000_000)
    p.add_argument("--items", type=int, default=1000)
    args = p.parse_args()
    if not args.db.exists():
        make(args.db, args.entries)
    logging.disable(logging.WARNING)  # every fetch warns that its image is missing
    # as a worker receives it: pickled without its database, which it opens on first use
    images = pickle.loads(pickle.dumps(TrainingImages(Database.open(args.db, backend="torch", device="cpu"), 256)))
    rng = np.random.default_rng(0)
    before, start = rss_anon_mb(), time.perf_counter()
    for i in rng.integers(0, len(images), args.items):
        images[int(i)]
    print(f"{args.items} items: RssAnon {before} -> {rss_anon_mb()} MB, {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
