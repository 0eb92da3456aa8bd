"""Arithmetic and memory floors of one guided denoising step, per op class, for the released shapes.

The "two numbers first" of a GPU session (see bench/RESULTS.md): floating-point work counted by
``torch.utils.flop_counter`` on meta tensors (no memory, no GPU; multiply-add = 2 FLOPs), and the fewest bytes
the memory-bound glue must move when each of its ops reads its inputs once and writes its output once (bf16
activations). Floors use the H200 ceilings of the anchor measurements (bench/RESULTS.md, "Anchors": bf16 matrix
product 778 TFLOP/s, copy 4.25 TB/s); measured per-op times are to be compared against them.

Run: ``python bench/floors.py`` (a few seconds on the CPU).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's rdm_fast
from rdm_fast import RDM  # noqa: E402
from rdm_fast.models.layers import GroupNorm, LayerNorm  # noqa: E402
from rdm_fast.models.unet import GEGLU, ResBlock, TransformerBlock  # noqa: E402

PEAK_FLOPS = 778e12
PEAK_BYTES = 4.25e12
CASES = {"imagenet": 64, "rdm768": 16}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * 2  # bf16


def step_floors(preset: str, images: int) -> dict[str, tuple[float, float]]:
    """{op class: (GFLOP, MB of glue traffic)} for a guided step (UNet batch 2 x images) of ``preset``."""
    model = RDM.from_config(preset, device="meta", dtype=torch.bfloat16)
    cfg, b = model.config, 2 * images
    x = torch.empty(b, cfg.channels, cfg.image_size, cfg.image_size, device="meta")
    t = torch.zeros(b, dtype=torch.long, device="meta")
    ctx = torch.empty(b, cfg.context_tokens, cfg.context_dim, device="meta")
    traffic: dict[str, float] = defaultdict(float)

    def hook(name: str, extra=lambda m, i, o: 0):
        def record(module, inputs, output):
            traffic[name] += _bytes(inputs[0]) + _bytes(output) + extra(module, inputs, output)
        return record

    handles = []
    for module in model.unet.modules():
        if isinstance(module, GroupNorm):
            handles.append(module.register_forward_hook(hook("groupnorm(+silu)")))
        elif isinstance(module, LayerNorm):
            handles.append(module.register_forward_hook(hook("layernorm")))
        elif isinstance(module, GEGLU):  # the gate: read 8C, write 4C
            handles.append(module.proj.register_forward_hook(hook("geglu gate", lambda m, i, o: -_bytes(i[0]))))
        elif isinstance(module, (ResBlock, TransformerBlock)):  # residual adds: read 2, write 1 (1 per ResBlock,
            n_adds = 1 if isinstance(module, ResBlock) else 3  # 3 per transformer block)
            handles.append(module.register_forward_hook(
                hook("residual adds", lambda m, i, o, n=n_adds: n * 3 * _bytes(o) - _bytes(i[0]) - _bytes(o))))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.unet(x, t, ctx)
    for h in handles:
        h.remove()
    flops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    out = {"convolutions": (flops.pop("aten.convolution", 0) / 1e9, 0.0),
           "attention (QK^T, PV)": (flops.pop("aten.bmm", 0) / 1e9, 0.0),
           "linear layers": (sum(flops.values()) / 1e9, 0.0)}
    for name, nbytes in traffic.items():
        out[name] = (0.0, nbytes / 1e6)
    return out


def main() -> None:
    for preset, images in CASES.items():
        floors = step_floors(preset, images)
        total_flops = sum(f for f, _ in floors.values())
        total_mb = sum(m for _, m in floors.values())
        print(f"\n{preset}: guided step, {images} images (UNet batch {2 * images}), bf16; "
              f"{total_flops / (2 * images):.1f} GFLOP per image per call")
        print(f"{'op class':<24}{'GFLOP':>10}{'glue MB':>10}{'floor ms':>10}")
        for name, (gflop, mb) in floors.items():
            ms = max(gflop * 1e9 / PEAK_FLOPS, mb * 1e6 / PEAK_BYTES) * 1e3
            print(f"{name:<24}{gflop:>10.0f}{mb:>10.0f}{ms:>10.2f}")
        floor = total_flops * 1e9 / PEAK_FLOPS * 1e3 + total_mb * 1e6 / PEAK_BYTES * 1e3
        print(f"{'total (sum of floors)':<24}{total_flops:>10.0f}{total_mb:>10.0f}{floor:>10.2f}")


if __name__ == "__main__":
    main()
