"""Reading official PyTorch-Lightning checkpoints and rdm_fast's own safetensors format.

Official layout: the UNet under ``model.diffusion_model.``, the autoencoder under ``first_stage_model.``, EMA
copies of the UNet under ``model_ema.`` with the dots removed from their names (LitEma), plus schedule buffers
and a few bookkeeping tensors. rdm_fast's own layout: ``model.safetensors`` with our module names and the
official-layout config as JSON in the file's metadata (and, for people, ``config.json`` beside it).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Container, Mapping

import torch
from torch import Tensor

from ._files import atomic_write, not_a_file, remove_stale_temps

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
FORMAT_NAME = "rdm_fast"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# a training checkpoint of rdm_fast.train adds, beside its (EMA) model.safetensors, the UNet's training weights
# and the run's state (step, EMA updates, settings)
TRAIN_WEIGHTS_FILE = "train_weights.safetensors"
TRAIN_STATE_FILE = "state.json"
# a training run: RUN/checkpoints/<name>/, the newest named in RUN/latest
RUN_CHECKPOINTS = "checkpoints"
RUN_LATEST = "latest"

SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar")
# Tensors official checkpoints carry that sampling does not use: EMA counters, the unconditional
# vector of the RDM training code (guidance here uses the all-zero context), losses and discriminators.
IGNORED_KEYS = {"model_ema.decay", "model_ema.num_updates", "unconditional_guidance_vex"}
IGNORED_PREFIXES = ("first_stage_model.loss.", "loss.", "cond_stage_model.", "retrieval_encoder.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the configured model."""


def _reason(e: BaseException) -> str:
    """What reading a file raised, in one line; the exception's type where its message alone says nothing (a
    corrupt pickle's KeyError: 174812789)."""
    why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [""])[0]
    if not isinstance(e, (OSError, RuntimeError, ValueError, EOFError)) or not why:
        why = f"{type(e).__name__}: {why}" if why else type(e).__name__
    return why


WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # the files read_state_dict reads
NOT_CHECKPOINTS = {".yaml": "a config", ".yml": "a config", ".json": "a JSON file", ".npy": "a NumPy array",
                   ".png": "an image", ".jpg": "an image", ".jpeg": "an image", ".txt": "a text file"}


def unreadable(file: Path, e: Exception) -> CheckpointError:
    """The error for a checkpoint file that is missing, truncated or corrupt (``e``: what reading it raised)."""
    why = _reason(e)
    if "weights only" in why.lower() or "weights_only" in why:  # torch's advice to unpickle: not for a broken file
        why = "not a torch file of tensors"
    return CheckpointError(f"{file} cannot be read ({why}): is the checkpoint truncated or corrupt?")


def read_train_state(file: Path) -> dict[str, Any]:
    """A training checkpoint's ``state.json`` (step, EMA update count, the run's settings), checked."""
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise unreadable(file, e) from None
    if not (isinstance(state, dict) and {"step", "ema_updates"} <= state.keys()):
        raise CheckpointError(f"{file} records no step and ema_updates: is it a checkpoint of "
                              "python -m rdm_fast.train?")
    for key in ("step", "ema_updates"):
        value = state[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{file}: {key} = {value!r} is not a count (a non-negative integer)")
    if "run" in state and not isinstance(state["run"], dict):
        raise CheckpointError(f"{file}: run = {state['run']!r} is not the run's settings (a JSON object)")
    return state


def checkpoint_step(name: str) -> int | None:
    """The step of a run's checkpoint folder named ``step_NNNNNNN`` (None for any other name)."""
    match = re.fullmatch(r"step_([0-9]+)", name)
    return int(match[1]) if match else None


def run_checkpoints(root: Path) -> dict[int, Path]:
    """The checkpoint folders ``step_<n>`` in ``root`` by step (as numbers: past 9,999,999 the names grow)."""
    steps = {p: checkpoint_step(p.name) for p in root.glob("step_*") if p.is_dir()}
    return {step: p for p, step in steps.items() if step is not None}


class StateDictMismatch(CheckpointError):
    """Tensors the model needs that a checkpoint lacks or holds in another shape. The message is one line (counts
    and the first names); ``missing`` and ``mismatched`` keep the full lists."""

    def __init__(self, source: str, missing: list[str], mismatched: list[str]) -> None:
        self.source, self.missing, self.mismatched = source, missing, mismatched
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors: {describe(missing, 3)}")
        if mismatched:
            parts.append(f"{len(mismatched)} tensors of the wrong shape: {describe(mismatched, 3)}")
        super().__init__(f"{source} does not match the model configuration ({'; '.join(parts)}); is the config "
                         "right? pass a preset name or the model's config.yaml as the config (CLI: --config)")


def ema_name(official_unet_name: str) -> str:
    """LitEma's key for a UNet tensor: ``model_ema.`` + the name under ``model.`` with its dots removed."""
    return EMA_PREFIX + ("diffusion_model." + official_unet_name).replace(".", "")


def resolve_file(path: str | Path) -> Path:
    """A checkpoint file given as itself or as a directory: rdm_fast's (``model.safetensors``), a training run of
    ``python -m rdm_fast.train`` (its newest checkpoint, named in ``latest``, else the newest folder: see
    :func:`newest_run_checkpoint`) or an official release folder holding a single ``.ckpt``."""
    if not isinstance(path, (str, os.PathLike)):  # pathlib's TypeError named no argument
        raise TypeError(f"a checkpoint path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / WEIGHTS_FILE).is_file():
        if (path / RUN_LATEST).is_file() or run_checkpoints(path / RUN_CHECKPOINTS):
            raise CheckpointError(f"{path} holds both a model ({WEIGHTS_FILE}) and a training run ({RUN_LATEST} or "
                                  f"{RUN_CHECKPOINTS}/): pass {path / WEIGHTS_FILE}, or a checkpoint folder of the run "
                                  f"({path / RUN_CHECKPOINTS}/step_NNNNNNN)")
        others = sorted(p.name for p in path.glob("*.ckpt"))
        if others:
            log.info("%s: loading %s (not %s)", path, WEIGHTS_FILE, ", ".join(others))
        return path / WEIGHTS_FILE
    newest = newest_run_checkpoint(path)
    if newest is not None:
        if (path / RUN_LATEST).is_file():
            log.info("%s: its newest checkpoint, %s", path, newest.name)
        else:  # the one train --resume continues from
            log.warning("%s has no %s file (a run killed right after its first checkpoint leaves none): loading its "
                        "newest checkpoint, %s", path, RUN_LATEST, newest.name)
        return newest / WEIGHTS_FILE
    ckpts = sorted(path.glob("*.ckpt"))
    if len(ckpts) == 1:
        return ckpts[0]
    raise CheckpointError(f"{path} is a directory without {WEIGHTS_FILE} or a single .ckpt file: pass the "
                          "checkpoint file itself")


def newest_run_checkpoint(run: Path) -> Path | None:
    """The checkpoint directory a training run's ``latest`` names, else (a kill between the first checkpoint's
    rename and the ``latest`` file) its newest, since folders get checkpoint names only when complete; None for a
    directory that holds no checkpoint. CheckpointError if ``latest`` names no ``step_NNNNNNN`` folder of the run's
    checkpoints, or an incomplete one."""
    pointer = run / RUN_LATEST
    if not pointer.is_file():
        unnamed = run_checkpoints(run / RUN_CHECKPOINTS)
        return unnamed[max(unnamed)] if unnamed else None
    name = pointer.read_text(errors="replace").strip()
    if checkpoint_step(name) is None:
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint of this run (a step_NNNNNNN "
                              f"folder in {run / RUN_CHECKPOINTS})")
    path = run / RUN_CHECKPOINTS / name
    if not ((path / TRAIN_STATE_FILE).is_file() and (path / WEIGHTS_FILE).is_file()):
        raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def read_state_dict(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors of a ``.ckpt``/``.pt``/``.pth``/``.bin`` (torch) or ``.safetensors`` file, and the file's metadata.

    Torch files are read with ``weights_only=True``. ``allow_pickle=True`` unpickles arbitrary objects, which
    can run code from the file: only for files you trust.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file (resolve_file finds the file in an "
                              "rdm_fast directory or training run)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} {not_a_file(path)}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, lambda f: ({k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})))
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # zip (torch.save) or pickle (legacy torch.save)
        what = NOT_CHECKPOINTS.get(path.suffix.lower())
        raise CheckpointError(f"{path} is {what}, not a checkpoint" if what else
                              f"{path} is not a readable PyTorch checkpoint (neither a torch.save zip nor a "
                              "pickle); is it truncated or corrupt?")
    if allow_pickle:
        warnings.warn(f"unpickling {path} with weights_only=False: this runs any code the file contains",
                      stacklevel=2)
    try:
        obj = _torch_load(path, weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        why = next((ln.strip() for ln in lines if "Unsupported global" in ln), lines[0] if lines else "")
        raise CheckpointError(
            f"{path} holds Python objects besides tensors, which are not loaded by default ({why}). If you "
            "trust the file, pass allow_pickle=True (CLI: --allow-pickle), or convert it once with "
            "`python -m rdm_fast.convert --allow-pickle`") from None
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises anything (KeyError, ValueError, ...)
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({_reason(e)}); is it truncated or "
                              "corrupt?"
                              ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj), {}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file, read from its header alone (no tensors)."""
    return _read_safetensors(Path(path), lambda f: dict(f.metadata() or {}))


def read_names(path: str | Path) -> list[str]:
    """The tensor names of a ``.safetensors`` file, read from its header alone (no tensors)."""
    return _read_safetensors(Path(path), lambda f: list(f.keys()))


def _read_safetensors(path: Path, read: Callable[[Any], Any]) -> Any:
    """``read(f)`` on the opened safetensors file, CheckpointError if the file is damaged."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return read(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); is it truncated?") from None


def _torch_load(path: Path, weights_only: bool) -> Any:
    """torch.load, memory-mapped where the file format allows (large checkpoints need not fit in RAM)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def describe(names: list[str], limit: int = 12) -> str:
    """The first ``limit`` names joined for an error message, with a count of the rest."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def match_state_dict(state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]],
                     source: str) -> None:
    """Check that ``state`` holds every expected name with the expected shape, as finite floating-point values.

    Raises StateDictMismatch (a CheckpointError) with the missing and mis-shaped tensors, CheckpointError naming
    the tensors of another dtype or with NaN or infinite values (not checked on the meta device).
    """
    missing = [k for k in expected if k not in state]
    mismatched = [f"{k} {tuple(state[k].shape)} (model: {tuple(expected[k])})"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or mismatched:
        raise StateDictMismatch(source, missing, mismatched)
    integral = [f"{k} ({state[k].dtype})" for k in expected if not state[k].is_floating_point()]
    if integral:
        raise CheckpointError(f"{source}: {len(integral)} tensors are not floating-point: {describe(integral, 3)}")
    non_finite = [k for k in expected if not (state[k].is_meta or _finite(state[k]))]
    if non_finite:
        raise CheckpointError(f"{source}: {len(non_finite)} tensors hold NaN or infinite values: "
                              f"{describe(non_finite, 3)}; is it the checkpoint of a diverged run?")


def _finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN or infinity: its extremes (one pass, NaN propagates) are finite."""
    return t.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def cast_floats(tensors: Mapping[str, Tensor], dtype: torch.dtype | None,
                keep: Container[str] = ()) -> dict[str, Tensor]:
    """``tensors`` with the floating-point ones (but those named in ``keep``) in ``dtype`` (None: unchanged).
    ``dtype``: torch.float32, torch.float16 or torch.bfloat16, the precisions a model runs in (ValueError naming
    the argument otherwise: integers would truncate the weights). ValueError naming the tensors with finite
    values beyond ``dtype``'s range (they would become infinite)."""
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16 (or None: unchanged), "
                         f"got {dtype!r}")
    cast = {k: v.to(dtype) if dtype is not None and v.is_floating_point() and k not in keep else v
            for k, v in tensors.items()}
    overflow = [k for k, v in cast.items() if v is not tensors[k] and not _finite(v) and _finite(tensors[k])]
    if overflow:
        raise ValueError(f"{len(overflow)} tensors hold values beyond the range of {dtype}, which would become "
                         f"infinite: {describe(overflow, 3)}; store them in a wider dtype")
    return cast


def official_sources(state: Mapping[str, Tensor], official: Mapping[str, str], *, use_ema: bool = True,
                     source: str = "checkpoint") -> dict[str, str]:
    """For each of our names, the key of an official-layout ``state`` to read it from.

    ``official`` maps our names to official ones. UNet tensors come from the EMA copy when the file has one
    and ``use_ema`` is set (the reference samples with its EMA weights).
    """
    has_ema = any(k.startswith(EMA_PREFIX) and k not in IGNORED_KEYS for k in state)
    if not (use_ema and has_ema):
        return dict(official)
    log.info("%s: using the EMA weights of the UNet", source)
    return {ours: ema_name(off[len(UNET_PREFIX):]) if off.startswith(UNET_PREFIX) else off
            for ours, off in official.items()}


def unexpected_official(state: Mapping[str, Tensor], official: Mapping[str, str]) -> list[str]:
    """Keys of an official-layout file that neither the model nor the known bookkeeping tensors account for."""
    known = set(official.values()) | IGNORED_KEYS | set(SCHEDULE_BUFFERS)
    known |= {ema_name(off[len(UNET_PREFIX):]) for off in official.values() if off.startswith(UNET_PREFIX)}
    return [k for k in state if k not in known and not k.startswith(IGNORED_PREFIXES)]


def check_schedule(state: Mapping[str, Tensor], alphas_cumprod: Tensor, source: str) -> None:
    """If the file carries the schedule, it must be the one the config describes, to the precision it is stored
    in (a checkpoint halved to float16 or bfloat16 rounds its schedule buffers too)."""
    stored = state.get("alphas_cumprod")
    if stored is None:
        return
    rtol = max(1e-5, torch.finfo(stored.dtype).eps) if stored.is_floating_point() else 1e-5
    if stored.shape != alphas_cumprod.shape or not torch.allclose(stored.double(), alphas_cumprod, rtol=rtol,
                                                                    atol=1e-7):
        raise CheckpointError(f"{source}: its alphas_cumprod differ from the configured schedule "
                              "(check linear_start, linear_end and timesteps in the config)")


def save_safetensors(tensors: Mapping[str, Tensor], config: dict[str, Any], directory: str | Path) -> Path:
    """Write ``model.safetensors`` (config in its metadata) and ``config.json`` into ``directory`` atomically:
    each file is written under a temporary name and renamed into place, so no half-written file is left.
    ValueError for a ``directory`` that names a file or holds a database, a training run or one of its
    checkpoints, or sample images."""
    from safetensors.torch import save_file

    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"the folder to save the model into must be a str or Path, got {type(directory).__name__}")
    directory = Path(directory)
    if directory.suffix in WEIGHT_SUFFIXES:  # a folder of that name was made
        raise ValueError(f"{directory} names a file: the model is saved into a folder (its {WEIGHTS_FILE} and "
                         f"{CONFIG_FILE}); pass the folder")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a folder to save the model into")
    from ._cli import folder_kind  # here: the command-line helpers import this module

    found = folder_kind(directory) if directory.is_dir() else None
    if found in ("a database", "a training run", "a training checkpoint", "a sample run"):
        raise ValueError(f"{directory} holds {found}: save the model into a folder of its own")
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "config": json.dumps(config)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    weights = directory / WEIGHTS_FILE
    remove_stale_temps(directory, [WEIGHTS_FILE, CONFIG_FILE])  # what a killed save left there
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    try:
        atomic_write(directory / CONFIG_FILE,
                      lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    except BaseException:  # an earlier save's copy would describe other weights (and be reported as edited)
        (directory / CONFIG_FILE).unlink(missing_ok=True)
        raise
    return weights


def _warn_if_edited(file: Path, config: dict[str, Any]) -> None:
    """config.json beside an rdm_fast file is a copy for reading: the file's own metadata is what loads. Say so
    when the copy differs (an edit there has no effect) or is unreadable."""
    if not file.is_file():
        return
    try:
        copy = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s); the config stored in %s is used", file, e, file.parent / WEIGHTS_FILE)
        return
    if copy != config:
        changed = differing_keys(copy, config)
        log.warning("%s differs from the config stored in %s (%s), which is the one used: edits to config.json "
                    "have no effect; pass --config (or config=) to load with another", file,
                    file.parent / WEIGHTS_FILE, ", ".join(changed))


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested dicts differ."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [prefix or "(the whole config)"] if a != b else []
    return [k for key in sorted(set(a) | set(b), key=str)
            for k in differing_keys(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))]


def read_own_config(metadata: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    """The config stored by ``save_safetensors``: from the file's metadata, else ``config.json`` beside it."""
    if metadata.get("format") == FORMAT_NAME:
        try:
            version = int(metadata.get("format_version", "0"))
        except ValueError:
            raise CheckpointError(f"{path}: the format_version in its metadata, {metadata['format_version']!r}, "
                                  "is not a number; is the file damaged?") from None
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer rdm_fast (format {version}; this version reads "
                                  f"up to {FORMAT_VERSION}): upgrade rdm_fast")
        config = _json_config(lambda: metadata["config"], f"{path} (its metadata)")
        _warn_if_edited(path.parent / CONFIG_FILE, config)
        return config
    beside = path.parent / CONFIG_FILE
    if beside.is_file():
        return _json_config(beside.read_text, str(beside))
    return None


def _json_config(read: Callable[[], str], where: str) -> dict[str, Any]:
    """The config in the JSON text ``read()`` returns; CheckpointError naming ``where`` if there is none."""
    try:
        config = json.loads(read())
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: no readable config ({_reason(e)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: the config is not a JSON object")
    return config
