"""``python -m rdm_fast.db``: build, import, inspect, index and search image embedding databases.

Commands: ``build`` (embed a folder or list of images; resumable; split over GPUs with ``torchrun``),
``import-npz`` (official ``{N}x{D}-part_{i}.npz`` files), ``info``, ``search`` (by caption or image, with an
optional contact sheet), ``index`` (FAISS index for large databases) and ``neighbors`` (training neighbours
and the top-m proposal list). ``--encoder`` takes a registered name or ``package.module:factory``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import math
import os
import shutil
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ._cli import CLIError, HelpFormatter, add_max_image_pixels, holding, one_process, parse_args, run, summary
from ._distributed import process_device
from ._files import atomic_save_npy, atomic_write, make_dirs, not_a_file, remove_stale_temps
from .encoders import EncoderUnavailable, query_encoder, resolve_encoder
from .images import contact_sheet
from .retrieval import (Database, add_index, build_database, compute_neighbors, import_npz, proposal_ranking,
                        save_neighbors, save_proposals)
from .retrieval.build import (CROP_MODES, MAX_UPSCALE, PROGRESS, error_line, load_query_image, load_rgb, make_crops,
                              query_image_size, replay_crop)
from .retrieval.context import locate_database
from .retrieval.database import BACKENDS, MANIFEST, PROPOSALS
from .retrieval.neighbors import neighbor_files, same_entries

log = logging.getLogger("rdm_fast.db")
EXACT_CPU_WARNING = 10**14  # multiply-adds of an exact CPU neighbour search worth a warning (1,000 s at 1e11/s)


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


# the parameters each index kind takes (retrieval.faiss_index, which needs faiss to import)
INDEX_PARAMS = "flat: chunk; ivfpq: nlist, m, nbits, nprobe, chunk; hnsw: M, ef_construction, ef_search, chunk"


def build_parser() -> argparse.ArgumentParser:
    """The ``db`` command line: one subcommand per step of a database's life."""
    p = argparse.ArgumentParser(prog="python -m rdm_fast.db", description=summary(__doc__))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = HelpFormatter

    def command(name: str, text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", formatter_class=fmt)
        parser.set_defaults(subparser=parser)  # parse_args reports unknown options with this command's usage
        return parser

    db_help = "database directory, or the name of one in $RDM_FAST_HOME/databases"
    no_progress = "no progress bar (e.g. in batch jobs' logs)"
    backend_help = ("search backend: auto (triton on CUDA, else the FAISS index if built, else exact torch), "
                    f"or one of {', '.join(b for b in BACKENDS if b != 'auto')}")
    device_help = "auto (cuda if available, else cpu), cpu, cuda or cuda:N"
    nprobe_help = ("with an ivfpq index (the faiss backend): inverted lists searched per query (default: the one "
                   "recorded at build, nlist / 20 and at least 8); fewer is faster and less exact")
    b = command("build", "embed images into a new database (resumable; torchrun for several GPUs)")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of jpg/jpeg/png/webp images (searched recursively, links to folders "
                                      "followed)")
    src.add_argument("--list", help="text file: one image path per line (relative paths are read from the list's "
                                    "folder), optionally a tab and a class id")
    b.add_argument("--encoder", required=True, help="registered encoder name or package.module:factory")
    add_max_image_pixels(b)
    b.add_argument("--out", required=True, help="database directory (rerun the same command to resume)")
    b.add_argument("--crop", choices=CROP_MODES, default="center",
                   help="random: patches at native resolution, or of --fit-square squares; center: short side "
                        "resized, central square; none: whole image resized")
    b.add_argument("--fit-square", type=_positive, metavar="S",
                   help="with --crop random: cut the patches from each image's central S x S square, its short side "
                        "resized to S first (--crop-size to 8192; the official OpenImages database: 1200, with 256 px "
                        "patches, 3 per image)")
    b.add_argument("--crop-size", type=_positive, default=256,
                   help="side of the square crops, in pixels (at most 4096; the encoder resizes them to its input)")
    b.add_argument("--crops-per-image", type=_positive, default=1, help="random crops per image")
    b.add_argument("--batch-size", type=_positive, default=64, help="crops per encoder batch")
    b.add_argument("--shard-size", type=_positive, default=100_000,
                   help="rows per shard, rounded down to whole images: each shard holds shard-size // "
                        "crops-per-image images (at least one)")
    b.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image loading processes")
    b.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK or cpu), cpu, cuda or cuda:N")
    b.add_argument("--encoder-checkpoint", help="local weights file for the encoder")
    b.add_argument("--class-from-folder", action="store_true",
                   help="class id = index of the image's folder (top-level under --images, parent for --list); "
                        "-1 for images directly in the folder or the list's folder")
    b.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    b.add_argument("--no-progress", action="store_true", help=no_progress)

    im = command("import-npz", "convert official {N}x{D}-part_{i}.npz files into a database")
    im.add_argument("parts", nargs="+", help="part files (imported in part order)")
    im.add_argument("--out", required=True, help="database directory (rerun the same command to resume)")
    im.add_argument("--encoder", required=True,
                    help="encoder that made the embeddings (e.g. clip-vit-b-32); its dimension is checked")
    im.add_argument("--shard-size", type=_positive, default=100_000,
                    help="rows per shard at most (a shard never spans two parts)")
    im.add_argument("--chunk-rows", type=_positive, default=65536, help="rows read from a part at a time")
    im.add_argument("--allow-pickle", action="store_true",
                    help="accept parts whose img_id is pickled (runs code from the file: trusted files only)")
    im.add_argument("--no-progress", action="store_true", help=no_progress)

    i = command("info", "summary of a database")
    i.add_argument("db", help=db_help)
    i.add_argument("--verify", action="store_true",
                   help="check the SHA-256 of every shard's embeddings and metadata (reads them all; the index "
                        "and proposals files have no checksum)")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")

    s = command("search", "nearest entries of a caption or an image")
    s.add_argument("db", help=db_help)
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="caption query (encoders with a text tower)")
    q.add_argument("--image", help="image query")
    s.add_argument("--k", type=_positive, default=8, help="entries to return")
    s.add_argument("--json", action="store_true",
                   help="print the results as JSON (rank, score, id, source, class id, patch corner) instead of TSV")
    s.add_argument("--encoder", help="encoder spec (default: the one the database was built with)")
    s.add_argument("--encoder-checkpoint", help="local weights file for the encoder")
    s.add_argument("--contact-sheet", help="write an image grid of the query (the caption's words, or the image) and "
                                           "its neighbours; the format follows the suffix (PNG without one)")
    add_max_image_pixels(s)
    s.add_argument("--image-root", help="folder the database's relative sources are resolved against "
                                        "(default: the one recorded at build time)")
    s.add_argument("--backend", choices=BACKENDS, default="auto", help=backend_help)
    s.add_argument("--nprobe", type=_positive, help=nprobe_help)
    s.add_argument("--device", default="auto", help=device_help)

    x = command("index", "build a FAISS index over the database")
    x.add_argument("db", help=db_help)
    x.add_argument("--kind", default="auto",
                   help="flat, hnsw or ivfpq; auto: chosen from the database's size")
    x.add_argument("--train-size", type=_positive,
                   help="vectors sampled to train an ivfpq index (default: max(64 nlist, 16384), at most all)")
    x.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    x.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help=f"index parameter passed to build_index (repeatable), e.g. nlist=4096; {INDEX_PARAMS}")
    x.add_argument("--no-progress", action="store_true", help=no_progress)

    n = command("neighbors", "training neighbours of every entry and the top-m proposal list")
    n.add_argument("db", help=db_help + " (searched; its proposal ranking is stored in it)")
    n.add_argument("--queries", help="database of the training set, a directory or a name as for DB (same encoder; "
                                     "default: DB itself)")
    n.add_argument("--k", type=_positive, required=True, help="neighbours per entry")
    n.add_argument("--exclude-self", action="store_true",
                   help="drop each query's own entry (queries = DB or a copy of it; for others, --dedup-threshold)")
    n.add_argument("--dedup-threshold", type=float, help="drop entries more similar to the query than this cosine")
    n.add_argument("--batch-size", type=_positive, default=1024, help="queries per search")
    n.add_argument("--out", required=True, help=".npz (ids, scores) or .npy (ids; X_scores.npy beside it); the "
                                                "results so far are kept in OUT.progress/ until it is written, so "
                                                "that a rerun after a kill continues from them")
    n.add_argument("--top-m-out", help="also write the proposal ranking here (.npy, (N, 2) int64: id, count)")
    n.add_argument("--no-proposals", action="store_true",
                   help="leave the database's proposal ranking (top-m sampling's pseudo-queries) as it is, e.g. for "
                        "the neighbours of a validation split")
    n.add_argument("--backend", choices=BACKENDS, default="auto", help=backend_help)
    n.add_argument("--nprobe", type=_positive, help=nprobe_help)
    n.add_argument("--device", default="auto", help=device_help)
    n.add_argument("--no-progress", action="store_true", help=no_progress)
    return p


def _encoder_info(spec: str, device: str) -> dict:
    """The name, dim and normalisation of encoder ``spec``, built without weights on ``device``."""
    try:
        return resolve_encoder(spec, device=device, pretrained=False).info()
    except EncoderUnavailable as e:
        raise CLIError(_unavailable(spec, e)) from None


def _unavailable(spec: str, e: EncoderUnavailable) -> str:
    return str(e) if repr(spec) in str(e) else f"encoder {spec!r} is unavailable: {e}"


def _build_lock(out: str) -> contextlib.AbstractContextManager[None]:
    """A build's hold on ``--out`` (:func:`~rdm_fast._cli.holding` its progress folder): a second build into it would
    delete the first's temporary files and race it to the manifest."""
    if Path(out).exists() and not Path(out).is_dir():
        raise CLIError(f"--out {out} is a file, not a folder")
    return holding(Path(out) / PROGRESS, out)


def cmd_build(args: argparse.Namespace) -> int:
    """``db build``: embed an image folder or list into a new database (resumable)."""
    if args.workers < 0:
        raise CLIError(f"--workers must be at least 0, got {args.workers}")
    try:
        with _build_lock(args.out):
            out = build_database(args.out, encoder=args.encoder, images=args.images, image_list=args.list,
                                 crop=args.crop, crop_size=args.crop_size, crops_per_image=args.crops_per_image,
                                 batch_size=args.batch_size, shard_size=args.shard_size, workers=args.workers,
                                 device=args.device, encoder_checkpoint=args.encoder_checkpoint,
                                 class_from_folder=args.class_from_folder, seed=args.seed,
                                 fit_square=args.fit_square, progress=not args.no_progress)
    except EncoderUnavailable as e:
        raise CLIError(_unavailable(args.encoder, e)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(out)
    return 0


def _print_summary(path: Path) -> None:
    db = Database.open(path, backend="torch", device="cpu")
    skipped = db.manifest["skipped"]["count"]
    shards = len(db.manifest["shards"])
    print(f"{path}: {len(db)} embeddings ({db.dim}-d, {db.encoder_name}) in {shards} shard{'s' * (shards != 1)}"
          + (f"; skipped {skipped} unreadable image{'s' * (skipped != 1)} (see manifest.json)" if skipped else ""))


def cmd_import(args: argparse.Namespace) -> int:
    """``db import-npz``: the official {N}x{D}-part_{i}.npz files as a database, streamed."""
    for part in args.parts:  # before the encoder is built (seconds, for CLIP)
        if not Path(part).is_file():
            raise CLIError(f"part file {part} {not_a_file(part)}")
    try:  # only the encoder's name/dim/normalisation are needed: build it without weights where it allows
        info = _encoder_info(args.encoder, "meta")
    except (RuntimeError, NotImplementedError):
        info = _encoder_info(args.encoder, "cpu")
    with _build_lock(args.out):
        out = import_npz(args.parts, args.out, info, encoder_spec=args.encoder, shard_size=args.shard_size,
                         chunk_rows=args.chunk_rows, allow_pickle=args.allow_pickle, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(out)
    return 0


def _disk_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    exp = min(4, int(math.log(n, 1024)))
    return f"{n / 1024 ** exp:.1f} {('KiB', 'MiB', 'GiB', 'TiB')[exp - 1]}"


def cmd_info(args: argparse.Namespace) -> int:
    """``db info``: a database's size, encoder, index and proposals (``--verify``: checksums)."""
    db = Database.open(locate_database(args.db), backend="torch", device="cpu", verify=args.verify)
    m = db.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    rows = [s["rows"] for s in m["shards"]]
    enc = m["encoder"]
    lines = [
        f"database   {db.path}",
        f"format     version {m['format_version']}",
        f"entries    {len(db)} x {db.dim} float16",
        f"encoder    {enc['name']} ({enc['dim']}-d, {'L2-normalised' if enc['normalized'] else 'not normalised'})",
        f"shards     {len(rows)}" + (f" ({min(rows)}-{max(rows)} rows each)" if rows and min(rows) < max(rows) else
                                     f" ({rows[0]} rows{' each' * (len(rows) > 1)})" if rows else ""),
        f"on disk    {_human(_disk_size(db.path))}",
        "metadata   " + (", ".join(name for name, key in (("sources", "has_sources"), ("class ids", "has_class_ids"),
                                                           ("patch coords", "has_patch_coords")) if m[key])
                         or "none"),
        "index      " + (f"{m['index']['kind']} ({m['index']['file']}{_index_params(m['index'])})" if m.get("index")
                            else "none"),
        "proposals  " + (f"ranking from {m['proposals'].get('queries', '?')} queries x k={m['proposals'].get('k', '?')}"
                         + _proposal_options(m["proposals"]) if m.get("proposals") else "none"),
        f"skipped    {m['skipped']['count'] or 'no'} unreadable inputs",
    ]
    enlarged = (m.get("enlarged") or {}).get("count")
    if enlarged:
        uncounted = m["enlarged"].get("uncounted_shards")
        older = f"; {uncounted} older shards not counted" if uncounted else ""
        lines.append(f"enlarged   {enlarged} image{'s' * (enlarged != 1)}, more than {MAX_UPSCALE}x for their crops or "
                     f"squares (listed in manifest.json{older})")
    if m.get("image_root"):
        lines.append(f"images     {m['image_root']}")
    build = m.get("build") or {}
    if build.get("crop"):  # what training crops its images as, and a query image is cut like
        per = build.get("crops_per_image", 1)
        lines.append(f"crops      {build['crop']}, {build.get('crop_size', '?')} px" +
                     (f", {per} per image" if per != 1 else "") +
                     (f", of {build['fit_square']} px squares" if build.get("fit_square") else ""))
    if args.verify:
        lines.append("verified   every shard's embeddings and metadata match their SHA-256 (index and proposals "
                     "files have no checksum)")
    print("\n".join(lines))
    return 0


def _index_params(index: dict) -> str:
    """The search parameters an index was built with, as `db info` shows them (e.g. ", nlist 512, nprobe 26")."""
    params = index.get("params") or {}
    shown = [f"{key} {params[key]}" for key in ("nlist", "m", "nbits", "nprobe", "M", "ef_search") if key in params]
    return "".join(f", {item}" for item in shown)


def _proposal_options(proposals: dict) -> str:
    """How a proposal ranking's neighbours were found, as `db info` shows it."""
    shown = (["exclude-self"] if proposals.get("exclude_self") else []) + (
        [f"dedup-threshold {proposals['dedup_threshold']}"] if proposals.get("dedup_threshold") is not None else []) \
        + ([f"queries from {proposals['queries_db']}"] if proposals.get("queries_db") else [])
    return f" ({', '.join(shown)})" if shown else ""


def _source_path(source: str, root: str | None) -> Path | None:
    p = Path(source)
    if not p.is_absolute() and root:
        p = Path(root) / p
    return p if p.is_file() else None


def _grey_tile(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), (200, 200, 200))


def _text_tile(text: str, size: int) -> Image.Image:
    """A white ``size`` px tile with ``text`` wrapped in Pillow's default font (what fits; an ellipsis after)."""
    tile = Image.new("RGB", (size, size), "white")
    lines = textwrap.wrap(text, width=max(1, size // 7)) or [""]
    rows = max(1, (size - 8) // 12)
    if len(lines) > rows:
        lines = lines[:rows - 1] + [lines[rows - 1][:max(1, size // 7 - 3)] + "..."]
    ImageDraw.Draw(tile).multiline_text((4, 4), "\n".join(lines), fill="black", spacing=2)
    return tile


def _tile(path: Path, build: dict, xy: Sequence[int] | None, size: int) -> Image.Image | None:
    """``size`` px tile of the crop the database embedded from ``path`` (replayed from the ``build``'s crop mode,
    size and square, and the random crop's corner ``xy``; the whole image when the build recorded no crop, e.g.
    an import, or for the query: ``build`` {}), or None when the image cannot be read or no longer fits its
    recorded crop."""
    crop, crop_size = build.get("crop"), build.get("crop_size")
    try:
        img = load_rgb(path)
        if crop in CROP_MODES and crop_size:
            corner = (int(xy[0]), int(xy[1])) if crop == "random" and xy is not None else None
            img = Image.fromarray(replay_crop(img, crop, crop_size, corner, build.get("fit_square")))
    except Exception as e:  # any decoder error (OSError, SyntaxError, DecompressionBombError, ...) or a crop misfit
        log.warning("result image %s cannot be shown (%s): drawn as a grey tile", path, error_line(e))
        return None
    return Image.fromarray(make_crops(img, "center", size, 1, np.random.default_rng(0))[0][0])


def _output_file(path: str, option: str) -> Path:
    """``path`` as a file to write later: its folder created now, so that a bad name fails before the work."""
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"{option} {out} is a directory; give a file name")
    try:
        make_dirs(out.parent)
    except OSError as e:
        raise CLIError(f"{option} {out}: cannot create its folder {out.parent} ({e.strerror or e})") from None
    return out


def _open_for_search(args: argparse.Namespace, device: torch.device) -> Database:
    """``args.db`` with the search options (--backend, --nprobe; Database.open warns of an --nprobe it ignores)."""
    return Database.open(locate_database(args.db), backend=args.backend, device=device, nprobe=args.nprobe)


def cmd_search(args: argparse.Namespace) -> int:
    """``db search``: the nearest entries of a caption or an image, optionally as a contact sheet."""
    if args.contact_sheet:
        _output_file(args.contact_sheet, "--contact-sheet")
        _sheet_format(args.contact_sheet)
    device = process_device(args.device)
    db = _open_for_search(args, device)
    spec = args.encoder or db.encoder_spec
    try:  # CLIP in float32, as the reference embeds queries (see query_encoder)
        encoder = query_encoder(spec, device=device, checkpoint=args.encoder_checkpoint)
    except EncoderUnavailable as e:
        raise CLIError(_unavailable(spec, e)) from None
    if args.text is not None:
        try:
            scores, ids = db.search_text(encoder, [args.text], args.k)
        except NotImplementedError as e:
            raise CLIError(f"encoder {encoder.name!r} cannot embed text: {e}") from None
        query_tile = None
    else:
        path = Path(args.image)
        query = load_query_image(path, query_image_size(db.manifest, encoder))  # cut as the entries were
        scores, ids = db.search_images(encoder, query[None], args.k)
        query_tile = path
    scores, ids = scores[0].cpu(), ids[0].cpu()
    sources = db.sources(ids) if db.manifest["has_sources"] else ["-"] * len(ids)
    if args.json:  # every field the database holds for the results
        classes = db.class_ids(ids).tolist() if db.manifest["has_class_ids"] else [None] * len(ids)
        corners = db.patch_coords(ids).tolist() if db.manifest["has_patch_coords"] else [None] * len(ids)
        print(json.dumps([{"rank": r, "score": score, "id": i, "source": source if source != "-" else None,
                           "class_id": c, "patch_coords": xy}
                          for r, (score, i, source, c, xy) in enumerate(zip(scores.tolist(), ids.tolist(), sources,
                                                                            classes, corners), 1)], indent=2))
    else:
        print("rank\tscore\tid\tsource")
        for r, (score, i, source) in enumerate(zip(scores.tolist(), ids.tolist(), sources), 1):
            print(f"{r}\t{score:.4f}\t{i}\t{source}")
    if args.contact_sheet:
        _write_contact_sheet(args, db, query_tile, scores, ids, sources)
    return 0


def _sheet_format(path: str) -> str:
    """The image format a contact sheet's file name asks for (PNG without a suffix); CLIError for an unknown one
    (a .jpg sheet held PNG bytes)."""
    suffix = Path(path).suffix.lower()
    found = Image.registered_extensions().get(suffix) if suffix else "PNG"
    if found is None or found not in Image.SAVE:
        raise CLIError(f"--contact-sheet {path}: {suffix} is not an image type Pillow writes (e.g. .png, .jpg)")
    return found


def _write_contact_sheet(args, db: Database, query: Path | None, scores, ids, sources) -> None:
    root = args.image_root or db.manifest.get("image_root")
    paths = [_source_path(s, root) if db.manifest["has_sources"] else None for s in sources]
    missing = sum(p is None for p in paths)
    if missing and not db.manifest["has_sources"]:
        log.warning("%s records no source images (e.g. imported embeddings): the results are drawn as grey tiles",
                    db.path)
    elif missing:
        log.warning("%d of %d result images are not reachable on disk (image root %s; see --image-root): drawn as "
                    "grey tiles", missing, len(paths), root)
    build = db.manifest.get("build") or {}
    coords = db.patch_coords(ids).tolist() if db.manifest["has_patch_coords"] else [None] * len(ids)
    size = 128
    if query is not None:
        tiles = [(_tile(query, {}, None, size) or _grey_tile(size), "query")]
    else:  # a caption: its words on the query's tile
        tiles = [(_text_tile(args.text, size), "query")]
    for r, (path, xy, score, i) in enumerate(zip(paths, coords, scores.tolist(), ids.tolist()), 1):
        tile = _tile(path, build, xy, size) if path is not None else None
        tiles.append((tile or _grey_tile(size), f"#{r} id {i}  {score:.3f}"))
    sheet = contact_sheet(tiles)
    out = _output_file(args.contact_sheet, "--contact-sheet")
    atomic_write(out, lambda tmp: sheet.save(tmp, format=_sheet_format(args.contact_sheet)))
    log.info("wrote contact sheet %s", out)


def _parse_param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CLIError(f"--param {text!r}: expected KEY=VALUE")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def cmd_index(args: argparse.Namespace) -> int:
    """``db index``: build a FAISS index over a database."""
    try:
        from .retrieval.faiss_index import INDEX_KINDS
    except ImportError as e:
        raise CLIError(f"FAISS indexes are unavailable here ({e}); install faiss-cpu or faiss-gpu") from None
    if args.kind != "auto" and args.kind not in INDEX_KINDS:
        raise CLIError(f"--kind {args.kind!r}: expected auto or one of {', '.join(INDEX_KINDS)}")
    params = dict(_parse_param(t) for t in args.param)
    path = locate_database(args.db)
    # the lock a build of the database holds: a second index run (or a build) meanwhile deleted this one's
    # temporary index file as stale
    with holding(path / PROGRESS, args.db, "database"):
        entry = add_index(path, args.kind, train_size=args.train_size, seed=args.seed, progress=not args.no_progress,
                          **params)
    print(f"{args.db}: {entry['kind']} index written to {entry['file']}")
    return 0


def cmd_neighbors(args: argparse.Namespace) -> int:
    """``db neighbors``: training neighbours per query and the top-m proposal ranking."""
    for file in neighbor_files(args.out):  # bad output names fail before the search, not after it
        _output_file(str(file), "--out")
    if args.top_m_out:
        if Path(args.top_m_out).suffix != ".npy":
            raise CLIError(f"--top-m-out {args.top_m_out} must end in .npy")
        _output_file(args.top_m_out, "--top-m-out")
        if Path(args.top_m_out).resolve() in [f.resolve() for f in neighbor_files(args.out)]:
            raise CLIError(f"--top-m-out {args.top_m_out} is a file of --out {args.out}: it would replace the "
                           "neighbours written there; choose another name")
    if args.dedup_threshold is not None and not -1 <= args.dedup_threshold <= 1:
        raise CLIError(f"--dedup-threshold is a cosine similarity in [-1, 1], got {args.dedup_threshold}")
    resume_dir = Path(f"{args.out}.progress")  # the results so far: a killed run continues from them
    with holding(resume_dir, args.out):  # one run at a time: a second would rewrite the files the first maps
        # the temporary files a killed run's writes left (the lock keeps other runs off these names)
        remove_stale_temps(resume_dir)
        for file in neighbor_files(args.out) + ([Path(args.top_m_out)] if args.top_m_out else []):
            remove_stale_temps(file.parent, [glob.escape(file.name)])
        return _neighbors(args, resume_dir)


def _database_files(db: Database) -> set[Path]:
    """The files of ``db`` (manifest, shards, index, proposal ranking), resolved: no output may replace them."""
    m = db.manifest
    names = [MANIFEST, PROPOSALS, *(s[key] for s in m["shards"] for key in ("embeddings", "meta"))]
    names += [m["index"]["file"]] if m.get("index") else []
    return {(db.path / name).resolve() for name in names}


def _neighbors(args: argparse.Namespace, resume_dir: Path) -> int:
    """``db neighbors`` once its arguments are checked and its ``--out`` is locked."""
    device = process_device(args.device)
    db = _open_for_search(args, device)
    queries = Database.open(locate_database(args.queries), backend="torch", device="cpu") if args.queries else None
    for database in (db, queries) if queries is not None else (db,):  # before the search, not after it
        own = _database_files(database)
        for option, file in [("--out", f) for f in neighbor_files(args.out)] + (
                [("--top-m-out", Path(args.top_m_out))] if args.top_m_out else []):
            if file.resolve() in own:
                raise CLIError(f"{option} {file} is a file of the database {database.path}: writing it would damage "
                               "the database; choose a name outside it")
    if args.exclude_self and queries is not None and not same_entries(db, queries):
        raise CLIError(f"--exclude-self applies only when the queries are the database's own entries ({args.db} "
                       f"itself or a copy of it); to leave out entries of {args.db} that duplicate images of "
                       f"--queries {args.queries}, use --dedup-threshold (e.g. 0.95) instead")
    if not args.exclude_self and (queries is None or same_entries(db, queries)):
        log.warning("the queries are %s's own entries and --exclude-self is not given: each entry's first "
                    "neighbour is itself (training refuses such a file; pass --exclude-self for training "
                    "neighbours)", args.db)
    if queries is not None and len(queries) == 0:
        raise CLIError(f"--queries {args.queries} is empty: no neighbours to compute (the proposal ranking of "
                       f"{args.db} is left as it is)")
    work = len(db) * len(queries if queries is not None else db) * db.dim  # multiply-adds of an exact search
    if db.backend == "torch-exact" and device.type == "cpu" and work > EXACT_CPU_WARNING:
        log.warning("exact search on the CPU: %d queries against %d entries are %.1e multiply-adds (%.1f hours at "
                    "1e11 per second); an index (python -m rdm_fast.db index %s) or a GPU (--device cuda) is much "
                    "faster",
                    len(queries if queries is not None else db), len(db), work, work / 1e11 / 3600, args.db)
    ids, scores = compute_neighbors(db, queries, k=args.k, exclude_self=args.exclude_self,
                                    dedup_threshold=args.dedup_threshold, batch_size=args.batch_size,
                                    progress=not args.no_progress, resume_dir=resume_dir)
    written = save_neighbors(args.out, ids, scores, databases=(db, queries if queries is not None else db))
    ranked, counts = proposal_ranking(ids, len(db))
    if args.top_m_out:  # before the database's own ranking changes
        atomic_save_npy(args.top_m_out, np.stack([ranked.numpy(), counts.numpy()], 1))
    ranking = f"the proposal ranking of {args.db} is left as it was"
    if not args.no_proposals:
        old = db.manifest.get("proposals")
        if old and not np.array_equal(db.proposal_ranking()[0].numpy(), ranked.numpy()):
            log.warning("replacing the proposal ranking of %s (from %s queries x k=%s) with this run's (%d x k=%d): "
                        "top-m sampling draws its pseudo-queries from it, so a sample run begun with the old one "
                        "cannot be resumed (--no-proposals leaves it)", args.db, old.get("queries", "?"),
                        old.get("k", "?"), ids.shape[0], args.k)
        save_proposals(db.path, ranked.numpy(), counts.numpy(), queries=int(ids.shape[0]), k=args.k,
                       queries_db=str(queries.path.resolve()) if queries is not None else None,
                       exclude_self=args.exclude_self, dedup_threshold=args.dedup_threshold)
        ranking = f"proposal ranking in {db.path / PROPOSALS}"
    shutil.rmtree(resume_dir, ignore_errors=True)  # last: a failed write above is retried without a new search
    print(f"wrote {ids.shape[0]} x {args.k} neighbours to {', '.join(map(str, written))}; {ranking}")
    return 0


MEMORY_ADVICE = "lower --batch-size (db build and db neighbors take one)"  # after an out-of-memory error
DISTRIBUTED = ("build", "import-npz")  # the commands that split their work over torchrun's processes
RESUMABLE = ("build", "import-npz", "neighbors")  # the commands whose rerun continues where a stopped one was
COMMANDS = {"build": cmd_build, "import-npz": cmd_import, "info": cmd_info, "search": cmd_search,
            "index": cmd_index, "neighbors": cmd_neighbors}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and run the subcommand."""
    args = parse_args(build_parser(), argv)
    if args.command not in DISTRIBUTED:
        one_process(f"db {args.command}")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.command in RESUMABLE:
            log.warning("stopped: the same command continues where this one stopped")
        raise


if __name__ == "__main__":
    raise SystemExit(run(main, memory_advice=MEMORY_ADVICE))
