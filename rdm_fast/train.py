"""``python -m rdm_fast.train``: train an RDM's UNet on images and the embeddings of their neighbours.

The objective is the released models' (eps prediction, MSE; :mod:`rdm_fast.diffusion.training`); the first-stage
autoencoder is frozen and encodes each batch on the fly, or once for all with ``--latents``; the data is a
training database, a retrieval database and precomputed neighbours (:mod:`rdm_fast.data`). One process or many:
``torchrun --nproc_per_node N -m rdm_fast.train ...`` runs data-parallel (DistributedDataParallel; NCCL on GPUs,
Gloo on CPUs).

Every step's batch comes from (``--seed``, step) and every image's timestep and noise from (``--seed``, step,
position in the global batch), on any device, so the run does not depend on how the global batch is split over
processes and ``--accumulate`` micro-batches, and ``--resume`` continues exactly where a checkpoint left off
(also on another number of processes, as long as the global batch stays the same). A UNet with dropout draws
its masks from torch's global generator, seeded before each micro-batch from (``--seed``, step, micro-batch,
process): a resume with the same split stays exact, but the masks depend on the split. AdamW (PyTorch's defaults
apart from ``--lr`` and ``--weight-decay``, as the reference trains) updates float32 weights; ``--bf16``/``--fp16``
run the forward and backward passes under autocast (fp16 with loss scaling). An exponential moving average of the
weights follows LitEma (decay min(``--ema-decay`` (0.9999), (1 + n) / (10 + n)) at update n). SIGTERM or a first
Ctrl-C stops after the current step with a checkpoint.

``--out`` receives ``checkpoints/step_XXXXXXX/`` (each written under a temporary name, flushed to disk and
renamed, the newest named in ``latest``): ``model.safetensors`` + ``config.json`` hold the EMA weights with the
first stage, in rdm_fast's format (``python -m rdm_fast.sample --ckpt`` takes the directory, or the run's); the
training weights, ``optimizer.pt`` and ``state.json`` let training resume. Also ``log.jsonl`` (loss, learning rate,
images/s, unreadable images, wall-clock time), ``run.json`` (the run's data and settings, and the arguments) and
``samples/step_XXXXXXX.png`` (EMA samples of the first training contexts).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import RDM
from . import checkpoint as ckpt
from ._cli import (CLIError, HelpFormatter, add_max_image_pixels, check_out_dir, claim_out_dir, parse_args, run,
                   summary)
from ._distributed import Processes, process_device
from ._files import atomic_write, atomic_write_json, fsync_path, naming_failed_writes, remove_stale_temps
from .config import WARM_UP_START, RDMConfig, preset_names
from .data import (DRAWS, DROPOUT, TrainingContexts, TrainingImages, TrainingOrder, cached_moments, derived_seed,
                   existing_neighbors_file)
from .diffusion import eps_losses
from .images import grid, save_png, to_uint8
from .models.layers import official_names
from .retrieval.context import locate_database

log = logging.getLogger("rdm_fast.train")

MEMORY_ADVICE = ("lower --batch-size and raise --accumulate by the same factor (the same global batch, also "
                 "with --resume), or add --grad-checkpoint")  # after an out-of-memory error
LOG = "log.jsonl"
MOVED_CHECK = 16  # training images looked for, spread over the training database, before a run starts
STOPPED = 128 + int(signal.SIGTERM)  # exit status of a run stopped by a signal (with a checkpoint)
OPTIMIZER = "optimizer.pt"
# how a run's random draws (batch order, noise, dropout) are derived from its seed; a run saved with other ones
# cannot resume exactly (1: before the draws got purpose tags and dropout its seeds)
DRAWS_VERSION = 2
# what fixes the batches and draws of every step: a resumed run must keep these (the data by content) ...
RESUME_KEYS = ("seed", "global_batch", "training_data", "random_crop")
RESUME_DEFAULTS = {"random_crop": False}  # what runs saved before a key existed did
# ... and may change these (with a warning: the run is then not the one an uninterrupted run would be)
CHANGEABLE_KEYS = ("lr", "weight_decay", "warmup", "cond_drop", "grad_clip", "ema_decay", "precision",
                   "training_db", "db", "neighbors", "cached_moments")
# the data a run trains on: a resumed run's own unless given again
DATA_KEYS = ("training_db", "db", "neighbors")
# the batch, seed and optimisation settings' defaults for a new run; a resumed run keeps its own unless given again
# (--warmup's default is the model config's warm_up_steps, set once the model is known)
SETTING_DEFAULTS = {"lr": 1e-4, "weight_decay": 0.01, "grad_clip": 0.0, "ema_decay": 0.9999,
                    "cond_drop": 0.0, "precision": "fp32", "batch_size": 8, "accumulate": 1, "seed": 0,
                    "save_every": 1000, "keep": 3, "log_every": 50, "preview": 8}


# ---------------------------------------------------------------------------------------------- EMA
class EMA:
    """An exponential moving average of a module's trainable weights, as LitEma keeps it: at the n-th update
    (n from 1) ``shadow += (1 - d) * (weight - shadow)`` with ``d = min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, module: nn.Module, decay: float = 0.9999) -> None:
        if not 0 <= decay <= 1:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.updates = decay, 0
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self._params(module)]

    def _params(self, module: nn.Module) -> list[Tensor]:
        params = dict(module.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average towards ``module``'s current weights (one optimiser step's update)."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.float() for p in self._params(module)], 1.0 - d)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights (float32) by parameter name."""
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, tensors: dict[str, Tensor], updates: int) -> None:
        """Restore the averaged weights and the update count of a saved run (CheckpointError if any is missing)."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ckpt.CheckpointError(f"the EMA weights lack {ckpt.describe(missing)}")
        for n, s in zip(self.names, self.shadow):
            s.copy_(tensors[n])
        self.updates = updates

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """The module holds the averaged weights inside the block, its own ones again after it."""
        params = self._params(module)
        with torch.no_grad():
            kept = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, kept)


# ---------------------------------------------------------------------------------------------- stopping
class StopRequest:
    """SIGTERM (a scheduler's preemption) or a first Ctrl-C asks the run to stop after the current step with a
    checkpoint; a second Ctrl-C interrupts at once. Installed for the duration of a ``with`` block (main thread)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s: stopping after this step, with a checkpoint%s", signal.Signals(signum).name,
                    " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # an ignored signal (inherited, nohup) stays ignored
                self._previous[sig] = signal.signal(sig, self._handle)
            else:  # e.g. `cmd &` in a script: the shell makes background jobs ignore SIGINT
                log.info("%s is ignored in this process (inherited): it does not stop the run%s",
                         signal.Signals(sig).name, "; SIGTERM does" if sig == signal.SIGINT else "")
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be restored
                signal.signal(sig, handler)


class StopVote:
    """The processes' agreement on a stop request: each step casts a vote, and the next step reads it. The vote's
    all-reduce is queued behind the step that cast it, so reading it waits for that step only, never for the one
    in flight (no stall of the GPU's queue), and every process reads the same result, so all stop at one step."""

    def __init__(self, procs: Processes, device: torch.device) -> None:
        self.procs = procs
        self.ballot = torch.zeros(1, dtype=torch.int32, device=device)
        cuda = device.type == "cuda"
        self.result = torch.zeros(1, dtype=torch.int32, pin_memory=cuda)
        self.ready = torch.cuda.Event() if cuda else None
        self.pending = False

    def cast(self, requested: bool) -> bool:
        """Vote ``requested`` after the step just queued; True when a process had asked to stop by the step
        before it (at once with a single process)."""
        if self.procs.world == 1:
            return requested
        agreed = self.settle()
        self.ballot.fill_(int(requested))
        self.procs.all_sum(self.ballot)  # NCCL: the stream waits for it, not the host
        self.result.copy_(self.ballot, non_blocking=True)
        if self.ready is not None:
            self.ready.record()
        self.pending = True
        return agreed

    def settle(self) -> bool:
        """Wait for the vote in flight (if any); True when some process voted to stop."""
        if not self.pending:
            return False
        if self.ready is not None:
            self.ready.synchronize()
        self.pending = False
        return int(self.result.item()) > 0


def _ignore_stop_signals(worker: int) -> None:
    """Data-loading workers leave SIGTERM/SIGINT to the trainer (a scheduler signals every process of the job;
    a worker that died of it would fail the step the trainer is finishing before its checkpoint)."""
    for sig in StopRequest.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------- model
def load_first_stage(model: RDM, path: str, allow_pickle: bool = False) -> None:
    """Load the autoencoder weights of an official latent-diffusion autoencoder checkpoint, an official RDM
    checkpoint (``first_stage_model.*``) or an rdm_fast file (``first_stage.*``) into ``model``."""
    state, _ = ckpt.read_state_dict(ckpt.resolve_file(path), allow_pickle=allow_pickle)
    ours = model.first_stage.state_dict()
    official = official_names(model.first_stage)
    for prefix, names in ((ckpt.FIRST_STAGE_PREFIX, official), ("first_stage.", {k: k for k in ours}),
                          ("", official)):
        if any(prefix + off in state for off in names.values()):
            break
    expected = {prefix + names[k]: tuple(v.shape) for k, v in ours.items()}
    ckpt.match_state_dict(state, expected, f"{path} (first stage)")
    model.first_stage.load_state_dict({k: state[prefix + names[k]] for k in ours})
    log.info("loaded the first stage from %s", path)


def build_model(args: argparse.Namespace) -> RDM:
    """The model a fresh run starts from (``--init``, ``--first-stage`` or ``--random-init``), float32 on CPU."""
    if args.init:
        return RDM.from_pretrained(args.init, args.config, allow_pickle=args.allow_pickle)
    torch.manual_seed(args.seed)
    model = RDM.from_config(args.config)
    if args.first_stage:
        load_first_stage(model, args.first_stage, args.allow_pickle)
    else:
        log.warning("--random-init: the first stage is random too, so the latents mean nothing (smoke runs only)")
    return model


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, step: int, model: RDM, ema: EMA, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, run_info: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` under a temporary name, flush it to disk, rename it into place, point ``latest``
    at it and then remove all but the newest ``keep`` checkpoints (never this one)."""
    from safetensors.torch import save_file

    root = out / ckpt.RUN_CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp, final = root / f".{name}.tmp", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        averaged = dict(model.state_dict())
        averaged.update({f"unet.{k}": v for k, v in ema.state_dict().items()})
        ckpt.save_safetensors(averaged, model.config.to_dict(), tmp)
        raw = {k: v.detach().contiguous().cpu() for k, v in model.unet.state_dict().items()}
        atomic_write(tmp / ckpt.TRAIN_WEIGHTS_FILE, lambda f: save_file(raw, f))
        atomic_write(tmp / OPTIMIZER, lambda f: torch.save({"optimizer": optimizer.state_dict(),
                                                             "scaler": scaler.state_dict()}, f))
        atomic_write_json(tmp / ckpt.TRAIN_STATE_FILE, {"step": step, "ema_updates": ema.updates, "run": run_info})
        for file in tmp.iterdir():
            fsync_path(file)
        fsync_path(tmp)
    except BaseException:  # a full disk: the finished files (the model's size each) would keep it full
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        _remove_checkpoint(final)
    os.replace(tmp, final)
    fsync_path(root)
    atomic_write(out / ckpt.RUN_LATEST, lambda f: Path(f).write_text(name + "\n"), fsync=True)
    fsync_path(out)
    older = [p for s, p in sorted(ckpt.run_checkpoints(root).items()) if s < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        _remove_checkpoint(old)
    return final


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, first renamed to a temporary name: a kill midway never leaves a partial
    checkpoint under a checkpoint's name (the next start removes the temporary folder)."""
    trash = path.with_name(f".{path.name}.old.tmp")  # not the name of a checkpoint being written
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash)


def remove_stale_checkpoints(out: Path, step: int) -> None:
    """Remove the checkpoints after ``step``, where the run (re)starts, and temporary folders of killed writes:
    a kill between a checkpoint's rename and the ``latest`` update, or a ``latest`` rolled back by hand, leaves
    newer checkpoints that the continued run would otherwise keep instead of its own. ``step`` is the resumed
    checkpoint's own (``load_checkpoint`` checks its state.json against its folder name), so that one stays."""
    root = out / ckpt.RUN_CHECKPOINTS
    if not root.is_dir():
        return
    stale = sorted(root.glob(".step_*.tmp")) + [p for s, p in sorted(ckpt.run_checkpoints(root).items()) if s > step]
    for path in stale:
        if path.is_dir():
            log.warning("removing %s: the run continues from step %d", path, step)
            shutil.rmtree(path)


def load_checkpoint(path: Path, model: RDM, ema: EMA, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """Restore the training weights, EMA, optimizer and loss scaler of checkpoint ``path``; returns its state.
    CheckpointError, naming the file, for a missing, truncated or corrupt one."""
    state = ckpt.read_train_state(path / ckpt.TRAIN_STATE_FILE)
    if state["step"] != ckpt.checkpoint_step(path.name):
        raise ckpt.CheckpointError(f"{path / ckpt.TRAIN_STATE_FILE}: step {state['step']} is not the step of its "
                                   f"folder, {path.name}")
    if not isinstance(state.get("run"), dict):
        raise ckpt.CheckpointError(f"{path / ckpt.TRAIN_STATE_FILE} lacks the run's settings: cannot resume from it")
    averaged, _ = ckpt.read_state_dict(path / ckpt.WEIGHTS_FILE)
    model.first_stage.load_state_dict({k[len("first_stage."):]: v for k, v in averaged.items()
                                       if k.startswith("first_stage.")})
    raw, _ = ckpt.read_state_dict(path / ckpt.TRAIN_WEIGHTS_FILE)
    ckpt.match_state_dict(raw, {k: tuple(v.shape) for k, v in model.unet.state_dict().items()},
                          str(path / ckpt.TRAIN_WEIGHTS_FILE))
    model.unet.load_state_dict(raw)
    ema.load_state_dict({k[len("unet."):]: v for k, v in averaged.items() if k.startswith("unet.")},
                        state["ema_updates"])
    saved = _read_optimizer(path / OPTIMIZER)
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise ckpt.CheckpointError(f"{path / OPTIMIZER} does not fit this model's optimizer ({e})") from None
    if scaler.is_enabled() and saved["scaler"]:  # a run that was not fp16 has no loss scale to continue
        scaler.load_state_dict(saved["scaler"])
    return state


def _read_optimizer(file: Path) -> dict[str, Any]:
    """A checkpoint's ``optimizer.pt``: the optimizer's and the loss scaler's states."""
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises anything (KeyError, ValueError, ...)
        raise ckpt.unreadable(file, e) from None
    if not (isinstance(saved, dict) and {"optimizer", "scaler"} <= saved.keys()):
        raise ckpt.CheckpointError(f"{file} does not hold an optimizer and loss scaler state")
    return saved


# ---------------------------------------------------------------------------------------------- the run
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rdm_fast.train", description=summary(__doc__),
                                formatter_class=HelpFormatter)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init", help="start from this RDM checkpoint (official .ckpt or rdm_fast; its EMA weights "
                                      "when it has them): fine-tuning")
    start.add_argument("--first-stage", help="train a new UNet of --config on this autoencoder: an official "
                                             "latent-diffusion autoencoder .ckpt or any RDM checkpoint")
    start.add_argument("--random-init", action="store_true", help="random UNet and first stage (smoke runs only)")
    p.add_argument("--config", help=f"preset ({', '.join(preset_names())}) or config.yaml of the model "
                                    "(with --init: default its own)")
    own = "; a resumed run's own unless given"
    p.add_argument("--training-db", help="database built from the training images (db build): a directory, or its "
                                         f"name in $RDM_FAST_HOME/databases{own}")
    p.add_argument("--db", help=f"retrieval database the neighbours come from (directory or name){own}")
    p.add_argument("--neighbors", help=f"neighbour ids of every training entry (db neighbors){own}")
    p.add_argument("--image-root", help="where the training images are now, if they have moved (without it: the "
                                        "image_root recorded in the database)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, logs and samples")
    add_max_image_pixels(p)
    p.add_argument("--latents", help="directory of the first stage's outputs for every training image, made on first "
                                     "use (all processes share the work) and reused: no image decoding or encoder "
                                     "in the training loop")
    p.add_argument("--random-crop", action="store_true", default=None,
                   help="train on a random window of each image, drawn anew each epoch after its short side is "
                        "resized to the model's image size (the released ImageNet model's augmentation; build the "
                        "training database with --crop center); without it, each entry's database crop. Not with "
                        "--latents; a resumed run keeps its own (given to a run made without it: refused)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out; with --init, --first-stage or --random-init "
                        "too, start the run that way when --out has no checkpoint yet (one command line for the "
                        "first launch and every requeue)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to train to (in all, when resuming)")
    kept = "; a resumed run keeps its own unless given"
    p.add_argument("--batch-size", type=int, help=f"images per process and micro-batch (default 8{kept})")
    p.add_argument("--accumulate", type=int, help=f"micro-batches per optimizer step (default 1{kept})")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default 1e-4{kept})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default 0.01, PyTorch's{kept})")
    p.add_argument("--warmup", type=int,
                   help="steps of linear learning-rate warm-up from 1e-6 x --lr, as the released configs' "
                        "scheduler_config (default: the config's, 100 for imagenet, 10000 for ffhq, else 0"
                        f"{kept})")
    p.add_argument("--grad-clip", type=float, help=f"clip the gradient norm to this (0: off; default 0{kept})")
    p.add_argument("--ema-decay", type=float,
                   help="decay of the weights' moving average: min(this, (1 + n) / (10 + n)) at update n (LitEma; "
                        f"default 0.9999{kept})")
    p.add_argument("--cond-drop", type=float,
                   help="probability of training on the all-zero context that guidance contrasts with (the "
                        "released models: 0; the reference's p_uncond would substitute a learned vector instead; "
                        f"default 0{kept})")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_const", dest="precision", const="bf16",
                      help=f"autocast the passes to bfloat16 (default float32{kept})")
    prec.add_argument("--fp16", action="store_const", dest="precision", const="fp16",
                      help="autocast the passes to float16 (with loss scaling)")
    prec.add_argument("--fp32", action="store_const", dest="precision", const="fp32",
                      help="no autocast: float32 passes (the default of a new run)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in the backward pass")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="run the UNet's training passes through torch.compile (default backend: inductor)")
    p.add_argument("--save-every", type=int, help=f"steps between checkpoints (and at the end; default 1000{kept})")
    p.add_argument("--keep", type=int, help=f"checkpoints kept (default 3{kept})")
    p.add_argument("--log-every", type=int, help=f"steps between log lines (default 50{kept})")
    p.add_argument("--preview", type=int,
                   help=f"EMA samples drawn at each checkpoint but a signal's stop (0: none; default 8{kept})")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loading processes per training process (default: 4, or the CPU count if lower)")
    p.add_argument("--seed", type=int, help="seed of the batch order, the noise and dropout draws and a new UNet's "
                                            f"weights (default 0{kept})")
    p.add_argument("--device", default="auto",
                   help="auto (this process's GPU, else the CPU), cpu, cuda or cuda:N (not under torchrun)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle checkpoints with Python objects (runs code from the file: trusted files only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in batch jobs' logs)")
    return p


def _fill_settings(args: argparse.Namespace, resume_from: Path | None) -> None:
    """Set the data and optimisation settings not given on the command line: a resumed run's own (so a requeue that
    leaves one out does not change the run), a new run's defaults."""
    saved: dict[str, Any] = {}
    if resume_from is not None:
        with _older_checkpoints_hint(resume_from, Path(args.out)):
            run = ckpt.read_train_state(resume_from / ckpt.TRAIN_STATE_FILE).get("run")
        saved = run if isinstance(run, dict) else {}
    for key, default in SETTING_DEFAULTS.items():
        if getattr(args, key) is None:
            value = saved.get(key, default)
            if type(value) is not type(default) and not (type(default) is float and type(value) is int):
                assert resume_from is not None  # the defaults have their own types: the value is a saved one
                flag = "--fp32, --bf16 or --fp16" if key == "precision" else f"--{key.replace('_', '-')}"
                raise CLIError(f"{resume_from / ckpt.TRAIN_STATE_FILE} records {key} = {value!r}, not a "
                               f"{type(default).__name__}: pass {flag}")
            setattr(args, key, value)
    if args.random_crop is None:
        args.random_crop = bool(saved.get("random_crop", False))
    if args.warmup is None and "warmup" in saved:
        if type(saved["warmup"]) is not int:
            raise CLIError(f"{resume_from} records warmup = {saved['warmup']!r}, not an int: pass --warmup")
        args.warmup = saved["warmup"]
    if args.precision not in ("fp32", "bf16", "fp16"):
        raise CLIError(f"{resume_from} records precision {args.precision!r}; pass --fp32, --bf16 or --fp16")
    for key in DATA_KEYS:
        if getattr(args, key) is None:
            flag = f"--{key.replace('_', '-')}"
            if not isinstance(saved.get(key), str):
                raise CLIError(f"{flag} is needed" + (f" ({resume_from / ckpt.TRAIN_STATE_FILE} records none)"
                                                      if resume_from is not None else ""))
            setattr(args, key, saved[key])
            log.info("%s %s (the run's own)", flag, saved[key])


def _check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "accumulate", "save_every", "keep", "log_every"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("warmup", "preview", "workers"):
        if (getattr(args, name) or 0) < 0:  # warmup: None until the config gives it
            raise CLIError(f"--{name} must be at least 0, got {getattr(args, name)}")
    for name in ("lr", "weight_decay", "grad_clip", "cond_drop", "ema_decay"):
        if not math.isfinite(getattr(args, name)):
            raise CLIError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if not 0 <= args.seed < 2 ** 63:
        raise CLIError(f"--seed must be in [0, 2**63), got {args.seed}")
    if not args.lr > 0 or args.weight_decay < 0 or args.grad_clip < 0:
        raise CLIError(f"--lr must be positive, --weight-decay and --grad-clip non-negative; got {args.lr}, "
                       f"{args.weight_decay} and {args.grad_clip}")
    if not 0 <= args.cond_drop < 1:
        raise CLIError(f"--cond-drop is a probability in [0, 1), got {args.cond_drop}")
    if not 0 <= args.ema_decay <= 1:
        raise CLIError(f"--ema-decay must be in [0, 1], got {args.ema_decay}")
    if args.random_crop and args.latents:
        raise CLIError("--random-crop cuts each image anew every epoch, while --latents stores the first stage's "
                       "outputs of each entry's one crop: use one or the other")
    if args.compile:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.compile not in backends:
            raise CLIError(f"--compile {args.compile}: not a torch.compile backend ({', '.join(backends)})")


def _check_cpp_compiler() -> None:
    """CLIError when inductor, compiling for the CPU, finds no C++ compiler: said before the run starts, not as
    a traceback from the first step."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a private helper: torch versions without it fail at the first step, as before
        return
    try:
        get_cpp_compiler()
    except RuntimeError as e:  # InvalidCxxCompiler
        raise CLIError(f"--compile inductor needs a C++ compiler on the CPU: {e} (install one or set "
                       "$CXX, or pass --compile aot_eager, which generates no code)") from None


def sample_draws(seed: int, step: int, rows: range, model: RDM, device: torch.device) -> dict[str, Tensor]:
    """The timestep, noise, posterior noise (KL first stages) and context-drop draw of the images at positions
    ``rows`` of step ``step``'s global batch, on ``device``. Each image's draws come from a CPU generator seeded
    with (seed, step, position) alone: the same on any device and however the global batch is split."""
    cfg = model.config
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    t, noise, posterior, drop = [], [], [], []
    for row in rows:
        gen = torch.Generator().manual_seed(derived_seed(seed, DRAWS, step, row))
        t.append(torch.randint(0, model.schedule.num_timesteps, (), generator=gen))
        noise.append(torch.randn(shape, generator=gen))
        posterior.append(torch.randn(shape, generator=gen))
        drop.append(torch.rand((), generator=gen))
    return {k: torch.stack(v).to(device, non_blocking=True)
            for k, v in (("t", t), ("noise", noise), ("posterior", posterior), ("drop", drop))}


def _moved_hint(args: argparse.Namespace) -> str:
    """What to do when the training images are not where the database recorded them."""
    return ("is --image-root the folder the database was built from?" if args.image_root else
            "if the images have moved, pass --image-root")


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """``--lr`` for optimizer step ``step`` (from 0), as the released configs' scheduler_config sets it: a factor
    rising linearly from WARM_UP_START at step 0 towards 1 over ``--warmup`` steps, then 1."""
    if step >= args.warmup:
        return args.lr
    return args.lr * (WARM_UP_START + (1 - WARM_UP_START) * step / args.warmup)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    check_out_dir(args.out, "a training run")
    out = Path(args.out)
    resume_from = ckpt.newest_run_checkpoint(out)
    if resume_from is not None and not (out / ckpt.RUN_LATEST).is_file():
        log.warning("%s has no %s file: its newest checkpoint is %s", out, ckpt.RUN_LATEST, resume_from.name)
    starts = args.init or args.first_stage or args.random_init
    if resume_from is not None and not args.resume:
        raise CLIError(f"{out} holds a run ({resume_from.name}): pass --resume to continue it, or another --out")
    if args.resume and resume_from is None and not starts:
        raise CLIError(f"--resume: {out} has no checkpoint to continue from (add --init, --first-stage or "
                       "--random-init to start the run when there is none)")
    if resume_from is None and not starts:
        raise CLIError("a new run needs --init, --first-stage or --random-init")
    if not (args.init or resume_from) and not args.config:
        raise CLIError("--config is needed unless the run starts from --init or resumes")
    if resume_from is not None and starts:
        log.info("%s holds a run: resuming it (the start options apply to a new run only)", out)
    _fill_settings(args, resume_from)
    _check_args(args)
    device = process_device(args.device)  # also the current CUDA device
    if args.compile == "inductor" and device.type == "cpu":
        _check_cpp_compiler()
    procs = Processes("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    try:
        with contextlib.ExitStack() as held:
            return _train(args, out, resume_from, procs, device, held)
    finally:
        procs.close()


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run: the run reuses its data and settings, not the options about a
    launch (--latents, --image-root, --workers, --device...), which are given again where they were given."""
    parser = build_parser()
    launch = "".join(f" {flag} {shlex.quote(str(getattr(args, dest)))}" for flag, dest in (
        ("--latents", "latents"), ("--image-root", "image_root"), ("--workers", "workers"), ("--device", "device"))
        if getattr(args, dest) is not None and getattr(args, dest) != parser.get_default(dest))
    return (f"python -m rdm_fast.train --out {shlex.quote(str(args.out))} --resume --steps {args.steps}{launch}"
            f"{' --no-progress' if args.no_progress else ''}")


def _run_model(args: argparse.Namespace, out: Path, resume_from: Path | None, device: torch.device) -> RDM:
    """The model to train: the resumed run's (``--config`` may only repeat its config) or a new one; float32 on
    ``device``, the first stage frozen, the UNet in training mode."""
    if resume_from is not None:
        with _older_checkpoints_hint(resume_from, out):
            model = RDM.from_pretrained(resume_from)
        given = RDMConfig.resolve(args.config) if args.config else model.config
        # the run's warm-up is its recorded --warmup, whatever the config says
        given = replace(given, retrieval_encoder=model.config.retrieval_encoder,
                        warm_up_steps=model.config.warm_up_steps)
        if given != model.config:
            differ = ckpt.differing_keys(given.to_dict(), model.config.to_dict())
            raise CLIError(f"--config differs from the config of {resume_from} in {', '.join(differ)}: drop "
                           "--config to resume with the run's own")
    else:
        model = build_model(args)
    model = model.to(device, torch.float32)
    model.first_stage.requires_grad_(False).eval()
    model.unet.train()
    model.unet.gradient_checkpointing = args.grad_checkpoint
    return model


def _check_images_exist(images: TrainingImages, args: argparse.Namespace) -> None:
    """Moved images: one line before the run starts, not a warning per entry from the data workers first."""
    looked = min(len(images), MOVED_CHECK)
    files = [images.file(round(j * (len(images) - 1) / max(looked - 1, 1))) for j in range(looked)]
    if not any(f.exists() for f in files):
        raise CLIError(f"none of {len(files)} training images looked for exists, e.g. {files[0]}: "
                       f"{_moved_hint(args)}")


def _run_info(args: argparse.Namespace, cfg: RDMConfig, contexts: TrainingContexts, procs: Processes) -> dict:
    """The run's data, draws and settings, as ``run.json`` and every checkpoint record them (``--resume``
    compares them)."""
    return {"draws": DRAWS_VERSION, "seed": args.seed,
            "global_batch": args.batch_size * procs.world * args.accumulate, "lr": args.lr,
            "weight_decay": args.weight_decay, "warmup": args.warmup, "cond_drop": args.cond_drop,
            "grad_clip": args.grad_clip, "ema_decay": args.ema_decay, "precision": args.precision,
            "training_db": str(Path(args.training_db).resolve()), "db": str(Path(args.db).resolve()),
            "neighbors": str(Path(args.neighbors).resolve()), "training_data": contexts.digest(),
            "random_crop": args.random_crop,
            "cached_moments": args.latents is not None,
            "latents": None if args.latents is None else str(Path(args.latents).resolve()),  # not compared
            "batch_size": args.batch_size, "processes": procs.world, "accumulate": args.accumulate,
            "save_every": args.save_every, "keep": args.keep, "log_every": args.log_every,
            "preview": args.preview,
            "config": cfg.to_dict()}


def _check_resumed(before: dict, run_info: dict, args: argparse.Namespace, procs: Processes, resume_from: Path,
                   out: Path) -> None:
    """CLIError when this launch would continue the run with other data or draws than it had; a warning for the
    settings that may change on a resume (CHANGEABLE_KEYS)."""
    if before.get("draws") != DRAWS_VERSION:
        raise CLIError(f"--resume: {resume_from} was saved by an older rdm_fast, whose random draws (batch "
                       "order, noise, dropout) differ from this version's, so the run cannot continue exactly: "
                       f"start a new --out (e.g. --init {resume_from})")
    changed = [f"{k} {before.get(k, RESUME_DEFAULTS.get(k))!r} -> {run_info[k]!r}" for k in RESUME_KEYS
               if before.get(k, RESUME_DEFAULTS.get(k)) != run_info[k]]
    if before.get("global_batch") != run_info["global_batch"]:  # typically another number of processes
        split = " x ".join(str(before.get(k, "?")) for k in ("processes", "batch_size", "accumulate"))
        changed.append(f"the run's global batch is {split} (processes x images x micro-batches), this launch's "
                       f"{procs.world} x {args.batch_size} x {args.accumulate}: run on as many processes as the "
                       "run, or give --batch-size and --accumulate that make the same product")
    if changed:
        raise CLIError(f"--resume: the run in {out} was made with other data or draws: {'; '.join(changed)}")
    changed = [f"{k} {before.get(k)!r} -> {run_info[k]!r}" for k in CHANGEABLE_KEYS
               if before.get(k) != run_info[k]]
    if before.get("cached_moments") and args.latents is None:  # the same draws, from the images: slower
        where = f" ({before['latents']})" if before.get("latents") else ""
        changed = [c for c in changed if not c.startswith("cached_moments")] + [
            f"the run trained from a --latents cache{where}; without --latents each step decodes and encodes "
            "its images (the same draws, slower): pass it again"]
    if changed:
        log.warning("resuming with changed settings: %s", "; ".join(changed))


def _claim_out(out: Path, resume_from: Path | None, start: int, held: contextlib.ExitStack) -> None:
    """The main process takes ``--out`` for this run (until ``held`` closes) and clears what killed runs left."""
    held.enter_context(claim_out_dir(out))  # one run at a time into --out; makes it (the first write)
    if ckpt.newest_run_checkpoint(out) != resume_from:  # read before the lock: another run wrote there meanwhile
        raise CLIError(f"{out} changed while this run was starting (another run saved a checkpoint there): "
                       "run the command again")
    remove_stale_checkpoints(out, start)
    remove_stale_temps(out, ["run.json", ckpt.RUN_LATEST, LOG])  # the other files killed writes left
    if (out / "samples").is_dir():
        remove_stale_temps(out / "samples", ["step_*.png"])


class Meter:
    """The losses, unreadable images and throughput since the last log line (on this process until
    :meth:`record` sums them over the processes), and the unreadable images since this process started."""

    def __init__(self, procs: Processes, device: torch.device, step: int) -> None:
        self.procs, self.device = procs, device
        self.loss_sum = torch.zeros(2, device=device, dtype=torch.float64)  # (sum of losses, images)
        self.unreadable, self.unreadable_total = 0, 0
        self.restart(step)

    def restart(self, step: int) -> None:
        """Throughput counts from now and ``step`` on (after a checkpoint: training steps, not saving)."""
        self.tick, self.ticked = time.perf_counter(), step

    def add(self, losses: Tensor, ok: Tensor, unreadable: int) -> None:
        """A micro-batch's per-image losses, which of its images could be read, and how many could not."""
        self.loss_sum += torch.stack([losses.detach().sum().double(), ok.sum().double()])
        self.unreadable += unreadable
        self.unreadable_total += unreadable

    def record(self, done: int, lr: float, global_batch: int) -> dict[str, Any]:
        """The log record of the steps up to ``done`` (all processes take part), and a fresh count after it."""
        total = self.procs.all_sum(self.loss_sum.clone()).tolist()
        now = time.perf_counter()
        record = {"step": done, "loss": total[0] / max(total[1], 1.0), "lr": lr,
                  "images_per_s": (done - self.ticked) * global_batch / (now - self.tick),
                  "unreadable": int(self.procs.all_sum(torch.tensor([self.unreadable], device=self.device)).item()),
                  "time": round(time.time(), 3)}  # wall clock (seconds since the epoch), for timelines
        self.loss_sum.zero_()
        self.unreadable = 0
        self.restart(done)
        return record


def _write_record(record: dict[str, Any], bar: tqdm, args: argparse.Namespace, out: Path, global_batch: int) -> None:
    """The main process shows a log record (on the bar, or as a log line where no bar is seen) and appends it to
    the run's log."""
    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
    if bar.disable or not sys.stderr.isatty():  # no bar, or one whose frames a log file runs
        # together into one line (a batch job without --no-progress): the loss as a log line
        left = (args.steps - record["step"]) * global_batch / max(record["images_per_s"], 1e-9)
        log.info("step %d of %d: loss %.4f, lr %.3g, %.1f images/s, about %s left", record["step"], args.steps,
                 record["loss"], record["lr"], record["images_per_s"], datetime.timedelta(seconds=round(left)))
    with naming_failed_writes(out / LOG), open(out / LOG, "a") as f:  # a full disk names it
        f.write(json.dumps(record) + "\n")


def _train(args: argparse.Namespace, out: Path, resume_from: Path | None, procs: Processes,
           device: torch.device, held: contextlib.ExitStack) -> int:
    """The run: model, data, optimizer; then the steps. ``held`` keeps what the run holds until it ends."""
    args.training_db, args.db = str(locate_database(args.training_db)), str(locate_database(args.db))
    existing_neighbors_file(args.neighbors)  # before the (possibly large) model is built
    model = _run_model(args, out, resume_from, device)
    unet = model.unet
    if args.warmup is None:  # a new run (or one saved without it) warms up as its config's scheduler_config
        args.warmup = model.config.warm_up_steps
        if args.warmup:
            log.warning("--warmup %d (the config's scheduler_config, the released training recipe): the learning "
                        "rate reaches --lr at step %d; give --warmup to change that", args.warmup, args.warmup)
    contexts = TrainingContexts(model.config, args.training_db, args.db, args.neighbors)
    if model.config.retrieval_encoder is None:  # record it: sampling then refuses databases of other encoders
        model.config = replace(model.config, retrieval_encoder=contexts.retrieval.encoder_name)
    images = TrainingImages(contexts.training, model.config.pixel_size, args.image_root,
                            random_crop=args.random_crop, seed=args.seed)
    if args.random_crop and images.crop != "center" and procs.main:
        log.warning("--random-crop trains on windows of each whole image, but %s holds --crop %s crops, whose "
                    "neighbours the contexts are: build the training database with --crop center for --random-crop",
                    contexts.training.path, images.crop)
    if args.latents is None:
        _check_images_exist(images, args)
    run_info = _run_info(args, model.config, contexts, procs)
    global_batch = run_info["global_batch"]
    if global_batch > len(images):
        log.warning("the global batch (%d) is larger than the %d training images: each step sees some images more "
                    "than once", global_batch, len(images))

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    ema = EMA(unet, args.ema_decay)
    start = 0
    if resume_from is not None:
        with _older_checkpoints_hint(resume_from, out):
            state = load_checkpoint(resume_from, model, ema, optimizer, scaler)
        _check_resumed(state["run"], run_info, args, procs, resume_from, out)
        for group in optimizer.param_groups:  # the optimizer's state carries the old ones
            group["weight_decay"] = args.weight_decay
        start = state["step"]
        log.info("resuming from %s at step %d", resume_from, start)
    if procs.main:
        _claim_out(out, resume_from, start, held)
    if start >= args.steps:
        log.info("%s is already at step %d of --steps %d", out, start, args.steps)
        return 0
    if procs.main:
        _truncate_log(out / LOG, start)

    examples = images if args.latents is None else cached_moments(
        args.latents, model, images, procs, device, batch_size=args.batch_size, workers=args.workers,
        progress=not args.no_progress)
    ddp = unet if procs.world == 1 else nn.parallel.DistributedDataParallel(
        unet, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(ddp, backend=args.compile) if args.compile else ddp
    if args.compile:
        log.info("--compile: the first step compiles the UNet's passes (%s), which can take minutes", args.compile)
    order = TrainingOrder(len(examples), seed=args.seed, batch=args.batch_size, world=procs.world, rank=procs.rank,
                          accumulate=args.accumulate, start_step=start, epochs=args.random_crop)
    loader = iter(torch.utils.data.DataLoader(examples, batch_size=args.batch_size, sampler=order,
                                              num_workers=args.workers, pin_memory=device.type == "cuda",
                                              persistent_workers=args.workers > 0,
                                              worker_init_fn=_ignore_stop_signals,
                                              generator=torch.Generator()))  # not a global RNG draw
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16,
                              enabled=args.precision != "fp32")
    preview = contexts(torch.arange(min(args.preview, len(images)))) if args.preview else None
    log.info("training %s steps %d -> %d: global batch %d (%d process%s x %d x %d micro-batches), %s on %s",
             f"{sum(p.numel() for p in unet.parameters()):,}-parameter UNet", start, args.steps, global_batch,
             procs.world, "es"[:2 * (procs.world != 1)], args.batch_size, args.accumulate, args.precision, device)

    meter = Meter(procs, device, start)
    stopping, vote = False, StopVote(procs, device)
    first_readable, first_file = 0, None  # the first step's readable images on this rank, and one of its files
    bar = tqdm(total=args.steps, initial=start, desc="training", unit="step",
               disable=args.no_progress or not procs.main)
    with StopRequest() as stop:
        for step in range(start, args.steps):
            for micro in range(args.accumulate):
                batch = next(loader)
                first = (micro * procs.world + procs.rank) * args.batch_size  # position in the global batch
                draws = sample_draws(args.seed, step, range(first, first + args.batch_size), model, device)
                if step == start:  # moved images: say so before the first update, made of nothing
                    first_readable += int(batch["ok"].sum())
                    first_file = first_file or images.file(int(batch["index"][0]))
                    if micro == args.accumulate - 1 and not int(procs.all_sum(  # the whole global batch's count
                            torch.tensor(first_readable, device=device))):
                        hint = (_moved_hint(args) if not first_file.exists() else  # not moved: unreadable
                                "the files exist; the warnings say why they cannot be used")
                        raise CLIError(f"none of the first batch's images can be read, e.g. {first_file}: {hint}"
                                       + (" (and delete --latents)" if args.latents else ""))
                ok = batch["ok"].to(device)
                context = contexts(batch["index"]).to(device, non_blocking=True)
                context = context * (draws["drop"] >= args.cond_drop)[:, None, None]
                with torch.no_grad(), autocast:
                    if "moments" in batch:
                        x0 = model.latents(batch["moments"].to(device, non_blocking=True), noise=draws["posterior"])
                    else:
                        pixels = batch["pixels"].to(device, non_blocking=True).float() / 127.5 - 1.0
                        x0 = model.encode(pixels, noise=draws["posterior"])
                sync = contextlib.nullcontext() if micro == args.accumulate - 1 or ddp is unet else \
                    cast(nn.parallel.DistributedDataParallel, ddp).no_sync()
                # dropout draws from the global generators (CPU and CUDA): seeded per micro-batch and process, so a
                # resumed run draws the masks an uninterrupted one does and processes draw different ones
                torch.manual_seed(derived_seed(args.seed, DROPOUT, step, micro * procs.world + procs.rank))
                with sync:
                    with autocast:
                        losses = eps_losses(forward, model.schedule, x0, context, draws["t"], draws["noise"])
                    losses = losses * ok  # unreadable images (zeros) take no part
                    # the mean over the global batch: DDP averages the ranks' gradients
                    scaler.scale(losses.sum() / (args.batch_size * args.accumulate)).backward()
                meter.add(losses, ok, int((~batch["ok"]).sum()))  # counted on the host
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(args, step)
            if args.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(unet.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema.update(unet)
            done = step + 1
            bar.update(1)
            if done == start + 1 and procs.main:  # the settings, once they have run (not those of a failed start)
                atomic_write_json(out / "run.json", {**run_info, "args": vars(args)})
            stopping = vote.cast(stop.requested)
            if done % args.log_every == 0 or done == args.steps or stopping:  # a stop writes the pending line
                record = meter.record(done, learning_rate(args, step), global_batch)
                if not math.isfinite(record["loss"]):
                    raise CLIError(f"the loss is {record['loss']} at step {done} ({args.precision}): lower --lr, "
                                   f"or {_divergence_advice(args)}")
                if procs.main:
                    _write_record(record, bar, args, out, global_batch)
            if done % args.save_every == 0 or done == args.steps or stopping:
                _check_finite_weights(unet, done, out, args)  # every process: none may wait on a failed save
                if procs.main:
                    path = save_checkpoint(out, done, model, ema, optimizer, scaler, run_info, args.keep)
                    shown = ""
                    if preview is not None and not stopping:
                        _preview(model, ema, preview, out / "samples" / f"step_{done:07d}.png", args.seed)
                        shown = f", preview {out / 'samples' / f'step_{done:07d}.png'}"
                    log.info("step %d: checkpoint %s%s", done, path, shown)
                procs.barrier()
                meter.restart(done)  # the throughput of training steps, not of saving
            if stopping and done < args.steps:
                vote.settle()
                bar.close()
                log.warning("stopped at step %d of %d by a signal: continue with %s", done, args.steps,
                            resume_command(args))
                return STOPPED
        vote.settle()
    bar.close()
    if meter.unreadable_total:
        log.warning("%d draws of training images could not be read (this process) and gave no gradient",
                    meter.unreadable_total)
    log.info("done: %s (sample with python -m rdm_fast.sample --ckpt %s ...)", ckpt.newest_run_checkpoint(out), out)
    return 0


def _divergence_advice(args: argparse.Namespace) -> str:
    return "train in bf16 (--bf16) instead of fp16" if args.precision == "fp16" else "add --warmup or --grad-clip"


def _check_finite_weights(unet: nn.Module, step: int, out: Path, args: argparse.Namespace) -> None:
    """CLIError when a weight is NaN or infinite (a diverged run): such a checkpoint is not written, so it can
    neither replace good ones (--keep) nor be resumed from. One host synchronisation per save."""
    if not bool(torch.stack([torch.isfinite(p).all() for p in unet.parameters()]).all()):
        last = ckpt.newest_run_checkpoint(out) if out.is_dir() else None
        raise CLIError(f"the weights are not finite at step {step}: not saving them"
                       + (f" (the last checkpoint, {last.name}, is kept)" if last else "")
                       + f"; lower --lr, or {_divergence_advice(args)}")


@contextlib.contextmanager
def _older_checkpoints_hint(resume_from: Path, out: Path) -> Iterator[None]:
    """A CheckpointError of ``resume_from`` names the run's older checkpoints and how to continue from one."""
    try:
        yield
    except ckpt.CheckpointError as e:
        older = [p.name for s, p in sorted(ckpt.run_checkpoints(resume_from.parent).items(), reverse=True)
                 if p != resume_from]
        hint = (f"{'' if str(e).endswith(('?', '.')) else '.'} To continue from an older checkpoint "
                f"({', '.join(older)}), write its name into {out / ckpt.RUN_LATEST}" if older else "")
        raise ckpt.CheckpointError(f"{e}{hint}") from None


def _truncate_log(file: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step`` (what a resumed run repeats goes; a fresh run starts empty).
    Lines that do not parse (a line half-written when the run was killed, NUL padding after a crash) go, with
    a warning."""
    if not file.exists():
        return
    kept, dropped = [], 0
    for line in file.read_bytes().decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keep = record["step"] <= step
        except (ValueError, TypeError, KeyError):
            dropped += 1
            continue
        if keep:
            kept.append(line)
    if dropped:
        log.warning("%s: dropping %d unreadable lines (a run killed while writing?)", file, dropped)
    atomic_write(file, lambda f: Path(f).write_text("".join(line + "\n" for line in kept)))


def _preview(model: RDM, ema: EMA, context: Tensor, file: Path, seed: int) -> None:
    """Samples of the EMA weights for fixed contexts and noise (comparable from checkpoint to checkpoint)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with ema.applied(model.unet):
        model.unet.eval()
        try:  # the config's sampling settings
            z = model.sample(context, generator=torch.Generator().manual_seed(seed), cuda_graph=False,
                             channels_last=False)
            pixels = to_uint8(model.decode(z))
        finally:
            model.unet.train()
    save_png(grid(pixels), file)


if __name__ == "__main__":
    raise SystemExit(run(main, memory_advice=MEMORY_ADVICE))
