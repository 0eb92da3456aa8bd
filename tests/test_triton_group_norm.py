"""Triton GroupNorm kernel (``rdm_fast.kernels.group_norm``) vs ``group_norm_reference``.

On CPU the kernel runs in the Triton interpreter, which is selected by ``TRITON_INTERPRET=1`` when a
kernel is decorated (i.e. when the kernel module is imported) and read again at launch. Setting it
in this pytest process would leak into every other test module (and a kernel module imported
earlier without it would stay compiled-mode), so the interpreter cases run in a child interpreter:
this file run as a script with ``TRITON_INTERPRET=1`` evaluates every case and prints JSON; the
module fixture starts it once and each test asserts its case. bfloat16 is broken in the interpreter
and is only tested on a GPU (in process, compiled). Tolerances as in test_ops_group_norm.py.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from group_norm_shapes import SHAPES
from triton_testing import check_result, interpreter_fixture, print_results, ulp

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

EPS = 1e-5


def _cases() -> dict[str, tuple]:
    """id -> (shape, groups, layout, dtype name, fused add+silu, affine, mean offset, spread); layout False
    (contiguous), True (channels_last), "slice" (channels 5.. of a channels_last map 8 channels wider, as the
    UNet's skips), "w1" (W == 1, pixel rows at H's stride, W's stride 1) or "c1" (C == 1, rows of stride 2). The
    channels_last cases' ``add`` is strided: a column slice (slice layout) or one row expanded (float16). Spread
    1e-3 (variance ~1e-6, below eps): eps decides the output; spread 0: constant groups."""
    cases = {}
    for shape, groups in SHAPES:
        for cl in (False, True, "slice") if len(shape) == 4 else (False,):
            base = "x".join(map(str, shape)) + f"-g{groups}" + {False: "", True: "-nhwc", "slice": "-nhwcslice"}[cl]
            cases[f"{base}-float32-fused"] = (shape, groups, cl, "float32", True, True, 0.5, 2.0)
            cases[f"{base}-float16-fused"] = (shape, groups, cl, "float16", True, True, 0.5, 2.0)
            cases[f"{base}-float32-plain"] = (shape, groups, cl, "float32", False, False, 0.5, 2.0)
    cases["2x64x24x20-g8-offset1000"] = ((2, 64, 24, 20), 8, False, "float32", False, True, 1000.0, 2.0)
    cases["2x64x24x20-g8-nhwc-offset1000"] = ((2, 64, 24, 20), 8, True, "float32", False, True, 1000.0, 2.0)
    for cl in (False, True):  # spread 0: every group holds one value, the output is exactly the bias
        name = "-nhwc" if cl else ""
        cases[f"2x32x48x48-g8{name}-constant1000"] = ((2, 32, 48, 48), 8, cl, "float32", False, True, 1000.1, 0.0)
    for cl in (False, True, "slice"):
        for dtype in ("float32", "float16"):
            name = {False: "", True: "-nhwc", "slice": "-nhwcslice"}[cl]
            cases[f"2x32x7x5-g8{name}-{dtype}-eps"] = ((2, 32, 7, 5), 8, cl, dtype, True, True, 0.0, 1e-3)
    cases["2x16x5x1-g4-w1-float32-fused"] = ((2, 16, 5, 1), 4, "w1", "float32", True, True, 0.5, 2.0)
    cases["2x1x4x3-g1-c1-float32-fused"] = ((2, 1, 4, 3), 1, "c1", "float32", True, True, 0.5, 2.0)
    return cases


CASES = _cases()


def _inputs(case: tuple, device: str = "cpu"):
    """(x, weight, bias, add) on ``device``. The strided layouts are made there: ``Tensor.to`` copies a tensor
    with gaps between its elements into a contiguous one."""
    shape, _, cl, dtype, fused, affine, offset, spread = case
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * spread + offset).to(device, getattr(torch, dtype))
    if cl == "w1":  # the same values at strides (H*C, 1, C, 1)
        x = x[..., 0].transpose(1, 2).contiguous().transpose(1, 2).unsqueeze(-1)
    elif cl == "c1":  # the same values at strides (2*H*W, 2*H*W, 2*W, 2)
        x = torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]
    elif cl == "slice":
        wide = torch.zeros(shape[0], shape[1] + 8, *shape[2:], dtype=x.dtype, device=device).to(
            memory_format=torch.channels_last)
        wide[:, 5:5 + shape[1]] = x
        x = wide[:, 5:5 + shape[1]]
    elif cl:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = (1 + 0.5 * torch.randn(c, generator=gen)).to(device) if affine else None
    b = (0.5 * torch.randn(c, generator=gen)).to(device) if affine else None
    add = (torch.randn(shape[0], c, generator=gen) * min(spread, 1.0)).to(device) if fused else None
    if fused and cl == "slice":  # add: a column slice of a wider float32 matrix (row stride C + 8)
        add = (torch.randn(shape[0], c + 8, generator=gen) * min(spread, 1.0)).to(device)[:, 3:3 + c]
    elif fused and cl and dtype == "float16":  # add: one row expanded over the batch (row stride 0)
        add = add[:1].expand(shape[0], c)
    return x, w, b, add


def _mismatch(out: torch.Tensor, ref: torch.Tensor, offset: float) -> str | None:
    """None when ``out`` matches the reference within tolerance, else a description."""
    if out.shape != ref.shape or out.dtype != ref.dtype or out.stride() != ref.stride():
        return f"layout: got {out.shape} {out.dtype} {out.stride()}, expected {ref.shape} {ref.dtype} {ref.stride()}"
    diff = (out.float() - ref.float()).abs()
    if out.dtype == torch.float32:
        # With x ~ 1000 float32 itself is only ~6e-5 fine; the statistics must still be robust.
        atol = 3e-4 if offset > 100 else 1e-5
        bad = diff > atol + 1e-5 * ref.abs()
    else:
        bad = diff > ulp(torch.maximum(out.abs(), ref.abs())) + 1e-5
    if bad.any():
        return f"{int(bad.sum())} of {bad.numel()} values out of tolerance, max abs diff {diff.max().item():.3g}"
    return None


def _run_case(case: tuple, device: str = "cpu") -> str | None:
    from rdm_fast.kernels.group_norm import group_norm as triton_group_norm

    from rdm_fast.ops import group_norm_reference

    x, w, b, add = _inputs(case, device)
    groups, fused, offset = case[1], case[4], case[6]
    if case[2] in ("w1", "c1"):  # the layouts the cases are about
        assert not x.is_contiguous() and x.stride(3) != x.shape[1], x.stride()
    if case[2] == "slice" and add is not None:
        assert add.stride(0) == x.shape[1] + 8, add.stride()
    out = triton_group_norm(x, w, b, groups, EPS, add=add, silu=fused)
    if case[7] == 0:  # x - mean is exactly 0 (the reference's own float32 mean is ~1e-4 off here, times 316)
        expected = b.reshape(-1, *[1] * (x.dim() - 2)).expand_as(x).to(x.dtype)
        diff = (out - expected).abs().max().item()
        return None if diff == 0 else f"constant groups: max abs diff {diff:.3g} from the bias"
    ref = group_norm_reference(x, w, b, groups, EPS, add=add, silu=fused)
    return _mismatch(out, ref, offset)


# channels_last cases also run with the statistics loop not unrolled (NHWC_TUNING["unroll"] = 1, which the
# tuning sweep tries): results under "<name>-unroll1"
UNROLL1_CASES = [n for n in CASES if "-nhwc" in n and n.endswith("-fused")]


def _child_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from rdm_fast.kernels.group_norm import NHWC_TUNING

    results = {name: _run_case(case) for name, case in CASES.items()}
    NHWC_TUNING["unroll"] = 1
    results.update({f"{name}-unroll1": _run_case(CASES[name]) for name in UNROLL1_CASES})
    print_results(results)


interpreter_results = interpreter_fixture(__file__, timeout=900)


@pytest.mark.parametrize("name", list(CASES) + [f"{n}-unroll1" for n in UNROLL1_CASES])
def test_triton_interpreter_matches_reference(interpreter_results, name):
    check_result(interpreter_results, name)


GPU_CASES = [(n, d) for n in CASES if n.endswith("-float32-fused") for d in ("float32", "float16", "bfloat16")]
GPU_CASES += [(n, "float32") for n in CASES if "offset" in n or "constant" in n]  # large means: float32 only
GPU_CASES += [(n, CASES[n][3]) for n in CASES if n.endswith("-eps")]  # variance below eps, each in its dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,dtype", GPU_CASES)
def test_triton_gpu_matches_reference(name, dtype):
    case = CASES[name][:3] + (dtype,) + CASES[name][4:]
    err = _run_case(case, "cuda")
    assert err is None, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(128, 384, 32, 32), (128, 576, 16, 16), (32, 1344, 12, 12), (4, 960, 8, 8)])
def test_nhwc_kernels_at_model_shapes_on_gpu(shape):
    """The three channels_last kernels at the released models' inner levels (bf16, the card's own grid), against
    the float32 reference."""
    from rdm_fast.kernels import group_norm as kernels

    from rdm_fast.ops import group_norm_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16, memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.randn(c, device="cuda", generator=g), torch.randn(c, device="cuda", generator=g)
    add = torch.randn(shape[0], c, device="cuda", generator=g)
    ref = group_norm_reference(x, w, b, 32, EPS, add=add, silu=True)
    out = kernels.group_norm(x, w, b, 32, EPS, add=add, silu=True)
    assert _mismatch(out, ref, 0.0) is None, _mismatch(out, ref, 0.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the real thing")
@pytest.mark.parametrize("add", [False, True])
def test_nchw_kernel_compiles_for_sm90_without_spills(add):
    """Compiled mode for the NCHW kernel (contiguous maps), with and without the fused add."""
    from triton_testing import compile_launches

    from rdm_fast.kernels import group_norm as kernels

    x, w = torch.randn(2, 64, 12, 12, dtype=torch.bfloat16), torch.randn(64)
    results = compile_launches(lambda: kernels.group_norm(x, w, w, 32, EPS, add=torch.randn(2, 64) if add else None,
                                                          silu=True), kernels._group_norm_fwd_kernel)
    assert len(results) == 1 and results[0]["spill_bytes"] == 0, results


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the real thing")
@pytest.mark.parametrize("channels,side", [(192, 64), (1920, 16), (4096, 4), (64, 1)])
def test_nhwc_kernels_compile_for_sm90_without_spills(channels, side):
    """Compiled mode (which the interpreter does not exercise): the three channels_last kernels build for sm_90
    with no register spills, from 192 channels (6 per group) to 4096 (one pixel row per tile row), and for 1x1
    maps (the launcher passes hw = 1 as a constexpr: this failed on an H200 once)."""
    from triton_testing import compile_launches

    from rdm_fast.kernels import group_norm as kernels

    x = torch.randn(2, channels + 8, side, side, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    x = x[:, 8:]  # a channel slice: 1x1 maps are otherwise contiguous and take the NCHW kernel
    w, add = torch.randn(channels), torch.randn(2, channels)
    nhwc = (kernels._nhwc_stats_kernel, kernels._nhwc_finalize_kernel, kernels._nhwc_apply_kernel)
    for kernel in nhwc:
        others = [k for k in nhwc if k is not kernel]
        for k in others:  # record-only launch of the kernel under test; the others do nothing
            k.run = lambda *args, **kwargs: None
        try:
            results = compile_launches(lambda: kernels.group_norm(x, w, w, 32, EPS, add=add, silu=True), kernel)
        finally:
            for k in others:
                del k.run
        assert len(results) == 1 and results[0]["spill_bytes"] == 0, results


if __name__ == "__main__":
    _child_main()
