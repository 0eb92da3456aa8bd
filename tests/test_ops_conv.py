"""ops.conv3x3 (the UNet's thin first and last convolutions): the reference against float64, the Triton kernel
against the reference (in the interpreter on the CPU, compiled on a GPU), dispatch, validation, and an sm_90
build without a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from triton_testing import check_result, interpreter_fixture, mismatch, print_results

from rdm_fast import ops
from rdm_fast.ops import _dispatch
from rdm_fast.ops.conv import CONV3X3, conv3x3, conv3x3_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# name -> (batch, C_in, C_out, H, W, layout of x, bias, copies of the result in out)
# Layouts: "nhwc" channels-last, "nchw" contiguous, "slice" channels 8.. of a wider channels-last map. Paths:
# the direct kernel over (tap, channel) pairs (in3, in7, in15: C_in not a multiple of 16) and tap by tap (in16,
# out20); the few-outputs path (per-tap partials, then their sum) for the rest, in chunks of up to 64 input
# channels: 50 and 200 leave a partial chunk, 64 and 192 none; 64 -> 16 makes 144 partials per pixel, three
# column blocks.
CASES = {
    "in3-out40": (2, 3, 40, 9, 7, "nhwc", True, 1),
    "in3-out40-copies": (2, 3, 40, 9, 7, "nhwc", True, 2),
    "in7-out19-nchw-nobias": (2, 7, 19, 5, 6, "nchw", False, 1),
    "in15-out70-1row": (3, 15, 70, 1, 9, "nhwc", True, 1),
    "in16-out20": (2, 16, 20, 6, 5, "nhwc", True, 1),
    "in50-out3": (2, 50, 3, 6, 11, "nhwc", True, 1),
    "in64-out16-slice-copies": (2, 64, 16, 6, 11, "slice", True, 2),
    "in192-out3": (1, 192, 3, 8, 8, "nhwc", True, 1),
    "in200-out5-nchw-1col": (2, 200, 5, 7, 1, "nchw", True, 3),
}


def conv_inputs(name: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """(x, weight, bias, out) of a case, random, on ``device``; ``out`` a channel slice (channels 3..) of a wider
    channels-last map filled with 7 (what lies outside the slice must stay 7), with ``copies * batch`` rows; the
    "-copies" cases' bias a strided view."""
    b, cin, cout, h, w, layout, has_bias, copies = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin**0.5)
    bias = torch.randn(cout, generator=g) if has_bias else None
    x, weight = x.to(device, dtype), weight.to(device, dtype)
    if layout == "slice":  # build the strided layout on the device: .to() makes gapped tensors contiguous
        wide = torch.empty(b, cin + 8, h, w, dtype=dtype, device=device, memory_format=torch.channels_last)
        wide[:, 8:] = x
        x = wide[:, 8:]
    elif layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    bias = bias.to(device, dtype) if bias is not None else None
    if name.endswith("-copies"):  # a strided bias (every other value of a longer one; the kernels read it packed)
        bias = torch.stack([bias, torch.full_like(bias, 100.0)], -1)[:, 0]
    out = torch.full((copies * b, cout + 3, h, w), 7.0, dtype=dtype, device=device)
    out = out.contiguous(memory_format=torch.channels_last)[:, 3:]
    return x, weight, bias, out


def check(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    # float32 sums in another order; 16-bit: the float32 result rounded once either way, at most 1 ulp apart (+1e-5
    # near 0)
    return mismatch(out, ref, rtol32=1e-5, atol32=1e-5, ulps=1.0, atol16=1e-5)


def _run_case(name: str, dtype: torch.dtype, device: str = "cpu") -> str | None:
    from rdm_fast.kernels import conv as kernels

    x, weight, bias, out = conv_inputs(name, dtype, device)
    layout = CASES[name][5]
    built = {"nchw": x.is_contiguous(), "nhwc": x.is_contiguous(memory_format=torch.channels_last),
             "slice": x.stride(1) == 1 and not x.is_contiguous(memory_format=torch.channels_last)}[layout]
    if not built:
        return f"{layout} layout not built: strides {x.stride()}"
    ref = conv3x3_reference(x, weight, bias)
    got = kernels.conv3x3(x, weight, bias, out)
    if got.data_ptr() != out.data_ptr():
        return "not written into out"
    wide = out.as_strided((out.shape[0], out.shape[1] + 3, *out.shape[2:]), out.stride(), out.storage_offset() - 3)
    if not bool((wide[:, :3] == 7).all()):
        return "written outside out's channel slice"
    b = x.shape[0]
    errs = {f"copy {k}": check(out[k * b:(k + 1) * b], ref) for k in range(out.shape[0] // b)}
    with _dispatch.use_mode("fast"):  # without out: a new map laid out like x (channels-last or contiguous)
        new = conv3x3(x, weight, bias)
    if new.is_contiguous(memory_format=torch.channels_last) != (layout != "nchw") or (
            layout == "nchw") != new.is_contiguous():
        errs["new output"] = f"laid out {new.stride()} for {layout} x"
    else:
        errs["new output"] = check(new, ref)
    return "; ".join(f"{k}: {e}" for k, e in errs.items() if e) or None


INTERPRETER_CASES = [(c, d) for c in CASES for d in ("float32", "float16")]


def _child_main() -> None:
    print_results({f"{c}-{d}": _run_case(c, getattr(torch, d)) for c, d in INTERPRETER_CASES})


interpreter_results = interpreter_fixture(__file__)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case,dtype", INTERPRETER_CASES)
def test_triton_interpreter_matches_reference(interpreter_results, case, dtype):
    check_result(interpreter_results, f"{case}-{dtype}")


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_gpu_matches_reference(case, dtype):
    with torch.backends.cudnn.flags(allow_tf32=False):
        err = _run_case(case, getattr(torch, dtype), "cuda")
    assert err is None, err


@needs_cuda
@pytest.mark.parametrize("shape", [(8, 3, 192, 64, 64, 2), (8, 192, 3, 64, 64, 1), (4, 16, 448, 48, 48, 2),
                                   (4, 448, 16, 48, 48, 1)])
def test_model_shapes_on_cuda_in_auto_and_fast_mode(shape):
    """The released models' first and last convolutions (imagenet, rdm768; the first into both halves of a skip
    buffer), bf16, both implementations ``auto`` mode can choose, and ``fast`` mode's kernel, against float64."""
    b, cin, cout, h, w, copies = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, cin, h, w, device="cuda", generator=g).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin, 3, 3, device="cuda", generator=g) / (3 * cin**0.5)).to(torch.bfloat16)
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(cout, device="cuda", generator=g).to(torch.bfloat16)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    for mode in ("auto", "fast"):
        wide = torch.full((copies * b, cout + 8, h, w), float("nan"), dtype=torch.bfloat16, device="cuda")
        out = wide.contiguous(memory_format=torch.channels_last)[:, 8:]
        with _dispatch.use_mode(mode):
            conv3x3(x, weight, bias, out=out)
        for k in range(copies):
            part = out[k * b:(k + 1) * b].double()
            assert torch.isfinite(part).all()
            err = ((part - ref).norm() / ref.norm()).item()
            assert err < 4e-3, (mode, k, err)  # bf16 output rounding: about 2e-3


def test_reference_is_one_rounding_of_the_float64_convolution():
    x, weight, bias, _ = conv_inputs("in50-out3", torch.float16)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    got = conv3x3_reference(x, weight, bias)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert check(got, expected.to(torch.float16)) is None


def test_reference_writes_every_copy_and_nothing_else():
    x, weight, bias, out = conv_inputs("in64-out16-slice-copies", torch.float32)
    conv3x3_reference(x, weight, bias, out)
    expected = F.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(out[:2], expected)
    torch.testing.assert_close(out[2:], expected)


@pytest.mark.parametrize("call,match", [
    (lambda x, w, b: conv3x3(x[0], w, b), "x of shape"),
    (lambda x, w, b: conv3x3(x, w[:, :2], b), "weight of shape"),
    (lambda x, w, b: conv3x3(x, w[..., :2, :2], b), "weight of shape"),
    (lambda x, w, b: conv3x3(x, w.half(), b), "weight of dtype"),
    (lambda x, w, b: conv3x3(x, w, b[:2]), "bias of shape"),
    (lambda x, w, b: conv3x3(x.int(), w, b), "unsupported x dtype"),
    (lambda x, w, b: conv3x3(x, w, b, out=torch.empty(3, 4, 5, 6)), "out of shape"),
    (lambda x, w, b: conv3x3(x, w, b, out=torch.empty(4, 4, 5, 6, dtype=torch.float16)), "out of shape"),
])
def test_bad_arguments_raise(call, match):
    x, w, b = torch.randn(2, 3, 5, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    with pytest.raises(ValueError, match=match):
        call(x, w, b)


def test_cpu_auto_runs_the_reference_and_autograd_works():
    """CPU auto mode is the reference; a call that needs gradients is refused by the kernel and runs the
    (differentiable) reference too; layers with many channels both ways are not the kernel's."""
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    w, b = torch.randn(4, 3, 3, 3), torch.randn(4)
    assert CONV3X3.select("cpu", x.detach(), w, b, torch.empty(2, 4, 5, 6)).name == "reference"
    y = conv3x3(x, w, b)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.conv2d(x, w, b, padding=1).sum(), x)[0])
    impl = CONV3X3.impl("triton")
    assert "require grad" in impl.unsupported(x, w, b, y)
    if HAS_TRITON and impl.unavailable() is None:
        assert "not a thin convolution" in impl.unsupported(torch.randn(1, 32, 4, 4), torch.randn(32, 32, 3, 3),
                                                            None, torch.empty(1, 32, 4, 4))


def test_views_spanning_2_31_elements_per_image_are_not_the_kernels():
    """The kernels index within one image with 32-bit offsets: a view whose elements of one image span 2^31 or
    more (a huge channel stride) goes to the reference, for x and for out (shapes on the meta device)."""
    impl = CONV3X3.impl("triton")
    w, b = torch.empty(4, 16, 3, 3, device="meta"), torch.empty(4, device="meta")
    dense = torch.empty(1, 16, 4, 4, device="meta")
    out = torch.empty(1, 4, 4, 4, device="meta")
    assert impl.unsupported(dense, w, b, out) is None
    wide = dense.as_strided((1, 16, 4, 4), (16 * 286331153, 286331153, 4, 1))  # channel 15 past 2^31 + 2^30
    assert "x's elements within one image span 2^31" in impl.unsupported(wide, w, b, out)
    just = dense.as_strided((1, 16, 4, 4), (2**31, (2**31 - 16) // 15, 4, 1))  # the last element at 2^31 - 1
    assert impl.unsupported(just, w, b, out) is None
    wide_out = out.as_strided((1, 4, 4, 4), (2**32, 2**30, 4, 1))
    assert "out's elements within one image span 2^31" in impl.unsupported(dense, w, b, wide_out)


def test_unet_routes_only_thin_inference_convolutions_to_the_op(monkeypatch, fresh_dispatch):
    """The UNet's first and last convolutions go through ops.conv3x3 at inference and never in autograd or the
    plain-PyTorch mode; its other convolutions never do."""
    from rdm_fast import RDMConfig
    from rdm_fast.models.unet import UNet

    cfg = RDMConfig.preset("tiny").unet_config
    unet = UNet(cfg).eval()
    seen = []
    real = ops.conv3x3
    monkeypatch.setattr(ops, "conv3x3", lambda x, w, b, **k: seen.append(tuple(w.shape)) or real(x, w, b, **k))
    x = torch.randn(2, cfg.in_channels, 16, 16)
    t, ctx = torch.tensor([3, 700]), torch.randn(2, 3, cfg.context_dim)
    with torch.no_grad():
        eps = unet(x, t, ctx)
    assert sorted(seen) == sorted([tuple(unet.input_conv.weight.shape), tuple(unet.out_conv.weight.shape)])
    assert eps.is_contiguous()  # an NCHW model keeps NCHW activations (the samplers' step needs contiguous eps)
    seen.clear()
    with torch.no_grad(), _dispatch.use_mode("reference"):
        ref = unet(x, t, ctx)
    unet(x, t, ctx)
    assert not seen
    torch.testing.assert_close(eps, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="offline compile check (a GPU runs the real thing)")
@pytest.mark.parametrize("cin,cout", [(3, 192), (16, 448), (192, 3), (448, 16), (50, 3)])
def test_configs_compile_for_sm90_without_spills(cin, cout):
    """Every autotuning candidate builds for sm_90 in bf16, for both reductions of the direct kernel and for the
    two kernels of the few-outputs path, without register spills."""
    from triton_testing import compile_launches

    from rdm_fast.kernels import conv as kernels

    x = torch.zeros(2, cin, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = torch.zeros(cout, cin, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out = torch.empty(4, cout, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    if kernels.few_outputs(cin, cout):
        args, meta = kernels.taps_arguments(x, weight, torch.empty(128, 9 * cout))
        fn, configs = kernels._taps_kernel.fn, kernels.TAPS_CONFIGS  # the kernel under the autotuner
        kernels._taps_kernel.run = lambda *a, **k: None  # record the summing pass alone
        try:
            results = compile_launches(lambda: kernels.conv3x3(x, weight, weight[:, 0, 0, 0], out),
                                       kernels._sum_taps_kernel)
        finally:
            del kernels._taps_kernel.run
        assert len(results) == 1 and results[0]["spill_bytes"] == 0, results
    else:
        args, meta = kernels.arguments(x, weight, weight[:, 0, 0, 0], out)
        fn, configs = kernels._conv3x3_kernel.fn, kernels.CONFIGS

    if kernels.few_outputs(cin, cout) and not meta["EVEN_K"]:
        configs = kernels._prune_taps(configs, {}, **meta)

    def launch():
        for cfg in configs:
            fn[(1, 1)](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    results = compile_launches(launch, fn)
    assert len(results) == len(configs)
    assert all(r["spill_bytes"] == 0 for r in results), results


if __name__ == "__main__":
    _child_main()
