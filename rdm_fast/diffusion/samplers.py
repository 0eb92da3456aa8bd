"""DDIM and PLMS samplers as small pure functions over an ``eps_fn(x, t) -> eps``.

Both follow the reference exactly: no clipping of x0; PLMS (eta = 0) averages eps at t and at the next
timestep on its first step (two model calls) and then uses Adams-Bashforth combinations of past eps. Each
update (multistep combination, predicted x0, DDIM step, noise) is one fused op, ``ops.ddim_guided_step`` /
``ops.plms_guided_step``: one Triton kernel on CUDA, its float32 (float64) PyTorch reference elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import ops
from .schedule import DDIMCoefficients

EpsFn = Callable[[Tensor, "int | Tensor"], Tensor]


Generator = torch.Generator | np.random.Generator  # a NumPy one: PCG64 streams from 128-bit seeds
Generators = Generator | Sequence[Generator] | None


def check_generator(generator: Any, batch: int) -> None:
    """TypeError/ValueError unless ``generator`` is None, a torch or NumPy generator, or a sequence of one per
    sample. NumPy's streams (``np.random.default_rng(SeedSequence(...))``) take seeds of any size; torch's CPU
    generator keeps only 32 bits of its seed, so per-sample torch streams of a run of n samples hold about
    n**2 / 2**33 pairs of identical streams (0.3 at n = 50,000)."""
    if generator is None or isinstance(generator, (torch.Generator, np.random.Generator)):
        return
    if not isinstance(generator, Sequence) or \
            not all(isinstance(g, (torch.Generator, np.random.Generator)) for g in generator):
        raise TypeError("generator must be a torch.Generator or numpy.random.Generator, or a list of one per sample, "
                        f"got {generator!r}")
    if len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for {batch} samples: give one per sample")


def _draw(shape: tuple[int, ...], generator: Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Standard normal ``shape`` from one generator: a torch one on its own device, a NumPy one in float32."""
    if isinstance(generator, np.random.Generator):
        return torch.from_numpy(generator.standard_normal(shape, dtype=np.float32)).to(dtype)
    return torch.randn(shape, generator=generator, device=device if generator is None else generator.device,
                       dtype=dtype)


def draw_noise(shape: tuple[int, ...], generator: Generators, device: torch.device,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise from ``generator`` (on its own device, so a seed gives the same noise on any
    device; NumPy generators draw on the CPU), delivered to ``device``; a CPU draw for a GPU goes through pinned
    memory without host sync. ``generator`` may be a sequence of one generator per row (sample): each row is then
    drawn from its own, whatever the other rows of the batch."""
    check_generator(generator, shape[0])
    if isinstance(generator, Sequence):
        devices = {torch.device("cpu") if isinstance(g, np.random.Generator) else g.device for g in generator}
        if len(devices) > 1:
            raise ValueError(f"the per-sample generators are on several devices: {sorted(map(str, devices))}")
        noise = torch.stack([_draw(shape[1:], g, device, dtype) for g in generator]) if generator else \
            torch.empty(shape, device=device, dtype=dtype)
    else:
        noise = _draw(shape, generator, device, dtype)
    if noise.device.type == "cpu" and device.type == "cuda":
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


def _timesteps(t: int | Tensor, n: int, device: torch.device) -> Tensor:
    """(n,) timesteps from an int or a 0-d tensor (expanded in place: no host synchronisation)."""
    return t.to(device).expand(n) if torch.is_tensor(t) else torch.full((n,), t, device=device)


def guided(eps_model: Callable[[Tensor, Tensor, Any], Tensor], context: Tensor, scale: float, *,
           prepare: Callable[..., Any] | None = None) -> EpsFn:
    """Classifier-free guidance: eps_u + s (eps_c - eps_u), with an all-zero unconditional context, computed
    in one batched call on cat(uncond, cond). ``scale == 1`` is plain conditional sampling (one half-size call).

    ``prepare(context, zero_rows, shared_input=...)`` (e.g. ``UNet.prepare_context``) turns the context once into
    what the model takes for a batch whose first ``zero_rows`` rows are unconditional; without it the zeros are
    concatenated. When the prepared context says ``shared_input``, the model takes x once for both halves.
    """
    if scale == 1.0:
        ctx = prepare(context, 0) if prepare is not None else context

        def conditional(x: Tensor, t: int | Tensor) -> Tensor:
            return eps_model(x, _timesteps(t, x.shape[0], x.device), ctx)

        setattr(conditional, "context", ctx)  # what the model reads (a CUDA-graph cache swaps a new trajectory's in)
        return conditional
    b = context.shape[0]
    both = prepare(context, b, shared_input=True) if prepare is not None else \
        torch.cat([torch.zeros_like(context), context])
    shared = getattr(both, "shared_input", False)

    def combined(x: Tensor, t: int | Tensor) -> Tensor:
        x_in = x if shared else torch.cat([x, x])
        eps_u, eps_c = eps_model(x_in, _timesteps(t, x_in.shape[0], x.device), both).chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    setattr(combined, "context", both)
    return combined


def sample_ddim(eps_fn: EpsFn, x: Tensor, coeffs: DDIMCoefficients, *,
                generator: Generators = None, progress: bool = False) -> Tensor:
    """Run DDIM from x_T through the given coefficients; returns the final latent. ``generator`` (one, or one
    per sample) draws the noise of eta > 0."""
    for i in tqdm(range(len(coeffs)), desc="DDIM", disable=not progress, leave=False):
        sigma = float(coeffs.sigmas[i])
        eps = eps_fn(x, int(coeffs.timesteps[i]))
        noise = draw_noise(x.shape, generator, x.device, x.dtype) if sigma > 0 else None
        x, _ = ops.ddim_guided_step(x, None, eps, 1.0, float(coeffs.alphas[i]), float(coeffs.alphas_prev[i]),
                                    sigma, noise)
    return x


def sample_plms(eps_fn: EpsFn, x: Tensor, coeffs: DDIMCoefficients, *, progress: bool = False) -> Tensor:
    """Run PLMS (pseudo linear multistep, eta = 0) from x_T; len(coeffs) + 1 model calls."""
    if bool((coeffs.sigmas > 0).any()):
        raise ValueError("PLMS is deterministic: use eta = 0")
    history: list[Tensor] = []
    n = len(coeffs)
    for i in tqdm(range(n), desc="PLMS", disable=not progress, leave=False):
        alpha, alpha_prev = float(coeffs.alphas[i]), float(coeffs.alphas_prev[i])
        eps = eps_fn(x, int(coeffs.timesteps[i]))
        if history:  # Adams-Bashforth over eps and up to three past ones
            x_prev, _, _ = ops.plms_guided_step(x, None, eps, 1.0, history, alpha, alpha_prev)
        else:  # the mean of eps here and at the DDIM step's result, at the next timestep
            x_next, _ = ops.ddim_guided_step(x, None, eps, 1.0, alpha, alpha_prev)
            eps_next = eps_fn(x_next, int(coeffs.timesteps[min(i + 1, n - 1)]))
            x_prev, _, _ = ops.plms_guided_step(x, None, eps_next, 1.0, [eps], alpha, alpha_prev, weights=(0.5, 0.5))
        x = x_prev
        history = (history + [eps])[-3:]
    return x
