"""Choosing between fast CUDA implementations of one op by timing them, once per call shape.

Some ops have two fast forms whose order depends on the card and the shape (our fused Triton kernel against a
vendor kernel plus a cheap pass, e.g. cuDNN + ``add_bias`` for the thin convolutions, or SDPA at short
sequences). In ``auto`` mode the first call of each shape times every candidate on the GPU (after a first call
that compiles and autotunes it) and keeps the fastest; the figures are logged at INFO.

Candidates are timed as a sampling step runs them: replayed from a CUDA graph, back to back. Timing single
eager calls (``triton.testing.do_bench``) measured our Python launch path instead of the GPU at small shapes:
on an H200 it chose SDPA for cross-attention at 256 tokens (0.131 against 0.045 ms per eager call) where graph
replays give our kernel 17.8 us against SDPA's 43.5 us (``bench/results/2026-11-26-h200-c``).

Timing is impossible inside a CUDA-graph capture, so a shape first seen there runs the last candidate (the
vendor path: no autotuning) without deciding; the eager warm-up of :class:`rdm_fast.diffusion.graphs.GraphedEps`
makes that the exception.
"""

from __future__ import annotations

import functools
import logging
import statistics
from collections.abc import Callable, Hashable
from typing import Any

import torch

logger = logging.getLogger("rdm_fast.ops")


def replay_time(fn: Callable[[], object], calls: int = 8, replays: int = 10) -> float:
    """Milliseconds per call of ``fn`` (already warmed up: compiled, autotuned) on the current CUDA device: the
    median over ``replays`` replays of one CUDA graph holding ``calls`` calls in a row, as a captured sampling
    step runs them (no launch overhead, no cache flush between calls)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()  # first replay: uploads the graph
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


class Measured:
    """``candidates``: name -> implementation, all taking the same arguments; the last is the capture fallback."""

    def __init__(self, op: str, candidates: dict[str, Callable]) -> None:
        self.op = op
        self.candidates = candidates
        self.chosen: dict[Hashable, str] = {}

    def __call__(self, key: Hashable, describe: Callable[[], str], *args: Any) -> Any:
        """Run the chosen candidate for ``key`` (a shape description), timing them all on its first call.
        ``describe()`` words the call for the log line."""
        name = self.chosen.get(key)
        if name is None:
            if torch.cuda.is_current_stream_capturing():
                return list(self.candidates.values())[-1](*args)
            name = self.chosen[key] = self._measure(describe(), *args)
        return self.candidates[name](*args)

    def _measure(self, what: str, *args) -> str:
        times, ran, failed = {}, [], None
        for name, fn in self.candidates.items():
            try:
                fn(*args)  # compile / autotune outside the timed runs
            except Exception as exc:  # a candidate that cannot run this call is left out, visibly
                logger.warning("%s at %s: %s failed (%s: %s); not a candidate here", self.op, what, name,
                               type(exc).__name__, exc)
                failed = exc
                continue
            ran.append(name)
            try:
                times[name] = replay_time(functools.partial(fn, *args))
            except Exception as exc:  # runs, but not in a graph: kept only if nothing could be timed
                logger.warning("%s at %s: %s could not be timed in a CUDA graph (%s: %s)", self.op, what, name,
                               type(exc).__name__, exc)
        if not ran:
            assert failed is not None  # every candidate (there is at least one) failed
            raise failed
        if not times:
            logger.warning("%s at %s: no candidate could be timed; %s runs untimed", self.op, what, ran[-1])
            return ran[-1]
        best = min(times, key=times.__getitem__)
        logger.info("%s at %s: %s -> %s", self.op, what, ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()), best)
        return best
