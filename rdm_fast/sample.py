"""``python -m rdm_fast.sample``: draw images from an RDM conditioned on given or retrieved embeddings.

Contexts come from ``--context-file`` (a .npy of shape (B, k, D) or (k, D)) or from ``--db`` (a database
directory or the name of one in ``$RDM_FAST_HOME/databases``): each sample's query (a ``--text`` caption,
an ``--image``, or for unconditional sampling a pseudo-query drawn from the database's top-m proposals) with
its nearest database entries, laid out as the model was trained (rdm_fast.retrieval.context). Writes
``sample_00000.png``..., ``grid.png`` (the first 64) and ``run.json`` (every setting) into ``--out``.

Sample i's start noise and, with eta > 0, the noise added at each DDIM step come from streams seeded by
(--seed, i), so it is the same image for any --batch-size (to float rounding) and any number of processes: under
``torchrun`` each process draws every world-th batch on its own GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import signal
import sys
import threading
import time
import uuid
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Literal, Sequence, cast

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngImageFile
from tqdm.auto import tqdm

from . import RDM
from ._cli import (CLIError, HelpFormatter, add_max_image_pixels, check_out_dir, claim_out_dir, parse_args,
                   pick_dtype, run, summary)
from ._distributed import Processes, process_device
from ._files import array_file_problem, atomic_write_json, not_a_file, remove_stale_temps, sha256_file
from .checkpoint import resolve_file
from .config import RDMConfig, SamplingDefaults, preset_names
from .data import derived_seed
from .diffusion import Schedule
from .diffusion.samplers import draw_noise
from .encoders import EncoderUnavailable, embed_images, embed_texts, query_encoder
from .images import PngWriter, grid, save_png, to_uint8
from .retrieval.context import (check_database_for_model, default_neighbors, draw_pseudo_queries, locate_database,
                                model_context)
from .retrieval.build import IMAGE_SUFFIXES, load_query_image, query_image_size
from .retrieval.database import BACKENDS, Database
from .retrieval.neighbors import database_digest
from .rdm import NORM_LIMIT, checkpoint_config, config_file_beside

log = logging.getLogger("rdm_fast.sample")
DEFAULT_TOP_M = 0.01  # the fraction of the proposal ranking that pseudo-queries are drawn from


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rdm_fast.sample", description=summary(__doc__),
                                formatter_class=HelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="official .ckpt, rdm_fast file or directory, or a training run (its newest "
                                      "checkpoint) or checkpoint")
    model.add_argument("--random-init", action="store_true",
                       help="random weights of --config (for smoke runs and benchmarks: the images are noise)")
    p.add_argument("--config", help=f"preset ({', '.join(preset_names())}) or config.yaml "
                                    "(default: the checkpoint's own, config.yaml beside it, or the matching preset)")
    ctx = p.add_mutually_exclusive_group(required=True)
    ctx.add_argument("--context-file", help=".npy of conditioning embeddings, (B, k, D) or (k, D)")
    ctx.add_argument("--db", help="embedding database: a directory made by python -m rdm_fast.db, or its name in "
                                  "$RDM_FAST_HOME/databases (default ~/.cache/rdm_fast/databases)")
    query = p.add_mutually_exclusive_group()
    query.add_argument("--text", action="append", help="with --db: caption query (repeat for several; cycled)")
    query.add_argument("--image", action="append", help="with --db: query image file (repeat for several; cycled)")
    add_max_image_pixels(p)
    p.add_argument("--k", type=int, metavar="K",
                   help="with --db: neighbours retrieved per query (default: the model's convention, 3 for "
                        "imagenet/ffhq, 10 for rdm768; 0: the query alone, e.g. caption-only text-to-image)")
    p.add_argument("--no-query", action="store_true",
                   help="with --db: condition on the neighbours alone, without the query's own embedding (the "
                        "default K then fills the query's slot too, 4 for imagenet/ffhq; with a text token, as "
                        "rdm768, K stays 10 and the context is one embedding shorter)")
    p.add_argument("--top-m", type=float,
                   help="with --db and no --text/--image: draw pseudo-queries from this top fraction of the "
                        f"database's proposal ranking (default: {DEFAULT_TOP_M})")
    p.add_argument("--encoder-checkpoint", help="local weights of the database's encoder (for --text/--image)")
    p.add_argument("--search-backend", default="auto", choices=BACKENDS,
                   help="nearest-neighbour search backend for --db")
    p.add_argument("--nprobe", type=int, metavar="N",
                   help="with --db and an ivfpq index: inverted lists searched per query (default: the one recorded "
                        "at build); fewer is faster and less exact")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-samples", type=int, help="images to draw (default: one per context in the file; with "
                   "--db, one per --text or --image query, else 4)")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampling call")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in batch jobs' logs)")
    p.add_argument("--steps", type=int,
                   help="sampling steps, 1 to T/2 (default: the config's sampling.steps). As in the reference, "
                        "the timesteps are every T // steps: a count that does not divide T = 1000 runs a few "
                        "more (7 -> 8), and one whose last timestep would be 1000 is refused (where T // steps "
                        "divides 999: 3, 9, 27, 36, 37, 101-111, 251-333)")
    p.add_argument("--sampler", choices=["ddim", "plms"], help="default: the config's sampling.sampler")
    p.add_argument("--eta", type=float, help="DDIM noise, 0 (deterministic) up to about 1 (the bound depends on "
                                             "--steps) (default: the config's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the config's)")
    p.add_argument("--seed", type=int, default=0,
                   help="sample i's noise (start, and each step's for eta > 0) is seeded by (seed, i), whatever "
                        "the batch it is drawn in")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", help="weights and activations in bfloat16")
    prec.add_argument("--fp16", action="store_true", help="weights and activations in float16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="run each denoising step eagerly instead of replaying a captured CUDA graph")
    p.add_argument("--no-ema", action="store_true",
                   help="the UNet's raw weights instead of its EMA ones: an official checkpoint's, or a training "
                        "checkpoint's train_weights.safetensors (other rdm_fast files hold one set: a warning)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out: only the samples without an image of that run "
                        "(each PNG names the run that drew it) are drawn; its "
                        "run.json must record the same settings, checkpoint file (by contents) and "
                        "conditioning: contexts, search (exact, or "
                        "which index) and query encoder (name, weights file, precision). --batch-size and the "
                        "number of processes may differ, and --device where the search does not depend on it (the "
                        "CLIP query encoders run in float32 on every device): the images depend on none of them, "
                        "up to float rounding")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle checkpoints with Python objects (runs code from the file: trusted files only)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """The checks that need no model or file, so that a bad option fails before anything is loaded."""
    for name in ("n_samples", "batch_size", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.n_samples is not None and args.n_samples > MAX_SAMPLES:  # its lists alone would take gigabytes
        raise CLIError(f"--n-samples {args.n_samples}: at most {MAX_SAMPLES:,} per run (more images are several "
                       "runs, each with its own --seed and --out)")
    if args.eta is not None and not args.eta >= 0:
        raise CLIError(f"--eta must be >= 0, got {args.eta}")
    if not 0 <= args.seed < 2**63:
        raise CLIError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.top_m is not None:
        if not args.db or args.text or args.image:
            raise CLIError("--top-m draws pseudo-queries from a database's proposals: it needs --db and no "
                           "--text/--image")
        if not 0 < args.top_m <= 1:
            raise CLIError(f"--top-m must be a fraction in (0, 1], got {args.top_m}")
    if args.text and not all(t.strip() for t in args.text):
        raise CLIError("--text captions must not be empty")
    if (args.text or args.image or args.k is not None or args.no_query or args.search_backend != "auto" or
            args.nprobe is not None) and not args.db:
        raise CLIError("--text, --image, --k, --no-query, --search-backend and --nprobe are about retrieval from a "
                       "database: add --db")
    if args.nprobe is not None and args.nprobe < 1:
        raise CLIError(f"--nprobe must be at least 1, got {args.nprobe}")
    if args.encoder_checkpoint and not (args.text or args.image):  # only queries are embedded here
        raise CLIError("--encoder-checkpoint is the weights of the encoder that embeds --text/--image queries: "
                       "without those it is not used")
    if args.k is not None and args.k < int(args.no_query):
        raise CLIError(f"--k must be at least {int(args.no_query)}{' with --no-query' if args.no_query else ''}, "
                       f"got {args.k}")
    if args.random_init and not args.config:
        raise CLIError("--random-init needs --config (a preset name or config.yaml)")
    check_out_dir(args.out, "a sample run")
    foreign = sorted(p.name for p in Path(args.out).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not (
        p.name == "grid.png" or p.name.startswith("sample_"))) if Path(args.out).is_dir() else []
    if foreign:  # an image folder: the samples would be mixed into it (and into what is later built from it)
        raise CLIError(f"--out {args.out} holds {len(foreign)} image{'s' * (len(foreign) > 1)} that sample did not "
                       f"write (e.g. {foreign[0]}): write the samples into a folder of their own")
    if args.resume and not (Path(args.out) / "run.json").is_file():  # before the model load
        raise CLIError(f"--resume: {Path(args.out) / 'run.json'} does not exist (no run to continue in {args.out})")


def known_config(args: argparse.Namespace, ckpt_file: Path | None) -> tuple[RDMConfig | None, str]:
    """The model's config where it is known without loading weights (see rdm_fast.rdm.checkpoint_config), and
    where it comes from, for messages."""
    if args.config:  # --random-init needs it
        return RDMConfig.resolve(args.config), f"--config {args.config}"
    assert ckpt_file is not None  # --ckpt, resolved
    beside = config_file_beside(ckpt_file) if ckpt_file.suffix != ".safetensors" else None
    source = f"{beside}, beside the checkpoint" if beside else f"the checkpoint {ckpt_file}"
    return checkpoint_config(ckpt_file), source


def sampling_settings(args: argparse.Namespace, cfg: RDMConfig) -> SamplingDefaults:
    """The run's steps, sampler, eta and guidance: the options, else the config's defaults, checked against its
    schedule."""
    try:
        settings = cfg.sampling.resolve(args.steps, args.sampler, args.eta, args.guidance)
    except (TypeError, ValueError) as e:  # the config's own values are valid: an option is at fault
        setting, _, rest = str(e).partition(" ")
        flag = {"guidance_scale": "guidance"}.get(setting, setting)
        raise CLIError(f"--{flag} {rest}") from None
    Schedule.linear(cfg.linear_start, cfg.linear_end, cfg.timesteps).ddim(settings.steps, settings.eta)  # ValueError
    return settings


def load_model(args: argparse.Namespace, ckpt_file: Path | None, cfg: RDMConfig | None, device: torch.device,
               dtype: torch.dtype) -> RDM:
    """The model of ``ckpt_file`` (--ckpt resolved) or --random-init; ``cfg``: its config if already known (else
    found while loading)."""
    if args.random_init:
        torch.manual_seed(args.seed)
        log.info("building a randomly initialised %s model", args.config)
        assert cfg is not None  # known_config resolves --config for --random-init
        return RDM.from_config(cfg, device=device, dtype=dtype)
    assert ckpt_file is not None  # --ckpt, resolved
    log.info("loading %s", ckpt_file)
    return RDM.from_pretrained(ckpt_file, cfg or args.config, device=device, dtype=dtype,
                               use_ema=not args.no_ema, allow_pickle=args.allow_pickle)


MEMORY_ADVICE = "lower --batch-size (the images do not depend on it)"  # after an out-of-memory error
GRID_SAMPLES = 64  # grid.png shows the first samples only
START_NOISE, STEP_NOISE, PSEUDO_QUERIES = 0, 1, 2  # purposes of the seeded streams
NOISE_STREAMS = "pcg64"  # how the per-sample streams are drawn, checked on resume; older versions seeded torch's
# CPU generator with a 32-bit mix of (seed, purpose, sample), so samples of one run could share their noise


def seeded_generator(seed: int, purpose: int, sample: int) -> np.random.Generator:
    """Sample ``sample``'s stream of ``purpose``: NumPy's PCG64 seeded by SeedSequence([seed, purpose, sample]),
    a 128-bit state, so distinct (seed, sample) pairs do not share noise (torch's CPU generator keeps 32 bits of
    its seed: a 50,000-image run held a pair with the same start noise for 3 of the seeds 0-9)."""
    return np.random.default_rng(np.random.SeedSequence([seed, purpose, sample]))


def read_context_file(path: str, dim: int, config_source: str) -> torch.Tensor:
    """(B, k, D) float32 contexts from a .npy file, with errors that say what is wrong (``config_source``: where
    the model's config, and so D, comes from)."""
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"context file {file} {not_a_file(file)}")
    try:
        arr = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise CLIError(f"context file {file} is not a readable .npy array ({array_file_problem(file, e)})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        raise CLIError(f"context file {file} is a zip archive (.npz, or torch.save's format): save the contexts as "
                       "one .npy array (np.save)")
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
        raise CLIError(f"context file {file} must hold a float array, not {getattr(arr, 'dtype', type(arr))}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] == 0:
        raise CLIError(f"context file {file} holds shape {arr.shape}; expected (B, k, {dim}) or (k, {dim})")
    if arr.shape[0] == 0:
        raise CLIError(f"context file {file} holds no contexts (shape {arr.shape}): it needs at least one")
    if arr.shape[2] != dim:
        raise CLIError(f"context file {file} holds {arr.shape[2]}-d embeddings but the model expects {dim}-d "
                       f"(context_dim in {config_source}): use embeddings from the model's retrieval encoder, or "
                       "the model's own config")
    if not np.isfinite(arr).all():
        raise CLIError(f"context file {file} contains NaN or infinite values")
    with np.errstate(over="ignore"):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise CLIError(f"context file {file} holds values beyond float32's range (about 3.4e38)")
    norms = np.sqrt(np.square(arr, dtype=np.float64).sum(-1))
    if norms.max() > NORM_LIMIT:
        raise CLIError(f"context file {file} holds embeddings of norm up to {norms.max():.3g}, beyond what the "
                       f"model computes with in float32 ({NORM_LIMIT:.3g})")
    return torch.from_numpy(arr)


# run.json entries that a resumed run must share with the run it continues (the images depend on them); the
# checkpoint by content, so that a copy of it elsewhere (e.g. on a node's local disk) resumes
RESUME_KEYS = ("ckpt_sha256", "config", "n_samples", "steps", "timesteps", "sampler", "eta",
               "guidance_scale", "seed", "dtype", "no_ema", "random_init", "context_source", "context_digest", "text",
               "image", "top_m", "k", "include_query", "search", "query_encoder")
MAX_SAMPLES = 10**7  # images per run (the list of their indices alone takes about 0.4 GB)
PNG_LEVELS = "truncated"  # how images are quantised (images.to_uint8), checked first on resume; older versions rounded


# what a changed entry means where its name does not say it
RESUME_KEY_MEANINGS = {"context_digest": "context_digest: the contents of the context file, or of the database, the "
                                         "pseudo-queries drawn from its proposal ranking or the --image files",
                       "ckpt_file": "ckpt_file: the checkpoint file (a training run's newest changes as it trains)",
                       "ckpt_sha256": "ckpt_sha256: the checkpoint file's contents (another model saved at its path, "
                                      "e.g. by convert into the same --out)",
                       "query_encoder": "query_encoder: the query encoder's name, weights or precision (float32 since "
                                        "rdm_fast embeds queries as the reference scripts do)"}


RUN_ID_KEY = "rdm_fast_run"  # the PNG text entry naming the run (run.json's run_id) that drew an image


def resumed_run_id(path: Path, run_info: dict) -> str:
    """The run id of ``path`` (an earlier run's run.json); CLIError unless it records the settings of
    ``run_info`` (RESUME_KEYS)."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CLIError(f"--resume: cannot read {path}: {e}") from None
    if not isinstance(previous, dict):
        raise CLIError(f"--resume: {path} is not the run.json of a sample run (not a JSON object)")
    if previous.get("png_levels") != PNG_LEVELS:
        raise CLIError(f"--resume: {path.parent} holds a run of an older rdm_fast (its run.json records no "
                       "png_levels), whose images may be quantised otherwise (this version truncates the levels as "
                       "the reference scripts do): finish it with that version, or start a new --out")
    if previous.get("noise") != NOISE_STREAMS:
        raise CLIError(f"--resume: {path.parent} holds a run of an older rdm_fast (its run.json records no "
                       f"noise = {NOISE_STREAMS}), whose noise came from other streams: finish it with that version, "
                       "or start a new --out")
    current = json.loads(json.dumps(run_info))  # as it would be written (tuples as lists)
    changed = [key for key in RESUME_KEYS if previous.get(key) != current.get(key)]
    if "ckpt_sha256" in changed and "ckpt_sha256" in previous and previous.get("ckpt_file") != current["ckpt_file"]:
        changed[changed.index("ckpt_sha256")] = "ckpt_file"  # another file (a copy of the same one resumes)
    changed = [RESUME_KEY_MEANINGS.get(key, key) if key in previous else f"{key}: not recorded by the older rdm_fast "
               "that began it" for key in changed]
    if changed:
        raise CLIError(f"--resume: {path.parent} holds a run with other settings ({', '.join(changed)}); use the "
                       "same options and inputs, or another --out")
    if not isinstance(previous.get("run_id"), str):
        raise CLIError(f"--resume: {path} names no run_id (written by an older rdm_fast): its images cannot be "
                       "told from other runs'; start a new run")
    return previous["run_id"]


def sample_images(out: Path) -> dict[int, Path]:
    """The images in ``out`` named as sample i's (``sample_{i:05d}.png``), by index."""
    found = {}
    for file in out.glob("sample_*.png"):
        digits = file.stem[len("sample_"):]
        if digits.isascii() and digits.isdigit() and file.name == f"sample_{int(digits):05d}.png":
            found[int(digits)] = file
    return found


def drawn_by(path: Path, run_id: str) -> bool:
    """Whether ``path`` is an image that the run ``run_id`` wrote (its PNG text entry; the header alone is read)."""
    try:
        with Image.open(path) as image:
            return isinstance(image, PngImageFile) and image.text.get(RUN_ID_KEY) == run_id
    except (OSError, SyntaxError, ValueError):  # missing, or not a readable image
        return False


class DatabaseContexts:
    """Per-batch contexts from a database: the queries are fixed up front (seeded), retrieval runs per batch on
    the sampling device."""

    query_ids: torch.Tensor | None
    queries: torch.Tensor | None

    def __init__(self, args: argparse.Namespace, cfg: RDMConfig, device: torch.device,
                 generator: torch.Generator) -> None:
        self.db = Database.open(locate_database(args.db), backend=args.search_backend, device=device,
                                nprobe=args.nprobe)
        self.include_query = not args.no_query
        self.k = default_neighbors(cfg, include_query=self.include_query) if args.k is None else \
            args.k
        check_database_for_model(self.db, cfg, self.k, own_entry=not (args.text or args.image))
        self.cfg, self.device = cfg, device
        self.texts, self.images, self.query_ids, self.queries, self.encoder = args.text, args.image, None, None, None
        if args.text or args.image:
            self.encoder = query_encoder(self.db.encoder_spec, device=device, checkpoint=args.encoder_checkpoint)
            self.n_default = len(args.text or args.image)
        else:
            self.n_default = 4
        self.top_m, self.generator = DEFAULT_TOP_M if args.top_m is None else args.top_m, generator
        self.encoder_checkpoint = args.encoder_checkpoint

    def prepare(self, n: int) -> None:
        """Fix the queries once, on the device (no per-batch copies, encoder calls or synchronisation)."""
        if self.encoder is None:
            self.query_ids = draw_pseudo_queries(self.db, n, self.top_m, self.generator).to(self.device)
        elif self.texts:  # each distinct caption / image embedded once, cycled over the samples
            self.queries = embed_texts(self.encoder, self.texts).to(self.device)
        else:
            size = query_image_size(self.db.manifest, self.encoder)  # cut as the database's entries were
            images = torch.stack([load_query_image(p, size) for p in self.images])
            self.queries = embed_images(self.encoder, images.to(self.device)).to(self.device)
        if self.queries is not None and not bool(torch.isfinite(self.queries).all()):  # once, before sampling
            assert self.encoder is not None  # the queries' encoder
            raise CLIError(f"encoder {self.encoder.name} gave non-finite embeddings for the "
                           f"{'--text captions' if self.texts else '--image files'}")

    def settings(self, digest_files: bool = True) -> dict:
        """What else decides the contexts: the search (exact, or which index with which parameters) and the
        query encoder (name, precision, and the --encoder-checkpoint file's resolved path and SHA-256: two CLIP
        checkpoints of one architecture have the same size; None without ``digest_files``)."""
        search = self.db.search_settings
        exact = self.db.backend.endswith("-exact")  # the exact backends agree (ties broken by the lower id)
        weights = None if self.encoder_checkpoint is None else Path(self.encoder_checkpoint).resolve()
        encoder = None if self.encoder is None else {
            "name": self.encoder.name, "dtype": str(getattr(self.encoder, "dtype", torch.float32)),
            "checkpoint": None if weights is None else [str(weights), sha256_file(weights) if digest_files else None]}
        return {"search": {**search, "backend": "exact" if exact else search["backend"]}, "query_encoder": encoder}

    def digest(self) -> str:
        """SHA-256 of what the contexts are drawn from besides the options (after prepare()): the database's shards,
        and the pseudo-queries drawn from its proposal ranking (a rerun of db neighbors can change them under the
        same manifest record) or the --image files."""
        h = hashlib.sha256(database_digest(self.db).encode())
        if self.query_ids is not None:
            h.update(self.query_ids.cpu().numpy().tobytes())
        for path in self.images or ():
            h.update(Path(path).read_bytes())
        return h.hexdigest()

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """Contexts of the samples ``index`` (on the sampling device: no host copy or synchronisation)."""
        if self.encoder is None:
            assert self.query_ids is not None  # drawn by prepare()
            ids = self.query_ids[index]
            return model_context(self.db, self.cfg, self.db.embeddings(ids).to(self.device), query_ids=ids,
                                 k=self.k, include_query=self.include_query)
        assert self.queries is not None  # embedded by prepare()
        rows = index % self.queries.shape[0]
        return model_context(self.db, self.cfg, self.queries[rows], k=self.k, include_query=self.include_query)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    check_args(args)
    # under torchrun: the batches are shared out, and the processes meet at the end (gloo; torchrun ends them all
    # if one fails)
    procs = Processes()
    # signal handlers can be set in the main thread only; an ignored SIGTERM (inherited) stays ignored
    own_handler = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    previous = signal.signal(signal.SIGTERM, _terminated) if own_handler else None
    state = {"sampling": False}  # set once this run's run.json says it is under way
    try:
        with contextlib.ExitStack() as held:
            return _main(args, procs, held, state)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (_terminated)
        if procs.main and state["sampling"]:
            log.warning("stopped: the same command with --resume draws only the images still missing")
        raise
    finally:
        if own_handler and previous is not None:  # None: a handler set outside Python, which cannot be restored
            signal.signal(signal.SIGTERM, previous)
        procs.close()


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler's preemption; torchrun ending the other processes when one fails) unwinds the run as
    Ctrl-C does: images being written are finished or removed, and the exit status is 143."""
    raise SystemExit(128 + signum)


def _main(args: argparse.Namespace, procs: Processes, held: contextlib.ExitStack, state: dict[str, bool]) -> int:
    """The run: model and contexts, then the batches. ``held`` keeps what the run holds until it ends;
    ``state["sampling"]`` is set once run.json records the run (from then on, --resume continues it)."""
    started = time.perf_counter()
    if args.db:
        locate_database(args.db)  # a missing database fails now; it is opened after the model
    ckpt_file = None if args.random_init else resolve_file(args.ckpt)  # a training run's newest checkpoint
    cfg, config_source = known_config(args, ckpt_file)
    if cfg is not None:
        sampling_settings(args, cfg)
    device, dtype = process_device(args.device), pick_dtype(args.bf16, args.fp16)
    # a bad context file fails before the (possibly minutes-long) model load where the config is already known
    contexts = read_context_file(args.context_file, cfg.context_dim, config_source) if args.context_file and cfg \
        else None
    model = load_model(args, ckpt_file, cfg, device, dtype)
    cfg = model.config
    settings = sampling_settings(args, cfg)
    # the --db pseudo-queries (a mixed seed: torch's generator keeps 32 bits, so --seed s and s + 2**32 drew alike)
    generator = torch.Generator().manual_seed(derived_seed(args.seed, PSEUDO_QUERIES))
    if args.context_file:
        if contexts is None:  # the config came from the tensors
            contexts = read_context_file(args.context_file, cfg.context_dim,
                                         "the preset the checkpoint's tensors match")
        n = args.n_samples or contexts.shape[0]
        batch_contexts: Callable[[torch.Tensor], torch.Tensor] = _cycled(contexts, n, device)
        context_digest = hashlib.sha256(contexts.numpy().tobytes()).hexdigest()
    else:
        try:
            batch_contexts = DatabaseContexts(args, cfg, device, generator)
        except EncoderUnavailable as e:
            raise CLIError(str(e)) from None
        n = args.n_samples or batch_contexts.n_default
        batch_contexts.prepare(n)
        context_digest = batch_contexts.digest()
    out = Path(args.out)
    held.enter_context(claim_out_dir(out, procs.from_rank0))  # one run at a time into --out; makes it
    db_contexts = cast(DatabaseContexts, batch_contexts)  # read below with --db only
    timesteps = len(model.schedule.ddim_timesteps(settings.steps))  # more than steps where they do not divide T
    run_info = {"ckpt": args.ckpt, "ckpt_file": None if ckpt_file is None else str(ckpt_file),
                # by content: a file replaced at the same path (convert again into its folder) holds other weights,
                # and a copy moved to another machine the same ones (a size and mtime would change with the copy)
                "ckpt_sha256": None if ckpt_file is None or not procs.main else sha256_file(ckpt_file),  # read once
                # the training warm-up does not change the images (runs recorded before it was read compare)
                "config": replace(cfg, warm_up_steps=0).to_dict(), "n_samples": n, "steps": settings.steps,
                "timesteps": timesteps, "sampler": settings.sampler, "eta": settings.eta,
                "guidance_scale": settings.guidance_scale, "seed": args.seed, "dtype": str(dtype),
                "batch_size": args.batch_size, "device": str(device), "processes": procs.world,
                "no_ema": args.no_ema, "random_init": args.random_init,
                "context_source": args.context_file or args.db, "context_digest": context_digest,
                "text": args.text, "image": args.image,
                "top_m": db_contexts.top_m if args.db and not (args.text or args.image) else None,
                "k": db_contexts.k if args.db else None,
                "include_query": db_contexts.include_query if args.db else None, "png_levels": PNG_LEVELS,
                "noise": NOISE_STREAMS,
                **(db_contexts.settings(procs.main) if args.db else {"search": None, "query_encoder": None}),
                "args": vars(args)}  # the command line as given, for reproduction
    run_id, missing = _images_to_draw(args, out, n, run_info, procs)
    run_info["run_id"] = run_id
    if procs.main:
        log.info("sampling %d image%s: %s, %d step%s, eta %g, guidance %g, %s on %s%s", n, "s"[:n != 1],
                 settings.sampler, timesteps, "s"[:timesteps != 1], settings.eta, settings.guidance_scale,
                 str(dtype).replace("torch.", ""), device, f" and {procs.world - 1} more process"
                 f"{'es' * (procs.world > 2)}" if procs.world > 1 else "")
        if args.resume:
            log.info("resuming: %d of the %d images exist, %d to draw", n - len(missing), n, len(missing))
        atomic_write_json(out / "run.json", {**run_info, "complete": False})  # an interrupted run says what it was
    state["sampling"] = True
    began = time.perf_counter()
    shown = _draw_images(args, model, settings, batch_contexts, missing, procs, out, run_id, device)
    procs.barrier()  # every process's images are written
    if procs.main:
        _finish(out, n, missing, shown, run_info, time.perf_counter() - began, started)
    return 0


def _images_to_draw(args: argparse.Namespace, out: Path, n: int, run_info: dict, procs: Processes
                    ) -> tuple[str, list[int]]:
    """The run's id and the indices of the images it draws: all ``n``, or with --resume those the run it
    continues has not written. Earlier runs' images in ``out`` are named in warnings; temporary files that killed
    runs left are removed. Every process gets rank 0's answer."""
    # every image carries its run's id: --resume keeps only the images of the run it continues (an interrupted new
    # run in the same --out leaves earlier runs' images behind), each written atomically (present = whole).
    # Rank 0's view (the checkpoint files are digested there only), so that every process shares out the same list
    # while the first images appear.
    run_id = (resumed_run_id(out / "run.json", run_info) if args.resume else uuid.uuid4().hex) if procs.main else None
    if procs.main:  # before the others write (they wait below): what killed runs left half-written
        removed = remove_stale_temps(out, ["sample_*.png", "grid.png", "run.json"])
        if removed:
            log.info("removed %d temporary file%s left by an interrupted run", removed, "s"[:removed != 1])
    present = sample_images(out) if procs.main else {}  # index -> file, listed once (not a lookup per index)
    kept = {i for i, file in present.items() if i < n and drawn_by(file, cast(str, run_id))} if args.resume else set()
    run_id, missing = procs.from_rank0((run_id, [i for i in range(n) if i not in kept] if procs.main else None))
    if procs.main:
        named = set(present.values())
        earlier = sum(p not in named for p in out.glob("sample_*.png")) + sum(i >= n for i in present)
        if earlier:
            log.warning("%s already holds sample images beyond this run's %d (%d, from an earlier run): they are "
                        "left as they are", out, n, earlier)
        replaced = 0 if args.resume else sum(i < n for i in present)
        if replaced:
            log.warning("%s holds %d of this run's image names from an earlier run: they are replaced (--resume "
                        "would keep that run's images and draw only the missing ones)", out, replaced)
    return run_id, missing


def _cycled(contexts: torch.Tensor, n: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The contexts of a --context-file's samples: sample i takes context i mod B (copied to ``device`` once)."""
    if n > contexts.shape[0] == 1:  # a (k, D) file
        log.info("%d samples from 1 context: every sample gets it", n)
    elif n > contexts.shape[0]:
        log.info("%d samples from %d contexts: the contexts are cycled (sample i gets context i mod %d)", n,
                 contexts.shape[0], contexts.shape[0])
    on_device = contexts.to(device)
    return lambda index: on_device[index % on_device.shape[0]]


def _draw_images(args: argparse.Namespace, model: RDM, settings: SamplingDefaults,
                 batch_contexts: Callable[[torch.Tensor], torch.Tensor], missing: list[int], procs: Processes,
                 out: Path, run_id: str, device: torch.device) -> dict[int, np.ndarray]:
    """Sample, decode and write this process's share of the ``missing`` images (every world-th batch); returns
    the drawn ones below GRID_SAMPLES, for grid.png (a long run's images are not all kept)."""
    cfg = model.config
    batches = [(b, min(b + args.batch_size, len(missing))) for b in range(0, len(missing), args.batch_size)]
    # under torchrun each process draws every world-th batch; sample i's noise depends on i alone
    mine = batches[procs.rank::procs.world]  # (first, end) positions in ``missing``
    order = torch.tensor(missing, device=device)  # the samples' indices on the device, copied once
    shown = {}  # samples below GRID_SAMPLES drawn here
    # PNGs are compressed on background threads while the next batch is queued on the device (PngWriter)
    with torch.inference_mode(), tqdm(total=sum(end - first for first, end in mine), desc="images", unit="img",
                                      disable=args.no_progress or not procs.main) as bar, \
            PngWriter(max_pending=2 * args.batch_size) as writer:
        batch = batch_contexts(order[slice(*mine[0])]) if mine else None
        for j, (first, end) in enumerate(mine):
            assert batch is not None  # this batch's contexts, queued before the loop or in its previous step
            samples = missing[first:end]
            # each sample's start noise from its own stream (the same for any batching), copied to a GPU
            # without waiting for the queued retrieval
            x_T = draw_noise((len(samples), *cfg.latent_shape),
                             [seeded_generator(args.seed, START_NOISE, i) for i in samples], device)
            z = model.sample(batch, steps=settings.steps, sampler=cast(Literal["ddim", "plms"], settings.sampler),
                             eta=settings.eta, guidance_scale=settings.guidance_scale, x_T=x_T,
                             generator=[seeded_generator(args.seed, STEP_NOISE, i) for i in samples]
                             if settings.eta > 0 else None,  # the noise of eta > 0 (none drawn at eta 0)
                             cuda_graph=False if args.no_cuda_graph else None,
                             progress=sys.stderr.isatty() and procs.main and not args.no_progress)  # terminals
            # read with the pixels, not before: non-finite latents (which decode refuses on the CPU: they are
            # zeroed there, to be named below) and images
            finite = torch.isfinite(z).flatten(1).all(1)
            images_gpu = model.decode(torch.nan_to_num(z) if z.device.type == "cpu" else z)
            finite &= torch.isfinite(images_gpu).flatten(1).all(1)
            if j + 1 < len(mine):  # queue the next batch's retrieval before waiting for these images
                batch = batch_contexts(order[slice(*mine[j + 1])])
            pixels = to_uint8(images_gpu)
            if not bool(finite.all()):
                bad = [i for i, ok in zip(samples, finite.tolist()) if not ok]
                raise CLIError(f"sample{'s' * (len(bad) > 1)} {', '.join(map(str, bad[:5]))} came out NaN or "
                               "infinite: the checkpoint's weights or the contexts are not finite" +
                               (", or float16 overflowed (try --bf16)" if args.fp16 else ""))
            for i, img in zip(samples, pixels):
                writer.write(img, out / f"sample_{i:05d}.png", text={RUN_ID_KEY: run_id})
                if i < GRID_SAMPLES:
                    shown[i] = img
            bar.update(len(pixels))
    return shown


def _finish(out: Path, n: int, missing: list[int], shown: dict[int, np.ndarray], run_info: dict, seconds: float,
            started: float) -> None:
    """grid.png of the first samples, run.json marked complete, and the run's summary line (the main process,
    once every process's images are written). ``seconds``: sampling, decoding and writing; ``started``: the
    run's start (time.perf_counter)."""
    # the first samples that other processes or an earlier run drew are read back
    first_images = [shown[i] if i in shown else np.asarray(Image.open(out / f"sample_{i:05d}.png").convert("RGB"))
                    for i in range(min(n, GRID_SAMPLES))]
    save_png(grid(np.stack(first_images)), out / "grid.png")
    atomic_write_json(out / "run.json", {**run_info, "complete": True, "seconds": round(seconds, 3)})
    rate = f", {seconds / len(missing):.3g} s per image, first batch's warm-up included" if missing else ""
    log.info("wrote %d image%s%s and grid.png (%s) to %s in %.1f s of sampling, decoding and writing%s; %.1f s "
             "with loading", len(missing), "s"[:len(missing) != 1],
             f" (the other {n - len(missing)} of {n} were there)" if len(missing) < n else "",
             f"the first {len(first_images)}" if len(first_images) > 1 else "of sample 0", out, seconds, rate,
             time.perf_counter() - started)


if __name__ == "__main__":
    raise SystemExit(run(main, memory_advice=MEMORY_ADVICE))
