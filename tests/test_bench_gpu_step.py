"""bench/gpu_step.py's helpers that run without a GPU (the script itself runs on the device machine only)."""

import copy
import logging
import os
import signal
import sys
from pathlib import Path

import pytest
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


def test_trajectory_parity_reports_close_half_precision_and_fp32_trajectories(monkeypatch):
    """The half-precision-vs-float32 trajectory check (run here on the CPU, on the ``tiny`` preset) records, for
    bf16 and fp16, a small latent error, a high PSNR, finite and not blank images; and a large error and a low
    PSNR where the half-precision model's eps is off by 20 %. Asked for 4 images of a batch of 2, it compares and
    names the 2 there are."""
    from bench_step import make_case

    model, x, ctx = make_case("tiny", 2, torch.device("cpu"), torch.bfloat16)
    lines: list[str] = []
    good: dict = {"preset": "tiny"}
    gpu_step.trajectory_parity(model, x, ctx, good, lines.append, images=4, steps=4)
    assert len(lines) == 2 and "4-step trajectory of 2 images, fp16" in lines[-1], lines
    for name, max_err, min_psnr in (("bf16", 5e-2, 30), ("fp16", 1e-2, 45)):
        assert good[f"trajectory_{name}_finite"] and not good[f"trajectory_{name}_blank"]
        assert good[f"trajectory_{name}_latent_err"] < max_err and good[f"trajectory_{name}_psnr_db"] > min_psnr
    assert model.dtype == torch.bfloat16  # the fp16 run used a copy

    unet_type = type(model.unet)
    forward = unet_type.forward

    def off_in_half(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out * 1.2 if next(self.parameters()).dtype != torch.float32 else out

    monkeypatch.setattr(unet_type, "forward", off_in_half)
    bad: dict = {"preset": "tiny"}
    gpu_step.trajectory_parity(model, x, ctx, bad, lines.append, images=2, steps=4)
    for name in ("bf16", "fp16"):
        assert bad[f"trajectory_{name}_latent_err"] > 10 * good[f"trajectory_{name}_latent_err"], lines[-2:]
        assert bad[f"trajectory_{name}_psnr_db"] < good[f"trajectory_{name}_psnr_db"] - 10, lines[-2:]


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


def test_profile_keeps_the_kernel_breakdown_when_the_graph_idle_measurement_fails(monkeypatch, tmp_path):
    """The graphed step's idle time (not yet run on a GPU) is measured apart from the per-kernel profile: its
    failure (here the CUDA-graph capture, on the CPU) still leaves kernels_<preset>.txt and the breakdown."""
    from bench_step import make_case

    model, x, ctx = make_case("tiny", 2, torch.device("cpu"), torch.float32)
    kernels = [("sm90_xmma_fprop_implicit_gemm", 2.0, 3), ("_attn_fwd_kernel", 1.0, 2)]
    module_times = gpu_step.module_times
    monkeypatch.setattr(gpu_step, "profile_kernels", lambda fn: (fn(), kernels)[1])  # the CUDA profiler's rows
    monkeypatch.setattr(gpu_step, "module_times", lambda fn, unet: module_times(fn, unet, steps=1, cuda=False))
    lines: list[str] = []
    result: dict = {"preset": "tiny"}
    gpu_step.profile_step(model, x, ctx, 2, tmp_path, result, lines.append)
    assert result["kernel_ms"] == 3.0 and "graph_idle_ms" not in result
    text = (tmp_path / "kernels_tiny.txt").read_text()
    assert "3.00 ms kernel time" in text and "[attention (ours)] _attn_fwd_kernel" in text and "ResBlock" in text
    assert any("convolution" in line and "2.00 ms" in line for line in lines)
    assert "graph idle time FAILED" in lines[-1] and "CUDA graphs need CUDA tensors" in lines[-1]


def test_a_run_stopped_at_its_time_limit_still_writes_the_table(monkeypatch, tmp_path):
    """gpu_check.sh stops the script with SIGTERM at its limit: the closing table still holds the presets measured
    so far, the one cut off with what it had (here on the CPU, with run_preset standing in for the GPU work)."""
    lines: list[str] = []

    def run_preset(result, variants, log, *, checks=True):
        result["rdm_fast"] = 50.0 if result["preset"] == "imagenet" else 40.0
        if result["preset"] == "rdm768":
            assert callable(signal.getsignal(signal.SIGTERM))  # else the signal would end this test process
            os.kill(os.getpid(), signal.SIGTERM)
        result["torch-eager"] = 150.0

    monkeypatch.setattr(gpu_step, "open_log", lambda path, header="": lines.append)
    monkeypatch.setattr(gpu_step, "run_preset", run_preset)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    monkeypatch.setattr(sys, "argv", ["gpu_step.py", "--out", str(tmp_path), "--variants", "rdm_fast,torch-eager",
                                      "--presets", "imagenet:64,rdm768:16,imagenet:4"])
    handler, level = signal.getsignal(signal.SIGTERM), logging.getLogger("rdm_fast").level
    try:
        with pytest.raises(SystemExit) as stopped:
            gpu_step.main()
    finally:
        signal.signal(signal.SIGTERM, handler)
        logging.getLogger("rdm_fast").setLevel(level)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "speed-up vs torch-eager" in lines[-3]
    assert lines[-2].split() == ["imagenet", "64", "50.00", "ms", "150.00", "ms", "3.00x"]
    assert lines[-1].split() == ["rdm768", "16", "40.00", "ms", "-", "-"]


def test_diagnostics_run_after_every_presets_timings(monkeypatch, tmp_path):
    """The trajectories, profile and decoder checks of the checked presets come after the timings of all presets
    (a time limit then cuts diagnostics, not rdm768's step timing behind imagenet's checks)."""
    calls: list[tuple[str, str, int, bool]] = []
    monkeypatch.setattr(gpu_step, "open_log", lambda path, header="": lambda line: None)
    monkeypatch.setattr(gpu_step, "run_preset", lambda result, variants, log, *, checks=True: calls.append(
        ("time", result["preset"], result["images"], checks)))
    monkeypatch.setattr(gpu_step, "diagnose_preset", lambda result, out, log: calls.append(
        ("diagnose", result["preset"], result["images"], True)))
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    monkeypatch.setattr(sys, "argv", ["gpu_step.py", "--out", str(tmp_path), "--presets",
                                      "imagenet:64,rdm768:16,imagenet:4:timings"])
    handler, level = signal.getsignal(signal.SIGTERM), logging.getLogger("rdm_fast").level
    try:
        gpu_step.main()
    finally:
        signal.signal(signal.SIGTERM, handler)
        logging.getLogger("rdm_fast").setLevel(level)
    assert calls == [("time", "imagenet", 64, True), ("time", "rdm768", 16, True), ("time", "imagenet", 4, False),
                     ("diagnose", "imagenet", 64, True), ("diagnose", "rdm768", 16, True)]
