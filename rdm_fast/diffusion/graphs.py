"""Whole denoising-step capture in a CUDA graph: one replay launches every kernel of a guided UNet call.

At the batch sizes users sample with, a step of the imagenet UNet is hundreds of small kernels; replaying them
from a graph removes the CPU launch overhead. Shapes are fixed at capture (one graph per trajectory shape).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .samplers import EpsFn

if TYPE_CHECKING:
    from ..models.unet import PreparedContext

logger = logging.getLogger("rdm_fast.diffusion")


class GraphedEps:
    """``eps_fn(x, t)`` replayed from a CUDA graph captured for ``x``'s shape, dtype and device.

    ``t`` is written into a device scalar before each replay, so the captured timestep embedding follows it.
    Returns a fresh tensor each call (samplers keep past eps, e.g. PLMS).
    """

    def __init__(self, eps_fn: EpsFn, x: Tensor) -> None:
        if x.device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA tensors, got {x.device}")
        self.static_x = x.detach().clone()
        self.static_t = torch.zeros((), dtype=torch.long, device=x.device)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # one warm-up outside the graph: lazy inits, kernel autotuning, allocator
            eps_fn(self.static_x, self.static_t)
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = eps_fn(self.static_x, self.static_t)

    def __call__(self, x: Tensor, t: int | Tensor) -> Tensor:
        s = self.static_x
        if x.shape != s.shape or x.dtype != s.dtype or x.device != s.device:
            raise ValueError(f"graph captured for x of shape {tuple(s.shape)}, {s.dtype} on {s.device}; got "
                             f"{tuple(x.shape)}, {x.dtype} on {x.device}")
        self.static_x.copy_(x)
        if torch.is_tensor(t):
            self.static_t.copy_(t)
        else:
            self.static_t.fill_(t)
        self.graph.replay()
        return self.static_out.clone()


def maybe_graphed(eps_fn: EpsFn, x: Tensor, enabled: bool | None) -> EpsFn:
    """``eps_fn`` in a CUDA graph when ``enabled`` (None: whenever ``x`` is on CUDA). If the capture fails,
    log a warning and return ``eps_fn`` unchanged: sampling goes on eagerly."""
    if enabled is None:
        enabled = x.device.type == "cuda"
    if not enabled:
        return eps_fn
    if x.device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device, not {x.device}")
    try:
        graphed = GraphedEps(eps_fn, x)
    except Exception as exc:  # any capture problem (an op that synchronises, an unsupported kernel): run eagerly
        logger.warning("CUDA graph capture failed (%s: %s); sampling eagerly", type(exc).__name__, exc)
        return eps_fn
    logger.info("denoising step captured in a CUDA graph (x %s, %s)", tuple(x.shape), str(x.dtype))
    return graphed


class GraphCache:
    """The last captured guided step, replayed for a following trajectory whose key (shapes, guidance, weights)
    matches: that trajectory's prepared context is copied into the captured one (``PreparedContext.load_``)
    instead of a new warm-up call and capture per batch. Holds one graph (its memory pool) at a time; copies and
    pickles of its owner start empty."""

    def __init__(self) -> None:
        self._last: tuple[Hashable, GraphedEps, PreparedContext] | None = None
        self._failed: Hashable | None = None  # the key of the last capture that failed (not tried again)

    def __call__(self, eps_fn: EpsFn, x: Tensor, enabled: bool | None, key: Hashable) -> EpsFn:
        """``eps_fn`` (from :func:`~rdm_fast.diffusion.samplers.guided`) replayed from a graph, as
        :func:`maybe_graphed`; reused when ``key`` equals the last capture's."""
        context = getattr(eps_fn, "context", None)
        if not hasattr(context, "load_") or not (x.device.type == "cuda" if enabled is None else enabled):
            return maybe_graphed(eps_fn, x, enabled)
        assert context is not None  # it has load_: a PreparedContext
        key = (key, tuple(x.shape), x.dtype, x.device)
        if self._last is not None and self._last[0] == key:
            _, last, captured = self._last
            captured.load_(context)  # this trajectory's keys/values where the graph reads them
            logger.debug("replaying the captured denoising step with a new context (x %s)", tuple(x.shape))
            return last
        if self._failed == key:  # eagerly, without another warm-up call, capture and warning at every batch
            return eps_fn
        self._last = None  # the old graph's memory goes before a new capture
        graphed = maybe_graphed(eps_fn, x, enabled)
        if isinstance(graphed, GraphedEps):
            self._last = (key, graphed, context)
        else:
            self._failed = key
        return graphed

    def clear(self) -> None:
        self._last = self._failed = None

    def __deepcopy__(self, memo: dict) -> GraphCache:
        return GraphCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._last = self._failed = None
