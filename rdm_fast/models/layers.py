"""Building blocks shared by the UNet and the autoencoders, and the official-name mapping they declare.

Each module that names its children differently from the official checkpoints says so in ``OFFICIAL``
(our child name -> official child path); ``official_names`` walks a model and joins those pieces, so the
converter between the two layouts is defined next to the modules themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


class GroupNorm(nn.Module):
    """GroupNorm with fp32 statistics, optionally fused with a per-channel add before it and SiLU after it."""

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, *, add: Tensor | None = None, silu: bool = False) -> Tensor:
        return ops.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, add=add, silu=silu)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, groups={self.num_groups}, eps={self.eps}"


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dim with fp32 statistics, through the fused op (same parameters and names)."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling and a 3x3 convolution (UNet and autoencoder decoder alike)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head softmax attention on (B, N, heads*d) tensors, scale d^-0.5; returns (B, N, heads*d)."""
    return ops.attention(q, k, v, heads)


def official_names(model: nn.Module, prefix: str = "") -> dict[str, str]:
    """Map every state-dict key of ``model`` to its name in the official checkpoints."""
    out = {}
    for name in model.state_dict().keys():
        parts = name.split(".")
        mod, pieces = model, []
        for part in parts[:-1]:
            pieces.append(getattr(mod, "OFFICIAL", {}).get(part, part))
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        pieces.append(parts[-1])
        out[name] = prefix + ".".join(pieces)
    return out
