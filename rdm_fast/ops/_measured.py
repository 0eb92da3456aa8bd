"""Choosing between fast CUDA implementations of one op by timing them, once per call shape.

Some ops have two fast forms whose order depends on the card and the shape (our fused Triton kernel against a
vendor kernel plus a cheap pass, e.g. cuBLAS + a gating kernel, or SDPA at short sequences). In ``auto`` mode
the first call of each shape times every candidate on the GPU (after a first call that compiles and autotunes
it) and keeps the fastest; the figures are logged at INFO. Timing is impossible inside a CUDA-graph capture,
so a shape first seen there runs the last candidate (the vendor path: no autotuning) without deciding; the
eager warm-up of :class:`rdm_fast.diffusion.graphs.GraphedEps` makes that the exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch

logger = logging.getLogger("rdm_fast.ops")


class Measured:
    """``candidates``: name -> implementation, all taking the same arguments; the last is the capture fallback."""

    def __init__(self, op: str, candidates: dict[str, Callable]) -> None:
        self.op = op
        self.candidates = candidates
        self.chosen: dict[Hashable, str] = {}

    def __call__(self, key: Hashable, describe: Callable[[], str], *args):
        """Run the chosen candidate for ``key`` (a shape description), timing them all on its first call.
        ``describe()`` words the call for the log line."""
        name = self.chosen.get(key)
        if name is None:
            if torch.cuda.is_current_stream_capturing():
                return list(self.candidates.values())[-1](*args)
            name = self.chosen[key] = self._measure(describe(), *args)
        return self.candidates[name](*args)

    def _measure(self, what: str, *args) -> str:
        from triton.testing import do_bench

        times, failed = {}, None
        for name, fn in self.candidates.items():
            try:
                fn(*args)  # compile / autotune outside the timed runs
                times[name] = do_bench(lambda fn=fn: fn(*args), warmup=5, rep=25, return_mode="median")
            except Exception as exc:  # a candidate that cannot run this call is left out, visibly
                logger.warning("%s at %s: %s failed (%s: %s); not a candidate here", self.op, what, name,
                               type(exc).__name__, exc)
                failed = exc
        if not times:
            raise failed
        best = min(times, key=times.get)
        logger.info("%s at %s: %s -> %s", self.op, what, ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()), best)
        return best
