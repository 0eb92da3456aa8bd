"""What the entry points share under ``torchrun``: this process's rank and device, and the few collectives they
use. Without torchrun (WORLD_SIZE unset) everything here is a no-op for a single process."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def process_device(device: str) -> torch.device:
    """The device this process computes on. ``auto``: its GPU (cuda:LOCAL_RANK) when CUDA is available, else the
    CPU; ``cuda``: its GPU; ``cuda:N`` only outside torchrun (each process takes its own GPU there). A GPU is made
    the current CUDA device too: Triton kernels and CUDA graphs run on the current device, not their tensors'."""
    dev = _pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device; ValueError for a name torch does not know, a device type rdm_fast does not run
    on (other than the CPU, CUDA and "meta") or a GPU this machine lacks."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    _check_supported(dev, device, "meta")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available here (use 'cpu')")
    _check_gpu_index(dev)
    return dev


def _check_supported(dev: torch.device, given: object, *also: str) -> None:
    """ValueError for device types other than the CPU, CUDA GPUs and ``also`` (mps, xpu, ...: torch parses their
    names, and the first tensor moved there failed with a traceback; "meta" builds models without weights)."""
    if dev.type not in ("cpu", "cuda", *also):
        raise ValueError(f"device {str(given)!r} is not supported: rdm_fast runs on 'cpu' or CUDA GPUs ('cuda', "
                         "'cuda:N')")


def _check_gpu_index(dev: torch.device) -> None:
    """ValueError for ``cuda:N`` past this machine's visible GPUs (the driver's error came from the first use)."""
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device {str(dev)!r}: this machine has {count} visible GPU{'s' * (count != 1)} "
                         f"(cuda:0 to cuda:{count - 1}; CUDA_VISIBLE_DEVICES selects them)")


def _pick_device(device: str) -> torch.device:
    local, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    _check_supported(dev, device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA GPU is available here (use cpu)")
    _check_gpu_index(dev)
    if dev.type == "cuda" and dev.index is None:  # one visible GPU per process (e.g. SLURM): that one
        return torch.device(f"cuda:{local if torch.cuda.device_count() > 1 else 0}")
    if dev.type == "cuda" and world > 1:
        raise ValueError(f"device {device}: under torchrun each process takes its own GPU (cuda:LOCAL_RANK); pass "
                         "cuda or auto")
    return dev


class Processes:
    """This process among the ``torchrun`` workers; the process group (``backend``) is created only when
    WORLD_SIZE > 1, and destroyed by :meth:`close` if this object created it."""

    def __init__(self, backend: str = "gloo", timeout: timedelta = timedelta(hours=72)) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owned = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend, timeout=timeout)
            self.owned = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (picklable values)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over all processes, in place."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def close(self) -> None:
        if self.owned:
            dist.destroy_process_group()
