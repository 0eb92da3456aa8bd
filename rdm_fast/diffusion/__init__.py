"""Diffusion: the noise schedule, the DDIM / PLMS samplers and the training objective."""

from .samplers import guided, sample_ddim, sample_plms
from .schedule import DDIMCoefficients, Schedule
from .training import eps_losses, noised

__all__ = ["Schedule", "DDIMCoefficients", "guided", "sample_ddim", "sample_plms", "eps_losses", "noised"]
