"""``python -m rdm_fast.convert``: turn an official checkpoint into rdm_fast's safetensors format, or back.

rdm_fast's format (``model.safetensors`` with the config inside, and ``config.json``) loads without unpickling,
memory-maps, and holds only the weights sampling needs (the EMA UNet when the checkpoint has one).
``--to official`` writes ``model.ckpt`` (a state dict in the layout of the official Lightning checkpoints, for the
reference code) and ``config.yaml``: rdm_fast's config under the official YAML names, whose ``unet_config`` and
``first_stage_config`` are the reference code's, without the reference's own model fields (its
``MinimalRETRODiffusion`` target, ``retrieval_cfg``, ``cond_stage_config``), which rdm_fast does not use. From a
training checkpoint of ``python -m rdm_fast.train`` the UNet's training weights go under
``model.diffusion_model.`` and its EMA weights under ``model_ema.``, as LitEma stores them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from . import RDM
from . import checkpoint as ckpt
from ._cli import CLIError, HelpFormatter, check_out_dir, holding, one_process, parse_args, run, summary
from ._files import atomic_write, remove_stale_temps
from .config import preset_names

log = logging.getLogger("rdm_fast.convert")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def official_checkpoint(model: RDM, ema: RDM | None = None, ema_updates: int = 0,
                        ema_decay: float = 0.9999) -> dict[str, torch.Tensor]:
    """``model``'s weights in the official layout; with ``ema``, its UNet as LitEma's ``model_ema.`` copy, with
    the decay and update count it was made with (0.9999: the released models' and LitEma's default)."""
    state = model.official_state_dict()
    if ema is not None:
        unet = ema.official_state_dict()
        state.update({ckpt.ema_name(k[len(ckpt.UNET_PREFIX):]): v for k, v in unet.items()
                      if k.startswith(ckpt.UNET_PREFIX)})
        state["model_ema.decay"] = torch.tensor(ema_decay, dtype=torch.float32)
        state["model_ema.num_updates"] = torch.tensor(ema_updates, dtype=torch.int32)
    return state


def _check_not_in_place(weights: Path, out: Path, to: str) -> None:
    """CLIError where writing ``to``'s files into ``out`` would replace the checkpoint file being converted, or leave
    beside them a model of the other format that loading ``out`` would pick instead (rdm_fast's weights win)."""
    written = out / ("model.ckpt" if to == "official" else ckpt.WEIGHTS_FILE)
    if written.resolve() == weights.resolve():
        raise CLIError(f"--out {out} would replace the checkpoint being converted ({weights}): choose another "
                       "folder")
    if to == "official" and (out / ckpt.WEIGHTS_FILE).is_file():
        raise CLIError(f"--out {out} holds {ckpt.WEIGHTS_FILE}, which loading the folder would use instead of the "
                       "model.ckpt written: choose another folder")


def _export_official(args: argparse.Namespace, weights: Path, out: Path) -> Path:
    training = (weights.parent / ckpt.TRAIN_WEIGHTS_FILE).is_file()  # raw UNet weights beside the EMA ones
    train_state: dict[str, Any] = ckpt.read_train_state(weights.parent / ckpt.TRAIN_STATE_FILE) if training else \
        {"ema_updates": 0}
    decay = train_state.get("run", {}).get("ema_decay", 0.9999)  # the run's --ema-decay
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 <= decay <= 1.0:
        raise ckpt.CheckpointError(f"{weights.parent / ckpt.TRAIN_STATE_FILE}: ema_decay = {decay!r} is not a "
                                   "decay in [0, 1]")
    if training:
        log.info("exporting both sets of UNet weights: the training ones (model.diffusion_model.) and the EMA ones "
                 "(model_ema., %d updates, decay %g), as the official checkpoints hold them",
                 train_state["ema_updates"], decay)
    loading = logging.getLogger("rdm_fast.rdm")
    level = loading.level
    if training:  # not its "using the training weights, not the EMA ones": both are exported
        loading.setLevel(logging.WARNING)
    try:
        raw = RDM.from_pretrained(weights, args.config, use_ema=not training, allow_pickle=args.allow_pickle)
    finally:
        loading.setLevel(level)
    ema = RDM.from_pretrained(weights, args.config, allow_pickle=args.allow_pickle) if training else None
    state = ckpt.cast_floats(official_checkpoint(raw, ema, train_state["ema_updates"], decay), DTYPES[args.dtype],
                             keep={"model_ema.decay"})
    with holding(out, out, keep_lock_file=False):  # a second conversion meanwhile would delete this one's
        # temporary files as stale and replace the files it reported written
        remove_stale_temps(out, ["model.ckpt", "config.yaml"])  # what a killed export left there
        # never a pair of one model's weights and another's config, even if killed midway: the old weights go
        # first, and the new weights come last (a folder without model.ckpt fails to load, loudly)
        (out / "model.ckpt").unlink(missing_ok=True)
        atomic_write(out / "config.yaml", lambda f: Path(f).write_text(yaml.safe_dump(raw.config.to_dict())))
        atomic_write(out / "model.ckpt", lambda f: torch.save({"state_dict": state}, f))
    return out / "model.ckpt"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdm_fast.convert", description=summary(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("ckpt", help="official .ckpt, rdm_fast file or directory, or a training run or checkpoint")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--to", choices=["rdm_fast", "official"], default="rdm_fast", help="format written")
    p.add_argument("--config", help=f"preset ({', '.join(preset_names())}) or config.yaml "
                                    "(default: an rdm_fast checkpoint's own; for an official .ckpt, config.yaml "
                                    "beside it, else the matching preset)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="precision of the stored weights")
    p.add_argument("--no-ema", action="store_true",
                   help="store the UNet's raw weights instead of its EMA ones: an official checkpoint's, or a "
                        "training checkpoint's train_weights.safetensors (--to rdm_fast only)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle a checkpoint with Python objects (runs code from the file: trusted files only)")
    args = parse_args(p, argv)
    one_process("convert")
    if Path(args.out).suffix in ckpt.WEIGHT_SUFFIXES:  # else refused only at the save, after the load
        raise CLIError(f"--out {args.out} names a file: the converted model is written into a folder")
    check_out_dir(args.out, "a model")  # an earlier conversion's output is replaced
    weights = ckpt.resolve_file(args.ckpt)  # once: a training run's newest checkpoint is named in one log line
    _check_not_in_place(weights, Path(args.out), args.to)
    log.info("reading %s", args.ckpt)
    if args.to == "official":
        if args.no_ema:
            raise ValueError("--no-ema applies to --to rdm_fast (official checkpoints hold both weights)")
        path = _export_official(args, weights, Path(args.out))
        log.info("wrote %s and config.yaml (%s)", path, args.dtype)
        return 0
    model = RDM.from_pretrained(weights, args.config, use_ema=not args.no_ema, allow_pickle=args.allow_pickle)
    with holding(Path(args.out), args.out, keep_lock_file=False):
        path = model.save_pretrained(args.out, dtype=DTYPES[args.dtype])
    n = sum(t.numel() for t in model.state_dict().values())
    log.info("wrote %s (%s tensors, %s values, %s)", path, len(model.state_dict()), f"{n:,}", args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
