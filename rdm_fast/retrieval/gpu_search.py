"""Exact nearest-neighbour search over an embedding database held in GPU memory (the Triton top-k kernel of
``rdm_fast.kernels.knn``), split in contiguous row ranges across devices when it does not fit on one.

Scores are inner products of L2-normalised rows (cosine similarity, as :func:`exact_search`) in fp32, ties
broken by the lower id. A search on the kernel path (k <= 64, ops mode not ``reference``; otherwise the
reference :func:`exact_search` runs, which synchronises) makes no host synchronisation when the queries and the
database are on GPUs, so it can run inside a sampling loop under ``torch.cuda.set_sync_debug_mode("error")`` or
a CUDA graph capture, once a first search of the same shape (query count bucket, k, dtype) has compiled and
autotuned the kernel, which does synchronise.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import get_mode
from ..ops._dispatch import log_first_use
from .search import check_k, exact_search, merge_topk

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NUMPY_FLOATS = (np.float16, np.float32, np.float64)
_FILL_FRACTION = 0.85  # share of a GPU's free memory the database may take when devices=None
_NORMALIZE_ROWS = 1 << 16  # rows normalised at once on the device (bounds the fp32 temporary)


def _kernel_max_k() -> int:
    from rdm_fast.kernels.knn import MAX_K

    return MAX_K


def _check_part(part: object) -> None:
    if not isinstance(part, (np.ndarray, Tensor)):
        raise TypeError(f"embeddings must be numpy arrays or torch Tensors, got {type(part).__name__}")
    if part.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(part.shape)}")
    floating = part.is_floating_point() if isinstance(part, Tensor) else np.issubdtype(part.dtype, np.floating)
    if not floating:
        raise ValueError(f"embeddings must hold floating-point values, got {part.dtype}")


def _interpreter_forced() -> bool:
    """The Triton interpreter runs CPU shards only when TRITON_INTERPRET=1 and RDM_FAST_OPS=fast."""
    return os.environ.get("TRITON_INTERPRET") == "1" and get_mode() == "fast"


class GPUExactSearch:
    """Exact top-k search by cosine similarity over an (N, D) database copied once onto the device(s).

    ``embeddings`` is one (N, D) array or tensor, or a sequence of (n_i, D) parts taken in order as one
    database (e.g. memory-mapped shard files). Arrays may be read-only ``np.memmap`` (e.g. fp16): they are read
    ``chunk_rows`` rows at a time, so host memory never holds an fp32 copy, nor any copy, of the whole
    database. Rows are L2-normalised in fp32 per chunk on the device (``normalize=True``) and stored as
    ``dtype``. ``normalize=False`` promises unit-length rows and queries and skips normalising them (the CPU
    reference path normalises regardless). A row that is not finite once stored (NaN, Inf, beyond ``dtype``)
    is refused with a ValueError, since the kernel cannot rank NaN scores.

    ``devices=None`` takes the visible CUDA GPUs, as few as hold the database in ``85%`` of their free
    memory, and splits the rows evenly across those; an explicit list splits the rows evenly across exactly
    those devices (repeat a device to cut it into several shards; ``"cpu"`` works). Ids are global row indices.

    On CUDA shards the Triton kernel runs (k <= 64; larger k, or ``RDM_FAST_OPS=reference``, use
    :func:`exact_search` on the GPU). CPU shards use :func:`exact_search`, or the Triton kernel in the
    interpreter when ``TRITON_INTERPRET=1`` and ``RDM_FAST_OPS=fast``.
    """

    name = "triton-exact"

    def __init__(
        self,
        embeddings: np.ndarray | Tensor | Sequence[np.ndarray | Tensor],
        *,
        devices: Sequence[str | torch.device] | None = None,
        dtype: torch.dtype = torch.float16,
        normalize: bool = True,
        chunk_rows: int = 1 << 20,
    ) -> None:
        if isinstance(embeddings, (np.ndarray, Tensor)):
            parts = [embeddings]
        elif isinstance(embeddings, Sequence):
            parts = list(embeddings)
        else:
            raise TypeError(f"embeddings must be an array, a tensor or a sequence of them, got "
                            f"{type(embeddings).__name__}")
        for part in parts:
            _check_part(part)
        if not parts:
            raise ValueError("the embedding database is empty (no parts given)")
        dims = {int(p.shape[1]) for p in parts}
        if len(dims) != 1:
            raise ValueError(f"the embedding parts have different dimensions: {sorted(dims)}")
        n, dim = sum(int(p.shape[0]) for p in parts), dims.pop()
        if n == 0 or dim == 0:
            raise ValueError(f"the embedding database is empty ({n} rows of {dim} dimensions)")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.dim = dim
        self.dtype = dtype
        self.normalize = normalize
        self._n = n

        row_bytes = dim * torch.empty((), dtype=dtype).element_size()
        if devices is None:
            targets = self._default_devices(n * row_bytes)
        else:
            targets = [torch.device(d) for d in devices]
            if not targets:
                raise ValueError("devices must name at least one device")
        bounds = np.linspace(0, n, len(targets) + 1).round().astype(np.int64)
        self._check_free_memory(targets, np.diff(bounds) * (row_bytes + 4))  # + the fp32 norm per row
        self._shards: list[tuple[int, Tensor]] = []
        self._norms: list[Tensor] = []  # per shard: each row's L2 norm before normalising (fp32)
        for device, start, stop in zip(targets, bounds[:-1], bounds[1:]):
            if stop > start:
                shard, norms = self._load(parts, int(start), int(stop), device, chunk_rows)
                self._shards.append((int(start), shard))
                self._norms.append(norms)
        self.devices: list[torch.device] = [shard.device for _, shard in self._shards]

    @staticmethod
    def unavailable() -> str | None:
        """None when the GPU kernel can run here (CUDA GPU and triton importable), else the reason."""
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        try:
            import rdm_fast.kernels.knn  # noqa: F401
        except Exception as e:  # noqa: BLE001 (a broken triton install fails here with any exception type)
            return f"the Triton kNN kernel failed to import ({type(e).__name__}: {e})"
        return None

    def __len__(self) -> int:
        return self._n

    @staticmethod
    def _default_devices(total_bytes: int) -> list[torch.device]:
        """The fewest visible GPUs (current one first) whose free memory holds the database at the fill fraction."""
        if not torch.cuda.is_available():
            raise RuntimeError("GPUExactSearch: no CUDA GPU is visible; pass devices=['cpu'] to search on the CPU")
        count = torch.cuda.device_count()
        first = torch.cuda.current_device()
        gpus = [torch.device("cuda", (first + i) % count) for i in range(count)]
        free = [torch.cuda.mem_get_info(g)[0] * _FILL_FRACTION for g in gpus]
        for used in range(1, count + 1):
            if min(free[:used]) * used >= total_bytes:
                return gpus[:used]
        raise RuntimeError(
            f"GPUExactSearch: the database needs {total_bytes / 2**30:.1f} GiB but the {count} visible GPU(s) "
            f"have {sum(free) / 2**30:.1f} GiB usable ({_FILL_FRACTION:.0%} of free memory)"
        )

    @staticmethod
    def _check_free_memory(devices: list[torch.device], needed: np.ndarray) -> None:
        """RuntimeError, before anything is copied, where a CUDA device's share exceeds its usable free memory (an
        explicit device list; the default one is chosen to fit)."""
        need: dict[torch.device, int] = {}
        for device, size in zip(devices, needed):
            if device.type == "cuda":
                device = torch.device("cuda", device.index if device.index is not None else
                                      torch.cuda.current_device())
                need[device] = need.get(device, 0) + int(size)
        for device, size in need.items():
            usable = torch.cuda.mem_get_info(device)[0] * _FILL_FRACTION
            if size > usable:
                raise RuntimeError(
                    f"GPUExactSearch: the database's rows for {device} need {size / 2**30:.1f} GiB but it has "
                    f"{usable / 2**30:.1f} GiB usable ({_FILL_FRACTION:.0%} of free memory): open it without a "
                    f"device to split it over the visible GPUs, or search it through a FAISS index on the CPU")

    @torch.no_grad()
    def _load(self, parts: list[np.ndarray | Tensor], start: int, stop: int, device: torch.device,
              chunk_rows: int) -> tuple[Tensor, Tensor]:
        """Global rows [start, stop) on ``device`` as ``self.dtype``, normalised in fp32 on the device per chunk,
        and their norms. ValueError for a non-finite row (NaN/Inf, or beyond the storage dtype): the kernel
        cannot rank NaN scores."""
        shard = torch.empty(stop - start, self.dim, dtype=self.dtype, device=device)
        norms = torch.ones(stop - start, dtype=torch.float32, device=device)
        finite = torch.ones(stop - start, dtype=torch.bool, device=device)
        part_start = 0
        for part in parts:
            lo, hi = max(start, part_start), min(stop, part_start + part.shape[0])
            for c0 in range(lo, hi, chunk_rows):
                c1 = min(c0 + chunk_rows, hi)
                rows = part[c0 - part_start:c1 - part_start]
                if isinstance(rows, np.ndarray):  # a writable native-endian copy of just this chunk
                    rows = torch.from_numpy(np.array(rows, dtype=rows.dtype if rows.dtype in _NUMPY_FLOATS
                                                     else np.float32))
                rows = rows.to(device)
                for r0 in range(0, c1 - c0, _NORMALIZE_ROWS):
                    block = rows[r0:r0 + _NORMALIZE_ROWS].float()
                    at = c0 - start + r0
                    if self.normalize:
                        norm = block.norm(dim=1)
                        norms[at:at + block.shape[0]] = norm
                        block = block / norm.clamp_min(1e-12)[:, None]
                    shard[at:at + block.shape[0]] = block
                    ok = shard[at:at + block.shape[0]].isfinite().all(1)
                    finite[at:at + block.shape[0]] = ok & norm.isfinite() if self.normalize else ok
            part_start += part.shape[0]
        if not finite.all():  # one host synchronisation per shard, at load time
            row = start + int(finite.logical_not().nonzero()[0])
            raise ValueError(f"embedding row {row} is not finite (NaN, Inf or beyond {self.dtype}): cannot search it")
        return shard, norms

    @torch.no_grad()
    def vectors(self, ids: Tensor) -> Tensor:
        """The database rows of ``ids`` (any shape, int64) as float32, shape ids.shape + (D,), on the ids' device,
        gathered from the device copy (normalised row x stored norm: the original vector to the storage dtype's
        precision). No host synchronisation: out-of-range ids are clamped, not reported."""
        flat = ids.reshape(-1)
        out = None
        for (start, shard), norms in zip(self._shards, self._norms):
            local = flat.to(shard.device, non_blocking=True) - start
            inside = (local >= 0) & (local < shard.shape[0])
            local = local.clamp(0, shard.shape[0] - 1)
            rows = shard.index_select(0, local).float() * norms.index_select(0, local)[:, None]
            rows = torch.where(inside[:, None], rows, 0.0).to(ids.device, non_blocking=True)
            out = rows if out is None else out + rows
        assert out is not None  # there is at least one shard (the database has rows)
        return out.reshape(*ids.shape, self.dim)

    @torch.no_grad()
    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-k rows for each query: (scores fp32 (Q, k), ids int64 (Q, k)), best first, ties by lower id.

        Results are on the queries' device, or on the first database device when the queries are on the CPU.
        """
        if not isinstance(queries, Tensor):
            raise TypeError(f"queries must be a torch Tensor, got {type(queries).__name__}")
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got shape {tuple(queries.shape)}")
        if not queries.is_floating_point():
            raise ValueError(f"queries must be floating point, got {queries.dtype}")
        check_k(k, self._n)
        out_device = self._shards[0][1].device if queries.device.type == "cpu" else queries.device
        q = queries.to(out_device, non_blocking=True).float()
        if self.normalize:
            q = F.normalize(q, dim=1)
        parts = []
        for start, shard in self._shards:
            scores, ids = self._search_shard(q.to(shard.device, non_blocking=True), shard, min(k, shard.shape[0]))
            parts.append((scores.to(out_device, non_blocking=True), (ids + start).to(out_device, non_blocking=True)))
        if len(parts) == 1:
            return parts[0]
        best = None  # shards come in id order, each sorted by (score desc, id asc)
        for scores, ids in parts:
            best = merge_topk(best, scores, ids, k)
        assert best is not None  # two or more parts
        return best

    def _search_shard(self, q: Tensor, shard: Tensor, k: int) -> tuple[Tensor, Tensor]:
        on_cuda = shard.device.type == "cuda"
        use_kernel = (on_cuda and get_mode() != "reference") or (not on_cuda and _interpreter_forced())
        if use_kernel and k <= _kernel_max_k():
            from rdm_fast.kernels.knn import topk_inner_product

            log_first_use("knn_search", "triton" if on_cuda else "triton-interpreter", shard.device.type,
                          str(shard.dtype))
            return topk_inner_product(q.to(shard.dtype), shard, k)
        log_first_use("knn_search", f"reference (k > {_kernel_max_k()})" if use_kernel else "reference",
                      shard.device.type, str(shard.dtype))  # the kernel's limit is read only where it would run
        return exact_search(q, shard, k)
