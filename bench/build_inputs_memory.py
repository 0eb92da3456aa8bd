"""Memory ``db build`` holds for its input list, per input image: what one process keeps while it embeds its
shards (anonymous memory when the first shard starts, over the process's before the build) and the peak of
listing them (VmHWM, reset at the start, over the RSS then). The inputs are ImageNet-style paths with class ids,
given as a list file (default) or as a folder of empty files (``--folder``); the build stops at its first shard.

    python bench/build_inputs_memory.py WORKDIR [--images 1000000] [--folder]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from rdm_fast.encoders import Encoder
from rdm_fast.retrieval import build


class Toy(Encoder):
    """Never called: the build is stopped before it embeds anything."""

    name, dim, normalized, image_size = "toy8", 8, False, 32

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raise AssertionError

    def encode_text(self, texts):
        raise AssertionError


class FirstShard(Exception):
    pass


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def paths(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    cls = rng.integers(0, 1000, n)
    return [f"train/n{c:08d}/n{c:08d}_{i}.JPEG" for i, c in enumerate(cls.tolist())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--folder", action="store_true", help="a folder of empty files instead of a list file")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.folder:
        inputs = args.workdir / f"folder_{args.images}"
        if not inputs.is_dir():
            for s in paths(args.images):
                (inputs / s).parent.mkdir(parents=True, exist_ok=True)
                (inputs / s).touch()
        kwargs = {"images": inputs, "class_from_folder": True}
    else:
        inputs = args.workdir / f"list_{args.images}.txt"
        if not inputs.is_file():
            inputs.write_text("".join(f"{s}\t{s[7:15].lstrip('0') or 0}\n" for s in paths(args.images)))
        kwargs = {"image_list": inputs}
    out = args.workdir / "out"
    if out.exists():
        import shutil
        shutil.rmtree(out)

    held = {}

    def first_shard(*a, **k):
        held["anon"] = status("RssAnon")
        raise FirstShard

    build._embed_shard = first_shard  # type: ignore[assignment]
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    base_anon, base_rss = status("RssAnon"), status("VmRSS")
    try:
        build.build_database(out, encoder=Toy(), workers=0, progress=False, device="cpu", **kwargs)
    except FirstShard:
        pass
    n = args.images
    kept, peak = held["anon"] - base_anon, status("VmHWM") - base_rss
    print(f"{n} inputs ({'folder' if args.folder else 'list'}): kept {kept / 2**20:.0f} MiB "
          f"({kept / n:.0f} B per image), peak over start {peak / 2**20:.0f} MiB ({peak / n:.0f} B per image)")


if __name__ == "__main__":
    main()
