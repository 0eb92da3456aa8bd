"""``python -m rdm_fast.sample``: draw images from an RDM conditioned on given or retrieved CLIP embeddings.

Contexts come from ``--context-file`` (a .npy of shape (B, k, D) or (k, D)) or from ``--db``: pseudo-queries
drawn at random from an embedding database, each with its nearest entries (the query first), as many as
the model was trained with. Writes ``sample_00000.png``..., ``grid.png`` and ``run.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import RDM
from ._cli import CLIError, pick_device, pick_dtype, run
from .config import preset_names
from .images import grid, save_png, to_uint8
from .retrieval import exact_search, load_embeddings

log = logging.getLogger("rdm_fast.sample")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rdm_fast.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="official .ckpt, rdm_fast directory or .safetensors file")
    model.add_argument("--random-init", action="store_true",
                       help="random weights of --config (for smoke runs and benchmarks: the images are noise)")
    p.add_argument("--config", help=f"preset ({', '.join(preset_names())}) or config.yaml "
                                    "(default: the checkpoint's own, config.yaml beside it, or the matching preset)")
    ctx = p.add_mutually_exclusive_group(required=True)
    ctx.add_argument("--context-file", help=".npy of conditioning embeddings, (B, k, D) or (k, D)")
    ctx.add_argument("--db", help="embedding database: .npy (N, D), official .npz part(s) or a directory of them")
    p.add_argument("--k", type=int, help="database entries per context with --db (default: as the model was trained)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-samples", type=int, help="images to draw (default: one per context in the file, 4 with --db)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, help="sampling steps (default: the config's sampling.steps)")
    p.add_argument("--sampler", choices=["ddim", "plms"], help="default: the config's sampling.sampler")
    p.add_argument("--eta", type=float, help="DDIM noise (0 = deterministic; default: the config's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", help="weights and activations in bfloat16")
    prec.add_argument("--fp16", action="store_true", help="weights and activations in float16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA ones")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle checkpoints with Python objects (runs code from the file: trusted files only)")
    return p


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> RDM:
    if args.random_init:
        if not args.config:
            raise CLIError("--random-init needs --config (a preset name or config.yaml)")
        torch.manual_seed(args.seed)
        return RDM.from_config(args.config, device=device, dtype=dtype)
    return RDM.from_pretrained(args.ckpt, args.config, device=device, dtype=dtype, use_ema=not args.no_ema,
                               allow_pickle=args.allow_pickle)


def read_context_file(path: str, dim: int) -> torch.Tensor:
    """(B, k, D) float32 contexts from a .npy file, with errors that say what is wrong."""
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"context file {file} does not exist")
    try:
        arr = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CLIError(f"context file {file} is not a readable .npy array ({str(e).splitlines()[0]})") from None
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
        raise CLIError(f"context file {file} must hold a float array, not {getattr(arr, 'dtype', type(arr))}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] == 0:
        raise CLIError(f"context file {file} holds shape {arr.shape}; expected (B, k, {dim}) or (k, {dim})")
    if arr.shape[2] != dim:
        raise CLIError(f"context file {file} holds {arr.shape[2]}-d embeddings but the model expects {dim}-d "
                       "(its context_dim): use embeddings from the model's retrieval encoder")
    if not np.isfinite(arr).all():
        raise CLIError(f"context file {file} contains NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def database_contexts(path: str, dim: int, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """n contexts of k entries each: a random database entry followed by its k-1 nearest entries."""
    emb = load_embeddings(path)
    if emb.shape[1] != dim:
        raise CLIError(f"database {path} holds {emb.shape[1]}-d embeddings but the model expects {dim}-d")
    if emb.shape[0] < k:
        raise CLIError(f"database {path} holds {emb.shape[0]} entries, fewer than the {k} each context needs")
    db = torch.from_numpy(np.array(emb, dtype=np.float32))
    queries = torch.randint(0, db.shape[0], (n,), generator=generator)
    _, ids = exact_search(db[queries], db, k)
    log.info("retrieved %d neighbours for %d random queries from %d database entries", k, n, db.shape[0])
    return db[ids]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("n_samples", "batch_size", "k", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    device, dtype = pick_device(args.device), pick_dtype(args.bf16, args.fp16)
    model = load_model(args, device, dtype)
    cfg = model.config
    generator = torch.Generator().manual_seed(args.seed)
    if args.context_file:
        contexts = read_context_file(args.context_file, cfg.context_dim)
        n = args.n_samples or contexts.shape[0]
        contexts = contexts[torch.arange(n) % contexts.shape[0]]
    else:
        n = args.n_samples or 4
        contexts = database_contexts(args.db, cfg.context_dim, n, args.k or cfg.context_tokens, generator)
    if cfg.normalized_embeddings:
        contexts = F.normalize(contexts, dim=-1)
    steps = args.steps or cfg.sampling.steps
    sampler = args.sampler or cfg.sampling.sampler
    eta = cfg.sampling.eta if args.eta is None else args.eta
    guidance = cfg.sampling.guidance_scale if args.guidance is None else args.guidance
    model.schedule.ddim(steps, eta)  # validate before any work
    if sampler == "plms" and eta != 0:
        raise CLIError("--sampler plms is deterministic: use --eta 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("sampling %d images: %s, %d steps, eta %g, guidance %g, %s on %s", n, sampler, steps, eta, guidance,
             str(dtype).replace("torch.", ""), device)
    images = []
    with torch.inference_mode(), tqdm(total=n, desc="images", unit="img") as bar:
        for start in range(0, n, args.batch_size):
            batch = contexts[start:start + args.batch_size].to(device)
            z = model.sample(batch, steps=steps, sampler=sampler, eta=eta, guidance_scale=guidance,
                             generator=generator)
            pixels = to_uint8(model.decode(z))
            for i, img in enumerate(pixels):
                save_png(img, out / f"sample_{start + i:05d}.png")
            images.append(pixels)
            bar.update(len(pixels))
    save_png(grid(np.concatenate(images)), out / "grid.png")
    run_info = {"ckpt": args.ckpt, "config": cfg.to_dict(), "n_samples": n, "steps": steps, "sampler": sampler,
                "eta": eta, "guidance_scale": guidance, "seed": args.seed, "dtype": str(dtype),
                "context_source": args.context_file or args.db}
    (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    log.info("wrote %d images and grid.png to %s", n, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
