"""Entry points: a real sampling run on the tiny model, conversion, and one-line errors for bad input."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rdm_fast import RDM, RDMConfig
from rdm_fast import checkpoint as ckpt
from rdm_fast import convert, images, sample, train
from rdm_fast._cli import run
from rdm_fast.retrieval.database import Database, save_proposals, update_manifest, write_database
from child_env import child_env

TEST_ENCODER = {"name": "test-64", "dim": 64, "normalized": False}


def cli(module, *argv: str) -> int:
    return run(module.main, list(argv))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = RDM.from_config("tiny")
    with torch.no_grad():
        for p in model.parameters():  # non-trivial weights (from_config zero-inits residual branches)
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(d / "model")
    np.save(d / "ctx.npy", np.random.default_rng(0).standard_normal((2, 4, 64)).astype(np.float32))
    write_database(d / "db", np.random.default_rng(1).standard_normal((50, 64)).astype(np.float32), TEST_ENCODER)
    return d


@pytest.mark.parametrize("quiet", [False, True])
def test_sample_progress_bar_and_no_progress(tiny_dir, tmp_path, capsys, quiet):
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"),
               "--out", str(tmp_path / "out"), "--steps", "2", *(["--no-progress"] if quiet else [])) == 0
    assert ("images: 100%" in capsys.readouterr().err) != quiet


def test_resume_of_runs_recorded_by_older_versions(tiny_dir, tmp_path, capsys):
    """A run recorded before run.json named its PNG levels is refused as an older version's (its images may be
    rounded), not as one of other settings; the config's training warm-up is not part of the run's record (runs
    recorded before it was read stay resumable)."""
    tree = RDMConfig.preset("tiny").to_dict()
    tree["model"]["params"]["scheduler_config"] = RDMConfig.preset("imagenet").to_dict()["model"]["params"][
        "scheduler_config"]
    (tmp_path / "warm.yaml").write_text(yaml.safe_dump(tree))
    args = ["--random-init", "--config", str(tmp_path / "warm.yaml"), "--context-file", str(tiny_dir / "ctx.npy"),
            "--out", str(tmp_path / "run"), "--steps", "2", "--no-progress"]
    assert cli(sample, *args) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "scheduler_config" not in info["config"]["model"]["params"] and info["png_levels"] == "truncated"
    del info["png_levels"]
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    assert cli(sample, *args, "--resume") == 2
    assert "holds a run of an older rdm_fast (its run.json records no png_levels), whose images may be " \
           "quantised otherwise" in capsys.readouterr().err
    info["png_levels"] = "truncated"
    del info["noise"]  # recorded before the per-sample streams were NumPy's
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    assert cli(sample, *args, "--resume") == 2
    assert "(its run.json records no noise = pcg64), whose noise came from other streams" in capsys.readouterr().err


def test_sample_noise_streams_do_not_collide():
    """Each (seed, sample) pair has its own start-noise stream. Torch's CPU generator keeps 32 bits of its seed:
    with the 32-bit mix used before, samples 12092 and 122801 of seed 0 (and sample 0 of seeds 14375 and 53572)
    started from the same noise."""
    from rdm_fast.data import derived_seed
    from rdm_fast.sample import START_NOISE, seeded_generator
    pairs = [((0, 12092), (0, 122801)), ((14375, 0), (53572, 0))]
    for (seed_a, i), (seed_b, j) in pairs:
        assert derived_seed(seed_a, START_NOISE, i) == derived_seed(seed_b, START_NOISE, j)  # the old collision
        a = seeded_generator(seed_a, START_NOISE, i).standard_normal(16)
        b = seeded_generator(seed_b, START_NOISE, j).standard_normal(16)
        assert not np.allclose(a, b)
    big = [seeded_generator(s, START_NOISE, 0).standard_normal(4) for s in (1, 1 + 2**32, 2**63 - 1)]
    assert not np.allclose(big[0], big[1]) and not np.allclose(big[1], big[2])  # torch would keep the low 32 bits


def test_sample_with_context_file(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"),
               "--out", str(out), "--steps", "7", "--n-samples", "3", "--batch-size", "2", "--seed", "5") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [".rdm_fast.lock", "grid.png", "run.json", "sample_00000.png", "sample_00001.png",
                     "sample_00002.png"]
    img = np.asarray(Image.open(out / "sample_00000.png"))
    assert img.shape == (32, 32, 3) and img.std() > 0
    info = json.loads((out / "run.json").read_text())
    assert (info["steps"], info["seed"], info["n_samples"], info["guidance_scale"]) == (7, 5, 3, 2.0)
    assert info["timesteps"] == 8  # stride 1000 // 7 = 142 visits 8 timesteps, as the reference does
    assert info["complete"] is True and info["ckpt_file"] == str(tiny_dir / "model" / "model.safetensors")
    assert info["seconds"] > 0
    # same seed, same images; samples 0 and 2 share a context (cycled) but not their noise
    again = tmp_path / "again"
    cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"), "--out",
        str(again), "--steps", "7", "--n-samples", "3", "--batch-size", "2", "--seed", "5")
    for name in ("sample_00000.png", "sample_00002.png"):
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(again / name)))
    assert not np.array_equal(np.asarray(Image.open(out / "sample_00000.png")),
                              np.asarray(Image.open(out / "sample_00002.png")))


def test_sample_says_what_it_replaces_and_how_to_continue(tiny_dir, tmp_path, monkeypatch, caplog):
    """A new run into a --out holding an earlier run's images replaced them without a word; Ctrl-C said only
    "interrupted", not that --resume continues."""
    args = ["--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"), "--steps", "2",
            "--n-samples", "2", "--out", str(tmp_path / "run")]
    caplog.set_level("INFO", logger="rdm_fast")
    assert cli(sample, *args) == 0
    assert not any("replaced" in r.getMessage() for r in caplog.records)
    assert cli(sample, *args) == 0
    assert any("holds 2 of this run's image names from an earlier run: they are replaced" in r.getMessage()
               for r in caplog.records)

    def interrupted(self, context, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RDM, "sample", interrupted)
    caplog.clear()
    assert cli(sample, *args[:-1], str(tmp_path / "cut")) == 130
    assert any("stopped: the same command with --resume draws only the images still missing" in r.getMessage()
               for r in caplog.records)

    # stopped before its own run.json (while loading): no hint, though the folder holds an unfinished run's
    monkeypatch.setattr(sample, "load_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    caplog.clear()
    assert cli(sample, *args[:-1], str(tmp_path / "cut")) == 130
    assert not any("--resume" in r.getMessage() for r in caplog.records)


def test_sample_unwinds_on_sigterm_and_restores_the_handler(tiny_dir, tmp_path, monkeypatch, caplog):
    """A scheduler's SIGTERM killed the process without a word: it now unwinds as Ctrl-C does, exit status 143.
    The test's own SIGTERM handler stands in for the default one, so that a regression fails the test instead of
    ending pytest (pytest runs tests in the main thread, where handlers can be set)."""
    received = []

    def test_handler(signum, frame):
        received.append(signum)

    def terminated(self, context, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # sample's handler interrupts this
        raise AssertionError(f"SIGTERM did not stop the run (the test's handler got {received})")

    monkeypatch.setattr(RDM, "sample", terminated)
    caplog.set_level("INFO", logger="rdm_fast")
    previous = signal.signal(signal.SIGTERM, test_handler)
    try:
        with pytest.raises(SystemExit) as e:
            cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"), "--steps",
                "2", "--n-samples", "2", "--out", str(tmp_path / "term"))
        assert signal.getsignal(signal.SIGTERM) is test_handler and not received
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == 143
    assert any("stopped: the same command with --resume" in r.getMessage() for r in caplog.records)


def test_sample_resume_draws_only_the_missing_samples_and_refuses_other_settings(tiny_dir, tmp_path, monkeypatch,
                                                                                   capsys):
    """--resume after an interruption draws only the samples without an image of that run, and the images equal
    those of an uninterrupted run (another --batch-size is allowed); images left by another run in the same --out
    are drawn again; other settings, other context file contents or no earlier run are refused."""
    monkeypatch.setattr(sample, "GRID_SAMPLES", 3)  # fewer than the images the resumed run draws
    args = ["--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"), "--steps", "4",
            "--n-samples", "5", "--batch-size", "2", "--seed", "3", "--out", str(tmp_path / "run")]
    assert cli(sample, *args) == 0
    full = {i: np.asarray(Image.open(tmp_path / "run" / f"sample_{i:05d}.png")) for i in range(5)}
    full_grid = np.asarray(Image.open(tmp_path / "run" / "grid.png"))
    for i in (1, 4):  # as if killed while writing
        (tmp_path / "run" / f"sample_{i:05d}.png").unlink()
    drawn = []
    real = RDM.sample

    def spy(self, context, **kwargs):
        drawn.append(context.shape[0])
        return real(self, context, **kwargs)

    monkeypatch.setattr(RDM, "sample", spy)
    assert cli(sample, *args, "--resume") == 0
    assert drawn == [2]  # samples 1 and 4 in one batch; the others were kept, not drawn again
    for i in range(5):  # another batch composition: the same images up to float rounding
        again = np.asarray(Image.open(tmp_path / "run" / f"sample_{i:05d}.png"), dtype=int)
        assert np.abs(again - full[i]).max() <= 1, i
    grid_now = np.asarray(Image.open(tmp_path / "run" / "grid.png"), dtype=int)
    assert np.abs(grid_now - full_grid).max() <= 1  # samples 0-2
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["complete"] is True and len(info["context_digest"]) == 64
    drawn.clear()
    assert cli(sample, *args, "--resume", "--batch-size", "3") == 0 and drawn == []  # nothing left to draw
    capsys.readouterr()
    assert cli(sample, *args, "--resume", "--seed", "4") == 2
    assert "holds a run with other settings (seed)" in capsys.readouterr().err
    # a new run into the same --out, interrupted before it replaced sample 3 of the run above: its --resume
    # redraws sample 3 (the image names the run that drew it), not only the missing ones
    stale = (tmp_path / "run" / "sample_00003.png").read_bytes()
    assert cli(sample, *args, "--seed", "4") == 0
    new_3 = np.asarray(Image.open(tmp_path / "run" / "sample_00003.png"))
    (tmp_path / "run" / "sample_00003.png").write_bytes(stale)
    drawn.clear()
    assert cli(sample, *args, "--seed", "4", "--resume") == 0 and drawn == [1]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "run" / "sample_00003.png")), new_3)
    Image.fromarray(new_3).save(tmp_path / "run" / "sample_00003.png", format="JPEG")  # recompressed in place
    drawn.clear()
    assert cli(sample, *args, "--seed", "4", "--resume") == 0 and drawn == [1]  # not this run's PNG: drawn again
    assert np.array_equal(np.asarray(Image.open(tmp_path / "run" / "sample_00003.png")), new_3)
    args[args.index("--seed") + 1] = "4"
    other = tmp_path / "other.npy"
    np.save(other, np.load(tiny_dir / "ctx.npy") + 1)
    args[args.index(str(tiny_dir / "ctx.npy"))] = str(other)
    (tmp_path / "run" / "sample_00004.png").unlink()
    assert cli(sample, *args, "--resume") == 2
    assert "(context_source, context_digest: the contents of the context file, or of the database, the " \
           "pseudo-queries drawn from its proposal ranking or the --image files)" in capsys.readouterr().err
    assert cli(sample, *args[:-1], str(tmp_path / "new"), "--resume") == 2
    assert "no run to continue" in capsys.readouterr().err


def test_sample_resume_compares_the_checkpoint_by_content(tiny_dir, tmp_path, capsys):
    """Another model saved at the --ckpt path (convert again into its folder) would draw the remaining images:
    --resume refuses it, and accepts a copy of the same file (another mtime, or another path); a training run's
    folder whose newest checkpoint changed is refused as another file; a run.json without the digest names it as
    not recorded."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir / "model", model)
    args = ["--ckpt", str(model), "--context-file", str(tiny_dir / "ctx.npy"), "--steps", "2", "--n-samples", "2",
            "--out", str(tmp_path / "run")]
    assert cli(sample, *args) == 0
    (tmp_path / "run" / "sample_00001.png").unlink()
    other = RDM.from_pretrained(model)
    with torch.no_grad():
        next(other.unet.parameters()).add_(0.01)
    other.save_pretrained(model)
    capsys.readouterr()
    assert cli(sample, *args, "--resume") == 2
    assert "holds a run with other settings (ckpt_sha256: the checkpoint file's contents (another model saved at " \
           "its path, e.g. by convert into the same --out))" in capsys.readouterr().err
    (model / "model.safetensors").write_bytes((tiny_dir / "model" / "model.safetensors").read_bytes())
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert cli(sample, *args, "--resume") == 0
    digest = info.pop("ckpt_sha256")
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    assert cli(sample, *args, "--resume") == 2
    assert "(ckpt_sha256: not recorded by the older rdm_fast that began it)" in capsys.readouterr().err
    (tmp_path / "run" / "run.json").write_text(json.dumps({**info, "ckpt_sha256": digest}))
    shutil.copytree(model, tmp_path / "local-copy")  # the same file at another path (e.g. a node's local disk)
    assert cli(sample, *[str(tmp_path / "local-copy") if a == str(model) else a for a in args], "--resume") == 0
    other.save_pretrained(tmp_path / "other")
    run = tmp_path / "training"
    for step, weights in ((1, tiny_dir / "model"), (2, tmp_path / "other")):
        shutil.copytree(weights, run / "checkpoints" / f"step_{step:07d}")
        state = {"step": step, "ema_updates": step}
        (run / "checkpoints" / f"step_{step:07d}" / ckpt.TRAIN_STATE_FILE).write_text(json.dumps(state))
    (run / ckpt.RUN_LATEST).write_text("step_0000001")
    args[1], args[-1] = str(run), str(tmp_path / "from-run")
    assert cli(sample, *args) == 0
    (tmp_path / "from-run" / "sample_00001.png").unlink()
    (run / ckpt.RUN_LATEST).write_text("step_0000002")  # the run trained on
    assert cli(sample, *args, "--resume") == 2
    assert "other settings (ckpt_file: the checkpoint file (a training run's newest changes as it trains));" in \
        capsys.readouterr().err


def test_sample_and_convert_take_the_newest_checkpoint_of_a_run_without_latest(tiny_dir, tmp_path, caplog):
    """A run killed right after its first checkpoint has no latest file: sample and convert load its newest
    checkpoint (by step number, the one train --resume continues from) and say so in one line, where they called
    the run a folder without a checkpoint; a model's folder that also holds a run's checkpoints stays ambiguous."""
    run = tmp_path / "run"
    newer = RDM.from_pretrained(tiny_dir / "model")
    with torch.no_grad():
        next(newer.unet.parameters()).add_(0.01)
    shutil.copytree(tiny_dir / "model", run / "checkpoints" / "step_0000009")
    newer.save_pretrained(run / "checkpoints" / "step_0000010")
    for step in (9, 10):
        state = {"step": step, "ema_updates": step}
        (run / "checkpoints" / f"step_{step:07d}" / ckpt.TRAIN_STATE_FILE).write_text(json.dumps(state))
    newest = run / "checkpoints" / "step_0000010" / ckpt.WEIGHTS_FILE
    said = f"{run} has no latest file (a run killed right after its first checkpoint leaves none): loading its " \
           "newest checkpoint, step_0000010"
    assert cli(sample, "--ckpt", str(run), "--context-file", str(tiny_dir / "ctx.npy"), "--steps", "2",
               "--n-samples", "1", "--out", str(tmp_path / "samples")) == 0
    assert json.loads((tmp_path / "samples" / "run.json").read_text())["ckpt_file"] == str(newest)
    assert caplog.text.count(said) == 1
    caplog.clear()
    assert cli(convert, str(run), "--out", str(tmp_path / "converted")) == 0
    assert caplog.text.count(said) == 1
    converted, _ = ckpt.read_state_dict(tmp_path / "converted" / ckpt.WEIGHTS_FILE)
    expected, _ = ckpt.read_state_dict(newest)
    assert converted.keys() == expected.keys() and all(torch.equal(converted[k], expected[k]) for k in expected)
    both = tmp_path / "both"
    shutil.copytree(tiny_dir / "model", both)
    shutil.copytree(run / "checkpoints", both / "checkpoints")
    with pytest.raises(ckpt.CheckpointError, match="holds both a model .* and a training run"):
        ckpt.resolve_file(both)


def test_process_device_takes_the_local_gpu_and_makes_it_current(monkeypatch):
    """Under torchrun each process computes on cuda:LOCAL_RANK, made the current CUDA device (Triton kernels and
    CUDA graphs run on the current device: without it every process would launch on GPU 0); cuda:N is refused
    there; the CPU needs no current device. (CUDA is simulated: no GPU needed.)"""
    from rdm_fast import _distributed

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _distributed.process_device("auto") == torch.device("cuda:1") == current[-1]
    assert _distributed.process_device("cuda") == torch.device("cuda:1") and len(current) == 2
    with pytest.raises(ValueError, match="each process takes its own GPU"):
        _distributed.process_device("cuda:0")
    assert _distributed.process_device("cpu") == torch.device("cpu") and len(current) == 2
    # a GPU index past the visible ones failed at its first use, with the driver's message
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="device 'cuda:2': this machine has 2 visible GPUs"):
        _distributed.process_device("cuda:2")
    with pytest.raises(ValueError, match="device 'cuda:7': this machine has 2 visible GPUs"):
        _distributed.parse_device("cuda:7")
    assert _distributed.parse_device("cuda:1") == torch.device("cuda:1")
    assert _distributed.process_device("cuda:1") == torch.device("cuda:1") == current[-1]  # outside torchrun: any GPU
    # one visible GPU per process (e.g. SLURM): cuda is that one, whatever the local rank
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _distributed.process_device("cuda") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"device 'cuda:1': this machine has 1 visible GPU \(cuda:0 to cuda:0;"):
        _distributed.parse_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device cuda: no CUDA GPU is available here \(use cpu\)"):
        _distributed.process_device("cuda")


def test_processes_join_a_process_group_made_before(tmp_path, monkeypatch):
    """Processes creates the process group only where none exists (a caller's own stays the caller's to close),
    and on one process its collectives give back what they are given."""
    import torch.distributed as dist

    from rdm_fast._distributed import Processes

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    alone = Processes()
    t = torch.ones(2)
    assert (alone.world, alone.rank, alone.main, alone.owned) == (1, 0, True, False)
    assert alone.from_rank0("x") == "x" and alone.all_sum(t) is t and t.tolist() == [1, 1]
    alone.barrier()
    alone.close()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun (the group made above has this one process)
        joined = Processes()
        assert not joined.owned
        joined.close()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_sample_refuses_an_out_in_use_and_removes_killed_writes(tiny_dir, tmp_path, capsys, monkeypatch):
    """Two runs into one --out would mix their images under one run.json: the second is refused before it writes
    anything, and before it loads the model. Temporary files a killed run left are removed (only sample's own: a
    user's are left alone)."""
    from rdm_fast._cli import OutDirLock

    def never(*a, **k):
        raise AssertionError("loaded the model")

    args = ["--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"), "--steps", "2",
            "--n-samples", "2", "--out", str(tmp_path / "run")]
    held = OutDirLock(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(sample, "load_model", never)
        assert cli(sample, *args) == 2
    assert "--out " + str(tmp_path / "run") + " is in use by another run (process" in capsys.readouterr().err
    held.release()
    left = [".sample_00001.png.k1.tmp", ".run.json.k2.tmp", ".grid.png.k3.tmp"]
    for name in [*left, ".notes.txt.k4.tmp"]:
        (tmp_path / "run" / name).write_bytes(b"half")
    assert cli(sample, *args) == 0
    assert sorted(p.name for p in (tmp_path / "run").glob(".*")) == [".notes.txt.k4.tmp", ".rdm_fast.lock"]


def test_sample_resume_refuses_each_setting_the_images_depend_on(tiny_dir, tmp_path, hash_encoder, capsys):
    """Each option that changes the remaining images, changed alone, is refused on --resume with its name: the
    sampler settings, precision, weights set, the model's config (a config.yaml other than the checkpoint's own),
    the captions (their embeddings are not in context_digest), the neighbour count and the query's slot, an
    --image file's contents."""
    tree = RDMConfig.preset("tiny").to_dict()
    tree["model"]["params"]["scale_factor"] = 0.25  # tiny's is 0.5
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(tree))
    args = ["--ckpt", str(tiny_dir / "model"), "--steps", "2", "--n-samples", "1", "--no-progress", "--out"]
    runs = {"file": [*args, str(tmp_path / "file"), "--context-file", str(tiny_dir / "ctx.npy")],
            "text": [*args, str(tmp_path / "text"), "--db", str(tiny_dir / "db"), "--text", "a red bird", "--k", "2"]}
    for argv in runs.values():
        assert cli(sample, *argv) == 0
    for run_name, extra, key in [
            ("file", ["--steps", "4"], "steps"), ("file", ["--sampler", "plms"], "sampler"),
            ("file", ["--eta", "0.5"], "eta"), ("file", ["--guidance", "3"], "guidance_scale"),
            ("file", ["--bf16"], "dtype"), ("file", ["--no-ema"], "no_ema"),
            ("file", ["--config", str(tmp_path / "other.yaml")], "config"),
            ("text", ["--text", "a blue bird"], "text"), ("text", ["--k", "1"], "k"),
            ("text", ["--no-query"], "include_query")]:
        capsys.readouterr()
        assert cli(sample, *runs[run_name], *extra, "--resume") == 2, extra
        changed = re.search(r"other settings \(([^)]*)\)", capsys.readouterr().err)
        assert changed and key in changed[1].split(", "), (extra, changed)
    for argv in runs.values():  # unchanged: resumes
        assert cli(sample, *argv, "--resume") == 0
    query = tmp_path / "q.png"  # an --image query replaced at the same path: compared by its bytes
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(query)
    image_run = [*args, str(tmp_path / "image"), "--db", str(tiny_dir / "db"), "--image", str(query)]
    assert cli(sample, *image_run) == 0
    Image.fromarray(np.full((40, 50, 3), 100, np.uint8)).save(query)
    capsys.readouterr()
    assert cli(sample, *image_run, "--resume") == 2
    assert "other settings (context_digest: " in capsys.readouterr().err
    info = json.loads((tmp_path / "file" / "run.json").read_text())
    del info["eta"]  # as a version that did not record it wrote run.json: not taken for equal
    (tmp_path / "file" / "run.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert cli(sample, *runs["file"], "--resume") == 2
    assert "other settings (eta: not recorded by the older rdm_fast that began it)" in capsys.readouterr().err


def test_sample_resume_compares_the_database_by_content(tiny_dir, tmp_path, hash_encoder, capsys):
    """A database rebuilt at the same path with other embeddings gives a caption other neighbours: --resume refuses
    it (context_digest covers the shards' contents), not only other pseudo-queries."""
    db = tmp_path / "db"
    shutil.copytree(tiny_dir / "db", db)
    args = ["--ckpt", str(tiny_dir / "model"), "--db", str(db), "--text", "a red bird", "--steps", "2",
            "--n-samples", "1", "--no-progress", "--out", str(tmp_path / "run")]
    assert cli(sample, *args) == 0
    shutil.rmtree(db)
    write_database(db, np.random.default_rng(2).standard_normal((50, 64)).astype(np.float32), TEST_ENCODER)
    capsys.readouterr()
    assert cli(sample, *args, "--resume") == 2
    assert "other settings (context_digest: " in capsys.readouterr().err


def test_sample_resume_refuses_another_search(tiny_dir, tmp_path, capsys):
    """Neighbours found by another search (here a FAISS index instead of the exact search) would change the
    remaining images' contexts: --resume refuses; the exact backends count as one."""
    pytest.importorskip("faiss")
    from rdm_fast.retrieval.database import add_index

    db = tmp_path / "db"
    shutil.copytree(tiny_dir / "db", db)
    args = ["--ckpt", str(tiny_dir / "model"), "--db", str(db), "--steps", "4", "--n-samples", "2",
            "--batch-size", "1", "--out", str(tmp_path / "run")]
    assert cli(sample, *args, "--search-backend", "torch") == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["search"]["backend"] == "exact" and info["query_encoder"] is None
    (tmp_path / "run" / "sample_00001.png").unlink()
    add_index(db, "flat")
    capsys.readouterr()
    assert cli(sample, *args, "--search-backend", "faiss", "--resume") == 2
    assert "other settings (search)" in capsys.readouterr().err
    assert cli(sample, *args, "--search-backend", "torch", "--resume") == 0
    probe = [*args[:-1], str(tmp_path / "probe")]
    assert cli(sample, *probe, "--search-backend", "faiss", "--nprobe", "3") == 0  # reaches the search settings
    assert json.loads((tmp_path / "probe" / "run.json").read_text())["search"]["nprobe"] == 3


def test_sample_nprobe_without_an_ivfpq_index_is_warned_about(tiny_dir, tmp_path, caplog):
    """--nprobe only tunes an IVF-PQ index: the exact search ignores it, which sample now says as db search does
    (it was silent)."""
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--db", str(tiny_dir / "db"), "--steps", "2",
               "--nprobe", "4", "--out", str(tmp_path / "run")) == 0
    assert "--nprobe applies to ivfpq indexes only; this search runs torch-exact, which ignores it" in caplog.text


def test_sample_under_torchrun_shares_the_batches_and_equals_one_process(tiny_dir, tmp_path):
    """Two torchrun processes draw alternate batches; the images, grid.png and run.json's settings equal one
    process's (sample i's noise depends on i alone; same batches, so the same arithmetic)."""
    args = ["--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"), "--steps", "4",
            "--n-samples", "5", "--batch-size", "2", "--seed", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process below: CPU kernels may split sums by thread
    try:
        assert cli(sample, *args, "--out", str(tmp_path / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    env = child_env(OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "rdm_fast.sample", *args, "--out", str(tmp_path / "two")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "and 1 more process" in r.stderr and r.stderr.count("wrote 5 images and grid.png") == 1
    assert "| 3/3 [" in r.stderr and "| 5/5 [" not in r.stderr  # process 0's bar: its batches 0-1 and 4 only
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for name in [f"sample_{i:05d}.png" for i in range(5)] + ["grid.png"]:
        assert np.array_equal(np.asarray(Image.open(one / name)), np.asarray(Image.open(two / name))), name
    info = json.loads((two / "run.json").read_text())
    assert info["complete"] is True and info["processes"] == 2 and info["n_samples"] == 5


def test_sample_grid_shows_the_first_samples_and_run_json_comes_first(tiny_dir, tmp_path, monkeypatch, caplog):
    """grid.png holds the first GRID_SAMPLES images only; run.json exists (incomplete) while sampling runs; images
    of an earlier, longer run in --out are reported."""
    monkeypatch.setattr(sample, "GRID_SAMPLES", 3)
    (tmp_path / "sample_00007.png").write_bytes(b"an earlier run's")
    seen = []
    real = sample.save_png

    def spy(image, path, **kwargs):
        seen.append((Path(path).name, json.loads((tmp_path / "run.json").read_text())["complete"]))
        real(image, path, **kwargs)

    monkeypatch.setattr(sample, "save_png", spy)  # grid.png
    monkeypatch.setattr(images, "save_png", spy)  # the samples, written by PngWriter's threads
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"),
               "--out", str(tmp_path), "--steps", "2", "--n-samples", "5", "--batch-size", "2") == 0
    assert sorted(seen[:-1]) == [(f"sample_{i:05d}.png", False) for i in range(5)]
    assert seen[-1] == ("grid.png", False)  # after every sample was written
    grid_img = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid_img.shape == (2 * 34 + 2, 2 * 34 + 2, 3)  # 3 images of 32 px in 2 x 2 cells, 2 px borders
    first = np.asarray(Image.open(tmp_path / "sample_00002.png"))
    assert np.array_equal(grid_img[36:68, 2:34], first)  # the third image fills the second row
    assert json.loads((tmp_path / "run.json").read_text())["complete"] is True
    assert "already holds sample images beyond this run's 5 (1, from an earlier run)" in caplog.text


def test_png_writer_writes_in_the_background_bounded_and_reports_failures(tmp_path, monkeypatch):
    """PngWriter: every queued image lands (atomically, readable); no more than max_pending wait at once; a
    failed write is raised by close; leaving on an exception keeps that exception."""
    release = threading.Event()
    real = images.save_png

    def slow(image, path, **kwargs):
        assert kwargs["fsync"] is True  # an image that exists is whole (sample --resume relies on it)
        release.wait(5)
        real(image, path, **kwargs)

    monkeypatch.setattr(images, "save_png", slow)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    with images.PngWriter(max_pending=2, workers=1) as writer:
        writer.write(pixels[0], tmp_path / "a0.png")
        writer.write(pixels[1], tmp_path / "a1.png")
        assert len(writer._pending) == 2  # both queued without blocking
        release.set()
        for i in range(2, 5):
            writer.write(pixels[i], tmp_path / f"a{i}.png")
            assert len(writer._pending) <= 2
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"a{i}.png")), pixels[i])
    writer = images.PngWriter()
    writer.write(pixels[0], tmp_path / "missing-dir" / "x.png")
    with pytest.raises(OSError):
        writer.close()
    writer = images.PngWriter(workers=1)  # a failure stops the loop at its next write, not after the last batch
    writer.write(pixels[0], tmp_path / "missing-dir" / "z.png")
    writer._pending[0].exception(5)  # written (and failed)
    with pytest.raises(OSError):
        writer.write(pixels[1], tmp_path / "z1.png")
    writer.close()
    with images.PngWriter(workers=3) as writer:  # the number of writing threads asked for
        assert writer._pool._max_workers == 3
    with pytest.raises(KeyError), images.PngWriter() as writer:
        writer.write(pixels[0], tmp_path / "missing-dir" / "y.png")
        raise KeyError("the loop's own error")


@pytest.mark.parametrize("extra", [["--bf16", "--sampler", "plms"], ["--fp16", "--eta", "1.0"]])
def test_sample_half_precision_and_options(tiny_dir, tmp_path, extra):
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--db", str(tiny_dir / "db"), "--out",
               str(tmp_path), "--steps", "4", "--n-samples", "2", *extra) == 0
    img = np.asarray(Image.open(tmp_path / "sample_00001.png"))
    assert img.std() > 0


def test_random_init_needs_config(tiny_dir, tmp_path, capsys):
    assert cli(sample, "--random-init", "--context-file", str(tiny_dir / "ctx.npy"), "--out", str(tmp_path)) == 2
    assert capsys.readouterr().err.strip() == "error: --random-init needs --config (a preset name or config.yaml)"


def bad_npy(tmp_path, array) -> str:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    return str(path)


@pytest.mark.parametrize("make,message", [
    (lambda d: str(d / "missing.npy"), "context file .*missing.npy does not exist"),
    (lambda d: bad_npy(d, np.zeros((2, 3, 32), np.float32)),
     r"holds 32-d embeddings but the model expects 64-d \(context_dim in the checkpoint .*model.safetensors\)"),
    (lambda d: bad_npy(d, np.zeros((2, 3, 4, 64), np.float32)), r"holds shape \(2, 3, 4, 64\); expected"),
    (lambda d: bad_npy(d, np.zeros((3, 64), np.int64)), "must hold a float array"),
    (lambda d: bad_npy(d, np.full((3, 64), np.nan, np.float32)), "NaN or infinite"),
    (lambda d: bad_npy(d, np.full((3, 64), 1e300)), "holds values beyond float32's range"),  # finite in float64
    # finite in float32, but the norm is not: normalised (tiny's embeddings are), the contexts were all zeros
    (lambda d: bad_npy(d, np.full((3, 64), 1e20, np.float32)), r"holds embeddings of norm up to 8e\+20, beyond what "
     r"the model computes with in float32 \(1.84e\+19\)"),
    (lambda d: (d / "text.npy").write_text("hello") and str(d / "text.npy"),
     r"not a readable .npy array \(not a NumPy .npy or .npz file\)$"),
    (lambda d: (np.save(d / "obj.npy", np.array([{}, 1], dtype=object)), str(d / "obj.npy"))[1],
     r"not a readable .npy array \(it holds Python objects \(pickled\), not numbers\)$"),
    (lambda d: (np.savez(d / "c.npz", a=np.zeros((2, 4, 64))), str(d / "c.npz"))[1],
     r"is a zip archive \(.npz, or torch.save's format\): save the contexts as one .npy array"),
    (lambda d: (torch.save(torch.zeros(2, 4, 64), d / "c.pt"), str(d / "c.pt"))[1],  # it said "a .npz archive"
     r"c.pt is a zip archive \(.npz, or torch.save's format\)"),
    (lambda d: (np.savez(d / "cut.npz", a=np.zeros((2, 4, 64))), (d / "cut.npz").write_bytes(
        (d / "cut.npz").read_bytes()[:500]), str(d / "cut.npz"))[2], r"cut.npz is not a readable .npy array \(File is "
     r"not a zip file\)$"),
    (lambda d: ((d / "dir.npy").mkdir(), str(d / "dir.npy"))[1], "context file .*dir.npy is a directory$"),
    (lambda d: (os.mkfifo(d / "fifo.npy"), str(d / "fifo.npy"))[1],  # said "does not exist"
     r"context file .*fifo.npy is not a regular file \(a pipe, socket or device\)"),
    (lambda d: bad_npy(d, np.zeros((0, 4, 64), np.float32)), r"holds no contexts \(shape \(0, 4, 64\)\)"),
])
@pytest.mark.parametrize("n_samples", [[], ["--n-samples", "3"]])
def test_context_file_errors(tiny_dir, tmp_path, capsys, make, message, n_samples):
    code = cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", make(tmp_path), "--out",
               str(tmp_path / "o"), *n_samples)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()  # refused before anything is written


@pytest.mark.parametrize("args,message", [
    (["--ckpt", "{d}/nope.ckpt"], "nope.ckpt does not exist"),
    (["--ckpt", "{t}/ctx512.npy"], r"ctx512.npy is a NumPy array, not a checkpoint$"),  # "truncated or corrupt?"
    (["--ckpt", "{d}/model", "--db", "{d}/nope"], "database directory .*nope does not exist"),
    (["--ckpt", "{d}/model", "--db", "{d}"], "manifest.json"),
    (["--ckpt", "{d}/model", "--text", "a cat"],
     "--text, --image, --k, --no-query, --search-backend and --nprobe are about"),
    (["--ckpt", "{d}/model", "--nprobe", "4"], "--nprobe are about retrieval from a database"),
    (["--ckpt", "{d}/model", "--db", "{d}/db", "--nprobe", "0"], "--nprobe must be at least 1, got 0"),
    (["--ckpt", "{d}/model", "--search-backend", "faiss"], "--search-backend and --nprobe are about retrieval from"),
    (["--ckpt", "{d}/model", "--db", "{d}/db", "--encoder-checkpoint", "{d}/w.pt"],
     "--encoder-checkpoint is the weights of the encoder that embeds --text/--image queries: without those"),
    (["--ckpt", "{d}/model", "--db", "{d}/db", "--text", " "], "--text captions must not be empty"),
    (["--ckpt", "{d}/model", "--steps", "999"], "steps must be between 1 and 500"),
    (["--ckpt", "{d}/model", "--n-samples", "0"], "--n-samples must be at least 1"),
    (["--ckpt", "{d}/model", "--n-samples", "1000000000"],  # 14 GB of lists before the first image, without a word
     r"--n-samples 1000000000: at most 10,000,000 per run \(more images are several runs"),
    (["--ckpt", "{d}/model", "--seed", "-1"], r"--seed must be in \[0, 2\*\*63\)"),
    (["--ckpt", "{d}/model", "--sampler", "plms", "--eta", "0.5"], "--eta must be 0 for plms, which is deterministic"),
    (["--ckpt", "{d}/model", "--eta", "3"], (r"eta = 3 is too large for 20 steps .*: the DDIM update needs "
                                             r"eta <= 1.0166$")),
    (["--ckpt", "{d}/model", "--config", "imagenet", "--context-file", "{t}/ctx512.npy"],
     (r"does not match the model configuration \(missing \d+ tensors: .*, \.\.\. \(\d+ more\); \d+ tensors "
      r"of the wrong shape: .*\); is the config right")),
    (["--ckpt", "{d}/model", "--device", "cuda:0"] if not torch.cuda.is_available() else
     ["--ckpt", "{d}/model", "--config", "nonexistent"], "no CUDA GPU|neither a preset"),
])
def test_sample_errors(tiny_dir, tmp_path, capsys, args, message):
    np.save(tmp_path / "ctx512.npy", np.zeros((2, 4, 512), np.float32))  # contexts for the imagenet config
    argv = [a.format(d=tiny_dir, t=tmp_path) for a in args]
    if "--db" not in argv and "--context-file" not in argv:
        argv += ["--context-file", str(tiny_dir / "ctx.npy")]
    code = cli(sample, *argv, "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_environment_and_output_errors_are_one_line_and_early(tiny_dir, tmp_path, capsys, monkeypatch):
    """An --out that is a file and a bad $RDM_FAST_OPS fail before the model loads; fast mode on the CPU without
    the Triton interpreter says how to get it (not how to rebuild); all as one `error:` line, exit status 2."""
    real_load = sample.load_model

    def never(*a, **k):
        raise AssertionError("loaded the model")

    (tmp_path / "afile").write_text("x")
    base = ["--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"), "--steps", "2"]
    monkeypatch.setattr(sample, "load_model", never)
    # other commands' outputs, which a sample run's run.json or PNGs (or converted weights) would mix into
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "manifest.json").write_text('{"format": "rdm_fast-database"}')
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "sample_00000.png").write_bytes(b"")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.JPG").write_bytes(b"")
    cases = [(sample, [*base, "--out", str(tmp_path / "afile")], {}, "--out .*afile is a file, not a folder"),
             (sample, [*base, "--out", str(tmp_path / "db")], {},
              "--out .*db holds a database: write a sample run into a folder of its own"),
             (sample, [*base, "--out", str(tmp_path / "run")], {}, "--out .*run holds a training run: write a sample"),
             (convert, [str(tiny_dir / "model"), "--out", str(tmp_path / "samples")], {},
              "--out .*samples holds a sample run: write a model into a folder of its own"),
             (sample, [*base, "--out", str(tmp_path / "afile" / "sub")], {},
              "--out .*sub: .*afile is a file, not a folder"),
             (sample, [*base, "--out", ""], {}, "--out is empty"),
             (sample, [*base, "--out", str(tmp_path / "photos")], {},  # a later db build of the folder takes both
              "--out .*photos holds 1 image that sample did not write \\(e.g. cat.JPG\\): write the samples into"),
             (convert, [str(tiny_dir / "model"), "--out", str(tmp_path / "afile")], {},
              "--out .*afile is a file, not a folder"),
             (sample, [*base, "--out", str(tmp_path / "o")], {"RDM_FAST_OPS": "bogus"},
              r"invalid rdm_fast ops mode 'bogus' from \$RDM_FAST_OPS")]
    if not torch.cuda.is_available():
        cases.append((sample, [*base, "--out", str(tmp_path / "o2")], {"RDM_FAST_OPS": "fast", "TRITON_INTERPRET": "0"},
                      r"mode 'fast' but no fast implementation can run this call .*set TRITON_INTERPRET=1[^;]*$"))
    for module, argv, env, message in cases:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        if env.get("RDM_FAST_OPS") == "fast":
            monkeypatch.setattr(sample, "load_model", real_load)
        assert cli(module, *argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and re.search(message, err[-1]), err
        for k in env:
            monkeypatch.delenv(k)


@pytest.mark.parametrize("module,argv,name", [
    ("sample", ["--random-init", "--config", "tiny", "--context-file", "", "--out", "o"], "--context-file"),
    ("sample", ["--random-init", "--config", "tiny", "--db", "", "--out", "o"], "--db"),
    ("sample", ["--random-init", "--config", "tiny", "--db", "d", "--text", "a", "--text", "", "--out", "o"],
     "--text"),
    ("db", ["build", "--images", "", "--encoder", "offline-lite0-minilm", "--out", "o"], "--images"),
    ("db", ["import-npz", "", "--encoder", "clip-vit-b-32", "--out", "o"], "parts"),
    ("db", ["search", "d", "--text", ""], "--text"),  # an option of a subcommand other than the first
    ("train", ["--training-db", "d", "--db", "d", "--neighbors", "", "--steps", "1", "--out", "o", "--random-init"],
     "--neighbors"),
    ("convert", ["", "--out", "o"], "ckpt"),
    ("encoders.train_projection", ["--cache", ""], "--cache"),
])
def test_empty_arguments_are_refused(module, argv, name, capsys):
    """An empty value is refused by name before anything runs: as a path it would mean the current directory
    (``db build --images ""`` embedded the working directory; ``sample --context-file ""`` fell through to the
    database branch and crashed)."""
    import importlib

    assert cli(importlib.import_module(f"rdm_fast.{module}"), *argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {name} is empty"


def test_out_dir_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    """Checked at the nearest existing folder (os.access: also a read-only file system, where root is refused)."""
    from rdm_fast._cli import CLIError, check_out_dir

    check_out_dir(str(tmp_path / "new" / "deeper"))  # to be made: fine
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path))
    with pytest.raises(CLIError, match=f"--out .*new: cannot write in {tmp_path} "):
        check_out_dir(str(tmp_path / "new"))
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.X_OK)  # writable but not searchable
    with pytest.raises(CLIError, match=f"--out .*new: cannot write in {tmp_path} "):
        check_out_dir(str(tmp_path / "new"))


def test_non_finite_samples_fail_instead_of_black_images(tiny_dir, tmp_path, capsys, monkeypatch):
    real = RDM.decode

    def decode(self, z):  # the second image of each batch goes NaN (e.g. weights that overflowed)
        x = real(self, z)
        return x * torch.tensor([1.0, float("nan")] * (len(x) // 2) + [1.0] * (len(x) % 2))[:, None, None, None]

    monkeypatch.setattr(RDM, "decode", decode)
    code = cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"), "--steps", "2",
               "--n-samples", "4", "--batch-size", "4", "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == ("error: samples 1, 3 came out NaN or infinite: the checkpoint's weights or the "
                                     "contexts are not finite"), err
    assert not list((tmp_path / "o").glob("sample_*.png"))
    real_sample = RDM.sample

    def nan_latents(self, context, **kwargs):  # NaN latents: named the same way (decode refuses them on the CPU)
        z = real_sample(self, context, **kwargs)
        return z * torch.tensor([float("nan")] + [1.0] * (len(z) - 1))[:, None, None, None]

    monkeypatch.setattr(RDM, "decode", real)
    monkeypatch.setattr(RDM, "sample", nan_latents)
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"), "--steps", "2",
               "--n-samples", "4", "--batch-size", "4", "--out", str(tmp_path / "p")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: sample 0 came out NaN or infinite")


@pytest.mark.parametrize("args,message", [
    (["--ckpt", "{d}/nope.ckpt", "--db", "{d}/nope", "--top-m", "5"], r"--top-m must be a fraction in \(0, 1\]"),
    (["--ckpt", "{d}/nope.ckpt", "--context-file", "x.npy", "--eta", "-1"], "--eta must be >= 0"),
    (["--ckpt", "{d}/nope.ckpt", "--context-file", "x.npy", "--steps", "0"], "--steps must be at least 1"),
    (["--ckpt", "{d}/model", "--context-file", "x.npy", "--steps", "999"], "steps must be between 1 and 500"),
    (["--ckpt", "{d}/model", "--context-file", "x.npy", "--eta", "1.5"], "eta = 1.5 is too large"),
    (["--random-init", "--config", "tiny", "--context-file", "x.npy", "--eta", "2"], "eta = 2 is too large"),
    (["--ckpt", "{d}/model", "--db", "{d}/nope"], "database directory .*nope does not exist"),
    (["--ckpt", "{d}/model", "--db", "{d}/nope", "--text", "a cat", "--top-m", "0.1"], "--top-m draws pseudo-queries"),
    (["--ckpt", "{d}/model", "--context-file", "x.npy", "--top-m", "0.1"], "--top-m draws pseudo-queries"),
])
def test_bad_options_fail_before_loading(tiny_dir, tmp_path, capsys, monkeypatch, args, message):
    """Option checks come before the model is loaded and the database or context file is read: a checkpoint
    that does not exist, or one whose config its header gives, is not read."""
    def never(*a, **k):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(sample, "load_model", never)
    monkeypatch.setattr(sample.Database, "open", never)
    monkeypatch.setattr(sample, "read_context_file", never)
    code = cli(sample, *[a.format(d=tiny_dir) for a in args], "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and re.search(message, err), err


def test_bad_context_file_fails_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    """Where the checkpoint's header gives its config, a context file of the wrong width is refused before the
    model is loaded."""
    def never(*a, **k):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(sample, "load_model", never)
    np.save(tmp_path / "bad.npy", np.zeros((2, 4, 7), dtype=np.float32))
    code = cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tmp_path / "bad.npy"),
               "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "7" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_start_noise_and_images_do_not_depend_on_the_batch_size(tiny_dir, tmp_path, monkeypatch, eta):
    """Sample i's noise (start, and each DDIM step's for eta > 0) is seeded by (seed, i): --batch-size 2 and 5
    draw the same start noise and give the same latents (to float rounding of the batched convolutions) and
    images. The steps' noise comes from streams of its own, not again from the start noise's."""
    calls = []
    real = RDM.sample

    def spy(self, context, **kw):
        for g, start in zip(kw["generator"] or (), kw["x_T"]):  # the first step's draw, from a copy of the stream
            assert not np.array_equal(copy.deepcopy(g).standard_normal(start.shape, dtype=np.float32), start.numpy())
        z = real(self, context, **kw)
        calls.append((kw["x_T"], z))
        return z

    monkeypatch.setattr(RDM, "sample", spy)
    runs = {}
    for b in (2, 5):
        calls.clear()
        assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"),
                   "--out", str(tmp_path / str(b)), "--steps", "4", "--n-samples", "5", "--batch-size", str(b),
                   "--seed", "3", "--eta", str(eta)) == 0
        runs[b] = [torch.cat(t) for t in zip(*calls, strict=True)]
    assert len(calls) == 1 and torch.equal(runs[2][0], runs[5][0])
    torch.testing.assert_close(runs[2][1], runs[5][1], rtol=1e-4, atol=1e-4)
    for i in range(5):
        a, b = (np.asarray(Image.open(tmp_path / d / f"sample_{i:05d}.png"), dtype=int) for d in ("2", "5"))
        assert np.abs(a - b).max() <= 1
    info = json.loads((tmp_path / "5" / "run.json").read_text())
    assert (info["batch_size"], info["device"], info["no_ema"], info["random_init"]) == (5, "cpu", False, False)
    assert info["args"]["batch_size"] == 5 and info["args"]["no_cuda_graph"] is False


@pytest.mark.parametrize("source", ["file", "text", "db"])
def test_each_sample_is_conditioned_on_its_own_context_in_any_batch(tiny_dir, tmp_path, hash_encoder, monkeypatch,
                                                                    source):
    """Sample i is drawn with its own context (a file's context i mod B, --text query i mod T, or its own
    pseudo-query's neighbours) in whichever batch it falls: the next batch's contexts are retrieved while the
    current one denoises, and an off-by-one there, or contexts picked by a sample's position in its batch,
    conditions images on other samples' contexts. The contexts differ from sample to sample here, so that each
    call's rows can be matched to the samples whose start noise they come with."""
    from rdm_fast.retrieval.context import model_context
    from rdm_fast.sample import START_NOISE, seeded_generator
    calls, drawn_ids = [], []
    real_sample, real_draw = RDM.sample, sample.draw_pseudo_queries

    def spy(self, context, **kw):
        calls.append((context.clone(), kw["x_T"].clone()))
        return real_sample(self, context, **kw)

    def draw_spy(*args, **kw):
        drawn_ids.append(real_draw(*args, **kw))
        return drawn_ids[-1]

    monkeypatch.setattr(RDM, "sample", spy)
    monkeypatch.setattr(sample, "draw_pseudo_queries", draw_spy)
    contexts = np.random.default_rng(4).standard_normal((3, 4, 64)).astype(np.float32)
    np.save(tmp_path / "ctx3.npy", contexts)
    texts = ["a red bird", "a blue car", "a green tree"]
    given = {"file": ["--context-file", str(tmp_path / "ctx3.npy")],
             "text": ["--db", str(tiny_dir / "db"), *(a for t in texts for a in ("--text", t))],
             "db": ["--db", str(tiny_dir / "db"), "--top-m", "1"]}[source]
    n = 5
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), *given, "--out", str(tmp_path / "out"), "--steps", "1",
               "--n-samples", str(n), "--batch-size", "2", "--seed", "3", "--no-progress") == 0
    db = Database.open(tiny_dir / "db")
    cfg = RDMConfig.preset("tiny")
    if source == "file":
        want = torch.from_numpy(contexts)[torch.arange(n) % 3]
    elif source == "text":
        queries = _HashEncoder().encode_text(texts)[torch.arange(n) % 3]
        want = model_context(db, cfg, queries)
    else:
        ids = drawn_ids[0]
        assert len(ids) == n and len(set(ids.tolist())) > 1
        want = model_context(db, cfg, db.embeddings(ids).float(), query_ids=ids)
    noise = [torch.from_numpy(seeded_generator(3, START_NOISE, i).standard_normal(cfg.latent_shape,
                                                                                  dtype=np.float32))
             for i in range(n)]
    assert [c.shape[0] for c, _ in calls] == [2, 2, 1]
    seen = []
    for context, x_T in calls:
        for row, start in zip(context, x_T):
            i = next(i for i in range(n) if torch.equal(noise[i], start))
            seen.append(i)
            torch.testing.assert_close(row, want[i], msg=f"sample {i}")
    assert seen == list(range(n))


@pytest.mark.parametrize("module,shown", [
    (sample, ["(default: 8)", "(default: 0.01)", "cuda:N (default: auto)", "(default: 0)",
              "--steps STEPS sampling steps, 1 to T/2 (default: the config's sampling.steps). As"]),
    (convert, ["(default: fp32)", "(default: rdm_fast)"]),
])
def test_help_shows_each_default_once(module, shown, capsys):
    """Hand-written defaults are not followed by argparse's "(default: None)"; unset options and flags show none."""
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert all(text.count(s) == 1 for s in shown), text


def test_help_shows_no_empty_list_default(capsys):
    """A repeatable option's empty list is no default to show (``db index --param`` ended in "(default: [])")."""
    from rdm_fast import db

    with pytest.raises(SystemExit):
        db.main(["index", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--param KEY=VALUE index parameter" in text and "(default: [])" not in text


def test_db_too_small_wrong_dim_and_encoder(tiny_dir, tmp_path, capsys):
    write_database(tmp_path / "small", np.zeros((3, 64), np.float32), TEST_ENCODER)
    write_database(tmp_path / "dim", np.zeros((20, 16), np.float32), {**TEST_ENCODER, "dim": 16})
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--db", str(tmp_path / "small"), "--out",
               str(tmp_path / "o")) == 2
    assert "holds 3 entries; contexts with 3 neighbours need at least 4" in capsys.readouterr().err
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--db", str(tmp_path / "dim"), "--out",
               str(tmp_path / "o")) == 2
    assert "holds 16-d embeddings but the model expects 64-d" in capsys.readouterr().err
    config = tmp_path / "config.yaml"
    tree = RDM.from_pretrained(tiny_dir / "model").config.to_dict()
    tree["model"]["params"]["retrieval_encoder"] = "clip-vit-b-32"
    config.write_text(yaml.safe_dump(tree))
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--config", str(config), "--db", str(tiny_dir / "db"),
               "--out", str(tmp_path / "o")) == 2
    assert "was made by encoder 'test-64' but the model was trained on 'clip-vit-b-32'" in capsys.readouterr().err


def test_text_and_image_queries_may_take_every_entry_as_a_neighbour(tiny_dir, tmp_path, hash_encoder, capsys):
    """A --text or --image query is no database entry, so a database of k entries gives it k neighbours (as
    model_context does); only pseudo-queries, whose own entry is left out, need k + 1. sample refused the text query
    with "holds 3 entries; contexts with 3 neighbours need at least 4"."""
    write_database(tmp_path / "small", np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32),
                   TEST_ENCODER)
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--db", str(tmp_path / "small"), "--text", "a red bird",
               "--out", str(tmp_path / "t"), "--steps", "2") == 0
    assert (tmp_path / "t" / "sample_00000.png").is_file()
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--db", str(tmp_path / "small"), "--text", "a red bird",
               "--k", "4", "--out", str(tmp_path / "u"), "--steps", "2") == 2
    assert "holds 3 entries; contexts with 4 neighbours need at least 4" in capsys.readouterr().err


@pytest.mark.parametrize("tokens,warned", [(4, False), (2, False), (1, False), (21, False), (22, True)])
def test_context_length_and_cycling_are_reported(tiny_dir, tmp_path, caplog, tokens, warned):
    """The tiny model, like rdm768, takes a text token alone or with up to 20 neighbours (its config: 3): longer
    contexts run, with one warning (not one per batch); more samples than contexts cycle them, which is said."""
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((2, tokens, 64)).astype(np.float32))
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tmp_path / "c.npy"), "--out",
               str(tmp_path / "o"), "--steps", "2", "--n-samples", "3", "--batch-size", "1") == 0
    assert caplog.text.count(f"the context holds {tokens} embeddings per sample; this model takes a text or query "
                             "embedding and up to 20 neighbours (its config's default: 3)") == int(warned)
    assert "3 samples from 2 contexts: the contexts are cycled" in caplog.text


def test_one_context_for_several_samples_is_reported_in_the_singular(tiny_dir, tmp_path, caplog):
    """A (k, D) context file conditions every sample (the log said "3 samples from 1 contexts: the contexts are
    cycled (sample i gets context i mod 1)")."""
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tmp_path / "c.npy"), "--out",
               str(tmp_path / "o"), "--steps", "2", "--n-samples", "3") == 0
    assert "3 samples from 1 context: every sample gets it" in caplog.text and "contexts" not in caplog.text


def test_help_works_whatever_the_ops_mode(monkeypatch, capsys):
    monkeypatch.setenv("RDM_FAST_OPS", "bogus")
    with pytest.raises(SystemExit) as e:
        cli(sample, "--help")
    assert e.value.code == 0 and "usage: python -m rdm_fast.sample" in capsys.readouterr().out


def test_other_libraries_warnings_keep_their_origin(caplog):
    """A warning from outside rdm_fast is logged under py.warnings with its category, not as ours, also from a
    virtual environment inside a checkout named rdm_fast (whose library warnings were logged as rdm_fast's)."""
    import rdm_fast
    from rdm_fast._cli import _log_warning

    _log_warning(DeprecationWarning("old API"), DeprecationWarning, "/site-packages/pil/x.py", 3)
    _log_warning(UserWarning("ours"), UserWarning, str(Path(rdm_fast.__file__).parent / "rdm.py"), 9)
    _log_warning(UserWarning("torch's"), UserWarning, "/home/u/rdm_fast/.venv/lib/python3.11/site-packages/torch/"
                 "nn/modules/module.py", 7)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("py.warnings", "DeprecationWarning: old API"),
                                                                  ("rdm_fast", "ours"),
                                                                  ("py.warnings", "UserWarning: torch's")]


def test_python_warnings_are_one_log_line(tiny_dir, tmp_path, caplog):
    """--no-ema on a file with one set of weights warns once, as a log line (no source file and line)."""
    with warnings.catch_warnings():  # restores the warnings module's state that run() changes
        assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tiny_dir / "ctx.npy"),
                   "--out", str(tmp_path), "--steps", "2", "--no-ema") == 0
    lines = [r for r in caplog.records if "holds one set of UNet weights" in r.getMessage()]
    assert len(lines) == 1 and lines[0].name == "rdm_fast" and lines[0].levelname == "WARNING"


def test_context_length_conventions():
    """imagenet's contexts are the query and 3 neighbours, exactly 4 tokens; rdm768's a text token alone or with
    up to 20 neighbours."""
    imagenet, rdm768 = RDMConfig.preset("imagenet"), RDMConfig.preset("rdm768")
    assert [imagenet.context_length_problem(n) for n in (4, 5, 2)] == [
        None, "this model takes 4 (the query and 3 neighbours)", "this model takes 4 (the query and 3 neighbours)"]
    assert [rdm768.context_length_problem(n) for n in (1, 11, 21)] == [None] * 3
    assert "up to 20 neighbours (its config's default: 10)" in rdm768.context_length_problem(22)


def test_named_database_and_top_m_proposals(tiny_dir, tmp_path, monkeypatch, caplog):
    """--db NAME finds $RDM_FAST_HOME/databases/NAME; pseudo-queries come from the top-m proposals only."""
    home = tmp_path / "home"
    shutil.copytree(tiny_dir / "db", home / "databases" / "mydb")
    ranking = np.r_[[7, 3], np.setdiff1d(np.arange(50), [7, 3])]
    save_proposals(home / "databases" / "mydb", ranking, np.r_[[9, 8], np.zeros(48, np.int64)])
    monkeypatch.setenv("RDM_FAST_HOME", str(home))
    drawn = []
    real = sample.model_context

    def spy(db, cfg, queries, *, query_ids=None, **kw):
        drawn.extend(query_ids.tolist())
        return real(db, cfg, queries, query_ids=query_ids, **kw)

    monkeypatch.setattr(sample, "model_context", spy)
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--db", "mydb", "--top-m", "0.04", "--out",
               str(tmp_path / "o"), "--steps", "2", "--n-samples", "5", "--batch-size", "2") == 0
    assert len(drawn) == 5 and set(drawn) <= {7, 3}  # top 4 % of 50 entries = the two most retrieved
    assert "top 0.04 of the proposal ranking of mydb: 2 of 50 entries" in caplog.text
    assert "5 samples from only 2 distinct pseudo-queries" in caplog.text
    info = json.loads((tmp_path / "o" / "run.json").read_text())
    assert info["top_m"] == 0.04 and info["context_source"] == "mydb"


def test_sample_resume_compares_the_pseudo_queries_drawn_from_the_proposal_ranking(tiny_dir, tmp_path,
                                                                                      hash_encoder, capsys):
    """A rerun of db neighbors can change the proposal ranking under the same manifest record: --resume refuses a
    run whose pseudo-queries it changes, and accepts one where they stay (a ranking changed below --top-m, a new
    record) and --text runs, which draw none."""
    db = tmp_path / "db"
    shutil.copytree(tiny_dir / "db", db)
    rest = np.setdiff1d(np.arange(50), [7, 3, 5])
    save_proposals(db, np.r_[[7, 3, 5], rest], np.r_[[9, 8, 1], np.zeros(47, np.int64)], queries=50, k=3)
    args = ["--ckpt", str(tiny_dir / "model"), "--db", str(db), "--top-m", "0.04", "--steps", "2", "--n-samples",
            "2", "--out", str(tmp_path / "run")]
    text = [*args[:4], "--text", "a red bird", *args[6:-1], str(tmp_path / "text")]
    assert cli(sample, *args) == 0 and cli(sample, *text) == 0
    save_proposals(db, np.r_[[7, 3, 5], rest[::-1]], np.r_[[9, 8, 2], np.zeros(47, np.int64)], queries=40, k=3)
    assert cli(sample, *args, "--resume") == 0 and cli(sample, *text, "--resume") == 0  # the top 2 are 7 and 3
    save_proposals(db, np.r_[[7, 5, 3], rest], np.r_[[9, 8, 1], np.zeros(47, np.int64)], queries=50, k=3)
    capsys.readouterr()
    assert cli(sample, *args, "--resume") == 2
    assert "other settings (context_digest: the contents of the context file, or of the database, the " \
           "pseudo-queries drawn from its proposal ranking" in capsys.readouterr().err
    assert cli(sample, *text, "--resume") == 0


def test_sample_resume_compares_the_encoder_checkpoint_by_content(tiny_dir, tmp_path, hash_encoder, capsys):
    """Query-encoder weights replaced at the same path with a file of the same size (another CLIP checkpoint of
    the same architecture) are refused on --resume; a copy of the same bytes resumes."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"a" * 64)
    args = ["--ckpt", str(tiny_dir / "model"), "--db", str(tiny_dir / "db"), "--text", "a red bird",
            "--encoder-checkpoint", str(weights), "--steps", "2", "--n-samples", "2", "--out", str(tmp_path / "run")]
    assert cli(sample, *args) == 0
    weights.write_bytes(b"a" * 64)  # the same bytes again (a new mtime)
    assert cli(sample, *args, "--resume") == 0
    weights.write_bytes(b"b" * 64)
    capsys.readouterr()
    assert cli(sample, *args, "--resume") == 2
    assert "other settings (query_encoder: the query encoder's name, weights" in capsys.readouterr().err


def test_sample_context_options(tiny_dir, tmp_path, hash_encoder, monkeypatch):
    """--k sets the neighbours per query (0: the caption alone) and --no-query leaves the query out; run.json
    records both (the neighbours used where --k is not given)."""
    seen = []
    real = sample.model_context

    def spy(db, cfg, queries, **kw):
        seen.append((queries.clone(), real(db, cfg, queries, **kw)))
        return seen[-1][1]

    monkeypatch.setattr(sample, "model_context", spy)
    base = ["--ckpt", str(tiny_dir / "model"), "--db", str(tiny_dir / "db"), "--steps", "2", "--n-samples", "2"]
    assert cli(sample, *base, "--text", "a red bird", "--k", "0", "--out", str(tmp_path / "a")) == 0
    text = _HashEncoder().encode_text(["a red bird"])
    torch.testing.assert_close(seen[-1][1], torch.nn.functional.normalize(text, dim=-1)[None].expand(2, 1, 64))
    info = json.loads((tmp_path / "a" / "run.json").read_text())
    assert (info["k"], info["include_query"]) == (0, True)

    assert cli(sample, *base, "--text", "a red bird", "--k", "2", "--no-query", "--out", str(tmp_path / "b")) == 0
    queries, ctx = seen[-1]
    db = Database.open(tiny_dir / "db")
    _, ids = db.search(queries, 2)
    assert ctx.shape == (2, 2, 64)
    torch.testing.assert_close(ctx, torch.nn.functional.normalize(db.embeddings(ids).float(), dim=-1))
    info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert (info["k"], info["include_query"]) == (2, False)

    assert cli(sample, *base, "--no-query", "--out", str(tmp_path / "c")) == 0  # top-m pseudo-queries
    assert seen[-1][1].shape == (2, 3, 64)  # tiny has a text token: k_nn = 3 neighbours, no query
    assert json.loads((tmp_path / "c" / "run.json").read_text())["k"] == 3  # the default, as used, not None


def test_default_neighbours_of_a_model_without_a_text_token(tiny_dir, tmp_path, monkeypatch):
    """Without a text token (the imagenet and ffhq layout) a context is the query and its k_nn - 1 nearest
    neighbours, or with --no-query the k_nn nearest; run.json records the neighbours used. The command's default
    taken without --no-query (k_nn - 1 neighbours, one slot left empty) passed the tests of the tiny preset, which
    has a text token."""
    shapes = []
    real = sample.model_context

    def spy(db, cfg, queries, **kw):
        context = real(db, cfg, queries, **kw)
        shapes.append(tuple(context.shape))
        return context

    monkeypatch.setattr(sample, "model_context", spy)
    tree = RDMConfig.preset("tiny").to_dict()
    tree["model"]["params"]["text_token"] = False
    (tmp_path / "no_text.yaml").write_text(yaml.safe_dump(tree))
    assert RDMConfig.resolve(str(tmp_path / "no_text.yaml")).text_token is False
    base = ["--random-init", "--config", str(tmp_path / "no_text.yaml"), "--db", str(tiny_dir / "db"), "--steps",
            "1", "--n-samples", "2", "--no-progress"]
    for extra, k in (((), 2), (("--no-query",), 3)):
        out = tmp_path / f"k{k}"
        assert cli(sample, *base, *extra, "--out", str(out)) == 0
        assert shapes[-1] == (2, 3, 64)  # k_nn = 3 tokens either way
        assert json.loads((out / "run.json").read_text())["k"] == k


@pytest.mark.parametrize("extra,message", [
    (["--k", "2"], "about retrieval from a database: add --db"),
    (["--no-query"], "about retrieval from a database: add --db"),
])
def test_context_options_need_a_database(tiny_dir, tmp_path, capsys, extra, message):
    np.save(tmp_path / "ctx.npy", np.zeros((1, 4, 64), np.float32))
    code = cli(sample, "--ckpt", str(tiny_dir / "model"), "--context-file", str(tmp_path / "ctx.npy"), *extra,
               "--out", str(tmp_path / "o"))
    assert code == 2 and message in capsys.readouterr().err


def test_k_zero_without_the_query_is_refused(tiny_dir, tmp_path, capsys):
    code = cli(sample, "--ckpt", str(tiny_dir / "model"), "--db", str(tiny_dir / "db"), "--no-query", "--k", "0",
               "--out", str(tmp_path / "o"))
    assert code == 2 and "--k must be at least 1 with --no-query, got 0" in capsys.readouterr().err


def test_convert(tmp_path, tiny_official, capsys, caplog):
    cfg, full, _, _ = tiny_official
    torch.save({"state_dict": full}, tmp_path / "official.ckpt")
    caplog.set_level("INFO", logger="rdm_fast")
    (tmp_path / "back").mkdir()  # what a killed export to the official format left there goes too
    for name in (".model.ckpt.a1b2.tmp", ".config.yaml.c3d4.tmp"):
        (tmp_path / "back" / name).write_bytes(b"left by a killed conversion")
    assert cli(convert, str(tmp_path / "official.ckpt"), "--out", str(tmp_path / "back"), "--to", "official") == 0
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["config.yaml", "model.ckpt"]
    assert any(r.name == "rdm_fast.rdm" for r in caplog.records)  # what the load says (only a training
    # checkpoint's "training weights, not the EMA ones" is left out, as both sets are exported)
    (tmp_path / "conv").mkdir()
    (tmp_path / "conv" / ".model.safetensors.x1y2.tmp").write_bytes(b"left by a killed conversion")
    (tmp_path / "conv" / ".notes.tmp").write_bytes(b"not ours")
    assert cli(convert, str(tmp_path / "official.ckpt"), "--out", str(tmp_path / "conv"), "--dtype", "fp16") == 0
    assert sorted(p.name for p in (tmp_path / "conv").iterdir()) == [".notes.tmp", "config.json", "model.safetensors"]
    model = RDM.from_pretrained(tmp_path / "conv")
    assert model.config == cfg
    got = model.official_state_dict()["model.diffusion_model.out.2.weight"]
    torch.testing.assert_close(got, full["model.diffusion_model.out.2.weight"].half().float())
    assert cli(convert, str(tmp_path / "nothing.ckpt"), "--out", str(tmp_path / "x")) == 2
    assert "nothing.ckpt does not exist" in capsys.readouterr().err


def test_convert_to_official_never_pairs_weights_with_another_models_config(tmp_path, capsys, monkeypatch):
    """Exported over an earlier export, killed (here: a failed write) after the config but before the weights: the
    folder holds the new config and no weights, so loading fails by name instead of pairing the old weights with
    the new config (or the reverse). The failed write is a one-line error naming the file."""
    from test_checkpoint import training_checkpoint

    training_checkpoint(tmp_path / "ck")
    assert cli(convert, str(tmp_path / "ck"), "--out", str(tmp_path / "off"), "--to", "official") == 0
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["config.yaml", "model.ckpt"]
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith(".tmp") and ".model.ckpt." in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    assert cli(convert, str(tmp_path / "ck"), "--out", str(tmp_path / "off"), "--to", "official") == 2
    assert re.search(r"^error: cannot write .*off/model\.ckpt: \[enforce fail", capsys.readouterr().err.strip())
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["config.yaml"]
    with pytest.raises(ckpt.CheckpointError, match="model.ckpt does not exist"):
        RDM.from_pretrained(tmp_path / "off" / "model.ckpt")
    monkeypatch.setattr(torch, "save", real_save)
    assert cli(convert, str(tmp_path / "ck"), "--out", str(tmp_path / "off"), "--to", "official") == 0
    # into its own folder: the checkpoint converted would be deleted before its replacement exists
    assert cli(convert, str(tmp_path / "off"), "--out", str(tmp_path / "off"), "--to", "official") == 2
    assert "would replace the checkpoint being converted" in capsys.readouterr().err
    assert (tmp_path / "off" / "model.ckpt").is_file()


def test_a_conversion_into_a_folder_another_run_writes_is_refused(tmp_path, capsys, monkeypatch):
    """Two conversions into one --out at once: the later one deleted the earlier one's temporary file as a killed
    export's, and the earlier one then replaced the model the later one had reported written. A conversion now
    holds --out while it writes (here another run takes the folder while the model loads): the second is refused,
    and the lock file does not stay among the model's files."""
    from test_checkpoint import training_checkpoint
    from rdm_fast._cli import OutDirLock

    training_checkpoint(tmp_path / "ck")
    out, held, real_load = tmp_path / "out", [], RDM.from_pretrained

    def load_while_another_run_takes_out(*args, **kwargs):
        if not held:
            held.append(OutDirLock(out))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(RDM, "from_pretrained", load_while_another_run_takes_out)
    for to in ("official", "rdm_fast"):
        assert cli(convert, str(tmp_path / "ck"), "--out", str(out), "--to", to) == 2
        assert f"--out {out} is in use by another run (process {os.getpid()}" in capsys.readouterr().err
        assert [p.name for p in out.iterdir()] == [".rdm_fast.lock"]
    held[0].release()
    for to, files in (("official", ["config.yaml", "model.ckpt"]), ("rdm_fast", ["config.json", "model.safetensors"])):
        shutil.rmtree(out)
        assert cli(convert, str(tmp_path / "ck"), "--out", str(out), "--to", to) == 0
        assert sorted(p.name for p in out.iterdir()) == files


def test_convert_training_checkpoints(tmp_path, capsys, caplog):
    """--no-ema takes a training checkpoint's raw UNet; --to official stores raw and EMA weights (and does not also
    log that it uses the training weights, "not the EMA ones") and refuses a checkpoint whose state.json lacks the
    EMA update count or whose training weights are unreadable."""
    from test_checkpoint import training_checkpoint

    ema, raw = training_checkpoint(tmp_path / "ck")
    assert cli(convert, str(tmp_path / "ck"), "--out", str(tmp_path / "raw"), "--no-ema") == 0
    got = RDM.from_pretrained(tmp_path / "raw").unet.state_dict()
    assert all(torch.equal(got[k], raw[k]) for k in raw)
    caplog.set_level("INFO", logger="rdm_fast")
    caplog.clear()
    assert cli(convert, str(tmp_path / "ck"), "--out", str(tmp_path / "off"), "--to", "official") == 0
    said = [r.getMessage() for r in caplog.records]
    assert any("exporting both sets" in m for m in said) and not any("not the EMA ones" in m for m in said), said
    state = torch.load(tmp_path / "off" / "model.ckpt", weights_only=True)["state_dict"]
    names = RDM.from_pretrained(tmp_path / "ck").unet.official_names()
    k, off = next((k, v) for k, v in names.items() if raw[k].is_floating_point())
    assert torch.equal(state[ckpt.UNET_PREFIX + off], raw[k]) and torch.equal(state[ckpt.ema_name(off)], ema[k])
    assert int(state["model_ema.num_updates"]) == 7
    (tmp_path / "ck" / ckpt.TRAIN_STATE_FILE).write_text(json.dumps({"step": 7}))
    assert cli(convert, str(tmp_path / "ck"), "--out", str(tmp_path / "x"), "--to", "official") == 2
    assert capsys.readouterr().err.strip().endswith("state.json records no step and ema_updates: is it a checkpoint of "
                                                    "python -m rdm_fast.train?")
    for run, problem in (("lr=1e-4", "run = 'lr=1e-4' is not the run's settings"),
                         ({"ema_decay": "0.99"}, "ema_decay = '0.99' is not a decay in [0, 1]"),
                         ({"ema_decay": 1.5}, "ema_decay = 1.5 is not a decay in [0, 1]")):
        (tmp_path / "ck" / ckpt.TRAIN_STATE_FILE).write_text(json.dumps({"step": 7, "ema_updates": 7, "run": run}))
        assert cli(convert, str(tmp_path / "ck"), "--out", str(tmp_path / "x"), "--to", "official") == 2
        assert problem in capsys.readouterr().err
    (tmp_path / "ck" / ckpt.TRAIN_STATE_FILE).write_text(json.dumps({"step": 7, "ema_updates": 7}))
    # the official layout holds both sets of weights: --no-ema there is refused, not silently ignored
    assert cli(convert, str(tmp_path / "ck"), "--out", str(tmp_path / "x"), "--to", "official", "--no-ema") == 2
    assert "--no-ema applies to --to rdm_fast" in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "ck" / ckpt.TRAIN_WEIGHTS_FILE).write_bytes(b"garbage")
    for extra in (["--to", "official"], ["--no-ema"]):
        assert cli(convert, str(tmp_path / "ck"), "--out", str(tmp_path / "x"), *extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "train_weights.safetensors is not a readable safetensors file" in err


def test_entry_point_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "rdm_fast.sample", "--ckpt", str(tmp_path / "x.ckpt"),
                           "--context-file", "c.npy", "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("x.ckpt does not exist")


class _HashEncoder(torch.nn.Module):
    """A deterministic 64-d encoder for CLI tests: text from character codes, images from pooled pixels."""

    name, dim, normalized, image_size = "test-64", 64, False, 32

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 64)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def encode_text(self, texts):
        codes = torch.zeros(len(texts), 64)
        for i, t in enumerate(texts):
            for j, ch in enumerate(t):
                codes[i, (ord(ch) * 7 + j) % 64] += 1.0
        return codes

    def encode_images(self, images):
        return self.proj(images.mean(dim=(2, 3)))


@pytest.fixture
def hash_encoder():
    from rdm_fast.encoders import Encoder, register_encoder
    from rdm_fast.encoders.base import _REGISTRY

    Encoder.register(_HashEncoder)
    register_encoder("test-64", lambda **kw: _HashEncoder(), replace=True)
    yield
    _REGISTRY.pop("test-64", None)


def test_sample_with_text_and_image_queries(tiny_dir, tmp_path, hash_encoder, monkeypatch):
    """--text / --image queries are embedded with the database's encoder and prefixed to their neighbours."""
    seen = []
    real = sample.model_context

    def spy(db, cfg, queries, *, query_ids=None, **kw):
        ctx = real(db, cfg, queries, query_ids=query_ids, **kw)
        seen.append((queries.clone(), ctx))
        return ctx

    monkeypatch.setattr(sample, "model_context", spy)
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--db", str(tiny_dir / "db"), "--text", "a red bird",
               "--text", "a blue car", "--out", str(tmp_path / "t"), "--steps", "2", "--n-samples", "3") == 0
    texts = _HashEncoder().encode_text(["a red bird", "a blue car", "a red bird"])
    queries, ctx = seen[0]
    torch.testing.assert_close(queries, texts)
    assert ctx.shape == (3, 4, 64)  # tiny: text token + k_nn = 3 neighbours, normalised
    torch.testing.assert_close(ctx[:, 0], torch.nn.functional.normalize(texts, dim=-1))
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(tmp_path / "q.png")
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--db", str(tiny_dir / "db"), "--image",
               str(tmp_path / "q.png"), "--out", str(tmp_path / "i"), "--steps", "2") == 0
    assert len(list((tmp_path / "i").glob("sample_*.png"))) == 1
    sizes = []
    monkeypatch.setattr(sample, "load_query_image", lambda p, size: sizes.append(size) or torch.zeros(3, size, size))
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--db", str(tiny_dir / "db"), "--image",
               str(tmp_path / "q.png"), "--out", str(tmp_path / "j"), "--steps", "2") == 0
    assert sizes == [_HashEncoder.image_size]  # no build record: the encoder's input size
    shutil.copytree(tiny_dir / "db", tmp_path / "built")
    update_manifest(tmp_path / "built", lambda m: m.update(build={"crop_size": 40}))
    assert cli(sample, "--ckpt", str(tiny_dir / "model"), "--db", str(tmp_path / "built"), "--image",
               str(tmp_path / "q.png"), "--out", str(tmp_path / "k"), "--steps", "2") == 0
    assert sizes[-1] == 40  # the database's crop size


class _Recorder:
    """A stream that keeps each write's text in ``writes``: how many writes a message took."""

    def __init__(self, writes: list[str]) -> None:
        self.writes = writes

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_error_and_interrupt_lines_are_single_writes(monkeypatch):
    """Under torchrun the processes share one stderr: each message goes out in one write with its newline (print's
    separate newline let two processes' error lines run together in CI)."""
    writes: list[str] = []

    def fails(argv):
        raise ValueError("bad input\nsecond line")

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.delenv("RDM_FAST_DEBUG", raising=False)
    monkeypatch.setattr("rdm_fast._cli.setup_logging", lambda: None)  # no log handler left on the recorder
    monkeypatch.setattr(sys, "stderr", _Recorder(writes))
    assert run(fails, []) == 2 and run(interrupted, []) == 130
    assert writes == ["error: bad input second line\n", "interrupted\n"]
    monkeypatch.setenv("RDM_FAST_DEBUG", "1")  # the traceback instead of the line
    with pytest.raises(ValueError, match="bad input"):
        run(fails, [])
    assert len(writes) == 2


def test_log_lines_are_single_writes(monkeypatch):
    """Log lines too go out in one write with their newline: tqdm.write wrote the newline separately, and under
    torchrun (whose processes share an unbuffered stderr) one process's line ran on with another's (a torchrun
    audit saw "... 32 px images[rank 2] rdm_fast.train: ..." followed by an empty line)."""
    import logging

    from rdm_fast._cli import _TqdmHandler

    writes: list[str] = []

    handler = _TqdmHandler(_Recorder(writes))
    handler.setFormatter(logging.Formatter("[rank 1] %(name)s: %(message)s"))
    handler.emit(logging.LogRecord("rdm_fast.train", logging.WARNING, __file__, 1, "a warning", None, None))
    assert [w for w in writes if w] == ["[rank 1] rdm_fast.train: a warning\n"]


def test_error_lines_name_a_rank_only_under_torchrun(capsys, monkeypatch):
    """"[rank N]" goes before an error line only where WORLD_SIZE says there are other processes: a RANK left in
    a single process's environment (e.g. by a job scheduler) does not make it one of several."""
    def fails(argv):
        raise ValueError("bad input")

    monkeypatch.delenv("RDM_FAST_DEBUG", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr("rdm_fast._cli.setup_logging", lambda: None)
    assert run(fails, []) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: bad input"


def test_logging_setup_per_rank(monkeypatch):
    """Under torchrun INFO lines come once (rank 0's); the other processes log warnings, saying whose they are;
    other libraries log at WARNING and above."""
    import logging

    from rdm_fast._cli import setup_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # restored afterwards, as the handlers below
    with warnings.catch_warnings():  # setup_logging routes warnings into the log
        for rank, level, prefix in (("1", logging.WARNING, "[rank 1] "), ("0", logging.INFO, "")):
            monkeypatch.setattr(root, "handlers", [])  # a process without handlers yet: setup adds its own
            monkeypatch.setenv("RANK", rank)
            setup_logging()
            assert root.handlers[0].formatter._fmt == prefix + "%(name)s: %(message)s"
            assert logging.getLogger("rdm_fast").level == level and root.level == logging.WARNING


def test_precision_flags_pick_their_dtypes():
    """--bf16 and --fp16 (one or the other: their options are exclusive) pick their dtypes, float32 neither."""
    from rdm_fast._cli import pick_dtype

    assert [pick_dtype(*flags) for flags in ((False, False), (True, False), (False, True))] == [
        torch.float32, torch.bfloat16, torch.float16]


def test_help_descriptions_are_the_docstrings_first_paragraph():
    from rdm_fast._cli import summary

    assert summary("Run ``x`` now,\nor later.\n\nDetails of ``y``.") == "Run x now,\nor later."


def test_to_uint8_quantises_as_the_reference_scripts():
    """Sampled images are saved as the reference's knn2img.py and rdm_sample.py save theirs (the files behind the
    published FIDs): ``(255 * clamp((x + 1) / 2, 0, 1)).astype(uint8)`` in float32 NumPy, truncating. Checked
    at every level's exact value, just below and above it, out of range, and on random values, in float32,
    bfloat16 and float16."""
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    x = torch.cat([levels, levels - 1e-6, levels + 1e-6, torch.tensor([-3.0, 3.0]), torch.rand(3000) * 2.2 - 1.1])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        batch = x.to(dtype)[: len(x) // 3 * 3].reshape(1, 3, -1, 1)
        half = np.clip((batch.float().numpy() + 1.0) / 2.0, 0.0, 1.0)  # the reference's float32 arithmetic
        expected = (255.0 * half).astype(np.uint8).transpose(0, 2, 3, 1)
        assert half.dtype == np.float32
        np.testing.assert_array_equal(images.to_uint8(batch), expected)


def test_folder_kinds_are_told_by_content(tmp_path):
    """Only rdm_fast's own outputs count as another command's folder: files of the same names from other tools
    (a web app's manifest.json, a logger's log.jsonl, the latents cache's manifest) do not."""
    from rdm_fast._cli import folder_kind

    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "my web app"}')
    (other / "log.jsonl").write_text('{"step": 1}\n')
    (other / "run.json").write_text("[1, 2]")
    assert folder_kind(other) is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text('["format"]')  # JSON but not an object
    (broken / "run.json").write_bytes(b'{"global_batch": \xff')  # neither JSON nor UTF-8
    assert folder_kind(broken) is None
    (other / "progress").mkdir()
    (other / "progress" / "config.json").write_text("{}")  # a database build under way
    assert folder_kind(other) == "a database"
    train_run = tmp_path / "train"
    train_run.mkdir()
    (train_run / "run.json").write_text('{"global_batch": 8, "seed": 0}')
    assert folder_kind(train_run) == "a training run"
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "run.json").write_text('{"n_samples": 4, "complete": false}')
    assert folder_kind(tmp_path / "sample") == "a sample run"


def test_context_dim_errors_name_where_the_config_came_from(tiny_dir, tmp_path, capsys):
    """A wrong config.yaml beside an official checkpoint was reported as a bad context file, naming no config."""
    assert cli(convert, str(tiny_dir / "model"), "--out", str(tmp_path / "off"), "--to", "official") == 0
    config = yaml.safe_load((tmp_path / "off" / "config.yaml").read_text())
    config["model"]["params"]["unet_config"]["params"]["context_dim"] = 256
    (tmp_path / "off" / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    argv = ["--ckpt", str(tmp_path / "off" / "model.ckpt"), "--context-file", str(tiny_dir / "ctx.npy")]
    assert cli(sample, *argv, "--out", str(tmp_path / "o")) == 2
    assert re.search(r"expects 256-d \(context_dim in .*off/config.yaml, beside the checkpoint\): use embeddings "
                     "from the model's retrieval encoder, or the model's own config", capsys.readouterr().err)
    assert cli(sample, *argv, "--config", "imagenet", "--out", str(tmp_path / "o")) == 2
    assert "expects 512-d (context_dim in --config imagenet)" in capsys.readouterr().err


def test_models_are_not_overwritten_or_mixed_with_runs(tiny_dir, tmp_path, capsys):
    """convert --out its own source folder replaced the weights being converted (in bf16, or without the EMA ones);
    train and sample wrote their runs into a model's folder, after which ``--ckpt`` of the folder loaded the old
    model instead of the run's newest checkpoint."""
    from rdm_fast._cli import folder_kind

    model = tmp_path / "m"
    shutil.copytree(tiny_dir / "model", model)
    before = (model / "model.safetensors").read_bytes()
    assert folder_kind(model) == "a model"
    assert cli(convert, str(model), "--out", str(model), "--dtype", "bf16") == 2
    assert "would replace the checkpoint being converted" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == before
    assert cli(convert, str(model), "--out", str(model), "--to", "official") == 2  # model.ckpt beside it: never used
    assert "holds model.safetensors, which loading the folder would use instead" in capsys.readouterr().err
    assert not (model / "model.ckpt").exists()
    assert cli(convert, str(model), "--out", str(tmp_path / "m.safetensors")) == 2  # before the load, not after
    assert "m.safetensors names a file: the converted model is written into a folder" in capsys.readouterr().err
    assert cli(convert, str(model), "--out", str(tmp_path / "half"), "--dtype", "bf16") == 0
    assert cli(convert, str(model), "--out", str(tmp_path / "half"), "--dtype", "fp16") == 0  # a conversion redone
    assert cli(convert, str(model), "--out", str(tmp_path / "official"), "--to", "official") == 0
    assert folder_kind(tmp_path / "official") == "a model"
    assert cli(convert, str(tmp_path / "official"), "--out", str(tmp_path / "official")) == 0  # beside its .ckpt
    capsys.readouterr()
    assert cli(sample, "--ckpt", str(model), "--context-file", str(tiny_dir / "ctx.npy"), "--out", str(model)) == 2
    assert "holds a model: write a sample run" in capsys.readouterr().err
    assert cli(train, "--random-init", "--config", "tiny", "--training-db", str(tiny_dir / "db"), "--db",
               str(tiny_dir / "db"), "--neighbors", str(tmp_path / "nn.npz"), "--steps", "1",
               "--out", str(model)) == 2
    assert "holds a model: write a training run" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == before and not (model / "checkpoints").exists()
    other = tmp_path / "other-tool"  # another library's model.safetensors is not one of ours
    other.mkdir()
    (other / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:8] + b"{}")
    assert folder_kind(other) is None
    step = tmp_path / "run" / "checkpoints" / "step_0000002"
    shutil.copytree(model, step)
    (step / "state.json").write_text("{}")
    assert folder_kind(step) == "a training checkpoint"
    assert cli(convert, str(model), "--out", str(step)) == 2
    assert "holds a training checkpoint" in capsys.readouterr().err
    (model / "latest").write_text("step_0000002")  # a run's files in a model's folder (made by hand)
    with pytest.raises(ckpt.CheckpointError, match="holds both a model .* and a training run"):
        ckpt.resolve_file(model)


def test_image_helpers_refuse_what_they_cannot_draw():
    """An empty batch divided by zero, a (3, H, W) image failed in ``permute``, no tiles in an IndexError, and
    ``columns=0`` was taken for the default."""
    with pytest.raises(ValueError, match=r"to_uint8: images must be a \(B, 3, H, W\) tensor, got \(3, 8, 8\)"):
        images.to_uint8(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="grid: images must be .* with B >= 1"):
        images.grid(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="grid: columns must be at least 1, got 0"):
        images.grid(np.zeros((2, 8, 8, 3), np.uint8), columns=0)
    with pytest.raises(ValueError, match="contact_sheet: no tiles"):
        images.contact_sheet([])
    with pytest.raises(ValueError, match="contact_sheet: columns must be at least 1, got 0"):
        images.contact_sheet([(Image.new("RGB", (8, 8)), "a")], columns=0)
    assert images.grid(np.zeros((3, 8, 8, 3), np.uint8), columns=3).shape == (12, 32, 3)


def test_save_png_leaves_no_partial_image(tmp_path, monkeypatch):
    """An image that exists is whole (``sample --resume`` keeps the images it finds): a write that fails part-way
    leaves neither the image's name nor a temporary file behind, and an image of that name written before keeps its
    bytes."""
    pixels = np.full((4, 4, 3), 7, np.uint8)
    kept = tmp_path / "sample_00000.png"
    images.save_png(pixels, kept)
    before = kept.read_bytes()

    def partial(self, fp, *args, **kwargs):  # a few bytes, then a full disk
        Path(fp).write_bytes(before[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", partial)
    for target in (kept, tmp_path / "sample_00001.png"):
        with pytest.raises(OSError, match="No space left"):
            images.save_png(pixels[::-1], target)
    assert kept.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["sample_00000.png"]


def test_save_png_hands_on_fsync_and_writes_the_text(tmp_path, monkeypatch):
    """save_png passes ``fsync`` to the atomic write (PngWriter's images are on disk before they take their names:
    ``sample --resume`` keeps the images it finds) and stores ``text`` in the PNG's header (the run id resume
    reads)."""
    seen, real = [], images.atomic_write

    def spy(target, write, *, fsync=False):
        seen.append(fsync)
        real(target, write, fsync=fsync)

    monkeypatch.setattr(images, "atomic_write", spy)
    pixels = np.full((4, 4, 3), 7, np.uint8)
    images.save_png(pixels, tmp_path / "a.png", text={"rdm_fast_run": "abc"}, fsync=True)
    images.save_png(pixels, tmp_path / "b.png")
    assert seen == [True, False]
    assert Image.open(tmp_path / "a.png").text == {"rdm_fast_run": "abc"}


def test_contact_sheet_lays_out_captioned_tiles():
    """contact_sheet: by default about sqrt(n) + 1 columns, never more than there are tiles (two tiles made a sheet
    with an empty third column); each tile is followed by a 14 px caption strip, 4 px apart."""
    tile = Image.new("RGB", (10, 10), "red")
    for n, columns, rows in ((1, 1, 1), (2, 2, 1), (5, 4, 2), (10, 5, 2)):
        sheet = images.contact_sheet([(tile, str(i)) for i in range(n)])
        assert sheet.size == (columns * 14 + 4, rows * 28 + 4), n
    assert images.contact_sheet([(tile, "a")] * 3, columns=1).size == (18, 3 * 28 + 4)


def test_check_image_range_warns_only_far_outside_minus_one_to_one(caplog):
    """check_image_range: a little past +-1 (a decoder's overshoot) passes silently; far past it on either side
    (e.g. 0-255 pixels passed as floats, or their negatives) is warned about with the peak."""
    with caplog.at_level("WARNING", logger="rdm_fast.images"):
        images.check_image_range(torch.tensor([-1.3, 0.0, 1.3]).reshape(1, 3, 1, 1), "decoded", "the encoder")
        assert caplog.text == ""
        images.check_image_range(torch.full((1, 3, 2, 2), 255.0), "pixels", "the encoder")
        images.check_image_range(torch.full((1, 3, 2, 2), -255.0), "negated", "the encoder")
    assert "pixels: the images reach 255; the encoder expects values in [-1, 1]" in caplog.text
    assert "negated: the images reach 255" in caplog.text


def test_grid_lays_the_images_out_row_by_row_on_white():
    """grid: image i at row i // columns, column i % columns (default columns: ceil(sqrt(B))), ``pad`` white pixels
    between and around the tiles, and the cells after the last image white."""
    tiles = np.stack([np.full((2, 3, 3), 40 * i, np.uint8) for i in range(5)])  # non-square tiles, distinct levels
    expected = np.full((2 * 3 + 1, 3 * 4 + 1, 3), 255, np.uint8)  # 2 rows, 3 columns, pad 1
    for i in range(5):
        r, c = divmod(i, 3)
        expected[1 + 3 * r:3 + 3 * r, 1 + 4 * c:4 + 4 * c] = 40 * i
    np.testing.assert_array_equal(images.grid(tiles, pad=1), expected)
    np.testing.assert_array_equal(images.grid(tiles[:2], columns=1, pad=0), tiles[:2].reshape(4, 3, 3))


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
            "is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the allocated memory "
            "76.50 GiB is allocated by PyTorch, and 1.10 GiB is reserved by PyTorch but unallocated.")


@pytest.mark.parametrize("error, line", [
    (lambda: torch.OutOfMemoryError(CUDA_OOM),
     "error: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB "
     "of which 1.06 GiB is free; lower --batch-size"),
    (lambda: RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
     "error: out of memory: CUDA error: out of memory CUDA kernel errors"),  # e.g. pinned host memory
    (lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
     "error: out of memory: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling"),
    (lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                          "tried to allocate 100 bytes."),
     "error: out of memory: DefaultCPUAllocator: not enough memory: you tried to allocate 100 bytes; lower"),
    (lambda: torch.empty(2 ** 60, dtype=torch.uint8),  # a real failed allocation of PyTorch's CPU allocator
     "error: out of memory: DefaultCPUAllocator: can't allocate memory: you tried to allocate 1152921504606846976 bytes"),
    (lambda: MemoryError(), "error: out of memory: MemoryError; lower --batch-size"),
])
def test_out_of_memory_is_one_line_with_the_commands_advice(error, line, capsys, monkeypatch):
    """Running out of GPU or host memory is an error line that names the failed allocation (not PyTorch's
    allocator statistics) and what the command can do with less; other RuntimeErrors keep their traceback."""
    def fails(argv):
        e = error()  # torch.empty raises here
        raise e

    monkeypatch.delenv("RDM_FAST_DEBUG", raising=False)
    assert run(fails, [], memory_advice="lower --batch-size") == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(line)

    def broken(argv):
        raise RuntimeError("an unexpected failure")

    with pytest.raises(RuntimeError, match="an unexpected failure"):
        run(broken, [], memory_advice="lower --batch-size")
    monkeypatch.setenv("RDM_FAST_DEBUG", "1")
    with pytest.raises((RuntimeError, MemoryError)):
        run(fails, [], memory_advice="lower --batch-size")


@pytest.mark.parametrize("error", [
    lambda: RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                         "[127.0.0.1]:43557"),
    lambda: RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:2375: "
                         "Connection reset by peer"),
    lambda: torch.distributed.DistBackendError("NCCL communicator was aborted on rank 0"),
    # the TCPStore of a process that ended (rank 0 hosts it): DistError's other kinds, not only the backend's
    lambda: torch.distributed.DistNetworkError("failed to recv, got 0 bytes"),
    lambda: torch.distributed.DistStoreError("wait timeout after 300000ms, keys: /default_pg/0//cuda//0"),
])
def test_a_process_whose_peer_failed_says_so_in_one_line(error, capsys, monkeypatch):
    """Under torchrun, when one process fails, the others' next collective fails: they printed a gloo traceback
    each (from a torchrun audit). The line does not say the failed process's error is above: that process closes
    its connections before it prints its error, so its error came after the others' lines, and a killed process
    prints none. Outside torchrun such an error keeps its traceback."""
    def fails(argv):
        raise error()

    monkeypatch.delenv("RDM_FAST_DEBUG", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run(fails, []) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: another process of this torchrun stopped (its own error line, which may come after this one, or "
        "torchrun's summary says why): this one stops too"]
    monkeypatch.setenv("RANK", "1")  # the other processes say which they are, as their log lines do
    assert run(fails, []) == 2
    assert capsys.readouterr().err.startswith("[rank 1] error: another process of this torchrun stopped")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError):
        run(fails, [])


def test_each_entry_point_gives_its_memory_advice(tmp_path):
    """``python -m`` of every command that runs batches passes its own advice (an allocation failure injected
    where the arguments are parsed)."""
    script = """
import runpy, sys, torch
import rdm_fast._cli as cli
def boom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
cli.parse_args = boom
for module in sys.argv[1:]:
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    except SystemExit as e:
        print(module, e.code)
"""
    modules = {"rdm_fast.sample": "--batch-size", "rdm_fast.train": "--accumulate", "rdm_fast.db": "--batch-size",
               "rdm_fast.encoders.train_projection": "--batch"}
    env = child_env(PYTHONWARNINGS="ignore::RuntimeWarning")  # the rdm_fast this process tests
    env.pop("RDM_FAST_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
    assert r.stdout.split() == [x for m in modules for x in (m, "2")], r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(modules), r.stderr
    for line, option in zip(errors, modules.values()):
        assert line.startswith("error: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB; lower "), line
        assert option in line, line


def test_convert_to_official_in_half_precision_keeps_the_ema_decay(tmp_path):
    """--dtype fp16 stores the weights in float16 but LitEma's decay in float32: 0.9999 rounds to 1.0 in float16,
    an EMA that would never move again if training resumed from the file."""
    from test_checkpoint import training_checkpoint

    training_checkpoint(tmp_path / "ck")
    assert cli(convert, str(tmp_path / "ck"), "--out", str(tmp_path / "off"), "--to", "official", "--dtype",
               "fp16") == 0
    state = torch.load(tmp_path / "off" / "model.ckpt", weights_only=True)["state_dict"]
    assert state["model_ema.decay"].dtype == torch.float32 and state["model_ema.decay"].item() == pytest.approx(0.9999)
    assert state[ckpt.UNET_PREFIX + "out.2.weight"].dtype == torch.float16
    # and LitEma's update count as LitEma keeps it, an int32 (a float count would be halved too: 2049 and above
    # rounded, past 65504 infinite)
    assert state["model_ema.num_updates"].dtype == torch.int32 and int(state["model_ema.num_updates"]) == 7
    # exactly the official layout: the model's tensors, LitEma's copy of the UNet alone and its two counters
    names = RDM.from_pretrained(tmp_path / "ck").official_names().values()
    assert state.keys() == {*names, *(ckpt.ema_name(n[len(ckpt.UNET_PREFIX):]) for n in names
                                      if n.startswith(ckpt.UNET_PREFIX)), "model_ema.decay", "model_ema.num_updates"}


def test_official_checkpoint_defaults_to_litemas_decay():
    """official_checkpoint without an ema_decay records LitEma's default, 0.9999, as the released models hold it (from
    a convert mutation audit: another default passed every test, convert itself always passing the run's decay)."""
    model = RDM.from_config("tiny")
    state = convert.official_checkpoint(model, model, ema_updates=3)
    assert state["model_ema.decay"].dtype == torch.float32
    assert state["model_ema.decay"].item() == pytest.approx(0.9999, abs=1e-7)  # float32 of 0.9999
    assert int(state["model_ema.num_updates"]) == 3


def test_log_lines_go_above_progress_bars_through_one_handler(monkeypatch):
    """setup_logging adds its handler only to a process that has none (run() again, or an application's own
    logging, must not print each line twice); its lines are written through tqdm, on a line of their own above a
    running progress bar (a plain stream handler appended them to the bar's line); a record that cannot be
    formatted does not raise out of the log call."""
    import io
    import logging

    from tqdm import tqdm

    from rdm_fast._cli import setup_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.delenv("RANK", raising=False)
    with warnings.catch_warnings():  # setup_logging routes warnings into the log
        setup_logging()
        handler = root.handlers[0]
        setup_logging()
        assert root.handlers == [handler]
        mine = logging.StreamHandler(io.StringIO())
        monkeypatch.setattr(root, "handlers", [mine])
        setup_logging()
        assert root.handlers == [mine]
    stream = io.StringIO()
    handler.setStream(stream)
    bar = tqdm(total=10, file=stream, ascii=True, mininterval=0)
    bar.update(3)
    handler.emit(logging.LogRecord("rdm_fast", logging.INFO, __file__, 1, "wrote %d images", (3,), None))
    bar.close()
    line = next(line for line in stream.getvalue().split("\n") if "wrote 3 images" in line)
    assert line.split("\r")[-1].strip() == "rdm_fast: wrote 3 images", repr(stream.getvalue())
    monkeypatch.setattr(logging, "raiseExceptions", False)  # handleError's report to stderr, not the point here
    handler.emit(logging.LogRecord("rdm_fast", logging.INFO, __file__, 1, "%d images", ("three",), None))


def test_own_warnings_are_told_by_the_package_folder(caplog, monkeypatch):
    """A warning is rdm_fast's by the folder its file is in: also given as a relative path (a module imported
    through a relative sys.path entry), and not for a folder whose name merely begins with the package's (an
    ``rdm_fast_old`` copy beside it)."""
    import rdm_fast
    from rdm_fast._cli import _log_warning

    package = Path(rdm_fast.__file__).parent
    monkeypatch.chdir(package.parent)
    _log_warning(UserWarning("relative"), UserWarning, os.path.join(package.name, "rdm.py"), 5)
    _log_warning(UserWarning("beside"), UserWarning, str(package) + "_old/rdm.py", 5)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("rdm_fast", "relative"),
                                                                  ("py.warnings", "UserWarning: beside")]


def test_one_line_of_an_error():
    """An error's text on one line: indented continuation lines joined by single spaces; "FILE: reason" for an
    OSError naming a file, Python's own text for one that names none (not "None: reason")."""
    import errno

    from rdm_fast._cli import _one_line

    assert _one_line(ValueError("bad config:\n    unet.channels: 0\n")) == "bad config: unet.channels: 0"
    assert _one_line(OSError(errno.EACCES, "Permission denied", "/x/y")) == "/x/y: Permission denied"
    assert _one_line(OSError(errno.ENOSPC, "No space left on device")) == "[Errno 28] No space left on device"
    assert _one_line(OSError("plain text")) == "plain text"
    assert _one_line(ValueError()) == "ValueError"  # no bare "error: " line for an error without a message


def test_os_errors_and_memory_errors_without_advice_are_one_line(capsys, monkeypatch):
    """A file that cannot be read or written is the user's error (exit status 2, the file named); running out of
    memory in a command that gives no advice ends with the failed allocation (no dangling "; ")."""
    def missing(argv):
        raise FileNotFoundError(2, "No such file or directory", "/data/x.npz")

    def no_memory(argv):
        raise MemoryError()

    monkeypatch.delenv("RDM_FAST_DEBUG", raising=False)
    monkeypatch.setattr("rdm_fast._cli.setup_logging", lambda: None)
    assert run(missing, []) == 2
    assert capsys.readouterr().err.splitlines() == ["error: /data/x.npz: No such file or directory"]
    assert run(no_memory, []) == 2
    assert capsys.readouterr().err.splitlines() == ["error: out of memory: MemoryError"]


def test_parse_args_refuses_extra_arguments_and_takes_values_after_double_dash(capsys):
    """A stray positional argument is refused like an unknown option (argparse's exit status 2, the usage), not
    ignored; after ``--`` a value that begins with "-" is a positional argument (a file named "-x.ckpt")."""
    import argparse

    from rdm_fast._cli import parse_args

    parser = argparse.ArgumentParser(prog="convert")
    parser.add_argument("ckpt")
    parser.add_argument("--out")
    assert parse_args(parser, ["--out", "o", "--", "-x.ckpt"]).ckpt == "-x.ckpt"
    with pytest.raises(SystemExit) as e:
        parse_args(parser, ["a.ckpt", "--out", "o", "extra"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: convert" in err and "unrecognized arguments: extra" in err


def test_folder_kinds_ignore_other_tools_files_of_the_same_names(tmp_path):
    """Another tool's state.json, safetensors weights (its metadata not rdm_fast's), a file named checkpoints or
    a folder named *.ckpt do not make a folder a training checkpoint, a model or a training run."""
    from safetensors.torch import save_file

    from rdm_fast._cli import folder_kind

    other = tmp_path / "other"
    other.mkdir()
    (other / "state.json").write_text("{}")
    (other / "checkpoints").write_text("")
    (other / "backup.ckpt").mkdir()
    save_file({"w": torch.zeros(2)}, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert folder_kind(other) is None
    (other / "sample_00000.png").write_bytes(b"")
    assert folder_kind(other) == "a sample run"


def test_out_dir_refusals_are_worded_for_the_user(tmp_path):
    """The exact lines: a file given as --out, and another command's folder for a caller that names no kind."""
    from rdm_fast._cli import CLIError, check_out_dir

    (tmp_path / "afile").write_text("x")
    with pytest.raises(CLIError) as e:
        check_out_dir(str(tmp_path / "afile"), "a sample run")
    assert str(e.value) == f"--out {tmp_path / 'afile'} is a file, not a folder"
    (tmp_path / "db" / "progress").mkdir(parents=True)
    (tmp_path / "db" / "progress" / "config.json").write_text("{}")
    with pytest.raises(CLIError) as e:
        check_out_dir(str(tmp_path / "db"))
    assert str(e.value) == f"--out {tmp_path / 'db'} holds a database: write this output into a folder of its own"
