"""The whole UNet with every fast kernel forced on (RDM_FAST_OPS=fast: the Triton kernels in the interpreter on
the CPU) vs the plain-PyTorch reference path, in fp32 and fp16, with a plain and with a prepared guided context,
and with channels-last weights (skip connections written into channel slices of the up stages' inputs; also with
guidance's shared input). The channels-last cases also run with GroupNorm through the Triton kernels that CUDA
runs (its three channels_last kernels), where the CPU would run the C++ op.

Run as a script with TRITON_INTERPRET=1 it prints the relative errors as JSON; the test starts it once.
Tolerances: fp32 1e-4 relative L2 (summation order only); fp16 1e-2 (each fused kernel rounds once where the
reference rounds at each step, through about 40 layers).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

TOLERANCE = {"float32": 1e-4, "float16": 1e-2}


def _errors() -> dict:
    from conftest import official_checkpoint

    from rdm_fast import RDM, RDMConfig, ops

    tree = RDMConfig.preset("tiny").to_dict()  # smaller latent: the interpreter is slow
    tree["model"]["params"]["image_size"] = 8
    cfg = RDMConfig.from_dict(tree)
    full, _, _ = official_checkpoint(cfg, seed=7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.channels, 8, 8, generator=g)
    t = torch.tensor([999, 3])
    ctx = torch.randn(1, cfg.context_tokens, cfg.context_dim, generator=g)
    out = {}
    for dtype, nhwc in ((torch.float32, False), (torch.float16, False), (torch.float32, True), (torch.float16, True)):
        model = RDM.from_state_dict(full, cfg).to(dtype)
        if nhwc:  # channels-last weights: the fast path writes skip connections into channel slices
            model.unet.to(memory_format=torch.channels_last)
        cases = [("prepared", lambda: model.unet.prepare_context(ctx, zero_rows=1), x, t)]
        if nhwc:  # guidance's shared input: one row for both halves, duplicated at the first cross-attention
            cases.append(("shared", lambda: model.unet.prepare_context(ctx, zero_rows=1, shared_input=True),
                          x[:1], t[:1]))
        else:
            cases.append(("plain", lambda: torch.cat([torch.zeros_like(ctx), ctx]), x, t))
        with torch.no_grad():
            for name, make_ctx, x_in, t_in in cases:
                runs = {}
                for mode in ("reference", "fast"):
                    with ops.use_mode(mode):
                        runs[mode] = model.unet(x_in, t_in, make_ctx()).double()
                if nhwc:  # GroupNorm through the CUDA path's Triton kernels instead of the C++ op
                    with ops.use_mode("fast"), _triton_group_norm():
                        runs["tritongn"] = model.unet(x_in, t_in, make_ctx()).double()
                ref = runs.pop("reference")
                key = f"{name}-{str(dtype).removeprefix('torch.')}" + ("-nhwc" if nhwc else "")
                for run, eps in runs.items():
                    out[key if run == "fast" else f"{key}-{run}"] = ((eps - ref).norm() / ref.norm()).item()
    return out


@contextlib.contextmanager
def _triton_group_norm():
    """On the CPU, GroupNorm runs the C++ op; here, the Triton kernels that CUDA runs for channels_last maps (in
    the interpreter)."""
    from rdm_fast.kernels import group_norm as kernels
    from rdm_fast.ops._dispatch import Impl
    from rdm_fast.ops.group_norm import GROUP_NORM

    saved = GROUP_NORM.by_device["cpu"]
    GROUP_NORM.by_device["cpu"] = [Impl("triton-interpreter", kernels.group_norm)]
    try:
        yield
    finally:
        GROUP_NORM.by_device["cpu"] = saved


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
    from triton_testing import run_child

    return run_child(Path(__file__), tmp_path_factory.mktemp("fastunet"), timeout=900)


NHWC_CASES = ["prepared-float32-nhwc", "prepared-float16-nhwc", "shared-float32-nhwc", "shared-float16-nhwc"]


@pytest.mark.parametrize("case", ["plain-float32", "prepared-float32", "plain-float16", "prepared-float16"]
                         + NHWC_CASES + [f"{c}-tritongn" for c in NHWC_CASES])
def test_fast_unet_matches_reference(errors, case):
    tol = TOLERANCE[case.split("-")[1]]
    assert errors[case] < tol, f"{case}: relative error {errors[case]:.3g} >= {tol}"


if __name__ == "__main__":
    print(json.dumps(_errors()))
