"""Fused GroupNorm: reference vs float64, C++ CPU op and CUDA op vs reference, errors, dispatch.

Needs the compiled extension: ``pip install --no-build-isolation .`` first (a source checkout on
``sys.path`` finds the installed copy's ``rdm_fast._C``, see ``rdm_fast/__init__.py``).

Tolerances: float32 outputs match the reference to ``rtol=atol=1e-5``. float16/bfloat16 outputs are
single roundings of float32 values that agree to within that float32 tolerance, so they may differ
from the reference by one unit in the last place of the low-precision format (at the larger of the
two magnitudes, ``triton_testing.ulp``) plus 1e-5 (which only matters near zero, e.g. among float16
subnormals).
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rdm_fast.ops as ops
from rdm_fast.ops import _extension
from rdm_fast.ops.group_norm import GROUP_NORM, group_norm, group_norm_reference
from child_env import child_env
from group_norm_shapes import SHAPES
from triton_testing import ulp

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUT_CASES = [(shape, g, cl) for shape, g in SHAPES for cl in ((False, True) if len(shape) == 4 else (False,))]
EPS = 1e-5


def _layout_id(case) -> str:
    shape, g, cl = case
    return "x".join(map(str, shape)) + f"-g{g}" + ("-nhwc" if cl else "")


def _make_inputs(shape, dtype, channels_last=False, *, affine=True, with_add=True, seed=0, offset=0.5):
    gen = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    x = (torch.randn(shape, generator=gen) * 2 + offset).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = 1 + 0.5 * torch.randn(c, generator=gen) if affine else None
    bias = 0.5 * torch.randn(c, generator=gen) if affine else None
    add = torch.randn(b, c, generator=gen) if with_add else None
    return x, w, bias, add


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert out.stride() == ref.stride(), "memory format differs from the reference"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        diff = (out.float() - ref.float()).abs()
        bad = diff > ulp(torch.maximum(out.abs(), ref.abs())) + 1e-5
        assert not bad.any(), f"{int(bad.sum())} values differ by more than 1 ulp + 1e-5 (max diff {diff.max().item()})"


def independent_group_norm(x, weight, bias, num_groups, eps, add=None, silu=False) -> torch.Tensor:
    """Fused GroupNorm from first principles in float64 (no F.group_norm)."""
    h = x.double()
    extra = (1,) * (x.dim() - 2)
    if add is not None:
        h = h + add.double().reshape(add.shape + extra)
    b, c = x.shape[:2]
    hg = h.reshape(b, num_groups, -1)
    mean = hg.sum(-1, keepdim=True) / hg.shape[-1]
    var = ((hg - mean) ** 2).sum(-1, keepdim=True) / hg.shape[-1]
    y = ((hg - mean) / torch.sqrt(var + eps)).reshape(h.shape)
    if weight is not None:
        y = y * weight.double().reshape((1, c) + extra)
    if bias is not None:
        y = y + bias.double().reshape((1, c) + extra)
    if silu:
        y = y / (1 + torch.exp(-y))
    return y


@pytest.fixture
def cpu_ext():
    """Fails (rather than skips) when the C++ extension is missing: it is part of the package."""
    if not _extension.cpu_loaded():
        pytest.fail(
            f"rdm_fast._C is not loadable ({_extension.load_error('rdm_fast._C')}); rdm_fast was imported from "
            f"{ops.__file__}. Install it with `pip install --no-build-isolation .` first."
        )


# --- the reference against an independent float64 computation


@pytest.mark.parametrize(
    "shape,groups,channels_last,dtype,silu",
    [
        ((3, 96, 7, 5), 32, False, torch.float32, True),
        ((2, 64, 33, 17), 16, True, torch.float32, False),
        ((3, 48, 19), 6, False, torch.float32, True),
        ((2, 32, 3, 5, 7), 8, False, torch.bfloat16, True),
        ((2, 64, 8, 8), 8, True, torch.float16, True),
    ],
)
def test_reference_matches_float64(shape, groups, channels_last, dtype, silu):
    x, w, b, add = _make_inputs(shape, dtype, channels_last)
    ref = group_norm_reference(x, w, b, groups, EPS, add=add, silu=silu)
    exact = independent_group_norm(x, w, b, groups, EPS, add, silu)
    if dtype == torch.float32:
        torch.testing.assert_close(ref.double(), exact, rtol=1e-5, atol=1e-5)
    else:
        assert ((ref.double() - exact).abs() <= ulp(exact.to(dtype)).double() + 1e-5).all()
    assert ref.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# --- C++ CPU op vs reference


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=_layout_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_add", [False, True], ids=["noadd", "add"])
@pytest.mark.parametrize("silu", [False, True], ids=["nosilu", "silu"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
def test_cpu_op_matches_reference(cpu_ext, fresh_dispatch, case, dtype, with_add, silu, affine):
    shape, groups, channels_last = case
    x, w, b, add = _make_inputs(shape, dtype, channels_last, affine=affine, with_add=with_add)
    ref = group_norm_reference(x, w, b, groups, EPS, add=add, silu=silu)
    with ops.use_mode("fast"):
        out = group_norm(x, w, b, groups, EPS, add=add, silu=silu)
    assert_matches(out, ref)
    assert_matches(torch.ops.rdm_fast.group_norm(x, w, b, groups, EPS, add, silu), ref)


@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_op_mixed_parameter_dtypes(cpu_ext, dtype, param_dtype):
    x, w, b, add = _make_inputs((2, 32, 6, 5), dtype, True)
    w, b, add = w.to(param_dtype), b.to(param_dtype), add.to(param_dtype)
    ref = group_norm_reference(x, w, b, 8, EPS, add=add, silu=True)
    assert_matches(torch.ops.rdm_fast.group_norm(x, w, b, 8, EPS, add, True), ref)


def test_cpu_op_weight_only_and_bias_only(cpu_ext):
    x, w, b, _ = _make_inputs((2, 32, 5, 3), torch.float32)
    for weight, bias in ((w, None), (None, b)):
        ref = group_norm_reference(x, weight, bias, 4, EPS)
        assert_matches(torch.ops.rdm_fast.group_norm(x, weight, bias, 4, EPS, None, False), ref)


def test_cpu_op_non_contiguous_add(cpu_ext):
    x, w, b, _ = _make_inputs((3, 32, 4, 4), torch.float32)
    add = torch.randn(32, 3).t()  # (B, C) view with strides (1, 3)
    ref = group_norm_reference(x, w, b, 8, EPS, add=add)
    assert_matches(torch.ops.rdm_fast.group_norm(x, w, b, 8, EPS, add, False), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,groups,channels_last",
    [((2, 4, 5000), 2, False), ((1, 4, 70, 70), 2, False), ((1, 4, 70, 70), 2, True), ((2, 6, 9000), 1, False)],
    ids=["1d-nchw", "2d-nchw", "2d-nhwc", "1d-one-group"],
)
def test_cpu_op_long_rows(cpu_ext, shape, groups, channels_last, dtype):
    """Rows longer than the kernels' 4096-value blocks and NHWC work items spanning several chunks."""
    x, w, b, add = _make_inputs(shape, dtype, channels_last)
    ref = group_norm_reference(x, w, b, groups, EPS, add=add, silu=True)
    assert_matches(torch.ops.rdm_fast.group_norm(x, w, b, groups, EPS, add, True), ref)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("offset_in", ["x", "add"])
def test_cpu_op_large_mean_offset(cpu_ext, channels_last, offset_in):
    x, w, b, add = _make_inputs((2, 64, 48, 40), torch.float32, channels_last, offset=0.0)
    if offset_in == "x":
        x = x + 1000
    else:
        add = add + 1000
    exact = independent_group_norm(x, w, b, 8, EPS, add, silu=False)
    out = torch.ops.rdm_fast.group_norm(x, w, b, 8, EPS, add, False)
    # x ~ 1000 carries ~6e-5 of float32 granularity; a naive E[x^2] - E[x]^2 would be off by O(1).
    assert (out.double() - exact).abs().max().item() < 1e-4
    ref = group_norm_reference(x, w, b, 8, EPS, add=add)
    assert (ref.double() - exact).abs().max().item() < 2e-4
    torch.testing.assert_close(out, ref, rtol=0, atol=3e-4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpu_op_constant_and_near_constant_groups(cpu_ext, channels_last):
    """A group of one value (here +-(1000.1 + 0.37 g)) has x - mean = 0 exactly, so the output is the bias. The
    first pass summed x itself in float32 runs of up to 4096 values: the mean came out ~1e-3 off, which
    rstd = 1/sqrt(eps) made 0.8 (channels_last; 0.3 NCHW). It now sums x minus one value of the group (or channel)
    of the same sample: the second sample's levels are negative, so a value of the first would not do."""
    gen = torch.Generator().manual_seed(3)
    level = (1000.1 + 0.37 * torch.arange(16.0)) * torch.tensor([1.0, -1.0]).repeat_interleave(8)
    level = level.reshape(2, 8, 1, 1, 1).expand(2, 8, 4, 80, 80).reshape(2, 32, 80, 80)
    w, b = 1 + 0.5 * torch.randn(32, generator=gen), 0.5 * torch.randn(32, generator=gen)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = level.contiguous(memory_format=fmt)  # 6400 pixels: more than one run
    assert torch.equal(torch.ops.rdm_fast.group_norm(x, w, b, 8, EPS, None, False), b[:, None, None].expand_as(x))
    reference_nan = group_norm_reference(x, w, b, 8, 0.0).isnan()  # eps 0: 0 / 0, as the reference
    assert reference_nan.all() and torch.ops.rdm_fast.group_norm(x, w, b, 8, 0.0, None, False).isnan().all()
    # variance ~1e-6, below eps: the float32 centre (1000.1 to ~3e-5) alone moves outputs by up to ~0.01
    x = (level + 1e-3 * torch.randn(level.shape, generator=gen)).contiguous(memory_format=fmt)
    exact = independent_group_norm(x, w, b, 8, EPS)
    assert (torch.ops.rdm_fast.group_norm(x, w, b, 8, EPS, None, False).double() - exact).abs().max() < 0.02


def _small_variance_inputs(shape=(2, 32, 6, 5), channels_last=False, dtype=torch.float32):
    """Groups whose variance (~1e-6) is below eps = 1e-5: eps decides the output, so an implementation that left it
    out, or added it after the square root, would be far off (asserted: the float64 result without eps differs
    by more than 1)."""
    x, w, b, add = _make_inputs(shape, torch.float32, channels_last, offset=0.0)
    x, add = (x * 1e-3).to(dtype), add * 1e-3
    exact = independent_group_norm(x, w, b, 8, EPS, add, silu=True)
    assert (exact - independent_group_norm(x, w, b, 8, 0.0, add, silu=True)).abs().max() > 1
    return (x, w, b, add), exact


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eps_is_applied(cpu_ext, channels_last):
    (x, w, b, add), exact = _small_variance_inputs(channels_last=channels_last)
    ref = group_norm_reference(x, w, b, 8, EPS, add=add, silu=True)
    torch.testing.assert_close(ref.double(), exact, rtol=1e-5, atol=1e-5)
    assert_matches(torch.ops.rdm_fast.group_norm(x, w, b, 8, EPS, add, True), ref)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpu_op_does_not_depend_on_the_thread_count(cpu_ext, channels_last):
    """Each thread of the channels_last kernel sums the rows of its work items (chunks of rows of one sample) into
    one buffer, cleared between items. With a thread per item, as on many-core machines, a buffer carried over from
    one item to the next went unnoticed, so one thread (all 9 items in one range) must give the bits of several."""
    x, w, b, add = _make_inputs((3, 32, 40, 30), torch.float32, channels_last)  # 1200 rows: 3 chunks of 512
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.rdm_fast.group_norm(x, w, b, 8, EPS, add, True)
        torch.set_num_threads(4)
        several = torch.ops.rdm_fast.group_norm(x, w, b, 8, EPS, add, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, several)
    assert_matches(one, group_norm_reference(x, w, b, 8, EPS, add=add, silu=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_low_precision_outputs_round_to_nearest(cpu_ext, dtype, channels_last):
    """With weight 0 every output is its channel's float32 bias, so the op must return exactly bias.to(dtype).
    The 1-ulp tolerance of assert_matches let float16 outputs rounded toward zero (F16C's _MM_FROUND_TO_ZERO) or
    bfloat16 ones truncated pass; rows of 8 and more values take the vectorised conversions."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, 4, 5, generator=gen).to(dtype)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    bias = torch.randn(64, generator=gen)
    out = torch.ops.rdm_fast.group_norm(x, torch.zeros(64), bias, 8, EPS, None, False)
    assert (bias.to(dtype).float() != bias).all()  # every value is rounded
    assert torch.equal(out, bias.to(dtype)[:, None, None].expand_as(x))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_silu_is_accurate_to_a_few_float32_ulp(cpu_ext, channels_last):
    """The SiLU's exp_poly is documented as accurate to about 1.6 float32 ulp, saturating beyond |x| = 87.3: the
    op's float32 SiLU must stay within 1e-6 relative (~8 ulp) of float64 over [-200, 200] (1e-30 absolute where
    it underflows). assert_matches' 1e-5 let a degree-5 polynomial (~3e-6 relative) pass, and no input reached the
    clamp (without it, silu(100) came out near 0). Weight 0 makes every output silu(bias) exactly."""
    bias = torch.linspace(-200, 200, 64 * 50)
    x = torch.randn(2, 64 * 50, 3, 3)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    out = torch.ops.rdm_fast.group_norm(x, torch.zeros(bias.shape), bias, 64, EPS, None, True)
    exact = (bias.double() / (1 + torch.exp(-bias.double())))[:, None, None]
    err = (out.double() - exact).abs()
    assert (err <= 1e-6 * exact.abs() + 1e-30).all(), (err / exact.abs()).max().item()


@needs_triton
def test_nhwc_row_layouts_are_recognised(fresh_dispatch):
    """Maps stored as pixel rows of C unit-strided channels, whatever the strides of their size-1 dims, take the
    channels_last kernels (with the right row stride, tested in test_triton_group_norm.py); other strides do not."""
    from rdm_fast._layout import nhwc_row_stride

    w1 = torch.randn(2, 5, 16).permute(0, 2, 1).unsqueeze(-1)  # (2, 16, 5, 1), strides (80, 1, 16, 1)
    c1 = torch.randn(2, 4, 3, 2)[..., 0].unsqueeze(1)  # (2, 1, 4, 3), strides (24, 24, 6, 2): rows of stride 2
    wide = torch.randn(2, 24, 4, 3).to(memory_format=torch.channels_last)
    assert nhwc_row_stride(w1) == 16 and nhwc_row_stride(c1) == 2 and nhwc_row_stride(wide[:, 5:21]) == 24
    assert nhwc_row_stride(torch.randn(2, 16, 4, 6)[..., ::2]) is None  # every other pixel
    assert nhwc_row_stride(torch.randn(2, 4, 3, 16).permute(0, 3, 2, 1)) is None  # W and H swapped
    for x in (w1, c1, wide[:, 5:21]):
        assert GROUP_NORM.select("cuda", x, None, None, 1, EPS).name == "triton-nhwc"


@needs_triton
def test_channels_last_maps_run_the_three_kernels_untimed(monkeypatch, caplog):
    """On CUDA, channels_last maps (and channel slices of them) go to the Triton kernels with the call's own
    arguments (the three-kernel path: test_triton_group_norm.py), in auto and fast mode alike, with nothing timed
    per call shape (no "group_norm at" line). Runs on CPU tensors with the kernels and the timer faked."""
    from rdm_fast.ops import _measured

    gn = sys.modules["rdm_fast.ops.group_norm"]  # the package re-exports the function under the module's name
    gn._KERNELS.unavailable()  # loads the kernel module
    calls = []
    monkeypatch.setattr(gn._KERNELS.module, "group_norm", lambda *a, **kw: calls.append((a, kw)) or "three")
    monkeypatch.setattr(_measured, "replay_time", lambda *a, **kw: pytest.fail("a channels_last call was timed"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    wide = torch.randn(2, 72, 5, 3).to(memory_format=torch.channels_last)
    add = torch.randn(2, 64)
    with caplog.at_level(logging.INFO, logger="rdm_fast.ops"):
        for mode in ("auto", "fast"):
            for x in (wide[:, :64].contiguous(memory_format=torch.channels_last), wide[:, 8:]):
                with ops.use_mode(mode):
                    impl = GROUP_NORM.select("cuda", x, None, None, 8, EPS, add=add, silu=True)
                    assert impl.name == "triton-nhwc"
                    calls.clear()
                    assert impl.fn(x, None, None, 8, EPS, add=add, silu=True) == "three"
                    assert len(calls) == 1, calls
                    (args, kwargs), = calls
                    assert args[0] is x and args[1:] == (None, None, 8, EPS), args
                    assert kwargs.keys() == {"add", "silu"} and kwargs["add"] is add and kwargs["silu"] is True
    assert "group_norm at" not in caplog.text


def test_sizes_beyond_the_kernels_limits_fall_back():
    """Batches above the grid's z limit (channels_last kernels) and groups of 2^31 values or more (32-bit offsets)
    go to the reference in auto mode instead of failing in a kernel."""
    big_batch = torch.empty(65536, 16, 1, 1, device="meta").to(memory_format=torch.channels_last)
    assert GROUP_NORM.impl("triton-nhwc").unsupported(big_batch, None, None, 4, EPS) is not None
    big_group = torch.empty(1, 64, 4096, 8192, device="meta")
    assert "32-bit" in GROUP_NORM.impl("cuda-ext").unsupported(big_group, None, None, 1, EPS)
    assert GROUP_NORM.impl("cuda-ext").unsupported(big_group, None, None, 2, EPS) is None
    # just under 2^31: the loops' 32-bit counters would step past it (a block at a time)
    near = torch.empty(1, 1, 2**31 - 100, device="meta")
    for impl in ("cuda-ext", "triton"):
        assert "loop counters" in GROUP_NORM.impl(impl).unsupported(near, None, None, 1, EPS)


@needs_triton
def test_a_channels_last_batch_above_the_grid_limit_never_reaches_the_triton_kernels(fresh_dispatch, monkeypatch):
    """On CUDA without the extension, a channels_last batch above the channels_last kernels' grid limit went to
    the last implementation, the Triton op, which runs those same kernels: its launcher raised ValueError instead
    of the reference running. It goes to the reference now (selection only: meta tensors)."""
    monkeypatch.setattr(GROUP_NORM.impl("cuda-ext"), "unavailable", lambda: "rdm_fast._C_cuda is not built")
    big = torch.empty(65536, 16, 2, 2, device="meta").to(memory_format=torch.channels_last)
    assert "launch grid" in GROUP_NORM.impl("triton").unsupported(big, None, None, 4, EPS)
    assert GROUP_NORM.select("cuda", big, None, None, 4, EPS).name == "reference"
    assert GROUP_NORM.select("cuda", big[:65535], None, None, 4, EPS).name == "triton-nhwc"
    assert GROUP_NORM.select("cuda", big.contiguous(), None, None, 4, EPS).name == "triton"  # the NCHW kernel


@needs_triton
def test_the_extension_takes_channels_last_batches_the_triton_kernels_cannot(fresh_dispatch, monkeypatch):
    """On CUDA, a channels_last batch above the channels_last kernels' grid limit goes to the extension's kernel
    (one program per sample and group: no such limit), not the reference; the only test of such batches asked
    triton-nhwc alone, so an extension check refusing channels_last maps passed (selection only: meta tensors)."""
    monkeypatch.setattr(GROUP_NORM.impl("cuda-ext"), "unavailable", lambda: None)
    big = torch.empty(65536, 16, 2, 2, device="meta").to(memory_format=torch.channels_last)
    assert GROUP_NORM.select("cuda", big, None, None, 4, EPS).name == "cuda-ext"
    assert GROUP_NORM.select("cuda", big.contiguous(), None, None, 4, EPS).name == "cuda-ext"


def test_fake_matches_the_op_on_channel_slices(cpu_ext):
    """The op itself (not the dispatcher, which makes slices channels_last first) returns NCHW for the channel
    slice of a channels_last map; its fake implementation must give the same strides."""
    wide = torch.randn(2, 40, 5, 3).to(memory_format=torch.channels_last)
    x, w, b, add = wide[:, 4:36], torch.randn(32), torch.randn(32), torch.randn(2, 32)
    torch.library.opcheck(torch.ops.rdm_fast.group_norm.default, (x, w, b, 8, EPS, add, True),
                          test_utils=("test_faketensor",))


@pytest.mark.parametrize("shape", [(0, 32, 4, 4), (2, 32, 0, 4), (2, 32, 0)], ids=["batch", "height", "length"])
def test_cpu_op_empty_input(cpu_ext, shape):
    """Nothing to read: an empty batch, or samples with no spatial positions (whose groups the kernel must not
    visit: their first value would be read from x's null data)."""
    x = torch.randn(shape)
    assert torch.ops.rdm_fast.group_norm(x, None, None, 8, EPS, torch.randn(shape[:2]), True).shape == x.shape
    # the reference (the oracle and reference mode's path) gives the same empty result, not F.group_norm's error
    assert group_norm_reference(x, None, None, 8, EPS, add=torch.randn(shape[:2]), silu=True).shape == x.shape


def test_unsupported_layout_falls_back_in_auto_and_raises_in_fast(cpu_ext, fresh_dispatch):
    x = torch.randn(2, 16, 3, 4, 5).to(memory_format=torch.channels_last_3d)
    ref = group_norm_reference(x, None, None, 4, EPS, silu=True)
    assert GROUP_NORM.select("cpu", x, None, None, 4, EPS).name == "reference"
    assert_matches(group_norm(x, None, None, 4, EPS, silu=True), ref)
    with ops.use_mode("fast"), pytest.raises(RuntimeError, match="contiguous or 4-D channels_last"):
        group_norm(x, None, None, 4, EPS)
    # The raw op copies other layouts to NCHW; values still match.
    torch.testing.assert_close(torch.ops.rdm_fast.group_norm(x, None, None, 4, EPS, None, True), ref)


# --- argument errors


def _error_cases():
    x = torch.randn(2, 12, 4, 4)
    return [
        ("divisible", (x, None, None, 5, EPS), {}, r"C=12 must be divisible by num_groups=5"),
        ("groups0", (x, None, None, 0, EPS), {}, r"divisible by num_groups=0"),
        ("add", (x, None, None, 4, EPS), {"add": torch.randn(2, 6)}, r"add of shape \(B, C\) = \(2, 12\).*\(2, 6\)"),
        ("add4d", (x, None, None, 4, EPS), {"add": torch.randn(2, 12, 1, 1)}, r"add of shape \(B, C\)"),
        ("weight", (x, torch.randn(6), None, 4, EPS), {}, r"weight of shape \(C,\) = \(12,\).*\(6,\)"),
        ("bias", (x, None, torch.randn(12, 1), 4, EPS), {}, r"bias of shape \(C,\)"),
        ("dtype", (x.double(), None, None, 4, EPS), {}, r"unsupported (x )?dtype .*(float64|Double)"),
        ("intdtype", (x.int(), None, None, 4, EPS), {}, r"unsupported (x )?dtype"),
        ("param_dtype", (x, torch.randn(12).double(), None, 4, EPS), {}, r"unsupported weight dtype"),
        ("dim", (torch.randn(12), None, None, 4, EPS), {}, r"expected x of shape \(B, C, \*spatial\).*\(12,\)"),
    ]


@pytest.mark.parametrize("fn", [group_norm, group_norm_reference], ids=["group_norm", "reference"])
@pytest.mark.parametrize("args,kwargs,match", [c[1:] for c in _error_cases()], ids=[c[0] for c in _error_cases()])
def test_errors(fn, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,match", [c[1:] for c in _error_cases()], ids=[c[0] for c in _error_cases()])
def test_cpu_op_errors(cpu_ext, args, kwargs, match):
    """The C++ op raises ValueError (TORCH_CHECK_VALUE) with the same kind of message."""
    x, weight, bias, groups, eps = args
    with pytest.raises(ValueError, match=match):
        torch.ops.rdm_fast.group_norm(x, weight, bias, groups, eps, kwargs.get("add"), False)


# --- dispatch


def test_mode_from_env_api_and_context_manager(fresh_dispatch, monkeypatch):
    assert ops.get_mode() == "auto"
    monkeypatch.setenv("RDM_FAST_OPS", "reference")
    assert ops.get_mode() == "reference"
    monkeypatch.setenv("RDM_FAST_OPS", "FAST")
    assert ops.get_mode() == "fast"
    ops.set_mode("auto")
    assert ops.get_mode() == "auto"
    with ops.use_mode("reference"):
        assert ops.get_mode() == "reference"
        with ops.use_mode("fast"):
            assert ops.get_mode() == "fast"
        assert ops.get_mode() == "reference"
    assert ops.get_mode() == "auto"
    with pytest.raises(KeyError), ops.use_mode("reference"):  # a body that raises restores the mode too
        raise KeyError("body")
    assert ops.get_mode() == "auto"
    ops.set_mode(None)
    assert ops.get_mode() == "fast"


def test_invalid_mode(fresh_dispatch, monkeypatch):
    with pytest.raises(ValueError, match="valid modes: auto, reference, fast"):
        ops.set_mode("turbo")
    with pytest.raises(ValueError, match="valid modes"):
        with ops.use_mode("slow"):
            pass
    monkeypatch.setenv("RDM_FAST_OPS", "bogus")
    with pytest.raises(ValueError, match=r"'bogus' from \$RDM_FAST_OPS; valid modes: auto, reference, fast"):
        ops.get_mode()


def test_first_use_is_logged_once(cpu_ext, fresh_dispatch, caplog):
    x = torch.randn(2, 8, 3, 3)
    with caplog.at_level(logging.INFO, logger="rdm_fast.ops"):
        group_norm(x, None, None, 2, EPS)
        group_norm(x, None, None, 2, EPS)
        group_norm(x.half(), None, None, 2, EPS)
        with ops.use_mode("reference"):
            group_norm(x, None, None, 2, EPS)
        group_norm(x.bfloat16().requires_grad_(), None, None, 2, EPS)  # says why the preferred path did not run
    messages = [r.getMessage() for r in caplog.records if r.name == "rdm_fast.ops"]
    assert messages == [
        "group_norm: cpu-ext (cpu, float32)",
        "group_norm: cpu-ext (cpu, float16)",
        "group_norm: reference (cpu, float32)",
        "group_norm: reference (cpu, bfloat16; not cpu-ext: inputs require grad (no backward kernel yet))",
    ]


def test_reference_mode_does_not_call_extension(cpu_ext, fresh_dispatch, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("extension called")

    monkeypatch.setattr(GROUP_NORM.impl("cpu-ext"), "fn", boom)
    x, w, b, add = _make_inputs((2, 32, 4, 4), torch.float32)
    with ops.use_mode("reference"):
        out = group_norm(x, w, b, 8, EPS, add=add, silu=True)
    assert_matches(out, group_norm_reference(x, w, b, 8, EPS, add=add, silu=True))
    with pytest.raises(AssertionError, match="extension called"):  # the patch is effective
        group_norm(x, w, b, 8, EPS)


def test_requires_grad_uses_reference_and_gradients_flow(cpu_ext, fresh_dispatch):
    x, _, _, add = _make_inputs((2, 16, 5, 5), torch.float32)
    w = torch.nn.Parameter(torch.ones(16))
    b = torch.nn.Parameter(torch.zeros(16))
    x.requires_grad_(True)
    assert not GROUP_NORM.impl("cpu-ext").supports(x, w, b, 4, EPS, add=add)
    assert GROUP_NORM.select("cpu", x, w, b, 4, EPS, add=add).name == "reference"
    out = group_norm(x, w, b, 4, EPS, add=add, silu=True)
    out.square().sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None
    x2 = x.detach().clone().requires_grad_(True)
    group_norm_reference(x2, w.detach(), b.detach(), 4, EPS, add=add, silu=True).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    with ops.use_mode("fast"), pytest.raises(RuntimeError, match="require grad"):
        group_norm(x, w, b, 4, EPS)
    # Parameters that require grad are fine when autograd is off (inference).
    with torch.no_grad():
        assert GROUP_NORM.impl("cpu-ext").supports(x, w, b, 4, EPS)
        assert GROUP_NORM.select("cpu", x, w, b, 4, EPS).name == "cpu-ext"
    with torch.inference_mode():
        assert GROUP_NORM.select("cpu", x.detach(), w, b, 4, EPS).name == "cpu-ext"


def test_missing_extension_warns_once_and_fast_mode_explains(fresh_dispatch, monkeypatch, caplog):
    monkeypatch.setattr(GROUP_NORM.impl("cpu-ext"), "unavailable", lambda: "rdm_fast._C is not built")
    x, w, b, _ = _make_inputs((2, 8, 3, 3), torch.float32)
    with caplog.at_level(logging.INFO, logger="rdm_fast.ops"):
        out1 = group_norm(x, w, b, 2, EPS)
        group_norm(x, w, b, 2, EPS)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "rdm_fast._C is not built" in warnings[0] and "pip install --no-build-isolation ." in warnings[0]
    assert_matches(out1, group_norm_reference(x, w, b, 2, EPS))
    with ops.use_mode("fast"), pytest.raises(RuntimeError, match=r"not built.*pip install --no-build-isolation \."):
        group_norm(x, w, b, 2, EPS)


def test_a_missing_preferred_backend_is_warned_about_when_a_slower_fast_one_runs(fresh_dispatch, caplog):
    """As on CUDA, where group_norm prefers the Triton kernels to the extension's and attention Triton to SDPA:
    with the first implementation's backend missing, the next one runs, and the user is told once what is
    missing (the warning of a fallback to the reference, for a fallback to a slower fast path)."""
    from rdm_fast.ops._dispatch import Impl, Op

    op = Op("demo", reference=Impl("reference", lambda x: x), by_device={"cpu": [
        Impl("first", lambda x: x + 1, unavailable=lambda: "rdm_fast._C_cuda is not built"),
        Impl("second", lambda x: x + 2)]})
    with caplog.at_level(logging.INFO, logger="rdm_fast.ops"):
        assert op(torch.zeros(1)).item() == 2
        op(torch.zeros(1))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "demo: falling back to the slower second implementation because rdm_fast._C_cuda is not "
                          "built; build it with `pip install --no-build-isolation .` from the rdm_fast source tree"),
        (logging.INFO, "demo: second (cpu, float32; not first: rdm_fast._C_cuda is not built)")]
    caplog.clear()
    other = Op("other", reference=op.reference, by_device=op.by_device)  # once per op, not once per process
    with caplog.at_level(logging.WARNING, logger="rdm_fast.ops"):
        other(torch.zeros(1))
    assert [r.getMessage().split(" because")[0] for r in caplog.records] == [
        "other: falling back to the slower second implementation"]


def test_a_missing_extension_is_not_blamed_for_calls_it_would_not_take(fresh_dispatch, monkeypatch, caplog):
    """A call that needs gradients runs the reference with or without the (inference-only) extension: its log
    line and fast mode's error give that reason, and the missing extension is warned about at the first call it
    would have run (training without the extension was told that building it would bring back the fast path)."""
    monkeypatch.setattr(GROUP_NORM.impl("cpu-ext"), "unavailable", lambda: "rdm_fast._C is not built")
    x, w, b, _ = _make_inputs((2, 8, 3, 3), torch.float32)
    x.requires_grad_(True)
    with caplog.at_level(logging.INFO, logger="rdm_fast.ops"):
        group_norm(x, w, b, 2, EPS)
        assert [r.getMessage() for r in caplog.records] == [
            "group_norm: reference (cpu, float32; not cpu-ext: inputs require grad (no backward kernel yet))"]
        with ops.use_mode("fast"), pytest.raises(RuntimeError, match=r"require grad[^;]*\)$"):  # no build advice
            group_norm(x, w, b, 2, EPS)
        with torch.no_grad():
            group_norm(x, w, b, 2, EPS)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "because rdm_fast._C is not built" in warnings[0]


def test_loaded_extension_was_built_from_these_sources(cpu_ext):
    """The extension in use carries the digest of the csrc/ it was built from; run from a checkout, it equals the
    checkout's (a stale install would have been refused)."""
    import rdm_fast._C as ext
    from rdm_fast._sources import csrc_digest

    assert len(ext.csrc_digest) == 16 and int(ext.csrc_digest, 16) >= 0
    if _extension.CHECKOUT_CSRC is not None:
        assert ext.csrc_digest == csrc_digest(_extension.CHECKOUT_CSRC)


def test_an_installed_copy_is_not_taken_for_a_checkout(tmp_path):
    """Installed, rdm_fast's parent is site-packages: another distribution's top-level ``csrc/`` there made both
    (good) extensions count as stale builds, and its ``kernels`` package joined rdm_fast's search path. A checkout
    is recognised by rdm_fast's own build files."""
    from rdm_fast import _source_checkout

    site = tmp_path / "site-packages"
    for name in ("rdm_fast/__init__.py", "kernels/__init__.py", "csrc/library.cpp"):
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text("")
    assert _source_checkout(str(site / "rdm_fast")) is None
    for name in ("setup.py", "CMakeLists.txt"):
        (site / name).write_text("")
    assert _source_checkout(str(site / "rdm_fast")) == str(site)


def test_stale_build_is_recognised(tmp_path, monkeypatch):
    """A module built from other sources (or before builds carried a digest) is named as stale; sources edited
    after the build change the digest."""
    from rdm_fast._sources import csrc_digest

    (tmp_path / "op.cpp").write_text("int f() { return 1; }\n")
    (tmp_path / "notes.txt").write_text("not a source")
    fake = type(sys)("rdm_fast._fake")
    monkeypatch.setitem(sys.modules, "rdm_fast._fake", fake)
    assert "(digest unknown, sources" in _extension.stale_build("rdm_fast._fake", tmp_path)
    fake.csrc_digest = csrc_digest(tmp_path)
    assert _extension.stale_build("rdm_fast._fake", tmp_path) is None
    (tmp_path / "notes.txt").write_text("still not a source")
    assert _extension.stale_build("rdm_fast._fake", tmp_path) is None  # only C++/CUDA files count
    (tmp_path / "op.cpp").write_text("int f() { return 2; }\n")
    assert "a stale build" in _extension.stale_build("rdm_fast._fake", tmp_path)
    assert _extension.stale_build("rdm_fast._fake", tmp_path / "none") is None  # an installed package: no sources


def test_available_backends(cpu_ext):
    backends = ops.available_backends()
    assert set(backends) == {"cpu-ext", "cuda-ext", "triton"}
    assert backends["cpu-ext"] is True


def run_python(code: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports the same rdm_fast as this process."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=child_env(**(extra_env or {})),
                          capture_output=True, text=True, timeout=300)


def test_import_does_not_load_extension(tmp_path):
    code = (
        "import sys, rdm_fast.ops, rdm_fast.ops.group_norm\n"
        "loaded = [m for m in ('rdm_fast._C', 'rdm_fast._C_cuda', 'rdm_fast.kernels.group_norm') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr


def test_cpu_baseline_isa_variant(cpu_ext, tmp_path):
    """The portable (non-AVX2) row kernels, forced with RDM_FAST_CPU_ISA=baseline in a fresh process."""
    code = (
        "import torch, rdm_fast.ops as ops\n"
        "assert ops.available_backends()['cpu-ext']\n"
        "torch.manual_seed(0)\n"
        "for dtype in (torch.float32, torch.float16, torch.bfloat16):\n"
        "    for cl in (False, True):\n"
        "        x = (torch.randn(3, 96, 33, 17) + 0.5).to(dtype)\n"
        "        x = x.to(memory_format=torch.channels_last) if cl else x\n"
        "        w, b, a = torch.randn(96), torch.randn(96), torch.randn(3, 96)\n"
        "        out = torch.ops.rdm_fast.group_norm(x, w, b, 32, 1e-5, a, True)\n"
        "        ref = ops.group_norm_reference(x, w, b, 32, 1e-5, add=a, silu=True)\n"
        "        tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps\n"
        "        torch.testing.assert_close(out, ref, rtol=tol, atol=1e-5 + tol)\n"
        "print('ok')\n"
    )
    result = run_python(code, tmp_path, {"RDM_FAST_CPU_ISA": "baseline"})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_compile_cold_start_fullgraph(tmp_path, fresh_dispatch):
    """torch.compile(fullgraph=True) over the dispatching API, with nothing loaded before tracing (the child in
    auto mode, whatever RDM_FAST_OPS this process was given)."""
    code = (
        "import sys, torch, rdm_fast.ops as ops\n"
        "x, w, b, a = torch.randn(2, 64, 8, 8), torch.randn(64), torch.randn(64), torch.randn(2, 64)\n"
        "f = lambda t: ops.group_norm(t, w, b, 32, 1e-5, add=a, silu=True) * 2\n"
        "with torch.no_grad():\n"
        "    out = torch.compile(f, backend='aot_eager', fullgraph=True)(x)\n"
        "assert 'rdm_fast._C' in sys.modules\n"
        "torch.testing.assert_close(out, ops.group_norm_reference(x, w, b, 32, 1e-5, add=a, silu=True) * 2)\n"
        "print('ok')\n"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_fake_impl_meta_and_compile(cpu_ext):
    x = torch.empty(2, 32, 5, 7, device="meta").to(memory_format=torch.channels_last)
    out = torch.ops.rdm_fast.group_norm(x, None, None, 8, EPS, None, True)
    assert out.device.type == "meta" and out.shape == x.shape and out.stride() == x.stride()

    def f(t, w, b, add):
        return torch.ops.rdm_fast.group_norm(t, w, b, 8, EPS, add, True) * 2

    xs, w, b, add = _make_inputs((2, 32, 5, 7), torch.float32, True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(xs, w, b, add), f(xs, w, b, add))


# --- CUDA


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_ext():
    if not _extension.cuda_loaded():
        pytest.fail(f"rdm_fast._C_cuda is not loadable: {_extension.load_error('rdm_fast._C_cuda')}")


def _to_cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


@cuda
@pytest.mark.parametrize(
    "case", LAYOUT_CASES + [((4, 320, 32, 32), 32, True), ((4, 128, 64, 64), 32, False)], ids=_layout_id
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "add+silu"])
def test_cuda_op_matches_reference(cuda_ext, fresh_dispatch, case, dtype, fused):
    shape, groups, channels_last = case
    x, w, b, add = _to_cuda(*_make_inputs(shape, dtype, channels_last, with_add=fused))
    ref = group_norm_reference(x, w, b, groups, EPS, add=add, silu=fused)
    with ops.use_mode("fast"):
        out = group_norm(x, w, b, groups, EPS, add=add, silu=fused)
    nhwc = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    expected = "triton-nhwc" if nhwc else "cuda-ext"
    assert GROUP_NORM.select("cuda", x, w, b, groups, EPS, add=add, silu=fused).name == expected
    assert_matches(out, ref)
    assert_matches(torch.ops.rdm_fast.group_norm(x, w, b, groups, EPS, add, fused), ref)  # the CUDA kernel too


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_op_misaligned_and_param_dtypes(cuda_ext, dtype):
    """A storage offset of one element forces the scalar (VEC=1) path; parameters in x.dtype."""
    shape = (2, 64, 12, 10)
    n = torch.Size(shape).numel()
    x = torch.randn(n + 1, device="cuda").to(dtype)[1:].view(shape)
    w, b, add = (t.cuda().to(dtype) for t in _make_inputs(shape, torch.float32)[1:])
    ref = group_norm_reference(x, w, b, 16, EPS, add=add, silu=True)
    assert_matches(torch.ops.rdm_fast.group_norm(x, w, b, 16, EPS, add, True), ref)


@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_op_large_mean_offset(cuda_ext, channels_last):
    x, w, b, add = _make_inputs((2, 64, 48, 40), torch.float32, channels_last, offset=1000.0)
    exact = independent_group_norm(x, w, b, 8, EPS, add, silu=False)
    out = torch.ops.rdm_fast.group_norm(*_to_cuda(x, w, b), 8, EPS, add.cuda(), False)
    assert (out.cpu().double() - exact).abs().max().item() < 3e-4
    ref = group_norm_reference(x, w, b, 8, EPS, add=add)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=3e-4)


@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_eps_is_applied(cuda_ext, fresh_dispatch, channels_last, dtype):
    (x, w, b, add), _ = _small_variance_inputs((2, 64, 12, 10), channels_last, dtype)
    ref = group_norm_reference(x, w, b, 8, EPS, add=add, silu=True)
    x, w, b, add = _to_cuda(x, w, b, add)
    with ops.use_mode("fast"):
        assert_matches(group_norm(x, w, b, 8, EPS, add=add, silu=True).cpu(), ref)
    assert_matches(torch.ops.rdm_fast.group_norm(x, w, b, 8, EPS, add, True).cpu(), ref)


@cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_op_on_current_stream(cuda_ext, channels_last):
    """The CUDA kernel launches on the current stream: captured into a CUDA graph (capture fails on a launch
    into any other stream) and replayed, it writes the right result."""
    x, w, b, add = _to_cuda(*_make_inputs((8, 128, 32, 32), torch.bfloat16, channels_last))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.rdm_fast.group_norm(x, w, b, 32, EPS, add, True)  # warm-up (first-use allocations)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.rdm_fast.group_norm(x, w, b, 32, EPS, add, True)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, group_norm_reference(x, w, b, 32, EPS, add=add, silu=True))


@pytest.mark.parametrize("eps", [-1.0, -1e-6, float("nan"), float("inf")], ids=["neg", "tiny-neg", "nan", "inf"])
@pytest.mark.parametrize("fn", [group_norm, group_norm_reference], ids=["op", "reference"])
def test_negative_or_non_finite_eps_is_refused(fn, eps):
    """A negative eps made the variance + eps negative: NaN outputs without an error."""
    x, w, b, _ = _make_inputs((2, 8, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="group_norm: eps must be a finite number >= 0"):
        fn(x, w, b, 4, eps)
    with pytest.raises(TypeError, match="group_norm: expected eps to be a float"):
        fn(x, w, b, 4, "1e-5")
    with pytest.raises(TypeError, match=r"group_norm: expected eps to be a float, got a tensor of shape \(2,\)"):
        fn(x, w, b, 4, torch.tensor([1e-5, 1e-5]))
    with pytest.raises(TypeError, match="group_norm: num_groups must be an int, got 4.0"):  # a dispatcher dump
        fn(x, w, b, 4.0, 1e-5)
    if fn is group_norm:
        with pytest.raises(TypeError, match="group_norm: silu must be True or False, got 'yes'"):
            fn(x, w, b, 4, 1e-5, silu="yes")
        torch.testing.assert_close(fn(x, w, b, np.int64(4), 1e-5, silu=np.bool_(True)), fn(x, w, b, 4, 1e-5, silu=True))
    assert torch.isfinite(fn(x, w, b, 4, 0.0)).all()  # 0 stays allowed (torch's own GroupNorm takes it)


@pytest.mark.parametrize("dynamic", [False, True])
def test_dispatch_traces_when_a_preferred_impl_declines(cpu_ext, fresh_dispatch, dynamic):
    """A declined implementation's reason can hold the call's (symbolic) sizes: the dispatch must still trace as one
    graph (the first-use log line leaves the reasons out under torch.compile)."""
    def f(x):
        return ops.group_norm(x, None, None, 2, EPS)

    compiled = torch.compile(f, backend="eager", dynamic=dynamic, fullgraph=True)
    for make in (lambda: torch.randn(2, 8, 5, 6).transpose(2, 3),  # strided: the layout reason names the strides
                 lambda: torch.randn(2, 8, 5, 5, requires_grad=True)):
        torch._dynamo.reset()
        for _ in range(2):
            x = make()
            torch.testing.assert_close(compiled(x), torch.nn.functional.group_norm(x, 2, eps=EPS))


def test_eps_check_traces_with_dynamic_shapes():
    """torch.compile(dynamic=True) traces eps as a symbolic float: the argument check must not break the graph."""
    def f(x, w, b, eps):
        return ops.group_norm(x, w, b, 4, eps)

    compiled = torch.compile(f, backend="eager", dynamic=True, fullgraph=True)
    x, w, b = torch.randn(2, 8, 4, 4), torch.rand(8), torch.randn(8)
    for eps in (1e-5, 2e-5):
        torch.testing.assert_close(compiled(x, w, b, eps), f(x, w, b, eps))
