"""Training data of an RDM: the images of a training database, each with the context of its precomputed
neighbours in the retrieval database (as the paper's models were trained: neighbours found once in advance, the
image itself excluded).

Three inputs, all made by ``python -m rdm_fast.db``:

* the *training database* (``db build`` over the training images): its entries are the training examples. Each
  image is cut again exactly as it was cut when embedded (the build's crop mode and size, and the recorded
  corner of random crops), then resized to the model's image size if that differs; or, with random crops (the
  released ImageNet model's augmentation), cut at a new random window each epoch (:class:`TrainingImages`);
* the *retrieval database* the model will later sample with (it may be the training database itself);
* the *neighbours file* (``db neighbors RETRIEVAL --queries TRAINING --k K --out FILE``, or ``--exclude-self``
  when both are one database): row i holds the ids of entry i's nearest retrieval entries.

Since every entry's crop is fixed, so is what the frozen first stage makes of it (:meth:`RDM.encode_moments`):
a :class:`MomentCache` stores it once (float16, memory-mapped), and training then reads it instead of decoding
and encoding images (:class:`TrainingMoments`).

Contexts follow each model's layout (:mod:`rdm_fast.retrieval.context`): without a text token (imagenet, ffhq)
the ``k_nn`` nearest neighbours; with one (rdm768) the image's own embedding in the text token's place (an image
embedding stands in for a caption's, which is what lets these models train without paired text) followed by
``k_nn`` neighbours; L2-normalised where the model expects it.

:class:`TrainingOrder` fixes which entries every optimizer step sees, as a function of the seed and the global
batch only, so a run gives the same batches on any number of processes and resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from ._distributed import Processes
from ._files import (TEMP_SUFFIX, array_file_problem, atomic_npy_memmap, atomic_save_npy, atomic_write_json,
                     map_npz, not_a_file)
from .config import RDMConfig
from .rdm import RDM
from .retrieval.build import (current_max_image_pixels, load_rgb, random_fitted_window, replay_crop,
                              set_max_image_pixels)
from .retrieval.context import check_database_for_model
from .retrieval.database import Database
from .retrieval.neighbors import DIGEST_KEYS, database_digest, neighbor_files, same_entries

log = logging.getLogger("rdm_fast.data")


# what a derived seed is for: its second part, so that no two uses share a stream (SeedSequence pads short
# entropy with zeros, so (seed, e) and (seed, e, 0) would otherwise mix to the same seed)
SHUFFLE, DRAWS, DROPOUT, CROP = 0, 1, 2, 3
# neighbour scores must agree with the databases' vectors to this: the float16 vectors searched in fp32, or in
# fp16 on a GPU, score within about 1e-3 of each other; scores for other databases are off by 1e-2 and more
NEIGHBOR_SCORE_TOLERANCE = 5e-3
NEIGHBOR_CHECK_ROWS = 64


def derived_seed(seed: int, purpose: int, *parts: int) -> int:
    """A 32-bit seed mixed from integers (numpy's SeedSequence): independent streams per purpose
    (:data:`SHUFFLE`, :data:`DRAWS`, :data:`DROPOUT`, :data:`CROP`) and parts (epoch; step and position)."""
    return int(np.random.SeedSequence([seed, purpose, *parts]).generate_state(1)[0])


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def existing_neighbors_file(path: str | Path) -> Path:
    """The ids file of the neighbours ``path`` names; FileNotFoundError, saying how to make it, if it is missing."""
    file = neighbor_files(path)[0]
    if not file.is_file():
        raise FileNotFoundError(f"neighbours file {file} {not_a_file(file)} (make it with python -m rdm_fast.db "
                                "neighbors RETRIEVAL_DB --queries TRAINING_DB --k K --out FILE)")
    return file


def load_neighbors(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, str]]:
    """The (N, K) int64 neighbour ids of ``db neighbors`` (.npz with ``ids``, or .npy), their (N, K) scores
    (None when the file has none) and the digests of the databases they were computed for (.npz only; {} when
    not recorded): ``{"db": ..., "queries": ...}``."""
    files = neighbor_files(path)
    file = existing_neighbors_file(path)
    reading = file
    try:
        if file.suffix == ".npz":  # memory-mapped: a file of K columns for 20M entries is gigabytes
            z = map_npz(file)
            ids, scores = z.get("ids"), z.get("scores")
            digests = {k: str(z[f"{k}_digest"][()]) for k in DIGEST_KEYS if f"{k}_digest" in z}
        else:
            ids = np.load(file, mmap_mode="r", allow_pickle=False)
            reading = files[1]
            scores = np.load(reading, mmap_mode="r", allow_pickle=False) if reading.is_file() else None
            digests = {}
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{reading} is not a readable neighbours file ({array_file_problem(reading, e)})") from None
    if ids is None:
        raise ValueError(f"{file} is not a neighbours file: it has no 'ids' array")
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"{file} holds {ids.dtype} {ids.shape}; expected (N, K) integer neighbour ids")
    if scores is not None and (scores.shape != ids.shape or scores.dtype.kind != "f"):
        raise ValueError(f"{file} holds scores {scores.dtype} {scores.shape} for ids {ids.shape}; expected one "
                         "float score per id")
    return ids, scores, digests


class TrainingImages(Dataset):
    """Entry ``i`` of a training database -> {"pixels": (3, S, S) uint8, "index": i, "ok": bool}.

    The image is its database crop, cut again (see the module docstring); with ``random_crop`` it is instead the
    whole image with its short side resized to S (bicubic, as center crops are), cut at a random S x S window
    drawn anew each epoch from (``seed``, epoch, i): the released ImageNet model's augmentation, whose
    neighbours also stayed those found once per image. Items are then asked for as (i, epoch) (TrainingOrder's
    ``epochs``).
    ``ok`` is False (pixels zero) when the image cannot be read any more; the trainer leaves such entries out of
    the loss and counts them. The database is opened lazily in each data-loader worker.
    """

    def __init__(self, db: Database, size: int, image_root: str | Path | None = None, *, random_crop: bool = False,
                 seed: int = 0) -> None:
        build = db.manifest.get("build") or {}
        if build.get("kind") != "images" or not db.manifest.get("has_sources") or "crop" not in build:
            raise ValueError(f"{db.path} was not built from image files (python -m rdm_fast.db build), so its "
                             "entries have no images to train on")
        root = image_root if image_root is not None else db.manifest.get("image_root")
        self.path, self.size, self.root = db.path, size, Path(root) if root else None
        self.crop, self.crop_size, self.square = build["crop"], int(build["crop_size"]), build.get("fit_square")
        self.random_crop, self.seed = random_crop, seed
        self.max_pixels = current_max_image_pixels()  # for workers that do not inherit it (spawn, forkserver)
        self._warned: set[int] = set()  # entries already warned about (per data-loading process)
        self.count = len(db)
        if self.crop_size != size and not random_crop:
            log.info("%s: its %d px crops are resized to the model's %d px images", db.path, self.crop_size, size)
        self._db: Database | None = db

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:  # workers open their own memory maps
        return {**self.__dict__, "_db": None}

    @property
    def database(self) -> Database:
        """The training database (each data-loading worker opens its own)."""
        if self._db is None:
            self._db = Database.open(self.path, backend="torch", device="cpu")
        return self._db

    def file(self, i: int) -> Path:
        """The image file of entry ``i``."""
        source = Path(self.database.sources([i])[0])
        return source if source.is_absolute() or self.root is None else self.root / source

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = key if isinstance(key, tuple) else (key, None)
        if self.random_crop and epoch is None:
            raise ValueError("random crops are drawn per epoch: ask for entries as (index, epoch)")
        set_max_image_pixels(self.max_pixels)
        try:
            if self.random_crop:
                pixels = self._random_crop(i, cast(int, epoch))
            else:
                xy = cast(tuple[int, int], tuple(int(v) for v in self.database.patch_coords([i])[0])) \
                    if self.crop == "random" else None
                pixels = replay_crop(load_rgb(self.file(i)), self.crop, self.crop_size, xy, self.square)
                if self.crop_size != self.size:
                    pixels = np.asarray(Image.fromarray(pixels).resize((self.size, self.size),
                                                                       Image.Resampling.BICUBIC))
            ok = True
        except Exception as e:  # missing, unreadable or changed since the build (any decoder error): skip it
            if i not in self._warned:  # once per entry, not at every draw of it
                self._warned.add(i)
                log.warning("training entry %d cannot be used: %s", i, str(e).splitlines()[0][:300])
            pixels, ok = np.zeros((self.size, self.size, 3), np.uint8), False
        return {"pixels": torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), "index": i, "ok": ok}

    def _random_crop(self, i: int, epoch: int) -> np.ndarray:
        """Entry ``i``'s image, short side resized to the model's size, at epoch ``epoch``'s random window."""
        return random_fitted_window(load_rgb(self.file(i)), self.size,
                                    np.random.default_rng(derived_seed(self.seed, CROP, epoch, i)))


class TrainingContexts:
    """Contexts (B, tokens, D) float32 of training entries, in the model's layout (see the module docstring)."""

    def __init__(self, cfg: RDMConfig, training_db: str | Path, retrieval_db: str | Path,
                 neighbors: str | Path) -> None:
        self.training = Database.open(training_db, backend="torch", device="cpu")
        same = Path(retrieval_db).resolve() == self.training.path.resolve()
        self.retrieval = self.training if same else Database.open(retrieval_db, backend="torch", device="cpu")
        check_database_for_model(self.retrieval, cfg)
        self.retrieval.check_encoder(self.training.encoder_name)
        ids, scores, digests = load_neighbors(neighbors)
        for key, db in (("db", self.retrieval), ("queries", self.training)):
            if key in digests and digests[key] != database_digest(db):
                raise ValueError(f"{neighbors} was computed for another {'retrieval' if key == 'db' else 'query'} "
                                 f"database than {db.path}: recompute it for these databases")
        self.k = cfg.k_nn
        if ids.shape[0] != len(self.training):
            raise ValueError(f"{neighbors} holds neighbours of {ids.shape[0]} entries but {self.training.path} has "
                             f"{len(self.training)}: compute them with --queries {self.training.path}")
        if ids.shape[1] < self.k:
            raise ValueError(f"{neighbors} holds {ids.shape[1]} neighbours per entry; the model's contexts take "
                             f"{self.k} (k_nn): recompute them with --k {self.k} or more")
        if ids.shape[1] > self.k:
            log.info("%s holds %d neighbours per entry: the model's contexts take the nearest %d (k_nn)", neighbors,
                     ids.shape[1], self.k)
        ids = np.array(ids[:, :self.k], np.int64, order="C")  # a copy: the files are memory-mapped read-only
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.retrieval)):
            raise ValueError(f"{neighbors} holds ids outside {self.retrieval.path}'s {len(self.retrieval)} entries: "
                             "were they computed against another retrieval database?")
        # the same entries, by path or by content (a copy of the training database as the retrieval one)
        if same_entries(self.retrieval, self.training) and (ids == np.arange(len(ids))[:, None]).any():
            queries = "" if same else f" --queries {self.training.path}"
            raise ValueError(f"{neighbors} lists entries as their own neighbours: the model would learn to copy its "
                             f"context. Compute them with python -m rdm_fast.db neighbors {self.retrieval.path}"
                             f"{queries} --k {self.k} --exclude-self --out FILE")
        if scores is not None:
            self._check_scores(neighbors, ids, scores)
        else:
            log.warning("%s holds no scores: it cannot be checked against the databases", neighbors)
        self.ids = torch.from_numpy(ids)
        digest = hashlib.sha256((database_digest(self.training) + database_digest(self.retrieval)).encode())
        digest.update(ids.data)  # the ids' own buffer: no copy of N x k x 8 bytes
        self._digest = digest.hexdigest()
        self.own = cfg.text_token
        self.normalize = cfg.normalized_embeddings

    def _check_scores(self, neighbors: str | Path, ids: np.ndarray, scores: np.ndarray) -> None:
        """The stored scores (N, K >= k) of a sample of rows must be the cosine similarities of those training
        entries to the listed retrieval entries (N, k): ids of another database (of the same size) pass every
        other check."""
        rows = np.unique(np.linspace(0, len(ids) - 1, min(len(ids), NEIGHBOR_CHECK_ROWS)).round().astype(np.int64))
        if not len(rows):
            return
        queries = F.normalize(self.training.embeddings(torch.from_numpy(rows)), dim=-1)
        found = F.normalize(self.retrieval.embeddings(torch.from_numpy(ids[rows])), dim=-1)
        cosine = torch.einsum("qd,qkd->qk", queries, found).numpy()
        stored = np.asarray(scores[rows, :ids.shape[1]], np.float32)
        worst = float(np.nan_to_num(np.abs(cosine - stored), nan=np.inf).max())
        if worst > NEIGHBOR_SCORE_TOLERANCE:
            raise ValueError(f"{neighbors} does not match the databases: its scores differ by up to {worst:.3g} "
                             f"(tolerance {NEIGHBOR_SCORE_TOLERANCE}) from the similarities of {self.training.path}'s "
                             f"entries to the listed entries of {self.retrieval.path}; were they computed for other "
                             "databases? Recompute them with python -m rdm_fast.db neighbors")

    def digest(self) -> str:
        """SHA-256 of what the contexts are made of (both databases' shards, the neighbour ids used)."""
        return self._digest

    def __call__(self, entries: Tensor) -> Tensor:
        """Contexts of training entries ``entries`` (B,)."""
        ctx = self.retrieval.embeddings(self.ids[entries])
        if self.own:
            ctx = torch.cat([self.training.embeddings(entries)[:, None], ctx], dim=1)
        return F.normalize(ctx, dim=-1) if self.normalize else ctx


class TrainingOrder(Sampler[Any]):
    """The entries this process reads, optimizer step after step, from ``start_step`` on.

    Entries come in an endless stream of epochs, each a fresh permutation drawn from (seed, epoch). Step ``s``
    consumes stream positions ``[s * G, (s + 1) * G)`` with G = ``batch * world * accumulate``; micro-batch ``a``
    of rank ``r`` takes the ``batch`` positions starting at ``s * G + (a * world + r) * batch``. The batches of a
    step therefore depend only on the seed and G, not on how G is split.
    """

    def __init__(self, n: int, *, seed: int, batch: int, world: int = 1, rank: int = 0, accumulate: int = 1,
                 start_step: int = 0, epochs: bool = False) -> None:
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.seed, self.batch, self.world, self.rank = n, seed, batch, world, rank
        self.accumulate, self.start_step, self.epochs = accumulate, start_step, epochs
        self._epoch = -1
        self._perm: Tensor | None = None

    @property
    def global_batch(self) -> int:
        return self.batch * self.world * self.accumulate

    def positions(self, first: int, count: int) -> Tensor:
        """The entries at stream positions ``[first, first + count)``."""
        out = []
        while count:
            epoch, offset = divmod(first, self.n)
            if epoch != self._epoch:
                gen = torch.Generator().manual_seed(derived_seed(self.seed, SHUFFLE, epoch))
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
            take = min(count, self.n - offset)
            assert self._perm is not None  # drawn for this epoch above
            out.append(self._perm[offset:offset + take])
            first, count = first + take, count - take
        return torch.cat(out)

    def _start(self, step: int, micro: int) -> int:
        return step * self.global_batch + (micro * self.world + self.rank) * self.batch

    def micro_batch(self, step: int, micro: int) -> Tensor:
        """The entries of micro-batch ``micro`` of optimizer step ``step`` on this rank."""
        return self.positions(self._start(step, micro), self.batch)

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        """The entries, or with ``epochs`` (entry, epoch of its stream position) pairs."""
        step = self.start_step
        while True:
            for micro in range(self.accumulate):
                entries = self.micro_batch(step, micro).tolist()
                if self.epochs:
                    first = self._start(step, micro)
                    yield from ((e, (first + j) // self.n) for j, e in enumerate(entries))
                else:
                    yield from entries
            step += 1


class MomentCache:
    """The first stage's output for every training entry, stored once in ``DIR``: shards of contiguous entries
    (``moments_<run>_<r>.npy``, (n, C, h, w) float16, and ``readable_<run>_<r>.npy``, (n,) bool: False where
    the image could not be read, its row unused), one per process r of the run that made them, and
    ``manifest.json``, written last, naming the shards and what the moments depend on (the first stage's weights,
    the training data, the image size). Each process writes only its own files, under a temporary name renamed
    into place; ``run`` is a token drawn per filling run, so neither a concurrent run nor the files a killed one
    left can be mistaken for this run's."""

    FORMAT = "rdm_fast-moments"

    def __init__(self, directory: str | Path, identity: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.identity = {"format": self.FORMAT, "format_version": 1, **identity}

    @property
    def count(self) -> int:
        return self.identity["count"]

    def manifest(self) -> dict | None:
        """The finished cache's manifest (None if there is none yet); ValueError if it was made from other data."""
        file = self.dir / "manifest.json"
        if not file.is_file():
            return None
        try:
            have = json.loads(file.read_text())
            if not isinstance(have, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is damaged ({str(e).splitlines()[0]}): delete {self.dir} to encode the images "
                             "again") from None
        if have.get("format") != self.FORMAT:  # another tool's folder (a database's manifest): not ours to delete
            raise ValueError(f"--latents {self.dir} holds a manifest.json that is not a first-stage cache's (format "
                             f"{have.get('format')!r}): give the cache a folder of its own")
        changed = [k for k in self.identity if have.get(k) != self.identity[k]]
        if changed:
            raise ValueError(f"{self.dir} holds first-stage outputs of another {', '.join(changed)}: delete it or "
                             "choose another directory")
        return have

    @staticmethod
    def share(count: int, world: int, rank: int) -> range:
        """The entries process ``rank`` of ``world`` encodes."""
        size = -(-count // world)
        return range(min(count, rank * size), min(count, (rank + 1) * size))

    def shard_files(self, run: str, rank: int) -> tuple[Path, Path]:
        return self.dir / f"moments_{run}_{rank}.npy", self.dir / f"readable_{run}_{rank}.npy"

    def check_writable(self) -> None:
        """Create the directory and write a probe file there: a bad path fails before the encoding, not after.
        ValueError for a folder holding other files than a cache's (e.g. the training images themselves)."""
        foreign = sorted(p.name for p in self.dir.iterdir() if not (
            p.name == "manifest.json" or p.name.startswith(("moments_", "readable_", "."))
        )) if self.dir.is_dir() else []
        if foreign:
            raise ValueError(f"--latents {self.dir} holds {len(foreign)} other file{'s' * (len(foreign) > 1)} (e.g. "
                             f"{foreign[0]}): give the cache a folder of its own")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=TEMP_SUFFIX, dir=self.dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ValueError(f"--latents {self.dir}: cannot store the first stage's outputs there "
                             f"({e.strerror or e})") from None

    @contextmanager
    def shard_writer(self, run: str, rank: int, rows: int,
                     shape: tuple[int, ...]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This process's share to fill in place, in entry order: ``(moments, readable)``, the moments
        memory-mapped from a temporary file (an ImageNet-sized share never sits in RAM); both are stored under
        their final names when the block ends without an error."""
        moments_file, readable_file = self.shard_files(run, rank)
        readable = np.zeros(rows, bool)
        with atomic_npy_memmap(moments_file, np.float16, (rows, *shape)) as moments:
            yield moments, readable
        atomic_save_npy(readable_file, readable)

    def unfinished_bytes(self) -> tuple[int, int]:
        """(count, bytes) of the files besides a manifest: shards of fills that were killed, or of one running now
        (not the other processes' write probes; files that vanish while listed are skipped)."""
        count = size = 0
        for p in self.dir.iterdir() if self.dir.is_dir() else ():
            if p.name == "manifest.json" or p.name.startswith(".probe."):
                continue
            try:
                size += p.stat().st_size
                count += 1
            except FileNotFoundError:
                pass
        return count, size

    def commit(self, run: str, world: int) -> None:
        """Write the manifest naming the ``world`` shards of ``run`` (all written): the cache is then usable."""
        shards = []
        for rank in range(world):
            entries = self.share(self.count, world, rank)
            moments, readable = self.shard_files(run, rank)
            shards.append({"moments": moments.name, "readable": readable.name, "start": entries.start,
                           "stop": entries.stop})
        atomic_write_json(self.dir / "manifest.json", {**self.identity, "shards": shards})


class TrainingMoments(Dataset):
    """Entry ``i`` of a finished :class:`MomentCache` -> {"moments": float32 (C, h, w), "index": i, "ok": bool}."""

    def __init__(self, cache: MomentCache) -> None:
        manifest = cache.manifest()
        if manifest is None:
            raise FileNotFoundError(f"{cache.dir} holds no finished cache (manifest.json)")
        self.dir, self.count, self.shards = cache.dir, manifest["count"], manifest["shards"]
        for shard in self.shards:  # now, not at the first step or in a data-loading worker
            rows = shard["stop"] - shard["start"]
            self._check_shard(shard["moments"], np.float16, (rows, *manifest["shape"]))
            self._check_shard(shard["readable"], np.bool_, (rows,))
        self._starts = np.array([s["start"] for s in self.shards])
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None

    def _check_shard(self, name: str, dtype: type, shape: tuple[int, ...]) -> None:
        """ValueError naming a shard file that is missing, truncated or not the array the manifest records."""
        file = self.dir / name
        try:
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
            problem = None if arr.dtype == dtype and arr.shape == shape else \
                f"holds {arr.dtype} {arr.shape}, not the {np.dtype(dtype)} {shape} that manifest.json records"
        except (OSError, ValueError, EOFError) as e:
            problem = "is missing" if not file.exists() else f"cannot be read ({str(e).splitlines()[0]})"
        if problem:
            raise ValueError(f"{file} {problem}: delete {self.dir} to encode the images again")

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:  # workers open their own memory maps
        return {**self.__dict__, "_arrays": None}

    def readable(self) -> np.ndarray:
        """(N,) bool: whether each entry's image could be read when the cache was made."""
        return np.concatenate([np.load(self.dir / s["readable"]) for s in self.shards])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._arrays is None:
            self._arrays = [(np.load(self.dir / s["moments"], mmap_mode="r"), np.load(self.dir / s["readable"]))
                            for s in self.shards]
        j = int(np.searchsorted(self._starts, i, side="right")) - 1
        moments, readable = self._arrays[j]
        row = i - self.shards[j]["start"]
        return {"moments": torch.from_numpy(moments[row].astype(np.float32)), "index": i, "ok": bool(readable[row])}


def cached_moments(directory: str | Path, model: RDM, images: TrainingImages, procs: Processes,
                   device: torch.device, *, batch_size: int = 32, workers: int = 4,
                   progress: bool = True) -> TrainingMoments:
    """The first stage's output for every training image from the :class:`MomentCache` in ``directory``, computed
    there first if missing: each process encodes a contiguous share in float32 into its own files (stored as
    float16); they meet through the file system, not a collective, so a slow share cannot time the others out."""
    example = model.encode_moments(torch.zeros(1, 3, images.size, images.size, device=device))
    cache = MomentCache(directory, {"count": len(images), "shape": list(example.shape[1:]),
                                       "image_size": images.size, "training_db": database_digest(images.database),
                                       "first_stage": module_digest(model.first_stage)})
    if cache.manifest() is None:
        cache.check_writable()
        count, size = cache.unfinished_bytes() if procs.main else (0, 0)
        if count:
            log.warning("%s holds files of unfinished fills (%d, %.1f GiB), e.g. of killed runs: delete them unless "
                        "another run is filling this cache right now", cache.dir, count, size / 2**30)
        run = procs.from_rank0(uuid.uuid4().hex[:12])
        mine = MomentCache.share(len(images), procs.world, procs.rank)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, mine), batch_size=batch_size,
                                             num_workers=workers, pin_memory=device.type == "cuda",
                                             generator=torch.Generator())  # not a global RNG draw
        try:
            with torch.no_grad(), cache.shard_writer(run, procs.rank, len(mine), tuple(example.shape[1:])) as (
                    moments, readable), tqdm(total=len(mine), desc="encoding", unit="img",
                                             disable=not progress or not procs.main) as bar:
                for batch in loader:
                    values = model.encode_moments(batch["pixels"].to(device).float() / 127.5 - 1.0).cpu().numpy()
                    if not (np.isfinite(values).all() and np.abs(values).max() <= np.finfo(np.float16).max):
                        raise ValueError("the first stage's outputs are not finite in float16: train without "
                                         "--latents")
                    rows = batch["index"].numpy() - mine.start
                    moments[rows], readable[rows] = values, batch["ok"].numpy()
                    bar.update(len(rows))
            if procs.main:
                wait_for_files([f for r in range(procs.world) for f in cache.shard_files(run, r)])
                cache.commit(run, procs.world)
        except BaseException:  # a fill that stopped is never used (its run token is this one's): its moments,
            for file in cache.shard_files(run, procs.rank):  # the size of the share, would only fill the disk
                file.unlink(missing_ok=True)
            raise
        if procs.main:
            log.info("stored the first stage's outputs for %d images in %s", len(images), cache.dir)
        else:
            wait_for_files([cache.dir / "manifest.json"])
    else:
        log.info("reading the first stage's outputs from %s", cache.dir)
    dataset = TrainingMoments(cache)
    missing = int((~dataset.readable()).sum())
    if missing and procs.main:
        log.warning("%s: %d training images could not be read when it was made; they take no part (delete it to "
                    "encode them again)", cache.dir, missing)
    return dataset


def wait_for_files(files: list[Path], poll: float = 1.0) -> None:
    """Block until every file exists (written by other processes; torchrun stops all if one fails)."""
    waited = 0.0
    while not all(f.exists() for f in files):
        time.sleep(poll)
        waited += poll
        if waited % 600 < poll:
            log.info("waiting for the other processes' files in %s", files[0].parent)
