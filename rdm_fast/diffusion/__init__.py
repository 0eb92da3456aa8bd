"""Diffusion: the noise schedule and the DDIM / PLMS samplers."""

from .samplers import ddim_update, guided, plms_eps, sample_ddim, sample_plms
from .schedule import DDIMCoefficients, Schedule

__all__ = ["Schedule", "DDIMCoefficients", "ddim_update", "plms_eps", "guided", "sample_ddim", "sample_plms"]
