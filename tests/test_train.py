"""Training: the objective against a hand computation, the data (crops replayed exactly, contexts in each model's
layout, a step's batch independent of how it is split), the EMA, checkpoints that resume bit for bit and sample,
gradient accumulation, torch.compile and a 2-process torchrun run against one process, the first-stage cache,
mixed-precision gradients against float32 (and, on a GPU, against the CPU), loss going down, and the entry
point's errors."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file

from child_env import child_env
from faults import fail_writes_to
from test_database import TinyEncoder
from rdm_fast import RDM, RDMConfig, ops
from rdm_fast import train
from rdm_fast._cli import run
from rdm_fast.ops import _extension
from rdm_fast.checkpoint import TRAIN_STATE_FILE, TRAIN_WEIGHTS_FILE, CheckpointError
from rdm_fast._files import TEMP_SUFFIX
from rdm_fast.data import (CROP, DRAWS, DROPOUT, SHUFFLE, MomentCache, TrainingContexts, TrainingImages, TrainingMoments,
                           TrainingOrder, derived_seed)
from rdm_fast.diffusion import Schedule, eps_losses, noised
from rdm_fast.models import unet as unet_module
from rdm_fast.models.layers import official_names
from rdm_fast.retrieval import Database, build_database, compute_neighbors, save_neighbors, write_database
from rdm_fast.retrieval.build import make_crops, replay_crop

ENV = child_env(OMP_NUM_THREADS="1")


def _config(path: Path, text_token: bool = True, dropout: float = 0.0) -> Path:
    """The tiny preset with 16-d contexts (the test encoder's), as a config.yaml."""
    tree = RDMConfig.preset("tiny").to_dict()
    tree["model"]["params"]["unet_config"]["params"]["context_dim"] = TinyEncoder.dim
    tree["model"]["params"]["unet_config"]["params"]["dropout"] = dropout
    tree["model"]["params"]["text_token"] = text_token
    tree["model"]["params"]["normalized_embeddings"] = text_token
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """12 images of varied sizes, a training database of random 32 px crops of them (also the retrieval
    database), each entry's 3 nearest other entries, and the configs."""
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (30 + 2 * i, 48 - i, 3), np.uint8)).save(root / "imgs" / f"i{i}.png")
    build_database(root / "db", encoder=TinyEncoder(), images=root / "imgs", crop="random", crop_size=32,
                   batch_size=4, workers=0, device="cpu", progress=False)
    db = Database.open(root / "db", backend="torch", device="cpu")
    ids, scores = compute_neighbors(db, k=3, exclude_self=True, progress=False)
    save_neighbors(root / "nn.npz", ids, scores)
    return {"root": root, "db": root / "db", "nn": root / "nn.npz", "ids": ids,
            "cfg": _config(root / "cfg.yaml"), "cfg_plain": _config(root / "cfg_plain.yaml", text_token=False),
            "cfg_dropout": _config(root / "cfg_dropout.yaml", dropout=0.1)}


def _args(setup, out: Path, *extra: str, steps: int = 4, batch: int = 4, bookkeeping: bool = True) -> list[str]:
    """``bookkeeping``: log and save every 2 steps, without previews."""
    return ["--training-db", str(setup["db"]), "--db", str(setup["db"]), "--neighbors", str(setup["nn"]),
            "--out", str(out), "--steps", str(steps), "--batch-size", str(batch), "--workers", "0",
            *(["--log-every", "2", "--save-every", "2", "--preview", "0"] if bookkeeping else []),
            "--no-progress", "--device", "cpu", *extra]


def _fresh(setup, out: Path, *extra: str, **kw) -> list[str]:
    return _args(setup, out, "--random-init", "--config", str(setup["cfg"]), *extra, **kw)


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:07d}" / TRAIN_WEIGHTS_FILE))


def _same_run(a: dict, b: dict, steps: int, lr: float = 1e-4) -> None:
    """Two runs' weights agree up to summation order. Adam moves a weight by about lr per step whatever its
    gradient's size, so weights whose gradients are rounding noise (a bias right before a GroupNorm of one channel
    per group has a gradient of exactly zero in exact arithmetic) differ by a fraction of that: allow 1 %."""
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 0.01 * steps * lr, worst
    total = sum(float((a[k] - b[k]).square().sum()) for k in a) / sum(float(b[k].square().sum()) for k in a)
    assert total ** 0.5 <= 1e-6, total ** 0.5


# ---------------------------------------------------------------------------------------------- objective
def test_noised_and_eps_losses_by_hand():
    sched = Schedule.linear(0.0015, 0.0195)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 500, 999])
    ac = np.cumprod(1 - np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000) ** 2)
    want = (np.sqrt(ac[t.numpy()])[:, None, None, None] * x0.double().numpy()
            + np.sqrt(1 - ac[t.numpy()])[:, None, None, None] * noise.double().numpy())
    np.testing.assert_allclose(noised(sched, x0, t, noise).numpy(), want, rtol=1e-6, atol=1e-6)

    seen = {}

    def unet(x, tt, ctx):  # a stand-in denoiser: the loss is then known in closed form
        seen.update(x=x, t=tt, ctx=ctx)
        return 0.5 * x

    ctx = torch.randn(3, 2, 7, generator=g)
    losses = eps_losses(unet, sched, x0, ctx, t, noise)
    expected = ((0.5 * torch.from_numpy(want) - noise.double()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-6)
    assert seen["t"] is t and seen["ctx"] is ctx
    with pytest.raises(ValueError, match="must agree"):
        eps_losses(unet, sched, x0, ctx[:2], t, noise)


@pytest.mark.parametrize("t, error, message", [
    (torch.tensor([0, 1, -1]), ValueError, r"in \[0, 1000\), got -1 to 1"),  # -1 indexed the last timestep
    (torch.tensor([0, 1000, 5]), ValueError, r"in \[0, 1000\), got 0 to 1000"),
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer timesteps, got torch.float32"),
    (torch.tensor([True, False, True]), TypeError, "integer timesteps, got torch.bool"),
    (torch.tensor([1, 2]), ValueError, r"must be \(3,\)"),
    (torch.tensor(3), ValueError, r"must be \(3,\)"),
])
def test_noised_refuses_timesteps_outside_the_schedule(t, error, message):
    x0 = torch.zeros(3, 4, 2, 2)
    with pytest.raises(error, match=message):
        noised(Schedule.linear(0.0015, 0.0195), x0, t, x0)


def test_noised_takes_one_shape_for_x0_and_noise():
    """Other shapes broadcast into wrong results: (2, 16) inputs gave (2, 1, 2, 16), a (2, 4, 8, 1) noise was
    spread over (2, 4, 8, 8)."""
    sched, t = Schedule.linear(0.0015, 0.0195), torch.tensor([3, 700])
    with pytest.raises(ValueError, match=r"x0 \(2, 4, 8, 8\) and noise \(2, 4, 8, 1\) must have one shape"):
        noised(sched, torch.randn(2, 4, 8, 8), t, torch.randn(2, 4, 8, 1))
    with pytest.raises(ValueError, match="must have one shape"):
        noised(sched, torch.randn(2, 4, 8, 8), t, torch.tensor(0.5))
    x0, noise = torch.randn(2, 16), torch.randn(2, 16)  # any per-sample shape: the schedule's factor per row
    a = sched.alphas_cumprod[t].float()[:, None]
    torch.testing.assert_close(noised(sched, x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_ema_follows_litema():
    model = torch.nn.Linear(3, 2)
    ema = train.EMA(model, decay=0.9999)
    shadow = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n_update in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.9999, (1 + n_update) / (10 + n_update))
        for n, p in model.named_parameters():
            shadow[n] = shadow[n] - (1 - d) * (shadow[n] - p.detach())
    for n, s in ema.state_dict().items():
        torch.testing.assert_close(s, shadow[n], rtol=1e-6, atol=1e-7)
        # outside autograd: an average that tracked the weights' graph grew it by a node per tensor every step
        assert not s.requires_grad and s.grad_fn is None
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.applied(model):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), shadow[n], rtol=1e-6, atol=1e-7)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), raw[n])


def test_encode_takes_posterior_noise():
    model = RDM.from_config("tiny")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean, logvar = model.first_stage.quant_conv(model.first_stage.encoder(images)).chunk(2, dim=1)
        want = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) * model.config.scale_factor
        torch.testing.assert_close(model.encode(images, noise=noise), want)
        with pytest.raises(ValueError, match="latent's shape"):
            model.encode(images, noise=noise[:1])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = RDM.from_config("tiny").train()
    for p in model.unet.parameters():  # no zero-initialised layers: every gradient is non-trivial
        torch.nn.init.normal_(p, std=0.05)
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 64), torch.tensor([3, 700])
    grads, calls = [], []
    real = unet_module.checkpoint

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    for flag in (False, True):
        model.unet.zero_grad()
        model.unet.gradient_checkpointing = flag
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(unet_module, "checkpoint", counted)
            model.unet(x, t, ctx).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.unet.named_parameters()})
        assert len(calls) == (len(model.unet.down) + 1 + len(model.unet.up) if flag else 0)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


# ---------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("mode", ["random", "center", "none"])
def test_replay_crop_matches_make_crops(mode):
    rng = np.random.default_rng(3)
    for shape in [(50, 40), (20, 70), (32, 32)]:
        img = Image.fromarray(rng.integers(0, 256, (*shape, 3), np.uint8))
        crops, coords = make_crops(img, mode, 32, 3, np.random.default_rng(5))
        for crop, xy in zip(crops, coords, strict=True):
            again = replay_crop(img, mode, 32, tuple(int(v) for v in xy) if mode == "random" else None)
            assert np.array_equal(again, crop)
    if mode == "random":
        with pytest.raises(ValueError, match="does not fit"):
            replay_crop(img, mode, 32, (5, 0))


def test_training_images_are_the_embedded_crops(setup):
    """The replayed crops embed to the vectors stored in the database: they are the images that were embedded."""
    db = Database.open(setup["db"], backend="torch", device="cpu")
    images = TrainingImages(db, 32)
    batch = torch.stack([images[i]["pixels"] for i in range(len(images))]).float() / 127.5 - 1
    got = TinyEncoder().encode_images(batch)
    torch.testing.assert_close(got, db.embeddings(torch.arange(len(db))), rtol=2e-3, atol=2e-3)
    resized = TrainingImages(db, 16)[0]["pixels"]
    assert resized.shape == (3, 16, 16) and resized.dtype == torch.uint8
    crop = Image.fromarray(images[0]["pixels"].numpy().transpose(1, 2, 0))  # resized bicubic, as center crops are
    want = np.asarray(crop.resize((16, 16), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(resized.numpy(), want)


def test_random_crops_are_windows_of_the_short_side_resized_image_drawn_per_epoch(setup):
    """With random_crop an entry is a size x size window of its whole image, short side resized to size (bicubic,
    here recomputed with PIL), at a position that is fixed for (seed, epoch, entry) and differs between epochs."""
    db = Database.open(setup["db"], backend="torch", device="cpu")
    images = TrainingImages(db, 24, random_crop=True, seed=5)
    for i in (0, 7, 11):
        img = Image.open(images.file(i)).convert("RGB")
        w, h = img.size
        scale = 24 / min(w, h)
        whole = np.asarray(img.resize((max(24, round(w * scale)), max(24, round(h * scale))),
                                      Image.Resampling.BICUBIC))
        corners = set()
        for epoch in range(6):
            item = images[i, epoch]
            pixels = item["pixels"].numpy().transpose(1, 2, 0)
            assert item["ok"] and item["index"] == i and pixels.shape == (24, 24, 3)
            assert np.array_equal(images[i, epoch]["pixels"], item["pixels"])  # the same draw for the same key
            found = [(x, y) for y in range(whole.shape[0] - 23) for x in range(whole.shape[1] - 23)
                     if np.array_equal(whole[y:y + 24, x:x + 24], pixels)]
            assert found, (i, epoch)
            corners.add(found[0])
        assert len(corners) > 1  # these images are not square: the window moves between epochs
        other_seed = TrainingImages(db, 24, random_crop=True, seed=6)
        assert any(not torch.equal(other_seed[i, e]["pixels"], images[i, e]["pixels"]) for e in range(6))
    with pytest.raises(ValueError, match=r"ask for entries as \(index, epoch\)"):
        images[0]


def test_random_crops_of_the_entries_of_an_epoch_are_drawn_apart(setup, monkeypatch):
    """Each entry's window comes from its own stream, (seed, epoch, entry): entries of one image size are not all
    cut at one window (every entry reads the same noise image here, so equal windows give equal pixels)."""
    same = Image.fromarray(np.random.default_rng(8).integers(0, 256, (24, 80, 3), np.uint8))
    monkeypatch.setattr("rdm_fast.data.load_rgb", lambda path: same)
    images = TrainingImages(Database.open(setup["db"], backend="torch", device="cpu"), 24, random_crop=True, seed=5)
    items = [images[i, 0] for i in range(12)]
    assert all(item["ok"] for item in items)
    assert len({item["pixels"].numpy().tobytes() for item in items}) > 6  # 57 windows for 12 entries


def test_random_crops_draw_from_their_own_stream(setup):
    """The window of (seed, epoch, entry) comes from the CROP stream of those numbers: drawn from another purpose's
    stream of the same numbers (a step's DRAWS, of (seed, step, row)), the crops would be tied to the noise."""
    from rdm_fast.retrieval.build import load_rgb, random_fitted_window

    images = TrainingImages(Database.open(setup["db"], backend="torch", device="cpu"), 24, random_crop=True, seed=5)
    for i, epoch in ((0, 0), (7, 3), (11, 1)):
        rng = np.random.default_rng(derived_seed(5, CROP, epoch, i))
        want = random_fitted_window(load_rgb(images.file(i)), 24, rng)
        assert np.array_equal(images[i, epoch]["pixels"].numpy().transpose(1, 2, 0), want), (i, epoch)


def test_training_images_pickle_without_their_database(setup):
    """A data-loading worker gets the dataset pickled: without its open database (whose memory maps would travel
    as copies of the embeddings, gigabytes for a large database), which the worker opens itself."""
    import pickle

    images = TrainingImages(Database.open(setup["db"], backend="torch", device="cpu"), 32)
    first = images[3]
    copy = pickle.loads(pickle.dumps(images))
    assert copy.__dict__["_db"] is None and images.__dict__["_db"] is not None
    again = copy[3]
    assert again["ok"] and torch.equal(again["pixels"], first["pixels"])


def test_training_images_apply_the_pixel_limit_they_were_made_under(setup):
    """Data-loading workers started by spawn or forkserver do not inherit the process's decompression-bomb limit
    (--max-image-pixels): every item applies the limit that was in force when the dataset was made."""
    from rdm_fast.retrieval.build import current_max_image_pixels, set_max_image_pixels

    db = Database.open(setup["db"], backend="torch", device="cpu")
    default = current_max_image_pixels()
    try:
        set_max_image_pixels(64)  # below every training image (the smallest is 37 x 30)
        images = TrainingImages(db, 32)
        set_max_image_pixels(default)  # what a fresh worker process has
        assert images[0]["ok"] is False
    finally:
        set_max_image_pixels(default)
    assert TrainingImages(db, 32)[0]["ok"] is True


def test_training_images_report_unreadable_files(setup, tmp_path, caplog):
    """An unreadable entry is skipped, with one warning however often it is drawn."""
    db = Database.open(setup["db"], backend="torch", device="cpu")
    images = TrainingImages(db, 32, image_root=tmp_path)  # the images are not there
    with caplog.at_level("WARNING", logger="rdm_fast"):
        item = images[3]
        images[3], images[3], images[4]
    assert item["ok"] is False and item["index"] == 3 and int(item["pixels"].sum()) == 0
    warned = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert [m.split(":")[0] for m in warned] == ["training entry 3 cannot be used", "training entry 4 cannot be used"]
    # at the model's size, not the database's crop size: the batch it is drawn in is collated with the others
    assert TrainingImages(db, 16, image_root=tmp_path)[3]["pixels"].shape == (3, 16, 16)


def test_extra_neighbours_in_the_file_are_named(setup, caplog):
    """A neighbours file with more columns than the model's k_nn (e.g. made with --k 4 for a k_nn of 3): the nearest
    k_nn are used, and the log says so (they were dropped silently)."""
    from dataclasses import replace

    cfg = replace(RDMConfig.resolve(setup["cfg"]), k_nn=2)
    with caplog.at_level("INFO", logger="rdm_fast.data"):
        contexts = TrainingContexts(cfg, setup["db"], setup["db"], setup["nn"])
    assert contexts.k == 2 and "holds 3 neighbours per entry: the model's contexts take the nearest 2" in caplog.text
    assert torch.equal(contexts.ids, setup["ids"][:, :2])  # the first columns, the nearest (not the last ones)


@pytest.mark.parametrize("text_token", [True, False])
def test_training_contexts_follow_the_model_layout(setup, text_token):
    cfg = RDMConfig.resolve(setup["cfg"] if text_token else setup["cfg_plain"])
    contexts = TrainingContexts(cfg, setup["db"], setup["db"], setup["nn"])
    db = Database.open(setup["db"], backend="torch", device="cpu")
    vectors = torch.from_numpy(np.concatenate([np.asarray(s, np.float32) for s in db.shard_arrays]))
    entries = torch.tensor([5, 0, 11])
    got = contexts(entries)
    nn = setup["ids"][entries]
    want = torch.cat([vectors[entries][:, None], vectors[nn]], 1) if text_token else vectors[nn]
    if text_token:
        want = F.normalize(want, dim=-1)
    assert got.shape == (3, cfg.context_tokens, 16)
    torch.testing.assert_close(got, want)
    assert not (nn == entries[:, None]).any()  # the entry itself is never its own neighbour


def test_training_contexts_with_another_retrieval_database(setup, tmp_path):
    """The text token's place holds the training entry's own embedding, the neighbours are entries of the retrieval
    database: with two different databases (all other tests use one), taking either from the other shows."""
    training = Database.open(setup["db"], backend="torch", device="cpu")
    rows = np.random.default_rng(4).standard_normal((20, 16)).astype(np.float16)
    other = Database.open(write_database(tmp_path / "other", rows, training.encoder_info), backend="torch",
                          device="cpu")
    ids, scores = compute_neighbors(other, training, k=3, progress=False)
    save_neighbors(tmp_path / "nn.npz", ids, scores, databases=(other, training))
    contexts = TrainingContexts(RDMConfig.resolve(setup["cfg"]), setup["db"], other.path, tmp_path / "nn.npz")
    entries = torch.tensor([5, 0, 11])
    want = torch.cat([training.embeddings(entries)[:, None], torch.from_numpy(rows).float()[ids[entries]]], 1)
    torch.testing.assert_close(contexts(entries), F.normalize(want, dim=-1))


def test_training_contexts_errors(setup, tmp_path):
    cfg = RDMConfig.resolve(setup["cfg"])
    ids = setup["ids"].numpy()
    for name, bad, match in [("short.npz", ids[:5], "neighbours of 5 entries"),
                             ("narrow.npz", ids[:, :2], "2 neighbours per entry"),
                             ("long.npz", np.concatenate([ids, ids[:1]]), "neighbours of 13 entries"),
                             ("range.npz", ids + 100, "outside"),
                             ("past_end.npz", np.where(ids == ids.max(), len(ids), ids), "outside"),
                             ("negative.npz", np.where(ids == ids.min(), -1, ids), "outside")]:
        np.savez(tmp_path / name, ids=bad, scores=np.zeros(bad.shape, np.float32))
        with pytest.raises(ValueError, match=match):
            TrainingContexts(cfg, setup["db"], setup["db"], tmp_path / name)
    with pytest.raises(FileNotFoundError, match="db neighbors"):
        TrainingContexts(cfg, setup["db"], setup["db"], tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="expects 64-d"):
        TrainingContexts(RDMConfig.preset("tiny"), setup["db"], setup["db"], setup["nn"])
    with_self = np.concatenate([np.arange(len(ids))[:, None], ids[:, :2]], 1)  # db neighbors without --exclude-self
    np.savez(tmp_path / "self.npz", ids=with_self, scores=np.zeros(with_self.shape, np.float32))
    with pytest.raises(ValueError, match="--exclude-self"):
        TrainingContexts(cfg, setup["db"], setup["db"], tmp_path / "self.npz")
    later = ids.copy()
    later[4, 1] = 4  # an entry listed as its own second neighbour (not only the first column is checked)
    np.savez(tmp_path / "later.npz", ids=later, scores=np.zeros(later.shape, np.float32))
    with pytest.raises(ValueError, match="--exclude-self"):
        TrainingContexts(cfg, setup["db"], setup["db"], tmp_path / "later.npz")
    shutil.copytree(setup["db"], tmp_path / "copy")  # the training database again, as the retrieval one
    with pytest.raises(ValueError, match="--exclude-self"):
        TrainingContexts(cfg, setup["db"], tmp_path / "copy", tmp_path / "self.npz")


def test_training_contexts_refuse_a_retrieval_database_of_another_encoder(setup, tmp_path):
    """The training entry's own embedding (in the text token's place) and its neighbours' must come from one
    encoder: a retrieval database of other embeddings (here the same vectors under another encoder's name, with
    the right neighbours file) is refused."""
    training = Database.open(setup["db"], backend="torch", device="cpu")
    rows = training.embeddings(torch.arange(len(training))).numpy()
    other = write_database(tmp_path / "other", rows, {**training.encoder_info, "name": "another-encoder"})
    with pytest.raises(ValueError, match="queries come from encoder 'tiny-test', but .*other holds 'another-encoder'"):
        TrainingContexts(RDMConfig.resolve(setup["cfg"]), setup["db"], other, setup["nn"])


def test_context_normalisation_follows_normalized_embeddings(setup):
    """Contexts are L2-normalised when the config's normalized_embeddings says so, with or without a text token
    (the other tests' configs set both alike)."""
    from dataclasses import replace

    entries = torch.tensor([5, 0, 11])
    for name in ("cfg", "cfg_plain"):
        cfg = RDMConfig.resolve(setup[name])
        plain, normed = (TrainingContexts(replace(cfg, normalized_embeddings=flag), setup["db"], setup["db"],
                                          setup["nn"])(entries) for flag in (False, True))
        assert not torch.allclose(plain.norm(dim=-1), torch.ones(3, cfg.context_tokens))  # not unit vectors
        torch.testing.assert_close(normed, F.normalize(plain, dim=-1))


def test_bad_neighbours_files_name_the_file_and_the_problem(tmp_path):
    from rdm_fast.data import load_neighbors

    np.savez(tmp_path / "a.npz", scores=np.zeros((2, 3), np.float32))
    (tmp_path / "b.npz").write_bytes(b"\x00" * 64)
    np.save(tmp_path / "c.npy", np.zeros((2, 3), np.int64))
    (tmp_path / "c_scores.npy").write_text("not an array")
    for name, message in (("a.npz", "a.npz is not a neighbours file: it has no 'ids' array"),
                          ("b.npz", "b.npz is not a readable neighbours file (not a NumPy .npy or .npz file)"),
                          ("c.npy", "c_scores.npy is not a readable neighbours file (not a NumPy .npy or .npz "
                                    "file)")):
        with pytest.raises(ValueError) as e:
            load_neighbors(tmp_path / name)
        assert message in str(e.value), str(e.value)
    np.savez(tmp_path / "d.npz", ids=np.zeros((100, 3), np.int64))
    (tmp_path / "d.npz").write_bytes((tmp_path / "d.npz").read_bytes()[:1000])  # a copy that was cut off
    with pytest.raises(ValueError, match=r"d\.npz is not a readable neighbours file \(not a readable \.npz archive"):
        load_neighbors(tmp_path / "d.npz")


def test_neighbours_files_of_other_shapes_or_types_are_refused(tmp_path):
    """load_neighbors refuses ids that are not an (N, K) integer array and scores that are not one float per id
    (they failed later, or not at all), and names an empty ids file (its EOFError escaped as it was); unsigned ids
    are integer ids too."""
    from rdm_fast.data import load_neighbors

    ids = np.arange(6, dtype=np.int64).reshape(3, 2)
    for name, arrays, message in (
            ("flat.npz", {"ids": ids.ravel()}, r"holds int64 \(6,\); expected \(N, K\) integer neighbour ids"),
            ("float.npz", {"ids": ids.astype(np.float32)}, r"holds float32 \(3, 2\); expected \(N, K\) integer"),
            ("narrow.npz", {"ids": ids, "scores": np.zeros((3, 1), np.float32)},
             r"holds scores float32 \(3, 1\) for ids \(3, 2\); expected one float score per id"),
            ("whole.npz", {"ids": ids, "scores": np.zeros((3, 2), np.int32)},
             r"holds scores int32 \(3, 2\) for ids \(3, 2\); expected one float score per id")):
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=re.escape(name) + " " + message):
            load_neighbors(tmp_path / name)
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.npy is not a readable neighbours file \(not a NumPy"):
        load_neighbors(tmp_path / "empty.npy")
    np.savez(tmp_path / "unsigned.npz", ids=ids.astype(np.uint32), scores=np.zeros((3, 2), np.float32))
    loaded, scores, _ = load_neighbors(tmp_path / "unsigned.npz")
    assert loaded.dtype == np.uint32 and loaded.tolist() == ids.tolist() and scores.shape == (3, 2)


def test_save_neighbors_refuses_what_training_could_not_use(setup, tmp_path):
    """Float ids were truncated (0.7 became 0), and mismatched or negative ids saved, to fail only in training."""
    db = Database.open(setup["db"], backend="torch", device="cpu")
    ids, scores = torch.tensor([[1, 2], [0, 2]]), torch.rand(2, 2)
    for bad_ids, bad_scores, message in (
            (ids.float() + 0.7, scores, r"ids must be an \(N, K\) integer array, got torch.float32 \(2, 2\)"),
            (ids[0], scores[0], r"ids must be an \(N, K\) integer array, got torch.int64 \(2,\)"),
            (ids, scores[:, :1], r"scores must be float, one per id \(2, 2\), got torch.float32 \(2, 1\)"),
            (ids, ids, r"scores must be float, one per id \(2, 2\), got torch.int64"),
            (ids - 1, scores, r"ids must be entry ids \(>= 0\), got -1")):
        with pytest.raises(ValueError, match=message):
            save_neighbors(tmp_path / "nn.npz", bad_ids, bad_scores)
    with pytest.raises(ValueError, match=r"databases must be \(the searched database, the queries' database\)"):
        save_neighbors(tmp_path / "nn.npz", ids, scores, databases=(db,))
    assert list(tmp_path.iterdir()) == []
    save_neighbors(tmp_path / "nn.npz", ids.numpy(), scores.numpy())  # arrays too


def test_neighbours_are_memory_mapped_and_only_k_columns_kept(setup, tmp_path):
    """A neighbours .npz stays on disk (20M entries x 20 neighbours are 4.8 GB of ids and scores); the training
    contexts keep a copy of the model's k columns, and their digest is of those ids."""
    import hashlib
    from rdm_fast._files import map_npz
    from rdm_fast.data import load_neighbors
    from rdm_fast.retrieval.neighbors import database_digest
    db = Database.open(setup["db"], backend="torch", device="cpu")
    ids, scores = compute_neighbors(db, k=6, exclude_self=True, progress=False)
    save_neighbors(tmp_path / "six.npz", ids, scores, databases=(db, db))
    loaded, loaded_scores, digests = load_neighbors(tmp_path / "six.npz")
    assert isinstance(loaded, np.memmap) and isinstance(loaded_scores, np.memmap)
    assert np.array_equal(loaded, ids.numpy()) and np.array_equal(loaded_scores, scores.numpy())
    assert digests == {"db": database_digest(db), "queries": database_digest(db)}
    contexts = TrainingContexts(RDMConfig.resolve(setup["cfg"]), setup["db"], setup["db"], tmp_path / "six.npz")
    kept = ids[:, :3].numpy()  # the test config's k_nn
    assert contexts.ids.tolist() == kept.tolist()
    assert contexts.digest() == hashlib.sha256((database_digest(db) * 2).encode() + kept.tobytes()).hexdigest()
    # ids stored in Fortran order (e.g. saved from a transposed array): the kept copy and the digest are the same
    np.savez(tmp_path / "fortran.npz", ids=np.asfortranarray(ids.numpy()), scores=np.asfortranarray(scores.numpy()))
    assert map_npz(tmp_path / "fortran.npz")["ids"].flags.f_contiguous
    fortran = TrainingContexts(RDMConfig.resolve(setup["cfg"]), setup["db"], setup["db"], tmp_path / "fortran.npz")
    assert fortran.ids.tolist() == kept.tolist() and fortran.digest() == contexts.digest()


def test_training_contexts_refuse_neighbours_of_another_database(setup, tmp_path):
    """Neighbours of another database of the same size pass the count, range and self checks: the stored scores
    (and, where the file records them, the databases' digests) give them away."""
    build_database(tmp_path / "other", encoder=TinyEncoder(), images=setup["root"] / "imgs", crop="center",
                   crop_size=32, batch_size=4, workers=0, device="cpu", progress=False)
    other = Database.open(tmp_path / "other", backend="torch", device="cpu")
    ids, scores = compute_neighbors(other, k=3, exclude_self=True, progress=False)
    cfg = RDMConfig.resolve(setup["cfg"])
    save_neighbors(tmp_path / "plain.npz", ids, scores)
    with pytest.raises(ValueError, match=r"plain\.npz does not match the databases.*scores differ"):
        TrainingContexts(cfg, setup["db"], setup["db"], tmp_path / "plain.npz")
    # the right file with two rows exchanged (rows out of line with the entries, e.g. chunks joined out of order):
    # every row's ids and scores still agree with each other, but not with the entry they are filed under
    db = Database.open(setup["db"], backend="torch", device="cpu")
    right_ids, right_scores = (t.numpy() for t in compute_neighbors(db, k=3, exclude_self=True, progress=False))
    # two rows past the first that are not each other's neighbours (so no entry becomes its own neighbour)
    i, j = next((i, j) for i in range(1, 12) for j in range(i + 1, 12)
                if i not in right_ids[j] and j not in right_ids[i])
    order = np.arange(12)
    order[[i, j]] = j, i
    save_neighbors(tmp_path / "swapped.npz", right_ids[order], right_scores[order])
    with pytest.raises(ValueError, match=r"swapped\.npz does not match the databases"):
        TrainingContexts(cfg, setup["db"], setup["db"], tmp_path / "swapped.npz")
    nan_scores = right_scores.copy()
    nan_scores[0, 0] = np.nan  # a damaged file: NaN compares as no difference
    np.savez(tmp_path / "nan.npz", ids=right_ids, scores=nan_scores)
    with pytest.raises(ValueError, match=r"nan\.npz does not match the databases"):
        TrainingContexts(cfg, setup["db"], setup["db"], tmp_path / "nan.npz")
    save_neighbors(tmp_path / "queries.npz", right_ids, right_scores, databases=(db, other))  # the right db searched
    with pytest.raises(ValueError, match=r"queries\.npz was computed for another query database"):
        TrainingContexts(cfg, setup["db"], setup["db"], tmp_path / "queries.npz")
    save_neighbors(tmp_path / "recorded.npz", ids, scores, databases=(other, other))
    with pytest.raises(ValueError, match=r"recorded\.npz was computed for another retrieval database"):
        TrainingContexts(cfg, setup["db"], setup["db"], tmp_path / "recorded.npz")
    TrainingContexts(cfg, tmp_path / "other", tmp_path / "other", tmp_path / "recorded.npz")  # its own databases
    save_neighbors(tmp_path / "right.npy", right_ids, right_scores, databases=(db, db))
    TrainingContexts(cfg, setup["db"], setup["db"], tmp_path / "right.npy")  # .npy: scores beside it


def test_derived_seeds_differ_by_purpose():
    """A shuffle's, an image's draws' and a micro-batch's dropout seeds never share a stream (short seeds were
    padded with zeros: epoch e's shuffle once had the seed of row 0's draws at step e)."""
    seeds = [derived_seed(7, SHUFFLE, e) for e in range(4)]
    seeds += [derived_seed(7, purpose, step, row) for purpose in (DRAWS, DROPOUT) for step in range(4)
              for row in range(4)]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("cached", [False, True], ids=["images", "latents-cache"])
def test_training_noises_a_posterior_sample_of_each_image(setup, tmp_path, monkeypatch, cached):
    """The clean latent x0 of a step is a sample of the KL posterior, scale_factor (mean + std * the image's own
    posterior draw), as the reference trains (``encoder_posterior.sample()``), from the images and from the cache
    of moments alike; taking the mean instead passed every other training test."""
    seen: dict[str, list] = {"draws": [], "moments": [], "x0": [], "scale": []}
    real_draws, real_losses = train.sample_draws, train.eps_losses
    real_latents, real_encode = RDM.latents, RDM.encode

    def draws(*args, **kwargs):
        seen["draws"].append(out := real_draws(*args, **kwargs))
        return out

    def latents(self, moments, **kwargs):
        seen["moments"].append(moments.detach().clone())
        seen["scale"].append(self.config.scale_factor)
        return real_latents(self, moments, **kwargs)

    def encode(self, images, **kwargs):
        seen["moments"].append(self.encode_moments(images).detach().clone())
        seen["scale"].append(self.config.scale_factor)
        return real_encode(self, images, **kwargs)

    def losses(unet, schedule, x0, *args):
        seen["x0"].append(x0.detach().clone())
        return real_losses(unet, schedule, x0, *args)

    monkeypatch.setattr(train, "sample_draws", draws)
    monkeypatch.setattr(train, "eps_losses", losses)
    monkeypatch.setattr(RDM, "latents", latents)
    monkeypatch.setattr(RDM, "encode", encode)
    extra = ("--latents", str(tmp_path / "latents")) if cached else ()
    assert train.main(_fresh(setup, tmp_path / "run", *extra, steps=1, batch=4)) == 0
    moments, x0 = seen["moments"][-1], seen["x0"][-1]
    mean, logvar = moments.chunk(2, dim=1)
    want = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * seen["draws"][-1]["posterior"]) * seen["scale"][-1]
    assert not torch.allclose(want, mean * seen["scale"][-1], rtol=1e-2)  # the draw moves the latent
    torch.testing.assert_close(x0, want, rtol=1e-5, atol=1e-6)


def test_sample_draws_are_per_image_and_cover_every_timestep():
    """Each image of a step draws its own timestep, noise and context-drop value from (seed, step, position): no two
    positions alike, the same draws for a slice of the positions, and timesteps over all of [0, T) (the
    reference's randint(0, T): t = 0 included)."""
    model = SimpleNamespace(config=SimpleNamespace(channels=2, image_size=3), schedule=SimpleNamespace(num_timesteps=4))
    cpu = torch.device("cpu")
    draws = train.sample_draws(5, 2, range(64), model, cpu)
    assert sorted(set(draws["t"].tolist())) == [0, 1, 2, 3]
    for key in ("noise", "posterior", "drop"):
        assert len({tuple(v.flatten().tolist()) for v in draws[key]}) == 64, key
    assert not torch.equal(draws["posterior"], draws["noise"])  # two draws, not one used twice
    part = train.sample_draws(5, 2, range(40, 48), model, cpu)
    assert all(torch.equal(part[key], draws[key][40:48]) for key in draws)
    assert not torch.equal(train.sample_draws(5, 3, range(40, 48), model, cpu)["noise"], part["noise"])


def test_training_order_is_independent_of_the_split():
    with pytest.raises(ValueError, match="the training set is empty"):
        TrainingOrder(0, seed=0, batch=1)
    n, seed = 23, 7
    whole = TrainingOrder(n, seed=seed, batch=12)
    for step in range(5):  # 60 positions: the stream crosses epoch boundaries
        want = whole.micro_batch(step, 0)
        for world, accumulate in [(2, 1), (3, 2), (1, 4)]:
            batch = 12 // (world * accumulate)
            parts = [TrainingOrder(n, seed=seed, batch=batch, world=world, rank=r, accumulate=accumulate)
                     .micro_batch(step, a) for a in range(accumulate) for r in range(world)]
            assert torch.equal(torch.cat(parts), want)
    stream = whole.positions(0, 3 * n)
    for e in range(3):  # every epoch is a permutation, and epochs differ
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n:2 * n])
    resumed = iter(TrainingOrder(n, seed=seed, batch=4, accumulate=2, start_step=3))
    assert [next(resumed) for _ in range(8)] == TrainingOrder(n, seed=seed, batch=8).micro_batch(3, 0).tolist()
    # with epochs, each entry comes with the epoch of its stream position (what random crops are drawn for)
    keyed = iter(TrainingOrder(n, seed=seed, batch=4, world=2, rank=1, accumulate=2, epochs=True, start_step=2))
    plain = TrainingOrder(n, seed=seed, batch=4, world=2, rank=1, accumulate=2)
    epochs = []
    for step in (2, 3):
        for micro in range(2):
            first = step * 16 + (micro * 2 + 1) * 4
            want = [(e, (first + j) // n) for j, e in enumerate(plain.micro_batch(step, micro).tolist())]
            assert [next(keyed) for _ in range(4)] == want
            epochs.append({epoch for _, epoch in want})
    assert {1, 2} in epochs  # a micro-batch that crosses an epoch boundary (positions 44 to 47)


# ---------------------------------------------------------------------------------------------- runs
def test_training_lowers_the_loss(setup, tmp_path):
    out = tmp_path / "run"
    assert train.main(_fresh(setup, out, "--lr", "2e-3", steps=30, batch=6) + ["--log-every", "10"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_resume_is_bit_exact_and_checkpoints_sample(setup, tmp_path, caplog):
    straight, split = tmp_path / "straight", tmp_path / "split"
    with caplog.at_level("INFO", logger="rdm_fast.train"):
        assert train.main(_fresh(setup, straight, "--keep", "5", "--preview", "2")) == 0
    assert f"step 4: checkpoint {straight / 'checkpoints' / 'step_0000004'}, preview " \
           f"{straight / 'samples' / 'step_0000004.png'}" in caplog.text  # where the preview went
    assert train.main(_fresh(setup, split, steps=2)) == 0
    with pytest.raises(train.CLIError, match="--resume"):
        train.main(_fresh(setup, split))
    assert train.main(_args(setup, split, "--resume")) == 0
    for name in (TRAIN_WEIGHTS_FILE, "model.safetensors"):
        a = load_file(str(straight / "checkpoints" / "step_0000004" / name))
        b = load_file(str(split / "checkpoints" / "step_0000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "latest").read_text().strip() == "step_0000004"
    # every --save-every steps done (and at the end), not at the steps whose index is a multiple
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert (straight / "samples" / "step_0000004.png").is_file()
    state = json.loads((straight / "checkpoints" / "step_0000004" / TRAIN_STATE_FILE).read_text())
    assert state["step"] == 4 and state["ema_updates"] == 4

    # the checkpoint is a model: the sampler loads it (EMA weights) and draws from it
    model = RDM.from_pretrained(straight / "checkpoints" / "step_0000004")
    assert model.config.retrieval_encoder == TinyEncoder.name  # recorded: sampling checks databases against it
    ema = load_file(str(straight / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert torch.equal(model.unet.input_conv.weight, ema["unet.input_conv.weight"])
    assert not torch.equal(ema["unet.out_conv.weight"], _weights(straight, 4)["out_conv.weight"])
    from rdm_fast import sample
    assert sample.main(["--ckpt", str(straight), "--db", str(setup["db"]),  # the run: its newest checkpoint
                        "--n-samples", "2", "--out", str(tmp_path / "samples"), "--steps", "2",
                        "--device", "cpu"]) == 0  # conditioned on the training database, which it checks
    assert (tmp_path / "samples" / "grid.png").is_file()


def _without(args: list[str], *flags: str) -> list[str]:
    """``args`` without ``flags`` and their values."""
    out = []
    for a in args:
        if out and out[-1] in flags:
            out.pop()
        else:
            out.append(a)
    return out


def test_random_crop_runs_resume_exactly_and_keep_their_crops(setup, tmp_path):
    """--random-crop trains on per-epoch windows: a run resumed half-way (without repeating the flag) equals a
    straight one, and a run's crop setting cannot change on resume or go with --latents."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(_fresh(setup, straight, "--random-crop", steps=4)) == 0
    assert train.main(_fresh(setup, split, "--random-crop", steps=2)) == 0
    assert train.main(_args(setup, split, "--resume", steps=4)) == 0
    a, b = _weights(straight, 4), _weights(split, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((split / "run.json").read_text())["random_crop"] is True
    fixed = tmp_path / "fixed"
    assert train.main(_fresh(setup, fixed, steps=2)) == 0
    assert not all(torch.equal(a[k], b[k]) for a, b in [(_weights(fixed, 2), _weights(straight, 2))] for k in a)
    with pytest.raises(train.CLIError, match="other data or draws: random_crop False -> True"):
        train.main(_args(setup, fixed, "--resume", "--random-crop", steps=4))
    with pytest.raises(train.CLIError, match="--random-crop cuts each image anew every epoch, while --latents"):
        train.main(_fresh(setup, tmp_path / "cached", "--random-crop", "--latents", str(tmp_path / "lat")))


def test_random_crop_on_a_database_of_other_crops_is_warned_about(setup, tmp_path, caplog):
    """--random-crop keeps each entry's neighbours, found for its database crop: README says to build the training
    database with --crop center for it; one of random crops (here) trained without a word."""
    caplog.set_level("WARNING", logger="rdm_fast")
    assert train.main(_fresh(setup, tmp_path / "fixed", steps=1)) == 0
    assert "--crop center for --random-crop" not in caplog.text
    assert train.main(_fresh(setup, tmp_path / "windows", "--random-crop", steps=1)) == 0
    assert "holds --crop random crops" in caplog.text and "--crop center for --random-crop" in caplog.text


def test_resume_takes_the_runs_own_data(setup, tmp_path, caplog):
    """A requeue may leave out the data, the batch and the seed: the run's recorded ones (an uninterrupted run's
    weights; the batch is not the default 8 here); a new run needs the data."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(_fresh(setup, straight, "--seed", "3")) == 0
    assert train.main(_fresh(setup, split, "--seed", "3", steps=2)) == 0
    with caplog.at_level("INFO", logger="rdm_fast"):
        assert train.main(_without(_args(setup, split, "--resume"), "--training-db", "--db", "--neighbors",
                                   "--batch-size")) == 0
    assert f"--neighbors {setup['nn'].resolve()} (the run's own)" in caplog.messages
    a, b = _weights(straight, 4), _weights(split, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for flag in ("--training-db", "--db", "--neighbors"):
        args = _fresh(setup, tmp_path / "new")
        del args[args.index(flag):args.index(flag) + 2]
        with pytest.raises(train.CLIError, match=f"^{flag} is needed$"):
            train.main(args)
    assert not (tmp_path / "new").exists()


def test_resume_refuses_other_data_and_finishes_at_steps(setup, tmp_path):
    out = tmp_path / "run"
    assert train.main(_fresh(setup, out, steps=2)) == 0
    with pytest.raises(train.CLIError, match=r"global_batch 4 -> 2; the run's global batch is 1 x 4 x 1 \(processes x "
                                             r"images x micro-batches\), this launch's 1 x 2 x 1: run on as many "
                                             r"processes as the run, or give --batch-size and --accumulate"):
        train.main(_args(setup, out, "--resume", batch=2))
    with pytest.raises(train.CLIError, match="--config differs"):
        train.main(_args(setup, out, "--resume", "--config", str(setup["cfg_plain"])))
    assert train.main(_args(setup, out, "--resume", steps=2)) == 0  # already there: nothing to do
    moved = tmp_path / "moved"
    shutil.copytree(setup["db"], moved / "databases" / "mine")
    shutil.copy(setup["nn"], moved / "nn.npz")
    args = _args(setup, out, "--resume", steps=3)
    for flag, value in (("--training-db", "mine"), ("--db", "mine"), ("--neighbors", str(moved / "nn.npz"))):
        args[args.index(flag) + 1] = value  # databases by name, from $RDM_FAST_HOME/databases
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RDM_FAST_HOME", str(moved))
        assert train.main(args + ["--image-root", str(setup["root"] / "imgs")]) == 0  # the same data, moved
    with pytest.raises(train.CLIError, match="no checkpoint to continue from .*add --init, --first-stage or "):
        train.main(_args(setup, tmp_path / "empty", "--resume"))
    with pytest.raises(train.CLIError, match="--init, --first-stage or --random-init"):
        train.main(_args(setup, tmp_path / "new"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(train.CLIError, match="is a file"):
        train.main(_fresh(setup, tmp_path / "a_file"))
    with pytest.raises(train.CLIError, match="not a torch.compile backend"):
        train.main(_fresh(setup, tmp_path / "new", "--compile", "nonsense"))
    with pytest.raises(train.CLIError, match="--image-root"):
        train.main(_fresh(setup, tmp_path / "moved", "--image-root", str(tmp_path)))
    for flag, value in (("--seed", "-1"), ("--grad-clip", "nan"), ("--lr", "inf"), ("--ema-decay", "nan"),
                        ("--cond-drop", "nan"), ("--weight-decay", "inf")):
        with pytest.raises(train.CLIError, match=f"^{flag} must"):
            train.main(_fresh(setup, tmp_path / "checked", flag, value))
        assert not (tmp_path / "checked").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="cannot store the first stage's outputs there"):  # before encoding
        train.main(_fresh(setup, tmp_path / "latents", "--latents", str(tmp_path / "a_file"), steps=1))


def test_resume_refuses_other_neighbours_at_the_same_path_and_another_seed(setup, tmp_path):
    """Neighbours computed again into the same file (another db neighbors run) change every later step's contexts:
    --resume compares the data by content (training_data), not by its paths; another --seed is refused too."""
    nn = tmp_path / "nn.npz"
    shutil.copy(setup["nn"], nn)
    out = tmp_path / "run"

    def args(*extra: str, **kw) -> list[str]:
        argv = _args(setup, out, *extra, **kw)
        argv[argv.index("--neighbors") + 1] = str(nn)
        return argv

    assert train.main(args("--random-init", "--config", str(setup["cfg"]), steps=2)) == 0
    with pytest.raises(train.CLIError, match=r"other data or draws: seed 0 -> 5$"):
        train.main(args("--resume", "--seed", "5", steps=3))
    with np.load(setup["nn"]) as saved:  # the same neighbours, ranked otherwise
        save_neighbors(nn, np.roll(saved["ids"], 1, axis=1), np.roll(saved["scores"], 1, axis=1))
    with pytest.raises(train.CLIError, match=r"other data or draws: training_data [0-9a-f']+ -> [0-9a-f']+$"):
        train.main(args("--resume", steps=3))


@pytest.mark.parametrize("failing", ["readable", "manifest"])
def test_a_latents_fill_that_fails_to_be_written_leaves_no_shards(setup, tmp_path, monkeypatch, capsys, failing):
    """A full disk at the small files written after the moments (the readable flags, the manifest) left the
    moments shard, the share's full size, under its final name: never used (each fill draws its own run token),
    it stayed on the full disk, and a rerun wrote another beside it. The fill's shards go; a rerun completes."""
    from rdm_fast import data

    name = "atomic_save_npy" if failing == "readable" else "atomic_write_json"
    real = fail_writes_to(monkeypatch, data, name)
    cache = tmp_path / "lat"
    args = _fresh(setup, tmp_path / "run", "--latents", str(cache), steps=1)
    assert run(train.main, args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(": No space left on device")
    assert sorted(p.name for p in cache.iterdir()) == []
    monkeypatch.setattr(data, name, real)
    assert train.main(args) == 0 and len(list(cache.glob("moments_*.npy"))) == 1


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_non_finite_loss_stops_with_a_one_line_error(setup, tmp_path, monkeypatch, capsys, precision):
    real = train.eps_losses
    monkeypatch.setattr(train, "eps_losses", lambda *a: real(*a) * float("nan"))
    extra = ["--log-every", "1"] + (["--fp16"] if precision == "fp16" else [])
    assert run(train.main, _fresh(setup, tmp_path / "run", *extra, steps=1)) == 2
    err = capsys.readouterr().err
    assert f"error: the loss is nan at step 1 ({precision}): lower --lr" in err and "Traceback" not in err
    assert ("--bf16" in err) == (precision == "fp16")


def test_diverged_weights_are_not_saved(setup, tmp_path, monkeypatch):
    """Weights that went NaN between log lines are refused at the next save: no checkpoint of them replaces the
    good ones (which --keep would prune) or can be resumed from."""
    out = tmp_path / "run"
    assert train.main(_fresh(setup, out, steps=2) + ["--save-every", "2"]) == 0
    real = train.EMA.update

    def poisoned(self, unet):  # the optimizer step left a NaN in the weights
        with torch.no_grad():
            next(unet.parameters()).view(-1)[0] = float("nan")
        real(self, unet)

    monkeypatch.setattr(train.EMA, "update", poisoned)
    with pytest.raises(train.CLIError, match=r"weights are not finite at step 4: not saving them \(the last "
                                             r"checkpoint, step_0000002, is kept\)"):
        train.main(_args(setup, out, "--resume", "--save-every", "2", "--log-every", "1000", steps=6))
    assert (out / "latest").read_text().strip() == "step_0000002" and not (out / "checkpoints" / "step_0000004").exists()


@pytest.mark.parametrize("bar", [False, True])
def test_without_progress_bars_the_loss_is_logged(setup, tmp_path, caplog, monkeypatch, bar):
    """--no-progress (batch jobs) leaves no bar to show the loss: each --log-every record is a log line too. So
    does a bar written to a file (here pytest's capture), whose frames run together into one line."""
    caplog.set_level("INFO", logger="rdm_fast.train")
    monkeypatch.setattr(train.sys.stderr, "isatty", lambda: False)  # also under pytest -s in a terminal
    args = [a for a in _fresh(setup, tmp_path / "run", steps=4) if not (bar and a == "--no-progress")]
    assert train.main(args) == 0  # --log-every 2
    lines = [r.getMessage() for r in caplog.records if "images/s" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["step 2 of 4", "step 4 of 4"] and ": loss " in lines[0]
    assert re.search(r"images/s, about \d+:\d\d:\d\d left$", lines[0]) and lines[1].endswith("about 0:00:00 left")
    saved = [r.getMessage() for r in caplog.records if ": checkpoint " in r.getMessage()]
    assert saved and all(", preview " not in m for m in saved)  # --preview 0


def test_throughput_leaves_out_checkpoint_time(setup, tmp_path, monkeypatch):
    """The logged images/s measures training steps: the checkpoint written after a log line (and its preview)
    counted in the next interval."""
    offset = [0.0]
    real_clock, real_save = time.perf_counter, train.save_checkpoint
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: real_clock() + offset[0], time=time.time))

    def slow_save(*args, **kwargs):
        offset[0] += 1000.0  # a checkpoint that takes 1000 s
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train, "save_checkpoint", slow_save)
    assert train.main(_fresh(setup, tmp_path / "run", steps=4)) == 0  # log and save every 2 steps
    records = [json.loads(line) for line in (tmp_path / "run" / train.LOG).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert abs(records[1]["time"] - time.time()) < 600 and records[0]["time"] <= records[1]["time"]  # wall clock
    assert records[1]["images_per_s"] > 8 / 100  # 8 images in well under 100 s, not in the save's 1000 s


def test_a_stop_writes_the_pending_log_line(setup, tmp_path, monkeypatch, caplog):
    """A signal's stop logs the steps since the last log line (they would be lost otherwise), and the command that
    continues the run, with the options a run does not record (here --latents)."""
    entered = train.StopRequest.__enter__

    def enter(self):
        entered(self)
        self.requested = True  # as if SIGTERM came during the first step
        return self

    monkeypatch.setattr(train.StopRequest, "__enter__", enter)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="rdm_fast.train"):
        assert train.main(_fresh(setup, out, "--latents", str(tmp_path / "lat"), steps=5) + ["--log-every", "100"]) \
            == train.STOPPED
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1]
    assert f"stopped at step 1 of 5 by a signal: continue with python -m rdm_fast.train --out {out} --resume " \
        f"--steps 5 --latents {tmp_path / 'lat'} --workers 0 --device cpu --no-progress" in caplog.text


def test_stop_request_leaves_ignored_signals_ignored(caplog):
    """A job started with SIGINT ignored (``nohup``, a background job of a script) kept it ignored only until
    training installed its handler; handlers are restored afterwards. The log says that Ctrl-C will not stop it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        term = signal.getsignal(signal.SIGTERM)
        with caplog.at_level("INFO", logger="rdm_fast.train"), train.StopRequest() as stop:
            assert "SIGINT is ignored in this process (inherited): it does not stop the run; SIGTERM does" \
                in caplog.text
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGINT, previous)


def test_missing_neighbours_fail_before_the_model_is_built(setup, tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("built the model")

    monkeypatch.setattr(train, "build_model", never)
    args = _fresh(setup, tmp_path / "run", steps=1)
    args[args.index("--neighbors") + 1] = str(tmp_path / "none.npz")
    with pytest.raises(FileNotFoundError, match="neighbours file .*none.npz does not exist"):
        train.main(args)


def test_run_state_refusals(setup, saved_run, tmp_path, caplog):
    """A run killed between its first checkpoint's rename and the latest file resumes from its newest checkpoint
    (folders get their checkpoint names only when complete), and a new run there is refused like in any run;
    a second run into an --out in use is refused; a start that fails writes no run.json."""
    from rdm_fast._cli import OutDirLock

    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    (out / "latest").unlink()
    newest = max((out / "checkpoints").glob("step_*"))
    with pytest.raises(train.CLIError, match=rf"holds a run \({newest.name}\): pass --resume"):
        train.main(_fresh(setup, out, steps=5))
    held = OutDirLock(out)
    with pytest.raises(train.CLIError, match="is in use by another run"):
        train.main(_args(setup, out, "--resume", steps=5))
    held.release()
    (out / "checkpoints" / f".{newest.name}.old.tmp").mkdir()  # a pruning killed midway
    (out / ".run.json.x1.tmp").write_text("{")
    assert train.main(_args(setup, out, "--resume", steps=int(newest.name[5:]) + 1)) == 0
    assert f"has no latest file: its newest checkpoint is {newest.name}" in caplog.text
    assert (out / "latest").read_text().strip() != newest.name
    assert not list(out.glob(".*.tmp")) and not list((out / "checkpoints").glob(".*"))
    failed = tmp_path / "failed"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="cannot store the first stage's outputs there"):
        train.main(_fresh(setup, failed, "--latents", str(tmp_path / "a_file"), steps=1))
    assert not (failed / "run.json").exists()


def test_a_run_that_finished_meanwhile_is_not_overwritten(setup, saved_run, tmp_path, monkeypatch, caplog):
    """--out is read before the lock is taken (at the first write, after the model is built): a run that saved a
    checkpoint there meanwhile makes this one stop, instead of removing that run's checkpoints as newer than its
    own start. A finished run's leftovers of killed writes are removed also when there is nothing to train."""
    caplog.set_level("INFO", logger="rdm_fast.train")  # not left to an earlier test's logging setup
    out = tmp_path / "run"
    real = train.claim_out_dir

    def finished_meanwhile(path, *args):
        shutil.copytree(saved_run, path, dirs_exist_ok=True)
        return real(path, *args)

    monkeypatch.setattr(train, "claim_out_dir", finished_meanwhile)
    with pytest.raises(train.CLIError, match="changed while this run was starting"):
        train.main(_fresh(setup, out, steps=2))
    monkeypatch.setattr(train, "claim_out_dir", real)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    (out / "checkpoints" / ".step_0000002.old.tmp").mkdir()
    (out / "samples").mkdir(exist_ok=True)
    (out / "samples" / ".step_0000004.png.k1.tmp").write_bytes(b"half")
    assert train.main(_args(setup, out, "--resume", steps=4)) == 0
    assert "is already at step 4" in caplog.text
    assert not list(out.rglob(".*.tmp")) and (out / "checkpoints" / "step_0000004").is_dir()


def test_resume_is_bit_exact_with_dropout(setup, tmp_path, monkeypatch):
    """Dropout draws from torch's global generator, which --resume does not restore: it is seeded per micro-batch,
    from the step too (a seed without it would repeat one step's masks at every step)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ("--config", str(setup["cfg_dropout"]), "--save-every", "1")
    seeds, real_seed = [], torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: seeds.append(seed) or real_seed(seed))
    assert train.main(_fresh(setup, straight, *args, steps=2)) == 0
    monkeypatch.undo()
    assert {derived_seed(0, DROPOUT, 0, 0), derived_seed(0, DROPOUT, 1, 0)} <= set(seeds)
    assert train.main(_fresh(setup, split, *args, steps=1)) == 0
    torch.manual_seed(123)  # the global generator's state must not matter
    assert train.main(_args(setup, split, "--resume", steps=2)) == 0
    a, b = _weights(straight, 2), _weights(split, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_command_line_starts_and_resumes(setup, tmp_path, caplog):
    """--resume with a start option starts the run where --out has no checkpoint and resumes it where it has
    one (a scheduler's requeued job), exactly as a straight run; a resumed run keeps its optimisation settings
    unless they are given again."""
    settings = ("--warmup", "3", "--ema-decay", "0.9", "--cond-drop", "0.3", "--weight-decay", "0.02")
    straight, requeued = tmp_path / "straight", tmp_path / "requeued"
    assert train.main(_fresh(setup, straight, *settings, steps=4)) == 0
    assert train.main(_fresh(setup, requeued, "--resume", *settings, steps=2)) == 0  # no checkpoint: starts
    caplog.set_level("INFO", logger="rdm_fast.train")
    assert train.main(_fresh(setup, requeued, "--resume", steps=4)) == 0  # the settings left out: the run's own
    messages = [r.getMessage() for r in caplog.records]
    assert any("holds a run: resuming it" in m for m in messages)
    assert not any("changed settings" in m for m in messages), messages
    a, b = _weights(straight, 4), _weights(requeued, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run_info = json.loads((requeued / "run.json").read_text())
    assert (run_info["warmup"], run_info["ema_decay"], run_info["cond_drop"], run_info["weight_decay"],
            run_info["precision"]) == (3, 0.9, 0.3, 0.02, "fp32")
    caplog.clear()
    assert train.main(_args(setup, requeued, "--resume", "--lr", "2e-4", "--bf16", steps=5)) == 0  # given: used
    assert any("changed settings: lr 0.0001 -> 0.0002; precision 'fp32' -> 'bf16'" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert json.loads((requeued / "log.jsonl").read_text().splitlines()[-1])["lr"] == 2e-4
    with pytest.raises(train.CLIError, match=r"--config differs from the config of .* in .*text_token.*: drop --config"):
        train.main(_args(setup, requeued, "--resume", "--config", str(setup["cfg_plain"]), steps=6))


@pytest.fixture(scope="module")
def saved_run(setup, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    assert train.main(_fresh(setup, out)) == 0
    return out


def test_resume_after_a_torn_log_line_and_a_rolled_back_latest(setup, saved_run, tmp_path, caplog):
    """A log line half-written by a killed run is dropped; checkpoints newer than the one --resume continues from
    (a kill between a checkpoint's rename and the latest update, or latest rolled back by hand) are removed
    first, so pruning never removes the checkpoint latest names."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    with open(out / "log.jsonl", "ab") as f:
        f.write(b'{"step": 5, "lo' + b"\0" * 16)
    (out / "latest").write_text("step_0000002\n")
    assert train.main(_args(setup, out, "--resume", "--keep", "1", steps=3)) == 0
    assert (out / "latest").read_text().strip() == "step_0000003"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003"]
    assert train.ckpt.newest_run_checkpoint(out) == out / "checkpoints" / "step_0000003"
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2, 3]
    assert "dropping 1 unreadable lines" in caplog.text and "removing" in caplog.text


def test_a_failed_log_write_names_the_log(setup, saved_run, tmp_path, monkeypatch, capsys):
    """A full disk fails the append to log.jsonl with an OSError that names no file ("error: [Errno 28] No space
    left on device" was all a training run said): the error names log.jsonl; the checkpoints stay as they were."""
    import builtins
    import errno

    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train, "open", lambda file, mode="r", *a, **k: Full(real_open(file, mode, *a, **k))
                        if Path(file).name == "log.jsonl" and mode == "a" else real_open(file, mode, *a, **k),
                        raising=False)
    assert run(train.main, _args(setup, out, "--resume", steps=6)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {out / 'log.jsonl'}: No space left on device"
    assert (out / "latest").read_text() == "step_0000004\n"


def test_a_failed_checkpoint_write_leaves_the_last_checkpoint_and_no_partial_one(setup, saved_run, tmp_path,
                                                                                 monkeypatch, capsys):
    """A full disk while a checkpoint is written leaves the newest complete one and latest as they were, and
    removes the partial checkpoint's folder (its finished files, the model's size each, stayed behind on the
    full disk until a rerun started); the same --resume completes once there is room."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    real = fail_writes_to(monkeypatch, train, "atomic_write", "optimizer.pt")
    args = _args(setup, out, "--resume", steps=6)
    assert run(train.main, args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("optimizer.pt: No space left on device")
    assert (out / "latest").read_text() == "step_0000004\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    monkeypatch.setattr(train, "atomic_write", real)
    assert train.main(args) == 0 and (out / "latest").read_text() == "step_0000006\n"


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


def _scramble(file: Path) -> None:
    file.write_bytes(np.random.default_rng(0).bytes(4096))


@pytest.mark.parametrize("name, damage", [(TRAIN_STATE_FILE, _truncate), (TRAIN_WEIGHTS_FILE, _truncate),
                                          ("optimizer.pt", _truncate), ("optimizer.pt", Path.unlink),
                                          ("optimizer.pt", _scramble)])
def test_resume_names_a_damaged_checkpoint_file(setup, saved_run, tmp_path, name, damage):
    """The damaged file is named, with the way back to the older checkpoint; never a hint to unpickle it."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    damage(out / "checkpoints" / "step_0000004" / name)
    with pytest.raises(CheckpointError, match=f"step_0000004/{name}") as e:
        train.main(_args(setup, out, "--resume", steps=5))
    assert f"older checkpoint (step_0000002), write its name into {out / 'latest'}" in str(e.value)
    assert "weights_only" not in str(e.value)


@pytest.mark.parametrize("step", [-5, 1, "6", True])
def test_resume_refuses_a_bad_step_and_removes_nothing(setup, saved_run, tmp_path, step):
    """A state.json whose step is no count, or not its folder's, is named before any checkpoint or log line goes
    (the run would continue from that step: the checkpoints after it, this one too, would be removed)."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    file = out / "checkpoints" / "step_0000004" / TRAIN_STATE_FILE
    file.write_text(json.dumps({**json.loads(file.read_text()), "step": step}))
    log = (out / "log.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=f"step_0000004/{TRAIN_STATE_FILE}: step"):
        train.main(_args(setup, out, "--resume", steps=5))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert (out / "log.jsonl").read_bytes() == log


def test_resume_refuses_a_latest_outside_the_run(setup, saved_run, tmp_path):
    """latest names a checkpoint folder of its own run, never a path to another run's."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    shutil.copytree(saved_run, tmp_path / "other")
    (out / "latest").write_text("../../other/checkpoints/step_0000004\n")
    with pytest.raises(CheckpointError, match=r"latest names '\.\./\.\./other/checkpoints/step_0000004', which is "
                                              r"not a checkpoint of this run \(a step_NNNNNNN folder in "):
        train.main(_args(setup, out, "--resume", steps=5))
    assert not (tmp_path / "other" / "checkpoints" / "step_0000005").exists()


def test_resume_refuses_runs_of_older_draws(setup, saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    file = out / "checkpoints" / "step_0000004" / TRAIN_STATE_FILE
    state = json.loads(file.read_text())
    del state["run"]["draws"]  # as the versions before draws had purpose tags saved it
    file.write_text(json.dumps(state))
    with pytest.raises(train.CLIError, match="older rdm_fast, whose random draws"):
        train.main(_args(setup, out, "--resume", steps=5))


def test_checkpoints_are_flushed_before_they_are_named(setup, tmp_path, monkeypatch):
    """Every file and the folder reach the disk before the rename, the rename before latest names it, and older
    checkpoints go only after that, each renamed to a temporary name before it is removed."""
    model = RDM.from_config(RDMConfig.resolve(setup["cfg"]))
    ema = train.EMA(model.unet)
    optimizer = torch.optim.AdamW(model.unet.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    (tmp_path / "checkpoints" / "step_0000001").mkdir(parents=True)
    events, replace, rmtree = [], os.replace, shutil.rmtree
    monkeypatch.setattr(train, "fsync_path", lambda p: events.append(("fsync", Path(p))))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", Path(b))), replace(a, b))[1])
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: (events.append(("remove", Path(p))), rmtree(p, **kw))[1])
    final = train.save_checkpoint(tmp_path, 3, model, ema, optimizer, scaler, {}, keep=1)
    tmp = final.parent / ".step_0000003.tmp"
    moved = events.index(("rename", final))
    assert {("fsync", tmp / f.name) for f in final.iterdir()} | {("fsync", tmp)} <= set(events[:moved])
    assert events.index(("fsync", final.parent)) > moved
    latest = events.index(("rename", tmp_path / "latest"))
    assert events.index(("fsync", tmp_path)) > latest
    old = final.parent / "step_0000001"  # renamed away, then removed: never half-deleted under its own name
    assert events[-2:] == [("rename", final.parent / ".step_0000001.old.tmp"),
                           ("remove", final.parent / ".step_0000001.old.tmp")]
    assert events.index(("rename", final.parent / ".step_0000001.old.tmp")) > latest
    assert final.is_dir() and not old.exists() and sorted(p.name for p in final.parent.iterdir()) == [final.name]


def test_checkpoints_are_ordered_by_step_number(tmp_path):
    """Past step 9,999,999 the folder names grow a digit: older/newer is decided by the number, not the name."""
    root = tmp_path / "checkpoints"
    for step in (9_999_998, 9_999_999, 10_000_000, 10_000_001):
        (root / f"step_{step:07d}").mkdir(parents=True)
    (root / "step_notes").mkdir()
    train.remove_stale_checkpoints(tmp_path, 10_000_000)
    assert sorted(p.name for p in root.iterdir()) == ["step_10000000", "step_9999998", "step_9999999", "step_notes"]
    assert list(train.ckpt.run_checkpoints(root)) and min(train.ckpt.run_checkpoints(root)) == 9_999_998


def test_compiled_training_matches_uncompiled(setup, tmp_path):
    """--compile (here the aot_eager backend: traced forward and backward graphs, no code generation, so the test
    stays fast; the default is inductor) computes the eager run's steps."""
    from torch._dynamo.utils import counters

    assert train.main(_fresh(setup, tmp_path / "eager", steps=2)) == 0
    counters.clear()
    assert train.main(_fresh(setup, tmp_path / "compiled", "--compile", "aot_eager", steps=2)) == 0
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did capture graphs
    _same_run(_weights(tmp_path / "compiled", 2), _weights(tmp_path / "eager", 2), steps=2)


def test_compile_without_a_cpp_compiler_is_a_one_line_error(setup, tmp_path, monkeypatch, capsys):
    """--compile (inductor) on the CPU with no C++ compiler to be found stops before the run starts with a
    one-line error: it was an InductorError traceback from the first step, after the data and model had loaded."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    assert run(train.main, _fresh(setup, tmp_path / "run", "--compile", steps=1)) == 2
    err = capsys.readouterr().err
    assert "error: --compile inductor needs a C++ compiler on the CPU" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_accumulation_equals_one_large_batch(setup, tmp_path):
    assert train.main(_fresh(setup, tmp_path / "one", steps=2, batch=4)) == 0
    assert train.main(_fresh(setup, tmp_path / "acc", "--accumulate", "2", steps=2, batch=2)) == 0
    _same_run(_weights(tmp_path / "acc", 2), _weights(tmp_path / "one", 2), steps=2)


def test_the_first_step_moves_each_weight_by_its_learning_rate(setup, tmp_path):
    """AdamW's first step moves each weight by the step's learning rate (m / sqrt(v) is the gradient's sign) after
    the decoupled weight decay: the rate of step 0 is --lr, or the warm-up's start (1e-6 x --lr) with --warmup. An
    optimizer given the rate of step 1 (the log, which computes it anew, still showed step 0's) or another weight
    decay than --weight-decay moved the weights otherwise."""
    torch.manual_seed(0)  # the --random-init weights (seed 0)
    before = RDM.from_config(str(setup["cfg"])).unet.state_dict()
    lr, decay = 1e-3, 10.0
    assert train.main(_fresh(setup, tmp_path / "run", "--lr", str(lr), "--weight-decay", str(decay), "--warmup", "0",
                             steps=1)) == 0
    after = _weights(tmp_path / "run", 1)
    moved = torch.cat([(after[k] - before[k] * (1 - lr * decay)).flatten() for k in before]).abs()
    assert float(moved.max()) == pytest.approx(lr, rel=1e-3) and float(moved.max()) <= lr * (1 + 1e-4)
    # a resume's --weight-decay is the one its steps use (the optimizer's saved state holds the run's old one):
    # AdamW's second step moves a weight by at most about the rate after the decay
    assert train.main(_args(setup, tmp_path / "run", "--resume", "--weight-decay", "100", steps=2)) == 0
    second = _weights(tmp_path / "run", 2)
    moved = torch.cat([(second[k] - after[k] * (1 - lr * 100)).flatten() for k in after]).abs()
    assert float(moved.max()) <= lr * 1.01
    assert train.main(_fresh(setup, tmp_path / "warm", "--lr", str(lr), "--warmup", "2", steps=1)) == 0
    after = _weights(tmp_path / "warm", 1)  # step 0 at 1e-9: within rounding of the initial weights
    assert max(float((after[k] - before[k]).abs().max()) for k in before) < 1e-7


def test_the_ema_averages_the_weights_each_step_made(setup, tmp_path):
    """Update n of the EMA moves it towards the weights of step n, after the optimizer made them (an EMA updated
    before the step averaged the weights one step behind): shadow_2 = lerp(shadow_1, weights_2, 1 - min(decay,
    3 / 12))."""
    out = tmp_path / "run"
    assert train.main(_fresh(setup, out, "--lr", "1e-3", "--save-every", "1", steps=2)) == 0
    ema = [{k[len("unet."):]: v for k, v in load_file(str(out / "checkpoints" / f"step_{s:07d}" / "model.safetensors"))
            .items() if k.startswith("unet.")} for s in (1, 2)]
    weights, d = _weights(out, 2), min(0.9999, 3 / 12)
    assert ema[1].keys() == weights.keys()
    for k, w in weights.items():
        torch.testing.assert_close(ema[1][k], ema[0][k] + (1 - d) * (w - ema[0][k]), rtol=1e-6, atol=1e-7)


def test_the_step_gradient_is_the_global_batch_mean(setup, tmp_path, monkeypatch):
    """The gradient a step clips (and AdamW then takes) is that of the mean loss over the global batch, unscaled:
    the same with --accumulate and in fp16 (its loss scale undone first), and clipped to --grad-clip. AdamW
    hardly sees a constant factor on the gradient, so weights alone did not show a loss left undivided by
    --accumulate or a clip of the loss-scaled fp16 gradient."""
    real, seen = torch.nn.utils.clip_grad_norm_, []

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        norm = real(parameters, max_norm, *args, **kwargs)
        clipped = torch.stack([p.grad.norm() for p in parameters if p.grad is not None]).norm()
        seen.append((float(norm), float(clipped), max_norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    for name, extra, batch in (("one", (), 4), ("acc", ("--accumulate", "2"), 2), ("fp16", ("--fp16",), 4)):
        assert train.main(_fresh(setup, tmp_path / name, "--grad-clip", "1e-3", *extra, steps=1, batch=batch)) == 0
    (one, clipped, max_norm), acc, fp16 = seen
    assert one > 1e-3 and clipped == pytest.approx(1e-3, rel=1e-4) and max_norm == 1e-3  # the clip did act
    assert acc[0] == pytest.approx(one, rel=1e-4)
    assert fp16[0] == pytest.approx(one, rel=2e-2) and fp16[1] == pytest.approx(1e-3, rel=1e-3)


def test_torchrun_two_processes_match_one(setup, tmp_path):
    """Also the first-stage cache, which the two processes fill together, the processes' stop votes (every step,
    with no stop), and --accumulate under DDP (gradients synchronised after the last micro-batch only: a sync after
    the first one left each process its own gradients, and the processes apart)."""
    one = _fresh(setup, tmp_path / "one", "--latents", str(tmp_path / "latents1"), steps=5, batch=4)
    assert train.main(one) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = _fresh(setup, tmp_path / "two", "--latents", str(tmp_path / "latents2"), "--accumulate", "2", steps=5,
                 batch=1)
    r = subprocess.run([*torchrun, "-m", "rdm_fast.train", *two], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    a, b = (torch.stack([TrainingMoments(MomentCache(tmp_path / d, {}))[i]["moments"] for i in range(12)])
            for d in ("latents1", "latents2"))  # one shard and two
    torch.testing.assert_close(b, a, rtol=2e-3, atol=1e-4)
    _same_run(_weights(tmp_path / "two", 5), _weights(tmp_path / "one", 5), steps=5)
    # the logged loss is the global batch's mean, summed over the processes (not one process's, nor the largest)
    logged = [[json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    assert len(logged[0]) == 3 and logged[1] == pytest.approx(logged[0], rel=1e-3)


def test_torchrun_random_crops_and_dropout_match_one_process(setup, tmp_path):
    """--random-crop's per-epoch windows depend on (seed, epoch, entry) alone: two processes with data-loading
    workers (which receive (entry, epoch) keys) train the steps one process does, across an epoch boundary. Dropout
    masks are seeded by the step and the micro-batch's place (micro-batch x processes + process), so two processes
    draw the masks one process with two micro-batches does (a seed without the process gave both processes one
    mask, a seed without the micro-batch both micro-batches one)."""
    dropout = ("--random-crop", "--config", str(setup["cfg_dropout"]))
    one = _fresh(setup, tmp_path / "one", *dropout, "--accumulate", "2", steps=4, batch=2)
    assert train.main(one) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = _fresh(setup, tmp_path / "two", *dropout, steps=4, batch=2)
    two[two.index("--workers") + 1] = "1"  # a data-loading worker per process
    r = subprocess.run([*torchrun, "-m", "rdm_fast.train", *two], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_run(_weights(tmp_path / "two", 4), _weights(tmp_path / "one", 4), steps=4)


def test_moved_images_are_named_before_the_run_starts(setup, tmp_path, caplog):
    """Images no longer where the training database recorded them stop the run with one line before any data
    worker starts (it printed a warning per entry first); where some exist, the run goes on."""
    caplog.set_level("WARNING", logger="rdm_fast")
    with pytest.raises(train.CLIError, match=r"none of 12 training images looked for exists, e.g. .*i0.png: is "
                                             r"--image-root the folder the database was built from\?"):
        train.main(_fresh(setup, tmp_path / "moved", "--image-root", str(tmp_path / "nowhere"), steps=1))
    assert "cannot be used" not in caplog.text
    partial = tmp_path / "partial"
    shutil.copytree(setup["root"] / "imgs", partial)
    (partial / "i0.png").unlink()  # the first entry looked for: the others are found
    assert train.main(_fresh(setup, tmp_path / "run", "--image-root", str(partial), steps=1)) == 0


def test_first_batch_check_counts_every_micro_batch(setup, tmp_path):
    """With --accumulate the first step's micro-batches are one global batch: an unreadable first micro-batch is
    not the end of the run when a later one of the step can be read (as 2 processes of one micro-batch each)."""
    db = Database.open(setup["db"], backend="torch", device="cpu")
    second = TrainingOrder(len(db), seed=0, batch=1, accumulate=2).micro_batch(0, 1).tolist()[0]
    keep = Path(db.sources([second])[0]).name
    images = tmp_path / "images"
    shutil.copytree(setup["root"] / "imgs", images)
    for f in images.iterdir():
        if f.name != keep:
            f.write_bytes(b"not an image any more")
    args = _fresh(setup, tmp_path / "run", "--image-root", str(images), "--accumulate", "2", steps=1, batch=1)
    assert train.main(args) == 0
    (images / keep).write_bytes(b"not an image either")
    with pytest.raises(train.CLIError, match="none of the first batch's images can be read"):
        train.main(_fresh(setup, tmp_path / "none", "--image-root", str(images), "--accumulate", "2", steps=1,
                          batch=1))


def test_a_first_batch_of_unreadable_images_that_exist_is_not_called_moved(setup, tmp_path):
    """Images that are where the database says but cannot be decoded (damaged, or over --max-image-pixels) stop
    the run without the advice to pass --image-root, which was given whether or not the files existed."""
    images = tmp_path / "images"
    shutil.copytree(setup["root"] / "imgs", images)
    for f in images.iterdir():
        f.write_bytes(b"not an image any more")
    with pytest.raises(train.CLIError, match=r"none of the first batch's images can be read, e.g. .*: the files "
                                             r"exist; the warnings say why") as e:
        train.main(_fresh(setup, tmp_path / "run", "--image-root", str(images), steps=1))
    assert "--image-root" not in str(e.value)


def test_unreadable_images_take_no_part_in_the_loss_or_its_log(setup, tmp_path, monkeypatch):
    """An image that cannot be read (zeros in its place) gives no gradient and no logged loss: a step differentiates
    the sum of its readable images' losses over the global batch, and the log shows their mean. A loop that kept
    the zeros' losses trained on blank images, and a log that divided by every image understated the loss; the
    first-batch check only needs the run to go on."""
    db = Database.open(setup["db"], backend="torch", device="cpu")
    entries = TrainingOrder(len(db), seed=0, batch=4).micro_batch(0, 0).tolist()
    broken = Path(db.sources([entries[1]])[0]).name
    images = tmp_path / "images"
    shutil.copytree(setup["root"] / "imgs", images)
    (images / broken).write_bytes(b"not an image any more")
    losses, scaled = [], []
    real_losses, real_scale = train.eps_losses, torch.amp.GradScaler.scale

    def losses_spy(*args):
        out = real_losses(*args)
        losses.append(out.detach().clone())
        return out

    def scale_spy(self, outputs):
        scaled.append(float(outputs.detach()))
        return real_scale(self, outputs)

    monkeypatch.setattr(train, "eps_losses", losses_spy)
    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale_spy)
    assert train.main(_fresh(setup, tmp_path / "run", "--image-root", str(images), steps=1)) == 0
    ok = torch.tensor([Path(db.sources([e])[0]).name != broken for e in entries])
    assert int(ok.sum()) == 3 and len(losses) == 1 and bool((losses[0] > 0).all())
    assert scaled == pytest.approx([float(losses[0][ok].sum()) / 4], rel=1e-6)
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert record["loss"] == pytest.approx(float(losses[0][ok].mean()), rel=1e-6) and record["unreadable"] == 1


def test_torchrun_first_batch_check_counts_every_process(setup, tmp_path):
    """The first step's unreadable-images check is over the global batch: one process whose only first image is
    unreadable trains on (as one process with that global batch does), and where no process can read one, every
    process stops with the error."""
    db = Database.open(setup["db"], backend="torch", device="cpu")
    first = TrainingOrder(len(db), seed=0, batch=1, world=2, rank=0).micro_batch(0, 0).tolist()[0]
    keep = db.sources([first])[0]
    images = tmp_path / "images"
    shutil.copytree(setup["root"] / "imgs", images)
    for f in images.iterdir():
        if f.name != Path(keep).name:
            f.write_bytes(b"not an image any more")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = _fresh(setup, tmp_path / "run", "--image-root", str(images), steps=1, batch=1)
    r = subprocess.run([*torchrun, "-m", "rdm_fast.train", *args], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (images / Path(keep).name).write_bytes(b"not an image either")
    args = _fresh(setup, tmp_path / "none", "--image-root", str(images), steps=1, batch=1)
    r = subprocess.run([*torchrun, "-m", "rdm_fast.train", *args], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith(("error:", "[rank 1] error:"))]
    assert r.returncode != 0 and len(errors) == 2, r.stderr[-3000:]
    assert all("none of the first batch's images can be read" in line for line in errors)


def test_a_stop_signal_to_one_torchrun_process_stops_both_with_a_checkpoint(setup, tmp_path):
    """SIGTERM to rank 1 alone (which writes no checkpoint) stops both processes at one step, through the vote:
    rank 0 writes that step's checkpoint and both exit with the stop status; the run then resumes."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = _fresh(setup, out, steps=10_000, batch=2) + ["--log-every", "1", "--save-every", "10000"]
    proc = subprocess.Popen([*torchrun, "-m", "rdm_fast.train", *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        log = out / "log.jsonl"
        deadline = time.time() + 240
        while not (log.exists() and len(log.read_text().splitlines()) >= 2) and time.time() < deadline:
            time.sleep(0.2)
        assert log.exists(), "the run did not start"
        rank1 = [pid for pid in _children(proc.pid) if "RANK=1" in _environ(pid)]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # torchrun reports the stop status as a failure, and ends the workers still running once one has exited
    assert proc.returncode != 0 and f"exitcode  : {train.STOPPED}" in err, err[-3000:]
    step = int((out / "latest").read_text().split("_")[1])
    assert 2 <= step < 10_000 and "[rank 1] rdm_fast.train: SIGTERM: stopping after this step" in err
    assert json.loads(log.read_text().splitlines()[-1])["step"] == step  # rank 0 logged and saved the stop step
    assert train.main(_args(setup, out, "--resume", steps=step + 1, batch=4)) == 0  # one process, same global batch
    assert (out / "latest").read_text().strip() == f"step_{step + 1:07d}"


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _environ(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace")
    except OSError:
        return ""


def _training_inputs(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Record the clean latents and contexts every training micro-batch feeds the loss (from the next run on: the
    spy wraps the library's own function, not an earlier spy)."""
    seen, real = [], eps_losses

    def spy(unet, schedule, x0, context, t, noise):
        seen.append({"x0": x0.detach().clone(), "context": context.detach().clone(), "t": t.clone()})
        return real(unet, schedule, x0, context, t, noise)

    monkeypatch.setattr(train, "eps_losses", spy)
    return seen


def test_cached_moments_are_the_encoder_outputs(setup, tmp_path, monkeypatch):
    """--latents stores what the first stage makes of each replayed crop, trains on the latents the images give
    (up to the float16 storage), is reused by later runs without the images, and refuses a first stage it was not
    made with."""
    cache = tmp_path / "latents"
    inputs = {}
    for name, extra in (("images", ()), ("cached", ("--latents", str(cache))),
                        ("again", ("--latents", str(cache), "--image-root", str(tmp_path)))):  # no images there
        inputs[name] = _training_inputs(monkeypatch)
        assert train.main(_fresh(setup, tmp_path / name, *extra, steps=2)) == 0
    torch.manual_seed(0)  # the first stage a run with --seed 0 starts from
    model = RDM.from_config(RDMConfig.resolve(setup["cfg"]))
    images = TrainingImages(Database.open(setup["db"], backend="torch", device="cpu"), 32)
    pixels = torch.stack([images[i]["pixels"] for i in range(len(images))]).float() / 127.5 - 1
    with torch.no_grad():
        want = model.encode_moments(pixels)
    stored = TrainingMoments(MomentCache(cache, {}))
    torch.testing.assert_close(torch.stack([stored[i]["moments"] for i in range(len(stored))]), want, rtol=2e-3,
                               atol=1e-4)
    assert stored.readable().all()
    for a, b, c in zip(inputs["images"], inputs["cached"], inputs["again"], strict=True):
        torch.testing.assert_close(b["x0"], a["x0"], rtol=5e-3, atol=5e-4)  # float16 moments, the same KL draw
        assert torch.equal(c["x0"], b["x0"]) and torch.equal(b["context"], a["context"])
    assert len(inputs["again"]) == 2 and json.loads((tmp_path / "again" / "log.jsonl").read_text())["unreadable"] == 0
    with pytest.raises(ValueError, match="first_stage"):  # another seed: another random first stage
        train.main(_fresh(setup, tmp_path / "other", "--latents", str(cache), "--seed", "1", steps=1))


def test_latents_cache_refuses_another_training_database_of_as_many_entries(setup, tmp_path):
    """A --latents cache holds the first stage's outputs of one training database's crops: a run on another
    database of the same count (the same images cropped with another seed) is refused, not given those latents."""
    cache = tmp_path / "latents"
    assert train.main(_fresh(setup, tmp_path / "first", "--latents", str(cache), steps=1)) == 0
    other = build_database(tmp_path / "db", encoder=TinyEncoder(), images=setup["root"] / "imgs", crop="random",
                           crop_size=32, batch_size=4, workers=0, device="cpu", progress=False, seed=1)
    ids, scores = compute_neighbors(Database.open(other, backend="torch", device="cpu"), k=3, exclude_self=True,
                                    progress=False)
    save_neighbors(tmp_path / "nn.npz", ids, scores)
    argv = _fresh(setup, tmp_path / "second", "--latents", str(cache), steps=1)
    for flag, value in (("--training-db", other), ("--db", other), ("--neighbors", tmp_path / "nn.npz")):
        argv[argv.index(flag) + 1] = str(value)
    with pytest.raises(ValueError, match="first-stage outputs of another training_db"):
        train.main(argv)


def test_resume_without_the_latents_cache_says_to_pass_it_again(setup, tmp_path, caplog):
    """A run trained from a --latents cache and resumed without it decodes images each step: the warning names the
    cache and the remedy (it said "cached_moments True -> False")."""
    cache = tmp_path / "latents"
    assert train.main(_fresh(setup, tmp_path / "run", "--latents", str(cache), steps=2)) == 0
    with caplog.at_level("WARNING", logger="rdm_fast"):
        assert train.main(_args(setup, tmp_path / "run", "--resume", steps=3)) == 0
    assert f"the run trained from a --latents cache ({cache.resolve()}); without --latents each step decodes" \
        in caplog.text and "cached_moments" not in caplog.text


def test_damaged_cache_files_are_named_when_the_cache_is_opened(setup, tmp_path, monkeypatch):
    """A damaged --latents cache failed with errors naming no file ("mmap length is greater than file size"), some
    only at the first training step; each damage is now named when the cache is opened, with the fix."""
    cache = tmp_path / "latents"
    assert train.main(_fresh(setup, tmp_path / "run", "--latents", str(cache), steps=1)) == 0
    moments, readable = next(cache.glob("moments_*.npy")), next(cache.glob("readable_*.npy"))
    full = np.load(moments)

    def damaged(name, damage):
        copy = tmp_path / name
        shutil.copytree(cache, copy)
        damage(copy)
        return copy

    cases = [("json", lambda d: (d / "manifest.json").write_text("{"), r"manifest.json is damaged \(Expecting"),
             ("list", lambda d: (d / "manifest.json").write_text("[]"), r"manifest.json is damaged \(not a JSON object"),
             ("float32", lambda d: np.save(d / moments.name, full.astype(np.float32)),
              rf"{moments.name} holds float32 \(.*not the float16"),
             ("flags", lambda d: (d / readable.name).unlink(), rf"{readable.name} is missing: delete"),
             ("cut", lambda d: (d / moments.name).write_bytes(moments.read_bytes()[:400]),
              rf"{moments.name} cannot be read \(.*\): delete .*cut to encode the images again"),
             ("shape", lambda d: np.save(d / moments.name, full[:, :2]),
              rf"{moments.name} holds float16 \({full.shape[0]}, 2, .*not the float16 \({full.shape[0]}, "
              rf"{full.shape[1]}, .* that manifest.json records"),
             ("gone", lambda d: (d / moments.name).unlink(), rf"{moments.name} is missing: delete")]
    for name, damage, message in cases:
        with pytest.raises(ValueError, match=message):
            TrainingMoments(MomentCache(damaged(name, damage), {}))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"--latents .*photos holds 1 other file \(e.g. cat.png\): give the cache"):
        train.main(_fresh(setup, tmp_path / "run3", "--latents", str(tmp_path / "photos"), steps=1))
    with pytest.raises(ValueError, match=r"is missing: delete"):  # the run stops before its first step
        train.main(_fresh(setup, tmp_path / "run2", "--latents", str(tmp_path / "gone"), steps=1))
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_interrupted_cache_fill_leaves_no_shard(setup, tmp_path, monkeypatch, caplog):
    """An error while encoding leaves neither a shard under its final name nor a temporary file; files of a fill
    that was killed outright are reported (not deleted: another run may be filling the cache)."""
    cache = tmp_path / "latents"
    real, calls = RDM.encode_moments, []

    def failing(self, pixels):
        calls.append(1)
        if len(calls) > 2:  # the shape probe and one batch go through
            raise RuntimeError("interrupted")
        return real(self, pixels)

    monkeypatch.setattr(RDM, "encode_moments", failing)
    args = _fresh(setup, tmp_path / "run", "--latents", str(cache), steps=1, batch=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        train.main(args)
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(RDM, "encode_moments", real)
    (cache / "moments_killed_0.npy").write_bytes(b"\0" * 1000)
    assert train.main(_fresh(setup, tmp_path / "run2", "--latents", str(cache), steps=1)) == 0
    assert "holds files of unfinished fills (1, 0.0 GiB)" in caplog.text and (cache / "moments_killed_0.npy").exists()
    assert TrainingMoments(MomentCache(cache, {})).readable().all()


def test_a_cache_filled_by_several_processes_reads_back_every_entry(setup, tmp_path, monkeypatch):
    """Under torchrun each process encodes its own share into its own shard (every other test fills one): here the
    ranks of a world of 5 in turn (shares of 3 of the 12 entries, the last one empty), ranks 1-4 stopped where
    they would wait for rank 0's manifest. The shares cover every entry once, each shard is filled from its own
    first entry on, the manifest records each shard's entries, and every entry, and whether its image could be
    read, reads back from the right shard (float16 storage: rtol 2e-3, atol 1e-4; the unreadable image's row holds
    what the first stage made of its zero pixels)."""
    from rdm_fast import data

    class Waits(Exception):
        pass

    def no_wait(files):
        raise Waits

    torch.manual_seed(0)
    model = RDM.from_config(RDMConfig.resolve(setup["cfg"]))
    shutil.copytree(setup["root"] / "imgs", tmp_path / "imgs")
    images = TrainingImages(Database.open(setup["db"], backend="torch", device="cpu"), 32, tmp_path / "imgs")
    images.file(1).unlink()  # entry 1, in the first shard, cannot be read
    cache, cpu = tmp_path / "latents", torch.device("cpu")
    for rank in (4, 3, 2, 1, 0):
        procs = SimpleNamespace(world=5, rank=rank, main=rank == 0, from_rank0=lambda value: "run0")
        with monkeypatch.context() as m:
            if rank:
                m.setattr(data, "wait_for_files", no_wait)
            with contextlib.nullcontext() if rank == 0 else pytest.raises(Waits):
                stored = data.cached_moments(cache, model, images, procs, cpu, batch_size=2, workers=0,
                                             progress=False)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 3), (3, 6), (6, 9), (9, 12), (12, 12)]
    pixels = torch.stack([images[i]["pixels"] for i in range(len(images))]).float() / 127.5 - 1
    with torch.no_grad():
        want = model.encode_moments(pixels)
    readable = [i != 1 for i in range(12)]
    assert len(stored) == 12 and stored.readable().tolist() == readable
    got = [stored[i] for i in range(12)]
    assert [item["index"] for item in got] == list(range(12)) and [item["ok"] for item in got] == readable
    torch.testing.assert_close(torch.stack([item["moments"] for item in got]), want, rtol=2e-3, atol=1e-4)


def test_moment_cache_files(tmp_path):
    """MomentCache's bookkeeping: the shares of ``world`` processes cover the entries once, in order, at most one
    share's length apart; check_writable takes a folder of an unfinished cache (shards, hidden temporary files of
    fills and probes) but not one of other files; unfinished_bytes counts and sizes every file besides the
    manifest and write probes."""
    for count in range(14):
        for world in range(1, 6):
            shares = [MomentCache.share(count, world, rank) for rank in range(world)]
            assert [i for share in shares for i in share] == list(range(count)), (count, world)
    cache = MomentCache(tmp_path / "cache", {"count": 4})
    cache.dir.mkdir()
    (cache.dir / "moments_a_0.npy").write_bytes(b"\0" * 1000)
    (cache.dir / "readable_a_0.npy").write_bytes(b"\0" * 24)
    (cache.dir / f".moments_b_0.npy.x1{TEMP_SUFFIX}").write_bytes(b"\0" * 100)  # a fill writing now
    (cache.dir / f".probe.x2{TEMP_SUFFIX}").write_bytes(b"")  # another process's write probe
    cache.check_writable()
    assert cache.unfinished_bytes() == (3, 1124)
    (cache.dir / "cat.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds 1 other file \(e.g. cat.png\)"):
        cache.check_writable()
    # a manifest.json of another kind (a database's, --latents given a database by mistake) is no cache of other
    # data, which the error told the user to delete ("holds first-stage outputs of another format, ...")
    other = MomentCache(tmp_path / "db", {"count": 4})
    other.dir.mkdir()
    (other.dir / "manifest.json").write_text(json.dumps({"format": "rdm_fast-database", "count": 4}))
    with pytest.raises(ValueError, match=r"^--latents .*db holds a manifest.json that is not a first-stage cache's "
                                         r"\(format 'rdm_fast-database'\): give the cache a folder of its own$"):
        other.manifest()


@pytest.mark.parametrize("stop", ["ctrl-c", "overflow"])
def test_a_cache_fill_that_stops_leaves_no_shard(setup, tmp_path, monkeypatch, stop):
    """A fill that stops leaves no files, also when its moments were already stored: at Ctrl-C while rank 0 waits
    for the other processes' shards (a KeyboardInterrupt, not an Exception), and at outputs that float16 cannot hold
    (finite in float32, infinite once stored), which are refused. Each fill has its own run token: its files would
    never be used."""
    from rdm_fast import data

    if stop == "ctrl-c":
        def interrupted(files):
            assert all(f.exists() for f in files)  # this process's shard is written
            raise KeyboardInterrupt

        monkeypatch.setattr(data, "wait_for_files", interrupted)
        error, match = KeyboardInterrupt, None
    else:
        real = RDM.encode_moments
        monkeypatch.setattr(RDM, "encode_moments", lambda self, pixels: real(self, pixels) * 1e6)
        error, match = ValueError, "the first stage's outputs are not finite in float16: train without --latents"
    model = RDM.from_config(RDMConfig.resolve(setup["cfg"]))
    images = TrainingImages(Database.open(setup["db"], backend="torch", device="cpu"), 32)
    procs = SimpleNamespace(world=1, rank=0, main=True, from_rank0=lambda value: value)
    with pytest.raises(error, match=match):
        data.cached_moments(tmp_path / "latents", model, images, procs, torch.device("cpu"), batch_size=4,
                            workers=0, progress=False)
    assert list((tmp_path / "latents").iterdir()) == []


def test_wait_for_files_waits_for_every_file(tmp_path, monkeypatch):
    """Rank 0 waits until every process's shard exists, not the first one (the sleep is where another process
    would write the missing file)."""
    from rdm_fast import data

    files = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    files[0].write_bytes(b"")
    sleeps = []

    def sleep(seconds):
        files[len(sleeps) + 1].write_bytes(b"")
        sleeps.append(seconds)

    monkeypatch.setattr(data.time, "sleep", sleep)
    data.wait_for_files(files, poll=0.5)
    assert sleeps == [0.5, 0.5]


def test_cache_made_with_unreadable_images_says_so(setup, tmp_path, caplog, monkeypatch):
    """An image that cannot be read is named, marked in the cache and left out of the loss (a batch of all 12
    entries: the logged loss is the mean over the 11 others)."""
    partial = tmp_path / "imgs"
    shutil.copytree(setup["root"] / "imgs", partial)
    missing = TrainingImages(Database.open(setup["db"], backend="torch", device="cpu"), 32, partial).file(0)
    missing.unlink()
    seen, real = [], train.eps_losses

    def spy(unet, schedule, x0, context, t, noise):
        losses = real(unet, schedule, x0, context, t, noise)
        seen.append((context.detach().clone(), losses.detach().clone()))
        return losses

    monkeypatch.setattr(train, "eps_losses", spy)
    args = _fresh(setup, tmp_path / "run", "--latents", str(tmp_path / "cache"), "--image-root", str(partial),
                  steps=1, batch=12)
    assert train.main(args) == 0
    assert "1 training images could not be read when it was made" in caplog.text
    readable = np.concatenate([np.load(f) for f in sorted((tmp_path / "cache").glob("readable_*.npy"))])
    assert readable.sum() == len(readable) - 1
    (context, losses), = seen
    own = TrainingContexts(RDMConfig.resolve(setup["cfg"]), setup["db"], setup["db"], setup["nn"])(torch.tensor([0]))
    unread = (context == own).flatten(1).all(1)
    assert int(unread.sum()) == 1
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text())["loss"]
    assert logged == pytest.approx(float(losses[~unread].double().mean()), rel=1e-6)


def test_context_drop_zeroes_whole_contexts(setup, tmp_path, monkeypatch):
    seen = []
    real = train.eps_losses

    def spy(unet, schedule, x0, context, t, noise):
        seen.append(context.detach().clone())
        return real(unet, schedule, x0, context, t, noise)

    monkeypatch.setattr(train, "eps_losses", spy)
    assert train.main(_fresh(setup, tmp_path / "run", "--cond-drop", "0.3", steps=3, batch=4)) == 0
    rows = torch.cat(seen).flatten(1)
    dropped = (rows == 0).all(1)
    assert 0 < int(dropped.sum()) < len(rows)  # 12 draws at p = 0.3 (fixed seed): some of each
    assert bool((rows[~dropped] != 0).all())
    # exactly the images whose drop draw is below p (an inverted test drops others, and at the default p = 0 would
    # drop every context; p is not 0.5, where a drop with probability 1 - p is the same test)
    cfg = RDMConfig.resolve(setup["cfg"])
    model = SimpleNamespace(config=cfg, schedule=SimpleNamespace(num_timesteps=1000))
    draws = torch.cat([train.sample_draws(0, step, range(4), model, torch.device("cpu"))["drop"] for step in range(3)])
    assert torch.equal(dropped, draws < 0.3)
    # the others are the contexts of the batch's own images (not, e.g., of the next entries')
    entries = torch.cat([TrainingOrder(12, seed=0, batch=4).micro_batch(step, 0) for step in range(3)])
    want = TrainingContexts(cfg, setup["db"], setup["db"], setup["nn"])(entries).flatten(1)
    torch.testing.assert_close(rows[~dropped], want[~dropped])


def test_first_stage_from_checkpoints(tmp_path):
    source = RDM.from_config("tiny")
    for p in source.first_stage.parameters():
        torch.nn.init.normal_(p)
    names = official_names(source.first_stage)
    ae = {names[k]: v for k, v in source.first_stage.state_dict().items()}
    layouts = {"ldm_autoencoder.ckpt": {**ae, "loss.logvar": torch.zeros(())},
               "rdm_official.ckpt": {f"first_stage_model.{k}": v for k, v in ae.items()},
               "rdm_fast.safetensors": None}
    source.save_pretrained(tmp_path / "own")
    for name, state in layouts.items():
        path = tmp_path / "own" if state is None else tmp_path / name  # a directory, as sample --ckpt takes
        if state is not None:
            torch.save({"state_dict": state}, path)
        target = RDM.from_config("tiny")
        train.load_first_stage(target, str(path))
        for k, v in source.first_stage.state_dict().items():
            assert torch.equal(target.first_stage.state_dict()[k], v), (name, k)
    torch.save({k: v for k, v in ae.items() if not k.startswith("decoder.")}, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match="missing"):
        train.load_first_stage(RDM.from_config("tiny"), str(tmp_path / "partial.ckpt"))


def test_image_size_of_the_presets():
    assert RDMConfig.preset("imagenet").pixel_size == 256
    assert RDMConfig.preset("rdm768").pixel_size == 768
    assert RDMConfig.preset("tiny").pixel_size == 32


def _unet_gradients(device: str, autocast: torch.dtype | None, mode: str = "auto") -> dict[str, torch.Tensor]:
    """Gradients of one eps loss of the tiny UNet with every weight non-zero (nothing hides behind a
    zero-initialised layer), on ``device``, under autocast to ``autocast`` or in float32, in ops ``mode``."""
    torch.manual_seed(0)
    model = RDM.from_config("tiny").train()
    for p in model.unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model = model.to(device)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    ctx, t = torch.randn(3, 4, 64, generator=g), torch.tensor([10, 400, 900])
    with torch.autocast(torch.device(device).type, dtype=autocast or torch.float32, enabled=autocast is not None), \
            ops.use_mode(mode):
        loss = eps_losses(model.unet, model.schedule, x0.to(device), ctx.to(device), t.to(device),
                          noise.to(device)).mean()
    loss.backward()
    return {n: p.grad.detach().cpu().double() for n, p in model.unet.named_parameters()}


@pytest.fixture(scope="module")
def cpu_gradients() -> tuple[dict[str, torch.Tensor], list[str]]:
    """The float32 CPU gradients, and the tensors whose gradients float32 itself determines well: some here are
    small differences of large terms (up to 4e-4 apart between two float32 evaluations that only round
    differently, the auto and the reference ops), which no lower precision can reproduce; the others agree to
    about 1e-6."""
    want, again = _unet_gradients("cpu", None), _unet_gradients("cpu", None, mode="reference")
    stable = [n for n in want if want[n].norm() > 0 and (again[n] - want[n]).norm() <= 1e-5 * want[n].norm()]
    assert len(stable) > 0.8 * len(want)
    return want, stable


def _gradient_errors(got: dict, want: dict, names: list[str]) -> tuple[float, float]:
    """(largest relative error over ``names``, relative error of all gradients together)."""
    worst = max(float((got[n] - want[n]).norm() / want[n].norm()) for n in names)
    total = sum(float((got[n] - want[n]).square().sum()) for n in want) / sum(float(w.square().sum())
                                                                             for w in want.values())
    return worst, total ** 0.5


def _check_against_plain_autocast(got: dict, device: str, autocast: torch.dtype, want: dict, stable: list,
                                  cap: float = 1.0) -> None:
    """Each well-determined gradient within 0.1 (relative L2) of float32, or within twice the distance of the
    plain-PyTorch path under the same autocast on the same device where that is larger (some gradients are small
    differences of large terms; how far a bfloat16 product lands depends on the device's kernels), and within
    ``cap`` in any case; all gradients together within 2e-2 and twice the plain path's distance."""
    plain = _unet_gradients(device, autocast, mode="reference")
    rel = lambda g, n: float((g[n] - want[n]).norm() / want[n].norm())  # noqa: E731
    errors = sorted(((rel(got, n), rel(plain, n), n) for n in stable), reverse=True)
    total, plain_total = _gradient_errors(got, want, stable)[1], _gradient_errors(plain, want, stable)[1]
    assert total < 2e-2 and total < 2 * plain_total + 1e-3, (total, plain_total, errors[:6])
    bad = [e for e in errors if not e[0] < min(cap, max(0.1, 2 * e[1]))]
    assert not bad, (total, plain_total, bad[:6])


def test_bf16_autocast_gradients_track_float32(cpu_gradients):
    """Mixed precision (our ops under autocast) gives the float32 gradients to bfloat16 accuracy. On a CPU with
    AVX-512 BF16 (2026-11-27) norm1's weight gradient in the first transformer was 0.156 off (the plain path:
    0.088): our ops round a norm's input to bfloat16 under autocast, where PyTorch's autocast keeps norms in
    float32; on the previous machine every tensor was within 0.1. Without the C++ extension auto mode runs the
    plain path itself: nothing to compare."""
    if not _extension.cpu_loaded():
        pytest.skip("the C++ extension is not built: auto mode runs the plain path")
    want, stable = cpu_gradients
    _check_against_plain_autocast(_unet_gradients("cpu", torch.bfloat16), "cpu", torch.bfloat16, want, stable,
                                  cap=0.25)


def test_a_resumed_run_keeps_its_checkpoint_and_log_settings(setup, tmp_path):
    """--save-every, --keep, --log-every and --preview are the run's own on resume unless given again (a resume
    without them saved only at the end and logged one averaged line)."""
    out = tmp_path / "run"
    assert train.main(_args(setup, out, "--random-init", "--config", str(setup["cfg"]), "--save-every", "1", "--keep",
                            "2", "--log-every", "1", "--preview", "0", steps=2, bookkeeping=False)) == 0
    assert train.main(_args(setup, out, "--resume", steps=4, bookkeeping=False)) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003", "step_0000004"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (out / "samples").exists()
    run_info = json.loads((out / "run.json").read_text())
    assert (run_info["save_every"], run_info["keep"], run_info["log_every"], run_info["preview"]) == (1, 2, 1, 0)


def test_warm_up_follows_the_configs_scheduler(setup, tmp_path, caplog):
    """The learning rate of each step as the released configs' scheduler_config (LDM's LambdaLinearScheduler:
    f = (f_max - f_start) / W * n + f_start for step n < W, then f_max = f_min = 1) sets it, with W from the config
    by default and from --warmup where given; the run records it, and a resume with the same --config keeps it."""
    tree = yaml.safe_load(setup["cfg"].read_text())
    tree["model"]["params"]["scheduler_config"] = {"target": "ldm.lr_scheduler.LambdaLinearScheduler", "params": {
        "warm_up_steps": [3], "cycle_lengths": [10000000000000], "f_start": [1e-6], "f_max": [1.0], "f_min": [1.0]}}
    cfg = tmp_path / "warm.yaml"
    cfg.write_text(yaml.safe_dump(tree))

    def official(n, warm_up):
        f_start, f_max, f_min, cycle = 1e-6, 1.0, 1.0, 10000000000000
        f = (f_max - f_start) / warm_up * n + f_start if n < warm_up else f_min + (f_max - f_min) * (cycle - n) / cycle
        return 1e-4 * f

    caplog.set_level("INFO", logger="rdm_fast.train")
    for extra, warm_up in (((), 3), (("--warmup", "2"), 2)):
        out = tmp_path / f"run{warm_up}"
        argv = _args(setup, out, "--random-init", "--config", str(cfg), "--log-every", "1", *extra, steps=4)
        assert train.main(argv) == 0
        lrs = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines()]
        assert lrs == pytest.approx([official(n, warm_up) for n in range(4)], rel=1e-12, abs=0)
        assert json.loads((out / "run.json").read_text())["warmup"] == warm_up
    assert "--warmup 3 (the config's scheduler_config, the released training recipe): the learning rate reaches " \
        "--lr at step 3" in caplog.text
    assert train.main(_args(setup, tmp_path / "run3", "--resume", "--config", str(cfg), steps=5)) == 0
    # a run whose config has no warm-up (as runs saved before it was read) resumes with a config that has one,
    # keeping its own: at step 1, within the config's warm-up, the rate is --lr
    plain = tmp_path / "plain"
    assert train.main(_args(setup, plain, "--random-init", "--config", str(setup["cfg"]), "--log-every", "1",
                            steps=1)) == 0
    assert train.main(_args(setup, plain, "--resume", "--config", str(cfg), "--log-every", "1", steps=2)) == 0
    assert [json.loads(line)["lr"] for line in (plain / "log.jsonl").read_text().splitlines()] == [1e-4, 1e-4]


def test_mixed_precision_runs(setup, tmp_path):
    """bf16 and fp16 runs (with checkpointing, clipping and warm-up) run and stay finite, and a run resumes in
    another precision (fp16's loss scale starts or is dropped). Their accuracy: the gradient test above."""
    extra = ("--grad-clip", "1.0", "--warmup", "2", "--log-every", "1")
    for precision in ("--bf16", "--fp16"):
        out = tmp_path / precision
        assert train.main(_fresh(setup, out, *extra, precision, "--grad-checkpoint", steps=2)) == 0
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["lr"] for r in log] == pytest.approx([1e-4 * 1e-6, 1e-4 * (1e-6 + (1 - 1e-6) / 2)], rel=1e-12)
        assert all(np.isfinite(r["loss"]) for r in log)
        assert all(torch.isfinite(w).all() for w in _weights(out, 2).values())
    other = {"--bf16": "--fp16", "--fp16": "--bf16"}
    for precision in other:  # into fp16 (a loss scale starts) and out of it
        log = tmp_path / precision / "log.jsonl"
        with open(log, "a") as f:  # a line logged after the checkpoint by a run that was then killed
            f.write(json.dumps({"step": 7, "loss": 0.5}) + "\n")
        assert train.main(_args(setup, tmp_path / precision, "--resume", other[precision], steps=3)) == 0
        assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("precision, dtype", [("--bf16", torch.bfloat16), ("--fp16", torch.float16), (None, None)])
def test_precision_runs_the_loss_under_autocast(setup, tmp_path, monkeypatch, precision, dtype):
    """--bf16 and --fp16 run the UNet's passes under autocast in that dtype, and a float32 run under none. A loop
    that never entered autocast trained every precision in float32 and passed the tests above (finite losses)."""
    real, seen = train.eps_losses, []

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "eps_losses", spy)
    assert train.main(_fresh(setup, tmp_path / "run", *([precision] if precision else []), steps=2)) == 0
    assert seen == [dtype, dtype]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_gradients_match_cpu(cpu_gradients, precision, monkeypatch):
    """One backward pass on the GPU (our Triton attention forward and backward; TF32 off for float32) against
    the CPU float32 one. In bfloat16 each tensor's gradient must be within 0.1 (relative L2) of float32, or within
    twice the distance of the plain-PyTorch path on the same GPU (autocast, with attention in float32) where that
    is larger: some gradients are small differences of large terms. On an H200 (2026-11-27) the self-attention's
    to_q/to_k gradients were 0.28 off against 0.03 for that path: the Triton backward took its delta from the
    16-bit output (fixed; ``kernels/attention.py``)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    want, stable = cpu_gradients
    autocast = None if precision == "fp32" else torch.bfloat16
    got = _unet_gradients("cuda", autocast)
    if autocast is None:
        worst, total = _gradient_errors(got, want, stable)
        assert worst < 1e-4 and total < 1e-5, (worst, total)
        return
    _check_against_plain_autocast(got, "cuda", autocast, want, stable)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_run_sees_the_cpu_run_data(setup, tmp_path):
    """A run on the GPU draws the same noise as on the CPU: at the first step the zero-initialised output layer
    makes eps zero, so the loss is the mean square of the drawn noise. It stays finite in bf16 and draws its
    preview samples there."""
    assert train.main(_fresh(setup, tmp_path / "cpu", "--log-every", "1", steps=1)) == 0
    args = _fresh(setup, tmp_path / "gpu", "--log-every", "1", "--bf16", "--preview", "2", steps=2)
    args[args.index("--device") + 1] = "cuda"
    assert train.main(args) == 0
    cpu, gpu = (json.loads((tmp_path / r / "log.jsonl").read_text().splitlines()[0]) for r in ("cpu", "gpu"))
    assert abs(gpu["loss"] - cpu["loss"]) <= 1e-6 * cpu["loss"], (gpu, cpu)
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path / "gpu", 2).values())
    assert (tmp_path / "gpu" / "samples" / "step_0000002.png").is_file()


def test_training_checkpoint_exports_to_the_official_layout(setup, tmp_path):
    """convert --to official: the training weights under model.diffusion_model., the EMA ones as LitEma's
    model_ema. copy; the official loader reads either back (EMA by default)."""
    from rdm_fast import convert

    run = tmp_path / "run"
    assert train.main(_fresh(setup, run, "--ema-decay", "0.99", steps=2)) == 0
    assert convert.main([str(run), "--out", str(tmp_path / "official"), "--to", "official"]) == 0
    state = torch.load(tmp_path / "official" / "model.ckpt", weights_only=True)["state_dict"]
    assert int(state["model_ema.num_updates"]) == 2 and any(k.startswith("first_stage_model.") for k in state)
    assert state["model_ema.decay"].item() == pytest.approx(0.99)  # the run's, not LitEma's default
    ema = load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    raw = _weights(run, 2)
    back_ema = RDM.from_pretrained(tmp_path / "official")  # config.yaml beside it
    back_raw = RDM.from_pretrained(tmp_path / "official" / "model.ckpt", tmp_path / "official" / "config.yaml",
                                   use_ema=False)
    for name, tensor in back_ema.unet.state_dict().items():
        assert torch.equal(tensor, ema[f"unet.{name}"]), name
        assert torch.equal(back_raw.unet.state_dict()[name], raw[name]), name
    assert not all(torch.equal(raw[n], ema[f"unet.{n}"]) for n in raw)  # two different sets of weights


def test_runs_start_from_init_or_first_stage(setup, tmp_path):
    """--init starts from a checkpoint's (EMA) weights, config included; --first-stage from a new UNet of --config
    (seeded) on the given autoencoder."""
    source = tmp_path / "source"
    assert train.main(_fresh(setup, source, steps=1)) == 0
    ema = RDM.from_pretrained(source)
    parser = train.build_parser()
    base = [*_args(setup, tmp_path / "new"), "--seed", "0"]  # main fills in a default seed; build_model takes it
    started = train.build_model(parser.parse_args([*base, "--init", str(source)]))
    assert started.config == ema.config
    assert all(torch.equal(a, b) for a, b in zip(started.state_dict().values(), ema.state_dict().values(), strict=True))
    fresh = train.build_model(parser.parse_args([*base, "--first-stage", str(source), "--config", str(setup["cfg"])]))
    assert all(torch.equal(a, b) for a, b in zip(fresh.first_stage.state_dict().values(),
                                                 ema.first_stage.state_dict().values(), strict=True))
    torch.manual_seed(0)
    seeded = RDM.from_config(RDMConfig.resolve(setup["cfg"])).unet.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(fresh.unet.state_dict().values(), seeded.values(), strict=True))


def test_sigterm_stops_with_a_checkpoint_and_resumes(setup, tmp_path):
    """A scheduler's SIGTERM to the whole job (trainer and data-loading workers) ends the run after the current
    step with a checkpoint of that step and exit status 143; --resume continues from it."""
    out = tmp_path / "run"
    args = _fresh(setup, out, steps=10_000) + ["--workers", "2", "--log-every", "1", "--save-every", "10000"]
    proc = subprocess.Popen([sys.executable, "-m", "rdm_fast.train", *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == train.STOPPED, err[-2000:]
    step = int((out / "latest").read_text().split("_")[1])
    assert 2 <= step < 10_000 and f"continue with python -m rdm_fast.train --out {out} --resume --steps 10000" in err
    assert train.main(_args(setup, out, "--resume", steps=step + 1)) == 0
    assert (out / "latest").read_text().strip() == f"step_{step + 1:07d}"


def test_a_batch_larger_than_the_data_is_warned_about(setup, tmp_path, caplog):
    assert train.main(_fresh(setup, tmp_path / "run", steps=1, batch=16)) == 0
    assert any("global batch (16) is larger than the 12 training images" in r.getMessage() for r in caplog.records)


def test_resume_names_a_damaged_saved_setting(setup, saved_run, tmp_path):
    """A resumed run takes the settings it is not given from its checkpoint: a damaged one is named."""
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    state_file = out / "checkpoints" / "step_0000004" / TRAIN_STATE_FILE
    state = json.loads(state_file.read_text())
    state["run"]["lr"] = "fast"
    state_file.write_text(json.dumps(state))
    with pytest.raises(train.CLIError, match=r"state.json records lr = 'fast', not a float: pass --lr"):
        train.main(_args(setup, out, "--resume", steps=6))
    assert train.main(_args(setup, out, "--resume", "--lr", "1e-4", steps=5)) == 0  # given: the saved one is unused
