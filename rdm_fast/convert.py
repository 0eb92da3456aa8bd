"""``python -m rdm_fast.convert``: turn an official checkpoint into rdm_fast's safetensors format.

The result (``model.safetensors`` with the config inside, and ``config.json``) loads without unpickling,
memory-maps, and holds only the weights sampling needs (the EMA UNet when the checkpoint has one).
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

import torch

from . import RDM
from ._cli import run
from .config import preset_names

log = logging.getLogger("rdm_fast.convert")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdm_fast.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", help="official .ckpt (or an rdm_fast file to re-save)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help=f"preset ({', '.join(preset_names())}) or config.yaml "
                                    "(default: config.yaml beside the checkpoint, else the matching preset)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="precision of the stored weights")
    p.add_argument("--no-ema", action="store_true", help="store the raw weights even if EMA ones exist")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle a checkpoint with Python objects (runs code from the file: trusted files only)")
    args = p.parse_args(argv)
    model = RDM.from_pretrained(args.ckpt, args.config, use_ema=not args.no_ema, allow_pickle=args.allow_pickle)
    path = model.save_pretrained(args.out, dtype=DTYPES[args.dtype])
    n = sum(t.numel() for t in model.state_dict().values())
    log.info("wrote %s (%s tensors, %s values, %s)", path, len(model.state_dict()), f"{n:,}", args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
