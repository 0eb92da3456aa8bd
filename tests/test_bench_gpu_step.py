"""bench/gpu_step.py's helpers that run without a GPU (the script itself runs on the device machine only)."""

import copy
import sys
from pathlib import Path

import torch

from rdm_fast import RDM, ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_step  # noqa: E402


def test_module_times_leaves_the_model_copyable():
    """The per-module profile must leave nothing on the modules: a profiler range kept as a module attribute made
    the next copy.deepcopy of the model fail (the decoder's parity check on an H200, 2026-11-27)."""
    model = RDM.from_config("tiny")
    cfg = model.config
    x = torch.randn(2, cfg.channels, cfg.image_size, cfg.image_size)
    ctx = torch.randn(2, cfg.context_tokens, cfg.context_dim)
    t = torch.full((2,), 500)
    with torch.inference_mode(), ops.use_mode("reference"):
        rows = gpu_step.module_times(lambda: model.unet(x, t, ctx), model.unet, steps=1, cuda=False)
    assert {name.split()[0] for name, _, _ in rows} >= {"ResBlock", "SpatialTransformer"}
    assert all(ms > 0 and calls >= 1 for _, ms, calls in rows)
    copy.deepcopy(model)
