"""Train the projections of the ``offline-lite0-minilm`` encoder from data that ships with Debian packages.

    python -m rdm_fast.encoders.train_projection --out rdm_fast/encoders/weights/offline_projection.safetensors

Data: every named emoji of Noto Color Emoji (``fonts-noto-color-emoji``; Pillow at size 109, the only size the
bitmap font has), captioned with its lower-cased Unicode name, and the clip art of ``openclipart-png``, captioned
with its folder path and file name. Each caption goes to one split by a hash of its text (stable across font
and package versions): 20 % ``test`` (held out, reported), 10 % ``val``, the rest ``train``. The final weights
are trained on train + val; ``--holdout val`` trains on train only and reports on val. Training emoji are also
rendered as ``--views - 1`` extra views (smaller, shifted, on light backgrounds); held-out ones only canonically.

The frozen towers' features are computed once and cached (``--cache``); training is then a few seconds:
CLIP-style symmetric InfoNCE with a learned temperature over batches of distinct captions, AdamW, with
standardised inputs that are folded into the saved linear maps. Retrieval is reported per source on the held-out
split (gallery = all its captions, one canonical image each) as text->image and image->text recall@1/@10, with
chance levels.
The weights file is written under a temporary name and renamed, with the settings and metrics as metadata.

Shipped weights (defaults, seed 0; 2-core CPU: tower features of 9,802 images ~9 min once, training 4 s):

================================  =========  =========  =========  =========  ==========
held out (gallery size)           t2i R@1    t2i R@10   i2t R@1    i2t R@10   chance R@10
================================  =========  =========  =========  =========  ==========
emoji (267)                       0.232      0.603      0.243      0.584      0.037
clip art (1,227)                  0.184      0.512      0.202      0.506      0.008
================================  =========  =========  =========  =========  ==========

Hyperparameters were chosen by 4-fold cross-validation on the non-test captions (image-feature dropout, emoji
repetition and clip art raised emoji text->image R@10 from 0.55 to 0.56-0.57 at ~300 candidates; more epochs
overfit). Chance R@1 is 1 / gallery size.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import random
import re
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .. import SOURCE_CHECKOUT
from .._cli import HelpFormatter, parse_args, run
from .._files import atomic_write
from .offline import (DIM, IMAGE_FEATURES, NAME, PROJECTION_FILE, TEXT_FEATURES, OfflineEncoder, require_packages,
                      resize)

MEMORY_ADVICE = "lower --batch (fewer negatives per step)"  # after an out-of-memory error
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_FONT_SIZE = 109
EMOJI_CANVAS = 160
CLIPART_ROOT = Path("/usr/share/openclipart/png")
CLIPART_MAX_SIDE = 256
CLIPART_PER_CAPTION = 3
# Code point ranges searched for emoji (the font also maps keycap bases and a few symbols below U+2000).
EMOJI_RANGES = ((0x20, 0x33FF), (0x1F000, 0x1FAFF))
FEATURES_VERSION = "2"


def split_of(caption: str) -> str:
    """``test`` (20 %), ``val`` (10 %) or ``train``, from a hash of the caption."""
    bucket = int(hashlib.sha256(caption.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "test" if bucket < 2 else "val" if bucket == 2 else "train"


def load_emoji_font(path: Path = EMOJI_FONT) -> ImageFont.FreeTypeFont:
    """Noto Color Emoji at its only bitmap size; FileNotFoundError when the font package is absent."""
    if not path.is_file():
        raise FileNotFoundError(f"emoji font {path} not found (Debian/Ubuntu package fonts-noto-color-emoji)")
    return ImageFont.truetype(str(path), EMOJI_FONT_SIZE)


def emoji_items(font: ImageFont.FreeTypeFont) -> list[tuple[str, str]]:
    """(character, caption) for every single code point that has a Unicode name and a glyph in ``font``."""
    items = []
    for lo, hi in EMOJI_RANGES:
        for code in range(lo, hi + 1):
            char = chr(code)
            name = unicodedata.name(char, "")
            if not name:
                continue
            try:
                left, top, right, bottom = font.getbbox(char)
            except RuntimeError:  # the shaper rejects a few control-like code points
                continue
            if bottom > top and right > left:  # code points without a glyph have an empty box
                items.append((char, name.lower()))
    return items


def render_emoji(char: str, font: ImageFont.FreeTypeFont, *, scale: float = 1.0, offset: tuple[int, int] = (0, 0),
                 background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The emoji centred on a square RGB canvas of EMOJI_CANVAS pixels; ``scale``/``offset``/``background``
    make training views."""
    glyph = Image.new("RGBA", (EMOJI_CANVAS, EMOJI_CANVAS), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((EMOJI_CANVAS / 2, EMOJI_CANVAS / 2), char, font=font, embedded_color=True,
                               anchor="mm")
    if scale != 1.0:
        side = max(1, round(EMOJI_CANVAS * scale))
        small = glyph.resize((side, side), Image.Resampling.LANCZOS)
        glyph = Image.new("RGBA", glyph.size, (0, 0, 0, 0))
        corner = (EMOJI_CANVAS - side) // 2
        glyph.paste(small, (corner + offset[0], corner + offset[1]))
    canvas = Image.new("RGBA", glyph.size, (*background, 255))
    return Image.alpha_composite(canvas, glyph).convert("RGB")


def clipart_caption(relative: Path) -> str:
    """``"animals mammals: canguro architetto franc"``: folder words, then file-name words without digits."""
    folders = " ".join(p.replace("_", " ") for p in relative.parent.parts if p != "unsorted")
    words = re.sub(r"[\d_\-.]+", " ", relative.stem)
    words = " ".join(words.split())
    return f"{' '.join(folders.split())}: {words}" if folders else words


def clipart_items(root: Path = CLIPART_ROOT) -> list[tuple[Path, str]]:
    """(path, caption) of the clip art, at most CLIPART_PER_CAPTION files per caption (the 1,386 numbered stars
    share one caption)."""
    if not root.is_dir():
        raise FileNotFoundError(f"clip art folder {root} not found (Debian/Ubuntu package openclipart-png)")
    per_caption: dict[str, int] = {}
    items = []
    for path in sorted(root.rglob("*.png")):
        caption = clipart_caption(path.relative_to(root))
        if per_caption.get(caption, 0) < CLIPART_PER_CAPTION:
            per_caption[caption] = per_caption.get(caption, 0) + 1
            items.append((path, caption))
    return items


def load_clipart(path: Path) -> Image.Image:
    """A clip-art PNG as RGB, transparency composited on white, padded to a white square of at most
    CLIPART_MAX_SIDE pixels."""
    Image.MAX_IMAGE_PIXELS = None  # some files are very large drawings, not decompression bombs
    with Image.open(path) as im:
        im.draft("RGBA", (CLIPART_MAX_SIDE, CLIPART_MAX_SIDE))
        rgba = im.convert("RGBA")
    rgba.thumbnail((CLIPART_MAX_SIDE, CLIPART_MAX_SIDE), Image.Resampling.LANCZOS)
    side = max(rgba.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    return canvas.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def emoji_views(char: str, font: ImageFont.FreeTypeFont, views: int, rng: random.Random) -> list[Image.Image]:
    """The canonical rendering, then ``views - 1`` smaller, shifted renderings on light backgrounds."""
    images = [render_emoji(char, font)]
    for _ in range(views - 1):
        scale = rng.uniform(0.55, 0.9)
        room = int(EMOJI_CANVAS * (1 - scale) / 2)
        offset = (rng.randint(-room, room), rng.randint(-room, room))
        background = (rng.randint(200, 255), rng.randint(200, 255), rng.randint(200, 255))
        images.append(render_emoji(char, font, scale=scale, offset=offset, background=background))
    return images


@dataclass
class Features:
    """Cached frozen-tower features: image rows, the caption each row belongs to, and caption rows."""
    image: torch.Tensor          # (N, 1280)
    image_caption: torch.Tensor  # (N,) index into captions; canonical views come first per caption
    canonical: torch.Tensor      # (C,) image row of each caption's canonical view
    text: torch.Tensor           # (C, 384)
    captions: list[str]
    source: list[str]            # "emoji" or "clipart" per caption


def _batched(images: Iterator[Image.Image], size: int) -> Iterator[torch.Tensor]:
    batch = []
    for image in images:
        batch.append(resize(to_tensor(image)[None])[0])
        if len(batch) == size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def compute_features(encoder: OfflineEncoder, captions: list[str], source: str,
                     images_per_caption: Iterator[list[Image.Image]], log_every: int = 500) -> dict:
    """Run the frozen towers over every caption and its views (each image gets the encoder's own resize here,
    one by one, so that batches of different sizes stack)."""
    rows, owners = [], []

    def flat() -> Iterator[Image.Image]:
        for index, images in enumerate(images_per_caption):
            for image in images:
                owners.append(index)
                yield image

    start, done = time.perf_counter(), 0
    for batch in _batched(flat(), 32):
        rows.append(encoder.image_features(batch))
        done += len(batch)
        if done // log_every != (done - len(batch)) // log_every:
            print(f"  {source}: {done} images, {time.perf_counter() - start:.0f} s", flush=True)
    text = encoder.text_features(captions)
    return {"image": torch.cat(rows), "image_caption": torch.tensor(owners), "text": text,
            "captions": captions, "source": [source] * len(captions)}


def cached_features(cache: Path, encoder: OfflineEncoder, *, emoji_views_n: int, seed: int,
                    use_clipart: bool) -> Features:
    """Features of the emoji (and clip art), computed once per data/view setting and cached under ``cache``."""
    font = load_emoji_font()
    emoji = emoji_items(font)
    parts = []
    key = hashlib.sha256(json.dumps([FEATURES_VERSION, emoji, emoji_views_n, seed]).encode()).hexdigest()[:12]
    path = cache / f"emoji-{key}.pt"
    if not path.is_file():
        print(f"computing emoji features ({len(emoji)} emoji x {emoji_views_n} views) -> {path}", flush=True)
        rng = random.Random(seed)
        views = (emoji_views(char, font, emoji_views_n if split_of(caption) != "test" else 1, rng)
                 for char, caption in emoji)
        _save_atomic(compute_features(encoder, [c for _, c in emoji], "emoji", views), path)
    parts.append(torch.load(path, weights_only=True))
    if use_clipart:
        clipart = clipart_items()
        listing = [(str(p.relative_to(CLIPART_ROOT)), c) for p, c in clipart]
        key = hashlib.sha256(json.dumps([FEATURES_VERSION, listing]).encode()).hexdigest()[:12]
        path = cache / f"clipart-{key}.pt"
        if not path.is_file():
            print(f"computing clip-art features ({len(clipart)} images) -> {path}", flush=True)
            images = ([load_clipart(p)] for p, _ in clipart)
            _save_atomic(compute_features(encoder, [c for _, c in clipart], "clipart", images), path)
        parts.append(torch.load(path, weights_only=True))
    return _merge(parts)


def _merge(parts: list[dict]) -> Features:
    captions: list[str] = []
    image, owner, text, source = [], [], [], []
    for part in parts:
        owner.append(part["image_caption"] + len(captions))
        image.append(part["image"])
        text.append(part["text"])
        captions += part["captions"]
        source += part["source"]
    owner_all = torch.cat(owner)
    # The first row of each caption is its canonical view (features are written caption by caption).
    first = torch.full((len(captions),), -1, dtype=torch.long)
    for row in range(len(owner_all) - 1, -1, -1):
        first[owner_all[row]] = row
    return Features(torch.cat(image), owner_all, first, torch.cat(text), captions, source)


def _save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class Bridge(torch.nn.Module):
    """Standardise each tower's features, map both linearly into DIM, learned temperature."""

    image_mean: torch.Tensor
    image_std: torch.Tensor
    text_mean: torch.Tensor
    text_std: torch.Tensor

    def __init__(self, image_stats: tuple[torch.Tensor, torch.Tensor],
                 text_stats: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.register_buffer("image_mean", image_stats[0])
        self.register_buffer("image_std", image_stats[1])
        self.register_buffer("text_mean", text_stats[0])
        self.register_buffer("text_std", text_stats[1])
        self.image = torch.nn.Linear(IMAGE_FEATURES, DIM)
        self.text = torch.nn.Linear(TEXT_FEATURES, DIM)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image((x - self.image_mean) / self.image_std), dim=-1)

    def embed_text(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text((t - self.text_mean) / self.text_std), dim=-1)

    @torch.no_grad()
    def folded(self) -> dict[str, torch.Tensor]:
        """What the encoder loads: the standardisation folded into plain linear maps on raw features; weight
        matrices stored as float16 (halves the file; retrieval unchanged), biases as float32."""
        out = {}
        for prefix, layer, mean, std in (("image_proj", self.image, self.image_mean, self.image_std),
                                         ("text_proj", self.text, self.text_mean, self.text_std)):
            weight = layer.weight / std
            out[f"{prefix}.weight"] = weight.half().contiguous()
            out[f"{prefix}.bias"] = (layer.bias - weight @ mean).float().contiguous()
        return out


def project(tensors: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    """The encoder's projection: ``normalize(x @ W.T + b)`` with the stored tensors."""
    return F.normalize(x @ tensors[f"{prefix}.weight"].float().T + tensors[f"{prefix}.bias"], dim=-1)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0).clamp_min(1e-3)


def train(feats: Features, train_captions: torch.Tensor, *, epochs: int, batch: int, lr: float,
          weight_decay: float, dropout: float, emoji_weight: int, seed: int) -> Bridge:
    """Contrastive training over batches of distinct captions, each with one of its image views."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rows = torch.isin(feats.image_caption, train_captions)
    bridge = Bridge(_stats(feats.image[rows]), _stats(feats.text[train_captions]))
    opt = torch.optim.AdamW(bridge.parameters(), lr=lr, weight_decay=weight_decay)
    views: list[list[int]] = [[] for _ in feats.captions]
    for row, owner in enumerate(feats.image_caption.tolist()):
        views[owner].append(row)
    is_emoji = torch.tensor([s == "emoji" for s in feats.source])
    pool = torch.cat([train_captions] + [train_captions[is_emoji[train_captions]]] * (emoji_weight - 1))
    steps_per_epoch = math.ceil(len(pool) / batch)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    for _ in range(epochs):
        order = pool[torch.randperm(len(pool), generator=gen)]
        for step in range(steps_per_epoch):
            chosen = order[step * batch:(step + 1) * batch].unique()
            picks = torch.tensor([views[c][int(torch.randint(len(views[c]), (1,), generator=gen))]
                                  for c in chosen.tolist()])
            x, t = feats.image[picks], feats.text[chosen]
            if dropout:
                x = x * (torch.rand(x.shape, generator=gen) > dropout) / (1 - dropout)
            logits = bridge.log_scale.clamp(max=math.log(100)).exp() * bridge.embed_images(x) @ bridge.embed_text(t).T
            target = torch.arange(len(chosen))
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return bridge.eval()


@torch.no_grad()
def recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """Text->image and image->text recall@k where row i of both is the matching pair."""
    sim = text_emb @ image_emb.T
    target = torch.arange(len(sim))
    out = {}
    for direction, s in (("t2i", sim), ("i2t", sim.T)):
        rank = (s > s[target, target][:, None]).sum(1)  # how many candidates beat the true match
        for k in ks:
            out[f"{direction}_R@{k}"] = round(float((rank < k).float().mean()), 4)
    n = len(sim)
    for k in ks:
        out[f"chance_R@{k}"] = round(min(k, n) / n, 4)
    out["candidates"] = n
    return out


def evaluate(tensors: dict[str, torch.Tensor], feats: Features, captions: torch.Tensor) -> dict[str, float]:
    """Recall of the stored projection over ``captions`` and their canonical images."""
    return recall(project(tensors, "image_proj", feats.image[feats.canonical[captions]]),
                  project(tensors, "text_proj", feats.text[captions]))


def write_weights(tensors: dict[str, torch.Tensor], metadata: dict, out: Path) -> None:
    """Save as .safetensors under a temporary name in the same folder, then rename (atomic on POSIX)."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta), fsync=True)


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rdm_fast" / "offline_projection"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default."""


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (the held-out metrics are printed and stored in the weights' metadata)."""
    parser = argparse.ArgumentParser(prog="python -m rdm_fast.encoders.train_projection", description=__doc__,
                                     formatter_class=_Formatter)
    parser.add_argument("--out", default=PROJECTION_FILE if SOURCE_CHECKOUT else None,
                        help="weights file to write (.safetensors; required outside a source checkout)")
    parser.add_argument("--cache", default=_default_cache(), help="folder of cached tower features")
    parser.add_argument("--holdout", choices=("test", "val"), default="test",
                        help="test: train on train+val, report test; val: train on train, report val")
    parser.add_argument("--no-clipart", action="store_true", help="train on emoji only")
    parser.add_argument("--views", type=_positive, default=3, help="image views per training emoji (1: canonical only)")
    parser.add_argument("--epochs", type=_positive, default=10, help="passes over the training captions")
    parser.add_argument("--batch", type=_positive, default=512,
                        help="caption-image pairs per step (the contrastive loss's negatives)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    parser.add_argument("--dropout", type=float, default=0.5, help="dropout on the image features, in [0, 1)")
    parser.add_argument("--emoji-weight", type=_positive, default=5, help="repeat emoji captions this often per epoch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the views, batches and initialisation")
    args = parse_args(parser, argv)  # strings until checked: Path("") would be the current directory
    if args.out is None:
        parser.error("--out is required outside a source checkout (the default, the installed package's own "
                     f"weights file {PROJECTION_FILE}, would be replaced by the next install)")
    args.out, args.cache = Path(args.out), Path(args.cache)
    if args.out.suffix != ".safetensors":
        parser.error(f"--out must end in .safetensors, got {args.out}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")

    require_packages()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    encoder = OfflineEncoder(projection=None).eval()
    feats = cached_features(args.cache, encoder, emoji_views_n=args.views, seed=args.seed,
                            use_clipart=not args.no_clipart)
    feature_s = time.perf_counter() - start
    splits = [split_of(c) for c in feats.captions]
    train_splits = {"train"} if args.holdout == "val" else {"train", "val"}
    train_ids = torch.tensor([i for i, s in enumerate(splits) if s in train_splits])
    held = {src: torch.tensor([i for i, (s, o) in enumerate(zip(splits, feats.source))
                               if s == args.holdout and o == src]) for src in sorted(set(feats.source))}

    t0 = time.perf_counter()
    bridge = train(feats, train_ids, epochs=args.epochs, batch=args.batch, lr=args.lr,
                   weight_decay=args.weight_decay, dropout=args.dropout, emoji_weight=args.emoji_weight,
                   seed=args.seed)
    train_s = time.perf_counter() - t0
    tensors = bridge.folded()
    metrics = {f"{args.holdout}_{src}": evaluate(tensors, feats, ids) for src, ids in held.items()}
    metrics["train_emoji_first300"] = evaluate(tensors, feats, train_ids[torch.tensor(
        [feats.source[i] == "emoji" for i in train_ids.tolist()])][:300])
    for name, m in metrics.items():
        print(f"{name}: {json.dumps(m)}")
    print(f"temperature 1/{math.exp(bridge.log_scale.item()):.1f}; "
          f"features {feature_s:.0f} s, training {train_s:.1f} s")

    metadata = {
        "encoder": NAME, "format": "image_proj/text_proj: raw tower features -> shared space, then L2-normalise",
        "dims": {"image_features": IMAGE_FEATURES, "text_features": TEXT_FEATURES, "out": DIM},
        "data": {"emoji": f"{EMOJI_FONT.name} at {EMOJI_FONT_SIZE}, captions = Unicode names",
                 "clipart": None if args.no_clipart else f"{CLIPART_ROOT}, captions = folders + file names",
                 "split": "sha256(caption) % 10: 0-1 test, 2 val, else train",
                 "train_splits": sorted(train_splits), "train_captions": len(train_ids)},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache")},
        "metrics": metrics, "training_seconds": round(train_s, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_weights(tensors, metadata, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, memory_advice=MEMORY_ADVICE))
