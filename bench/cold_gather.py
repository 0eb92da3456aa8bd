"""Cold-cache reads of scattered database rows (neighbour gathers, re-ranking), through the shards' default
memory maps (how ``Database.embeddings`` read them before) and through ``Database.embeddings`` (maps advised
MADV_RANDOM): bytes read from disk (/proc/self/io) and time per 256 random rows, with the shards evicted from the
page cache before each read. Linux only; needs a database large enough that read-ahead matters (GBs).

    python bench/cold_gather.py DB [--rows 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from rdm_fast.retrieval import Database


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("db")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    db = Database.open(args.db, backend="torch", device="cpu")
    files = [os.path.join(args.db, s["embeddings"]) for s in db.manifest["shards"]]
    offsets = np.cumsum([0] + [len(s) for s in db.shard_arrays])

    def evict() -> None:
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

    def disk_reads() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))

    def default_maps(ids: np.ndarray) -> None:
        for i in np.sort(ids):
            j = int(np.searchsorted(offsets, i, "right")) - 1
            np.array(db.shard_arrays[j][i - offsets[j]], np.float32)  # a copy: the row is read

    rng = np.random.default_rng(0)
    for name, read in (("default maps", default_maps),
                       ("Database.embeddings", lambda ids: db.embeddings(torch.from_numpy(ids)))):
        for _ in range(args.repeats):
            ids = rng.choice(len(db), args.rows, replace=False)
            evict()
            before, start = disk_reads(), time.perf_counter()
            read(ids)
            print(f"{name}: {(disk_reads() - before) / 2**20:.1f} MiB read, "
                  f"{1000 * (time.perf_counter() - start):.0f} ms")


if __name__ == "__main__":
    main()
