"""Whole denoising-step capture in a CUDA graph: one replay launches every kernel of a guided UNet call.

At the batch sizes users sample with, a step of the imagenet UNet is hundreds of small kernels; replaying them
from a graph removes the CPU launch overhead. Shapes are fixed at capture (one graph per trajectory shape).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .samplers import EpsFn

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
