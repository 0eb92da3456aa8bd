"""The noise schedule of the released RDMs and the DDIM sub-sequences sampled from it.

betas = linspace(sqrt(linear_start), sqrt(linear_end), T)^2 in float64, alphas_cumprod = cumprod(1 - betas).
A DDIM run of S steps visits the timesteps arange(0, T, T // S) + 1 (S = 50: 1, 21, ..., 981) and, as the
reference does, uses alphas_cumprod[0] (not 1) as the "previous" value of the last step.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)
_WARNED: set[tuple[int, int]] = set()  # (steps, T) whose step count was already warned about


def _last_ddim_timestep(steps: int, total: int) -> int:
    """The last timestep of the uniform DDIM schedule of ``steps`` steps (1 + stride * (count - 1))."""
    stride = total // steps
    return 1 + stride * ((total - 1) // stride)


def uniform_timesteps(steps: int, total: int) -> Tensor:
    """The "uniform" DDIM timesteps of ``steps`` steps over a ``total``-step schedule, ascending, as the reference
    picks them: every ``total // steps`` from 1, so a count that does not divide ``total`` gives a few more.
    TypeError unless ``steps`` is an int (NumPy's too); ValueError outside 1 to total // 2 or where the last
    timestep would be ``total``."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {steps!r}")
    steps = int(steps)
    if not 1 <= steps <= total // 2:
        raise ValueError(f"steps must be between 1 and {total // 2} for a {total}-step schedule, got {steps}")
    last = _last_ddim_timestep(steps, total)
    if last >= total:
        fits = [s for s in range(1, total // 2 + 1) if _last_ddim_timestep(s, total) < total]
        near = sorted(fits, key=lambda s: (abs(s - steps), s))[:2]
        raise ValueError(f"steps = {steps} would visit timestep {last}, past the last one ({total - 1}), as the "
                         f"reference's uniform schedule does; the nearest counts that fit: "
                         f"{' and '.join(map(str, sorted(near)))}")
    return torch.arange(0, total, total // steps, device="cpu") + 1  # the CPU whatever the default device


@dataclass(frozen=True)
class Schedule:
    """A discrete diffusion schedule (float64 on the CPU). ``betas``: (T,) values in [0, 1), a tensor or anything
    ``torch.as_tensor`` takes (stored as float64 on the CPU); TypeError for what is no array of numbers,
    ValueError for other shapes or values (a beta above 1 gave negative alpha-bars, which the samplers took)."""

    betas: Tensor

    def __post_init__(self) -> None:
        try:
            betas = torch.as_tensor(self.betas, dtype=torch.float64, device="cpu")
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"Schedule: betas must be a (T,) array of numbers, got {type(self.betas).__name__}") \
                from None
        if betas.dim() != 1 or not betas.numel():
            raise ValueError(f"Schedule: betas must be a non-empty (T,) array, got shape {tuple(betas.shape)}")
        if bool(betas.isnan().any()):
            raise ValueError("Schedule: betas must lie in [0, 1), got NaN")
        if not bool(((betas >= 0) & (betas < 1)).all()):
            raise ValueError(f"Schedule: betas must lie in [0, 1), got values from {betas.min().item()} to "
                             f"{betas.max().item()}")
        object.__setattr__(self, "betas", betas)  # frozen dataclass

    @classmethod
    def linear(cls, linear_start: float, linear_end: float, timesteps: int = 1000) -> "Schedule":
        """The ``"linear"`` schedule of latent diffusion: linear in sqrt(beta). ValueError naming the argument
        unless 0 <= linear_start <= linear_end < 1 and timesteps is an int >= 1."""
        if isinstance(timesteps, bool) or not isinstance(timesteps, numbers.Integral) or timesteps < 1:
            raise ValueError(f"timesteps must be an int >= 1, got {timesteps!r}")
        for name, value in (("linear_start", linear_start), ("linear_end", linear_end)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1) (a beta), got {value!r}")
        if linear_start > linear_end:
            raise ValueError(f"linear_start ({linear_start}) must not exceed linear_end ({linear_end}): betas grow "
                             "with t")
        sqrt_betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64,
                                    device="cpu")
        return cls(sqrt_betas ** 2)

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps (1000 for the released models)."""
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> Tensor:
        """alphā_t = prod_{s <= t} (1 - beta_s), float64, t = 0 .. T-1."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    def ddim_timesteps(self, steps: int) -> Tensor:
        """The "uniform" DDIM timesteps, ascending (see :func:`uniform_timesteps`), with a warning (once per
        count) where they are more than ``steps``."""
        total = self.num_timesteps
        timesteps = uniform_timesteps(steps, total)
        if len(timesteps) != steps and (steps, total) not in _WARNED:  # once per count, not per batch
            _WARNED.add((steps, total))
            log.warning("%d DDIM steps requested; the uniform schedule with stride %d gives %d (as the reference)",
                        steps, total // steps, len(timesteps))
        return timesteps

    def ddim(self, steps: int, eta: float = 0.0) -> "DDIMCoefficients":
        """Per-step coefficients for a DDIM/PLMS run, in sampling order (highest timestep first).

        ``eta`` scales the noise: 0 is deterministic, 1 the DDPM posterior variance. Beyond a bound (>= 1, it
        depends on the schedule and steps) the update's sqrt(1 - alphā_prev - sigma²) has no real value:
        ValueError naming the bound."""
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
            raise TypeError(f"eta must be a real number, got {eta!r}")
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        timesteps = self.ddim_timesteps(steps)
        acp = self.alphas_cumprod
        alphas = acp[timesteps]
        alphas_prev = torch.cat([acp[:1], acp[timesteps[:-1]]])
        sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        if bool((1 - alphas_prev - sigmas ** 2 < 0).any()):
            # eta² sigma_1² <= 1 - alphā_prev at every step, sigma_1 the eta = 1 value
            bound = float(torch.sqrt((1 - alphas) * alphas_prev / (alphas_prev - alphas)).min())
            raise ValueError(f"eta = {eta:g} is too large for {steps} steps of this schedule: the DDIM update "
                             f"needs eta <= {math.floor(bound * 1e4) / 1e4:g}")
        return DDIMCoefficients(timesteps.flip(0), alphas.flip(0), alphas_prev.flip(0), sigmas.flip(0))


@dataclass(frozen=True)
class DDIMCoefficients:
    """Timesteps t_i and alphā_t, alphā_prev, sigma_t per step, all ordered from the first (noisiest) step."""

    timesteps: Tensor
    alphas: Tensor
    alphas_prev: Tensor
    sigmas: Tensor

    def __len__(self) -> int:
        return len(self.timesteps)
