"""geglu_linear (the GEGLU projection with the gating in the GEMM's epilogue): the reference vs an independent
float64 computation, the Triton kernel vs the reference (interpreter on the CPU, compiled on a GPU), errors,
dispatch and the measured choice between the kernel and GEMM + gating on CUDA.

Tolerances. float32: 2e-5 + 2e-5 |ref| (summation order). float16/bfloat16: the kernel and the reference both
accumulate in float32 and round once, so outputs agree within 2 ulps plus 4 eps times the largest |output|
(summation order moving the gate's rounding across the erf). The reference against float64 on the same
operands: float32 within 1e-5 relative; float16 within one float16 ulp of the output plus 2e-3.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F
from triton_testing import check_result, interpreter_fixture, mismatch, print_results

from rdm_fast.ops import _dispatch, geglu, geglu_linear, geglu_linear_reference
from rdm_fast.ops.geglu_linear import GEGLU_LINEAR

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

# name -> (x shape, N, bias?, layout): sizes off the interpreter's 16-wide tiles and the GPU's 32..256 ones
CASES = {
    "37x40-n24": ((37, 40), 24, True, "contiguous"),
    "5x17-n3": ((5, 17), 3, True, "contiguous"),
    "2x9x33-n40": ((2, 9, 33), 40, True, "contiguous"),
    "1x1-n1": ((1, 1), 1, True, "contiguous"),
    "21x64-n64-nobias": ((21, 64), 64, False, "contiguous"),
    "3x11x48-n20-padded": ((3, 11, 48), 20, True, "padded-rows"),
    "130x96-n72": ((130, 96), 72, True, "contiguous"),
    "37x256-n24-cancelling": ((37, 256), 24, True, "cancelling"),
}


def make_inputs(name: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> tuple:
    shape, n, has_bias, layout = CASES[name]
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(shape, generator=g)
    w = torch.randn(2 * n, k, generator=g)
    b = 0.5 * torch.randn(2 * n, generator=g) if has_bias else None
    if layout == "cancelling":  # x ~ 1, weights ~ +0.1 on the first half of K and -0.1 on the second: the
        x = 1 + 0.1 * x  # partial sums grow to ~0.1 K/2, then cancel (a float32 accumulator keeps them exact)
        w = (0.1 + 0.01 * w) * torch.where(torch.arange(k) < k // 2, 1.0, -1.0)
    else:
        w = w * (1.5 / math.sqrt(k))  # gates of spread ~1.5: GELU's curved part
    if layout == "padded-rows":  # x a column slice of a wider buffer: row stride > K
        x = torch.cat([x, torch.full_like(x[..., :5], 1e4)], dim=-1)[..., :k]
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b)


def independent(x, w, b) -> torch.Tensor:
    """float64: the projection, then a * 0.5 * g * (1 + erf(g / sqrt 2))."""
    h = x.double() @ w.double().t() + (0 if b is None else b.double())
    a, g = h.chunk(2, dim=-1)
    return a * 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))


def check(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    return mismatch(out, ref, rtol32=2e-5, atol32=2e-5, ulps=2, atol16=4 * torch.finfo(ref.dtype).eps * scale)


# --- the reference


@pytest.mark.parametrize("name", ["37x40-n24", "2x9x33-n40", "21x64-n64-nobias", "3x11x48-n20-padded"])
def test_reference_matches_float64(name):
    args = make_inputs(name, torch.float32)
    ref = geglu_linear_reference(*args)
    n = CASES[name][1]
    assert ref.shape == args[0].shape[:-1] + (n,) and ref.dtype == torch.float32 and ref.is_contiguous()
    torch.testing.assert_close(ref.double(), independent(*args), rtol=1e-5, atol=1e-5)


def test_reference_float16_rounds_once():
    args = make_inputs("130x96-n72", torch.float16)
    ref = geglu_linear_reference(*args)
    expected = independent(*args)
    assert ref.dtype == torch.float16
    torch.testing.assert_close(ref.double(), expected, rtol=1e-3, atol=2e-3)


def test_reference_equals_unfused_composition_in_float32():
    """The model's unfused path, ``geglu(F.linear(...))``, computes the same thing (float32: same rounding)."""
    args = make_inputs("37x40-n24", torch.float32)
    torch.testing.assert_close(geglu_linear_reference(*args), geglu(F.linear(*args)), rtol=1e-6, atol=1e-6)


def test_grad_flows_through_reference():
    x, w, b = (t.requires_grad_() for t in make_inputs("5x17-n3", torch.float32))
    geglu_linear(x, w, b).square().sum().backward()
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    independent(xd, wd, bd).square().sum().backward()
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# --- errors


@pytest.mark.parametrize("change,match", [
    (lambda x, w, b: (x[..., :0], w[:, :0], b), "K > 0"),
    (lambda x, w, b: (x, w[:, :-1], b), "weight of shape"),
    (lambda x, w, b: (x, w[:-1], b[:-1]), "weight of shape"),
    (lambda x, w, b: (x, w, b[:-2]), "bias of shape"),
    (lambda x, w, b: (x, w.half(), b), "weight of dtype"),
    (lambda x, w, b: (x.int(), w, b), "unsupported x dtype"),
])
def test_bad_arguments_raise(change, match):
    with pytest.raises(ValueError, match=match):
        geglu_linear(*change(*make_inputs("37x40-n24", torch.float32)))


# --- dispatch


def test_cpu_auto_uses_reference_and_fast_needs_interpreter(fresh_dispatch, caplog):
    args = make_inputs("37x40-n24", torch.float32)
    with caplog.at_level(logging.INFO, logger="rdm_fast.ops"):
        out = geglu_linear(*args)
    assert "geglu_linear: reference (cpu, float32)" in caplog.text
    assert torch.equal(out, geglu_linear_reference(*args))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with _dispatch.use_mode("fast"), pytest.raises(RuntimeError, match="Triton interpreter is off"):
            geglu_linear(*args)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cuda_selection(fresh_dispatch):
    """Selection for CUDA tensors (made on the CPU: ``select`` only inspects them)."""
    args = make_inputs("37x40-n24", torch.bfloat16)
    assert GEGLU_LINEAR.select("cuda", *args).name == "triton"
    grad = (args[0].requires_grad_(),) + args[1:]
    assert GEGLU_LINEAR.select("cuda", *grad).name == "reference"


# --- the Triton kernel in the interpreter (child process) and compiled on a GPU


def _run_case(name: str, dtype: torch.dtype, device: str = "cpu") -> str | None:
    args = make_inputs(name, dtype, device)
    with _dispatch.use_mode("fast"):
        out = geglu_linear(*args)
    return check(out, geglu_linear_reference(*args))


INTERPRETER_CASES = [(n, d) for n in CASES for d in ("float32", "float16")]


def _child_main() -> None:
    print_results({f"{n}-{d}": _run_case(n, getattr(torch, d)) for n, d in INTERPRETER_CASES})


interpreter_results = interpreter_fixture(__file__)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name,dtype", INTERPRETER_CASES)
def test_triton_interpreter_matches_reference(interpreter_results, name, dtype):
    check_result(interpreter_results, f"{name}-{dtype}")


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="offline compile check (a GPU runs the real thing)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_configs_compile_for_sm90_without_spills(dtype):
    """Every autotuning candidate the pruning keeps builds for sm_90 with no register spills."""
    from triton_testing import compile_launches

    from rdm_fast.kernels import geglu_linear as kernels

    x, w = torch.zeros(256, 384, dtype=dtype), torch.zeros(2 * 1536, 384, dtype=dtype)
    y = torch.empty(256, 1536, dtype=dtype)
    fn = kernels._geglu_linear_kernel.fn.fn  # the kernel under the autotuner and the EVEN_K heuristic
    named = {"X": x, "M": 256, "N": 1536}
    configs = kernels._prune([c for c in kernels._configs()], named)

    def launch():
        for cfg in configs:
            for k in (384, 400):  # EVEN_K and a K tail (16-aligned: unaligned rows spill in large tiles)
                fn[(1,)](x, w, w[0], y, 256, 1536, k, 384, 1536, HAS_BIAS=True, IEEE=dtype == torch.float32,
                         GROUP_M=8, EVEN_K=k % cfg.kwargs["BLOCK_K"] == 0, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages, **cfg.kwargs)

    results = compile_launches(launch, fn)
    assert len(results) == 2 * len(configs) > 0
    assert all(r["spill_bytes"] == 0 for r in results), results


# Released shapes: imagenet's transformer widths (K = 384 / 576 / 960, N = 4K) and rdm768's top level (448).
GPU_CASES = {"imagenet-32x32": (4096, 384), "imagenet-8x8": (512, 960), "rdm768-48x48": (2304, 448),
             "odd": (1000, 200)}


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("name", list(GPU_CASES) + ["37x40-n24", "3x11x48-n20-padded"])
def test_triton_gpu_matches_reference(name, dtype):
    dt = getattr(torch, dtype)
    if name in GPU_CASES:
        rows, k = GPU_CASES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        args = (torch.randn(rows, k, device="cuda", generator=g).to(dt),
                (torch.randn(8 * k, k, device="cuda", generator=g) * (1.5 / math.sqrt(k))).to(dt),
                (0.5 * torch.randn(8 * k, device="cuda", generator=g)).to(dt))
        with _dispatch.use_mode("fast"):
            err = check(geglu_linear(*args), geglu_linear_reference(*args))
    else:
        err = _run_case(name, dt, "cuda")
    assert err is None, err


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_triton_gpu_persistent_candidates_match_reference(dtype):
    """Each persistent candidate (one program per SM looping over tiles, flattened with the K loop) launched
    directly, whatever the autotuner picks, on released shapes with row and column tails, into a poisoned
    output."""
    from rdm_fast.kernels import geglu_linear as kernels

    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(2)
    persistent = [c for c in kernels._configs() if c.kwargs["PER_SM"]]
    assert persistent
    for rows, k, n in ((131072 // 16 + 77, 384, 1536), (1000, 960, 3840 - 40)):
        x = torch.randn(rows, k, device="cuda", generator=g).to(dt)
        w = (torch.randn(2 * n, k, device="cuda", generator=g) * (1.5 / math.sqrt(k))).to(dt)
        b = (0.5 * torch.randn(2 * n, device="cuda", generator=g)).to(dt)
        ref = geglu_linear_reference(x, w, b)
        for cfg in persistent:
            y = torch.full((rows, n), float("nan"), device="cuda", dtype=dt)
            kernels._geglu_linear_kernel.fn.fn[kernels._grid(rows, n, x.device)(cfg.kwargs)](
                x, w, b, y, rows, n, k, k, n, HAS_BIAS=True, IEEE=False, GROUP_M=8,
                EVEN_K=k % cfg.kwargs["BLOCK_K"] == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **cfg.kwargs)
            err = check(y, ref)
            assert err is None, f"{rows}x{k}->{n} {cfg}: {err}"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_auto_mode_measures_once_per_shape_and_graph_capture_follows(fresh_dispatch, monkeypatch, caplog):
    """auto on CUDA: the first call of a shape times the kernel against GEMM + gating (logged) and keeps the
    choice; a CUDA-graph capture of a measured shape replays that choice; both choices match the reference."""
    module = importlib.import_module("rdm_fast.ops.geglu_linear")  # the package's attribute is the function

    monkeypatch.setattr(module._MEASURED, "chosen", {})
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2048, 384, device="cuda", generator=g).bfloat16()
    w = (torch.randn(3072, 384, device="cuda", generator=g) / 16).bfloat16()
    b = torch.randn(3072, device="cuda", generator=g).bfloat16()
    with caplog.at_level(logging.INFO, logger="rdm_fast.ops"):
        out = geglu_linear(x, w, b)
        geglu_linear(x, w, b)
    assert caplog.text.count(" -> ") == 1 and "gemm+geglu" in caplog.text and len(module._MEASURED.chosen) == 1
    assert check(out, geglu_linear_reference(x, w, b)) is None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = geglu_linear(x, w, b)
    x.copy_(torch.randn(x.shape, device="cuda", generator=g))
    graph.replay()
    assert check(captured, geglu_linear_reference(x, w, b)) is None


if __name__ == "__main__":
    _child_main()
