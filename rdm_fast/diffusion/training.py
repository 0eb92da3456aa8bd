"""The training objective of the released RDMs: noise a clean latent to a uniformly drawn timestep
and regress the added noise, eps, with a mean squared error ("l_simple"; no ELBO term, no learned variance)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .schedule import Schedule


def noised(schedule: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """A draw of q(x_t | x_0): ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` with a = alphas_cumprod (the square
    roots taken in float64, then rounded to float32, as the reference stores them). ``t``: (B,) integer
    timesteps in [0, T); TypeError for other dtypes, ValueError for a CPU ``t`` out of range (a GPU ``t`` is not
    read back, which would synchronise: its range is the caller's to keep)."""
    for name, value in (("x0", x0), ("t", t), ("noise", noise)):
        if not isinstance(value, Tensor):  # a NumPy array failed with an AttributeError
            raise TypeError(f"noised: {name} must be a torch.Tensor, got {type(value).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"noised: t must hold integer timesteps, got {t.dtype}")
    if x0.dim() < 1 or noise.shape != x0.shape:
        raise ValueError(f"noised: x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have one shape, the batch "
                         "first")
    if t.dim() != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"noised: t must be ({x0.shape[0]},) (one timestep per sample), got {tuple(t.shape)}")
    total = schedule.num_timesteps
    if t.device.type == "cpu" and t.numel() and not (0 <= int(t.min()) and int(t.max()) < total):
        raise ValueError(f"noised: timesteps must be in [0, {total}), got {int(t.min())} to {int(t.max())}")
    a = schedule.alphas_cumprod
    per_sample = (-1,) + (1,) * (x0.dim() - 1)  # broadcast over each sample's values, whatever their shape
    scale = a.sqrt().float().to(x0.device)[t].view(per_sample)
    sigma = (1.0 - a).sqrt().float().to(x0.device)[t].view(per_sample)
    return scale * x0.float() + sigma * noise.float()


def eps_losses(unet: Callable[..., Tensor], schedule: Schedule, x0: Tensor, context: Tensor, t: Tensor,
               noise: Tensor) -> Tensor:
    """(B,) per-sample mean squared errors of the UNet's eps prediction at ``noised(x0, t, noise)``, in float32.
    Their mean is the training loss; ``unet`` may be wrapped (DistributedDataParallel, torch.compile)."""
    if not (x0.shape == noise.shape and t.shape == (x0.shape[0],) and context.shape[0] == x0.shape[0]):
        raise ValueError(f"eps_losses: x0 {tuple(x0.shape)}, noise {tuple(noise.shape)}, t {tuple(t.shape)} and "
                         f"context {tuple(context.shape)} must agree on the batch (and x0 and noise on the shape)")
    eps = unet(noised(schedule, x0, t, noise), t, context)
    return (eps.float() - noise.float()).square().flatten(1).mean(1)

