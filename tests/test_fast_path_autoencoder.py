"""The first stages (KL with attention, VQ) with every fast kernel forced on (RDM_FAST_OPS=fast: the Triton kernels
in the interpreter on the CPU) vs the plain-PyTorch reference path, encode and decode, in fp32 and fp16, with NCHW
and with channels-last weights and inputs (the layout ``RDM`` gives them on CUDA).

Run as a script with TRITON_INTERPRET=1 it prints the relative errors as JSON; the test starts it once.
Tolerances as for the UNet (tests/test_fast_path_unet.py): fp32 1e-4 relative L2 (summation order only), fp16
1e-2 (each fused kernel rounds once where the reference rounds at each step).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

TOLERANCE = {"float32": 1e-4, "float16": 1e-2}
CASES = [f"{model}-{part}-{dtype}{layout}" for model in ("kl", "vq") for part in ("encode", "decode")
         for dtype in ("float32", "float16") for layout in ("", "-nhwc")]


def _errors() -> dict:
    from conftest import mini_vq_config, official_checkpoint

    from rdm_fast import RDM, RDMConfig, ops

    out = {}
    for name, cfg in (("kl", RDMConfig.preset("tiny")), ("vq", mini_vq_config())):
        full, _, _ = official_checkpoint(cfg, seed=11)
        f = cfg.first_stage_config.ddconfig.downsample_factor
        g = torch.Generator().manual_seed(0)
        images = torch.rand(2, 3, cfg.image_size * f, cfg.image_size * f, generator=g) * 2 - 1
        z = torch.randn(2, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
        for dtype in (torch.float32, torch.float16):
            for nhwc in (False, True):
                ae = RDM.from_state_dict(full, cfg).first_stage.to(dtype)
                layout = torch.channels_last if nhwc else torch.contiguous_format
                if nhwc:
                    ae.to(memory_format=layout)
                inputs = {"encode": (ae.moments, images), "decode": (ae.decode, z)}
                for part, (fn, x) in inputs.items():
                    x = x.to(dtype).contiguous(memory_format=layout)
                    runs = {}
                    with torch.no_grad():
                        for mode in ("reference", "fast"):
                            with ops.use_mode(mode):
                                runs[mode] = fn(x).double()
                    ref = runs["reference"]
                    key = f"{name}-{part}-{str(dtype).removeprefix('torch.')}" + ("-nhwc" if nhwc else "")
                    out[key] = ((runs["fast"] - ref).norm() / ref.norm()).item()
    return out


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    from triton_testing import run_child

    return run_child(Path(__file__), tmp_path_factory.mktemp("fastae"), timeout=900)


@pytest.mark.parametrize("case", CASES)
def test_fast_first_stage_matches_reference(errors, case):
    tol = TOLERANCE[case.split("-")[2]]
    assert errors[case] < tol, f"{case}: relative error {errors[case]:.3g} >= {tol}"


if __name__ == "__main__":
    print(json.dumps(_errors()))
