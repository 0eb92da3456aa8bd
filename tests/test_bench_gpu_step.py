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


def test_trajectory_parity_reports_close_bf16_and_fp32_trajectories(monkeypatch):
    """The bf16-vs-float32 trajectory check (run here on the CPU, on the ``tiny`` preset) records a small latent
    error and a high PSNR, and a large error and a low PSNR where the bf16 model's eps is off by 20 %."""
    from bench_step import make_case

    model, x, ctx = make_case("tiny", 2, torch.device("cpu"), torch.bfloat16)
    lines: list[str] = []
    good: dict = {"preset": "tiny"}
    gpu_step.trajectory_parity(model, x, ctx, good, lines.append, images=2, steps=4)
    assert "4-step trajectory of 2 images" in lines[-1], lines
    assert good["trajectory_finite"] and good["trajectory_latent_err"] < 5e-2 and good["trajectory_psnr_db"] > 30

    unet_type = type(model.unet)
    forward = unet_type.forward

    def off_in_bf16(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out * 1.2 if next(self.parameters()).dtype == torch.bfloat16 else out

    monkeypatch.setattr(unet_type, "forward", off_in_bf16)
    bad: dict = {"preset": "tiny"}
    gpu_step.trajectory_parity(model, x, ctx, bad, lines.append, images=2, steps=4)
    assert bad["trajectory_latent_err"] > 10 * good["trajectory_latent_err"], lines[-1]
    assert bad["trajectory_psnr_db"] < good["trajectory_psnr_db"] - 10, lines[-1]


def test_idle_time_counts_the_gaps_between_overlapping_work():
    """Span, busy time (the union of the intervals: overlaps counted once), idle gaps and the longest gap with the
    work on either side, against a hand count."""
    work = [(0.0, 10.0, "a"), (5.0, 12.0, "b"), (15.0, 20.0, "c"), (20.0, 21.0, "d"), (30.0, 31.0, "e"),
            (30.5, 30.7, "f")]
    st = gpu_step.idle_time(work, top=2)
    assert st["span"] == 31.0 and st["busy"] == 12.0 + 6.0 + 1.0 and st["idle"] == 3.0 + 9.0
    assert st["gaps"] == 2 and st["median_gap"] == 6.0
    assert st["longest"] == [(9.0, "d", "e"), (3.0, "b", "c")]
    assert gpu_step.idle_time([])["gaps"] == 0
