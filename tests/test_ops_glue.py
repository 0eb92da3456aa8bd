"""Glue ops (LayerNorm, add + LayerNorm, GEGLU, guided DDIM/PLMS step): references vs independent computations,
Triton kernels vs references (in the interpreter on the CPU, compiled on a GPU), sm_90 builds without a GPU,
errors and dispatch.

Tolerances. Kernels and references compute the same float32 values up to summation order (LayerNorm), libm
differences (erf; 1 + erf cancels for negative gates) and contraction into fused multiply-adds: float32 outputs
within 1e-5 + 1e-5 |ref| (inputs of size ~1-5); float16/bfloat16 outputs are single roundings of such values,
so within 1 ulp (+1e-5 near 0). References vs float64 computations: 1e-5 relative and absolute. The sampler
step's kernel with 0-d tensor coefficients vs the same kernel with Python float ones: bit-identical.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from triton_testing import check_result, compile_launches, interpreter_fixture, mismatch, print_results

import oracle
from rdm_fast.diffusion import Schedule
from rdm_fast import ops
from rdm_fast.ops import _dispatch
from rdm_fast.ops.glue import (
    ADD_BIAS,
    ADD_LAYER_NORM,
    GEGLU,
    LAYER_NORM,
    SAMPLER_STEP,
    add_bias,
    add_bias_reference,
    add_layer_norm,
    add_layer_norm_reference,
    ddim_guided_step,
    geglu,
    geglu_reference,
    layer_norm,
    layer_norm_reference,
    plms_guided_step,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
EPS = 1e-5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check(out: torch.Tensor, ref: torch.Tensor, tol32: float = 1e-5) -> str | None:
    return mismatch(out, ref, rtol32=tol32, atol32=tol32)


# ----------------------------------------------------------------------------------------------- inputs

LN_CASES = {  # name -> (shape, affine, residual, residual_bias)
    "3x37x96": ((3, 37, 96), True, True, True),
    "7x1": ((7, 1), True, False, False),
    "2x5x100-plain": ((2, 5, 100), False, True, False),
    "37x768": ((37, 768), True, False, True),
    "4x1000": ((4, 1000), True, True, True),
    "1x3x4100": ((1, 3, 4100), True, True, False),
    "1x50": ((1, 50), True, True, True),
    "5x64-eps": ((5, 64), True, False, False),  # variance ~1e-6, below eps: eps decides the output
}


def ln_inputs(name: str, dtype: torch.dtype, device: str = "cpu"):
    shape, affine, res, rbias = LN_CASES[name]
    g = _gen()
    c = shape[-1]
    x = torch.randn(shape, generator=g) * 1e-3 if name.endswith("-eps") else torch.randn(shape, generator=g) * 3 + 2
    w = 1 + 0.5 * torch.randn(c, generator=g) if affine else None
    b = 0.5 * torch.randn(c, generator=g) if affine else None
    r = torch.randn(shape, generator=g) if res else None
    rb = torch.randn(c, generator=g) if rbias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x), cast(r), cast(rb), cast(w), cast(b)


# name -> (shape, residual?): widths around the 256-column tile, rows around the row tile
# name -> (shape, with a residual, with a bias)
BIAS_CASES = {"7x3": ((7, 3), True, True), "1x300": ((1, 300), True, True),
              "2x33x17x40": ((2, 33, 17, 40), True, True), "3x5x7x24-nchw": ((3, 5, 7, 24), True, True),
              "37x256-nores": ((37, 256), False, True), "5x513": ((5, 513), True, True),
              "6x100-nobias": ((6, 100), True, False), "3x5x7x24-slice-copy": ((3, 5, 7, 24), False, False)}


def bias_inputs(name: str, dtype: torch.dtype, device: str = "cpu") -> tuple:
    shape, res, has_bias = BIAS_CASES[name]
    g = _gen(3)
    x = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    b = torch.randn(shape[-1], generator=g).to(device=device, dtype=dtype) if has_bias else None
    r = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype) if res else None
    if name.endswith("slice-copy"):  # a channel slice of a wider channels-last map, as its (B, H, W, C) rows
        wide = torch.zeros(*shape[:-1], shape[-1] + 8, dtype=dtype, device=device)
        wide[..., 8:] = x
        x = wide[..., 8:]
    return x, b, r


GEGLU_CASES = {"7x2": (7, 2), "1x74": (1, 74), "3x5x300": (3, 5, 300), "37x600": (37, 600), "2x2000": (2, 2000),
               "3x0": (3, 0), "0x8": (0, 8)}  # empty features, no rows


def geglu_input(name: str, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    return (torch.randn(GEGLU_CASES[name], generator=_gen()) * 2).to(device=device, dtype=dtype)


SCHEDULE = Schedule.linear(0.0015, 0.0195, 1000)


def step_coefficients(i: int, eta: float) -> tuple[float, float, float]:
    """(a_t, a_prev, sigma_t) of step i of a 50-step run of the imagenet schedule."""
    c = SCHEDULE.ddim(50, eta)
    return float(c.alphas[i]), float(c.alphas_prev[i]), float(c.sigmas[i])


STEP_CASES = {  # name -> (shape, guided, history length (None: DDIM), eta, step index, coefficient form)
    "ddim-guided-2x3x7x5": ((2, 3, 7, 5), True, None, 0.0, 10, "float"),
    "ddim-guided-noise-1x16x13x11": ((1, 16, 13, 11), True, None, 1.0, 30, "float"),
    "ddim-plain-noise-3x3x5x5": ((3, 3, 5, 5), False, None, 0.5, 49, "float"),
    "ddim-guided-tensors-2x3x7x5": ((2, 3, 7, 5), True, None, 1.0, 0, "tensor"),
    "ddim-guided-mixed-1x3x9x9": ((1, 3, 9, 9), True, None, 1.0, 20, "mixed"),
    "plms0-guided-2x3x7x5": ((2, 3, 7, 5), True, 0, 0.0, 5, "float"),
    "plms1-plain-1x16x13x11": ((1, 16, 13, 11), False, 1, 0.0, 6, "float"),
    "plms2-guided-tensors-2x3x7x5": ((2, 3, 7, 5), True, 2, 0.0, 7, "tensor"),
    "plms3-guided-1x16x13x11": ((1, 16, 13, 11), True, 3, 0.0, 49, "float"),
    "plms-mean-3x3x5x5": ((3, 3, 5, 5), True, 1, 0.0, 0, "mean"),
}


def step_inputs(name: str, dtype: torch.dtype, device: str = "cpu") -> tuple[dict, str]:
    """(keyword arguments of ddim_guided_step / plms_guided_step, which of the two)."""
    shape, guided_, hist, eta, i, form = STEP_CASES[name]
    g = _gen(1)
    t = lambda: torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    a_t, a_prev, sigma = step_coefficients(i, eta)
    scale: float | torch.Tensor = 3.5
    if form == "tensor":
        a_t = torch.tensor(a_t, dtype=torch.float64, device=device)
        a_prev = torch.tensor(a_prev, dtype=torch.float32, device=device)
        sigma = torch.tensor(sigma, dtype=torch.float64, device=device)
        scale = torch.tensor(scale, device=device)
    elif form == "mixed":
        sigma = torch.tensor(sigma, dtype=torch.float64, device=device)
    args = {"x": t(), "e_uncond": t() if guided_ else None, "e_cond": t(), "guidance_scale": scale,
            "a_t": a_t, "a_prev": a_prev}
    if hist is None:
        args.update(sigma_t=sigma, noise=t() if eta > 0 else None)
        return args, "ddim"
    args["history"] = [t() for _ in range(hist)]
    if form == "mean":
        args["weights"] = (0.5, 0.5)
    return args, "plms"


def run_step(kind: str, args: dict) -> tuple[torch.Tensor, ...]:
    return ddim_guided_step(**args) if kind == "ddim" else plms_guided_step(**args)


# Views the kernels read in place whose row stride is not the one they could assume: add_layer_norm with x
# contiguous and the residual the first 96 columns of a (37, 104) tensor; GEGLU on the first 600 columns of a
# (37, 610) tensor (row stride 610, not 2 * 300).
VIEW_CASES = ["add_layer_norm:37x96-residual-view", "geglu:37x600-row-view"]


def view_inputs(case: str, dtype: torch.dtype, device: str = "cpu") -> tuple:
    g = _gen()
    cast = lambda t: t.to(device=device, dtype=dtype)
    if case == "geglu:37x600-row-view":
        return (cast(torch.randn(37, 610, generator=g) * 2)[:, :600],)
    x = cast(torch.randn(37, 96, generator=g) * 3 + 2)
    r = cast(torch.randn(37, 104, generator=g))[:, :96]
    w, b = cast(1 + 0.5 * torch.randn(96, generator=g)), cast(0.5 * torch.randn(96, generator=g))
    return x, r, None, w, b


def tensor_coefficients_exact(dtype: torch.dtype, device: str = "cpu") -> str | None:
    """A DDIM step with 0-d float64 tensor coefficients (square roots in float64 in the kernel) gives bit for bit
    what Python float coefficients (square roots in float64 on the host) give, across the schedule, eta 0 and 1."""
    differ = []
    for i in (0, 10, 30, 49):
        for eta in (0.0, 1.0):
            args, _ = step_inputs("ddim-guided-noise-1x16x13x11", dtype, device)
            args.update(zip(("a_t", "a_prev", "sigma_t"), step_coefficients(i, eta), strict=True))
            tensors = {**args, **{k: torch.tensor(args[k], dtype=torch.float64, device=device)
                                  for k in ("a_t", "a_prev", "sigma_t")}}
            with _dispatch.use_mode("fast"):
                pairs = list(zip(ddim_guided_step(**args), ddim_guided_step(**tensors), strict=True))
            if not all(torch.equal(a, b) for a, b in pairs):
                diff = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
                differ.append(f"step {i} eta {eta} (max abs diff {diff:.3g})")
    return f"tensor and float coefficients differ at {', '.join(differ)}" if differ else None


# ----------------------------------------------------------------------------------------------- references


@pytest.mark.parametrize("name", list(LN_CASES))
def test_layer_norm_reference_matches_torch(name):
    x, _, _, w, b = ln_inputs(name, torch.float32)
    ref = layer_norm_reference(x, w, b, EPS)
    expected = F.layer_norm(x.double(), x.shape[-1:], None if w is None else w.double(),
                            None if b is None else b.double(), EPS)
    torch.testing.assert_close(ref.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_reference_shift(dtype):
    """``shift``: the LayerNorm of x + shift, the sum in float32 (not rounded to x's dtype first)."""
    x, _, shift, w, b = ln_inputs("37x768", dtype)
    ref = layer_norm_reference(x, w, b, EPS, shift=shift)
    expected = F.layer_norm(x.double() + shift.double(), x.shape[-1:], w.double(), b.double(), EPS)
    assert ref.dtype == dtype
    err = check(ref, expected.to(dtype))
    assert err is None, err
    with pytest.raises(ValueError, match="shift of shape"):
        layer_norm(x, w, b, EPS, shift=shift[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["3x37x96", "2x5x100-plain", "37x768"])
def test_add_layer_norm_reference(name, dtype):
    x, r, rb, w, b = ln_inputs(name, dtype)
    s, y = add_layer_norm_reference(x, r, rb, w, b, EPS)
    total = x.double() + (0 if r is None else r.double()) + (0 if rb is None else rb.double())
    assert s.dtype == dtype and s.is_contiguous() and y.is_contiguous()
    torch.testing.assert_close(s.double(), total, rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-6)
    expected = F.layer_norm(s.double(), s.shape[-1:], w.double() if w is not None else None,
                            b.double() if b is not None else None, EPS)
    err = check(y, expected.to(dtype))
    assert err is None, err


@pytest.mark.parametrize("name", list(BIAS_CASES))
def test_add_bias_reference_is_one_rounding_of_the_float64_sum(name):
    x, b, r = bias_inputs(name, torch.float16)
    expected = x.double() + (0 if b is None else b.double()) + (0 if r is None else r.double())
    assert torch.equal(add_bias_reference(x, b, r), expected.to(torch.float16))


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_add_bias_keeps_the_feature_map_layout(memory_format):
    """A feature map passed as its (B, H, W, C) view comes back, permuted, in its own memory format."""
    x = torch.randn(2, 6, 5, 3).to(memory_format=memory_format)
    b = torch.randn(6)
    out = add_bias(x.permute(0, 2, 3, 1), b, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert out.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out, 2 * x + b[:, None, None])


def test_add_bias_writes_into_out_cpu_and_cuda():
    """``out=`` (here a channel slice of a wider channels-last map, as the UNet's skip buffers are) receives the
    result and is returned; nothing outside it is touched. The reference and, on CUDA, the kernel alike."""
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        x = torch.randn(2, 4, 3, 6, device=device)
        b, r = torch.randn(6, device=device), torch.randn(2, 4, 3, 6, device=device)
        wide = torch.zeros(2, 4, 3, 10, device=device)
        out = add_bias(x, b, r, out=wide[..., 4:])
        assert out.data_ptr() == wide[..., 4:].data_ptr() and bool((wide[..., :4] == 0).all())
        torch.testing.assert_close(wide[..., 4:], x + r + b)
    with pytest.raises(ValueError, match="out of shape"):
        add_bias(x, b, r, out=wide)
    with pytest.raises(ValueError, match="out of shape"):  # leading rows not a multiple of x's
        add_bias(x, b, r, out=torch.zeros(3, 4, 3, 6, device=x.device))


def test_add_bias_into_repeated_rows_cpu_and_cuda():
    """``out=`` with k times x's leading rows (both halves of a guided batch that share their input) receives the
    result in each block of rows; a channel slice (the UNet's skip buffers) and an NCHW map's (B, H, W, C) view
    (which the kernel cannot view as rows: it goes through a temporary) alike."""
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        x = torch.randn(2, 4, 3, 6, device=device)
        b, r = torch.randn(6, device=device), torch.randn(2, 4, 3, 6, device=device)
        expected = x + r + b
        wide = torch.zeros(6, 4, 3, 10, device=device)
        out = add_bias(x, b, r, out=wide[..., 4:])
        assert out.data_ptr() == wide[..., 4:].data_ptr() and bool((wide[..., :4] == 0).all())
        for k in range(3):
            torch.testing.assert_close(wide[2 * k:2 * k + 2, ..., 4:], expected)
        nchw = torch.zeros(4, 6, 4, 3, device=device).permute(0, 2, 3, 1)  # rows of 6 at no single stride
        add_bias(x, b, r, out=nchw)
        torch.testing.assert_close(nchw, torch.cat([expected, expected]))


@pytest.mark.parametrize("name", list(GEGLU_CASES))
def test_geglu_reference_matches_erf_formula(name):
    h = geglu_input(name, torch.float32)
    a, g = h.double().chunk(2, dim=-1)
    expected = a * 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    torch.testing.assert_close(geglu_reference(h).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_sampler_step_reference_matches_oracle(name):
    """The fused step against the guided combine, then tests/oracle.py's plms_eps and ddim_step, in float64."""
    args, kind = step_inputs(name, torch.float32)
    out = run_step(kind, args)
    d = {k: (v.double() if torch.is_tensor(v) and v.dim() else v) for k, v in args.items()}
    num = lambda c: float(c) if torch.is_tensor(c) else c
    scale = num(d["guidance_scale"])
    eps = d["e_cond"] if d["e_uncond"] is None else d["e_uncond"] + scale * (d["e_cond"] - d["e_uncond"])
    if kind == "ddim":
        noise = d["noise"]
        expected = oracle.ddim_step(d["x"], eps, num(d["a_t"]), num(d["a_prev"]), num(d["sigma_t"]), noise)
    else:
        hist = [h.double() for h in d["history"]]
        combined = (eps + hist[0]) / 2 if "weights" in d else oracle.plms_eps(eps, hist) if hist else eps
        expected = oracle.ddim_step(d["x"], combined, num(d["a_t"]), num(d["a_prev"]), 0.0)
        torch.testing.assert_close(out[2].double(), eps, rtol=1e-5, atol=1e-5)
    for got, want in zip(out[:2], expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_numpy_coefficients_match_float_ones():
    """Coefficients and multistep weights taken from NumPy schedule arrays (np.float32/np.float64 elements) give the
    Python floats' result; NumPy bools are refused like Python ones."""
    args, kind = step_inputs("ddim-guided-noise-1x16x13x11", torch.float32)
    np_args = {**args, "guidance_scale": np.float32(args["guidance_scale"]), "a_t": np.float64(args["a_t"]),
               "a_prev": np.float32(args["a_prev"]), "sigma_t": np.float64(args["sigma_t"])}
    for got, want in zip(run_step(kind, np_args), run_step(kind, args), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    x = torch.randn(2, 3, 8)
    weights = (np.float32(0.5), np.float64(0.5))
    for got, want in zip(plms_guided_step(x, x, x, 2.0, [x], 0.5, 0.6, weights=weights),
                         plms_guided_step(x, x, x, 2.0, [x], 0.5, 0.6, weights=(0.5, 0.5)), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="guidance_scale must be a float"):
        ddim_guided_step(x, x, x, np.bool_(True), 0.5, 0.6)


def test_tensor_coefficients_match_float_ones():
    args, kind = step_inputs("ddim-guided-noise-1x16x13x11", torch.float32)
    tensor_args = {**args, **{k: torch.tensor(args[k], dtype=torch.float64)
                              for k in ("guidance_scale", "a_t", "a_prev", "sigma_t")}}
    for got, want in zip(run_step(kind, tensor_args), run_step(kind, args), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call,match", [
    (lambda x: layer_norm(x, torch.ones(5), None, EPS), "weight of shape"),
    (lambda x: layer_norm(x.int(), None, None, EPS), "unsupported x dtype"),
    (lambda x: add_layer_norm(x, x[:1], None, None, None, EPS), "residual of shape"),
    (lambda x: add_layer_norm(x, x.half(), None, None, None, EPS), "residual of dtype"),
    (lambda x: geglu(x[..., :5]), "even last dim"),
    (lambda x: add_bias(x, torch.ones(3)), "bias of shape"),
    (lambda x: add_bias(x, torch.ones(8), x.half()), "residual of dtype"),
    (lambda x: ddim_guided_step(x, x, x[:1], 2.0, 0.5, 0.6), "e_cond of shape"),
    (lambda x: ddim_guided_step(x, x, x, 2.0, 0.5, 0.6, 0.1), "needs noise"),
    (lambda x: ddim_guided_step(x, x, x, 2.0, 1.5, 0.6), "a_t"),
    (lambda x: ddim_guided_step(x, x, x, 2.0, 0.5, 0.99, 0.5, x), "1 - a_prev - sigma_t"),
    (lambda x: ddim_guided_step(x, x, x, torch.ones(2), 0.5, 0.6), "0-d floating-point tensor"),
    (lambda x: plms_guided_step(x, x, x, 2.0, [x] * 4, 0.5, 0.6), "at most 3 past eps"),
    (lambda x: plms_guided_step(x, x, x, 2.0, [x], 0.5, 0.6, weights=(1.0,)), "expected 2 weights"),
    (lambda x: plms_guided_step(x, x, x, 2.0, [x.half()], 0.5, 0.6), r"history\[0\] of dtype"),
    # NaN coefficients made every output NaN without an error
    (lambda x: ddim_guided_step(x, None, x, 1.0, 0.5, 0.9, float("nan"), x), "sigma_t must be >= 0, got nan"),
    (lambda x: ddim_guided_step(x, x, x, float("nan"), 0.5, 0.9), "guidance_scale must be finite, got nan"),
    (lambda x: plms_guided_step(x, x, x, 2.0, [x], 0.5, 0.6, weights=(1.0, float("inf"))),
     "multistep weights must be finite, got inf"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 3, 8))


@pytest.mark.parametrize("call,match", [
    (lambda x: ddim_guided_step(x, x, x, "2", 0.5, 0.6), "float or a 0-d tensor"),
    (lambda x: plms_guided_step(x, x, x, 2.0, [x], 0.5, 0.6, weights=(1.0, torch.tensor(0.5))),
     "Python or NumPy floats"),
])
def test_bad_argument_types_raise(call, match):
    with pytest.raises(TypeError, match=match):
        call(torch.randn(2, 3, 8))


# ----------------------------------------------------------------------------------------------- dispatch


def test_cpu_auto_uses_reference_and_fast_needs_interpreter(fresh_dispatch, caplog):
    x = torch.randn(3, 8)
    with caplog.at_level(logging.INFO, logger="rdm_fast.ops"):
        layer_norm(x, None, None, EPS)
        geglu(x)
        ddim_guided_step(x, x, x, 2.0, 0.5, 0.6)
    for op in ("layer_norm", "geglu", "sampler_step"):
        assert f"{op}: reference (cpu, float32)" in caplog.text
    if os.environ.get("TRITON_INTERPRET") != "1":  # pytest itself may run under the interpreter
        with _dispatch.use_mode("fast"), pytest.raises(RuntimeError, match="Triton interpreter is off"):
            geglu(x)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cuda_selection(fresh_dispatch):
    """Selection for CUDA tensors (made on the CPU: ``select`` only inspects them)."""
    x = torch.randn(4, 6, 32)
    w = torch.ones(32)
    assert LAYER_NORM.select("cuda", x, w, None, EPS).name == "triton"
    assert ADD_LAYER_NORM.select("cuda", x, x, None, w, None, EPS).name == "triton"
    assert GEGLU.select("cuda", x).name == "triton"
    assert ADD_BIAS.select("cuda", x, w, x).name == "triton"
    step = (x, x, x, 2.0, (), (1.0,), 0.5, 0.6, 0.0, None, False)
    assert SAMPLER_STEP.select("cuda", *step).name == "triton"
    wide = torch.randn(2, 16385)
    xt = x.transpose(0, 1)
    unsupported = [
        (LAYER_NORM, (wide, None, None, EPS)),
        (LAYER_NORM, (x.clone().requires_grad_(), w, None, EPS)),
        (GEGLU, (torch.randn(3, 4, requires_grad=True),)),
        (ADD_BIAS, (x, w.clone().requires_grad_(), None)),
        (SAMPLER_STEP, (xt, xt, xt) + step[3:]),
    ]
    for op, args in unsupported:
        assert op.select("cuda", *args).name == "reference"
        with _dispatch.use_mode("fast"), pytest.raises(RuntimeError, match="no fast implementation"):
            op.select("cuda", *args)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_impls_refuse_bfloat16():
    """Triton's interpreter computes bfloat16 wrongly without an error, so the CPU impls that run in it refuse
    bfloat16 calls (``fast`` mode then raises instead of returning garbage) and accept the same call in float16."""
    from rdm_fast.ops.attention import ATTENTION
    from rdm_fast.ops.cross_attention import CROSS_ATTENTION

    def calls(dtype):
        x, w = torch.randn(2, 6, 32, dtype=dtype), torch.ones(32, dtype=dtype)
        kv = torch.randn(4, 32, dtype=dtype)
        return [
            (LAYER_NORM, (x, w, None, EPS)),
            (ADD_LAYER_NORM, (x, x, None, w, None, EPS)),
            (ADD_BIAS, (x, w, x)),
            (GEGLU, (x,)),
            (SAMPLER_STEP, (x, x, x, 2.0, (), (1.0,), 0.5, 0.6, 0.0, None, False)),
            (ATTENTION, (x, x, x, 1)),
            (CROSS_ATTENTION, (x, w, None, EPS, torch.randn(32, 32, dtype=dtype), kv, kv, 1)),
        ]

    for (op, args16), (_, args_bf16) in zip(calls(torch.float16), calls(torch.bfloat16), strict=True):
        impl = op.impl("triton-interpreter")
        assert impl.unsupported(*args16) is None, op.name
        assert "bfloat16" in impl.unsupported(*args_bf16), op.name


def test_add_bias_takes_out_by_keyword_only():
    """Under autocast the ops cast every tensor argument but ``out``, which they recognise by its keyword: a
    positional ``out`` would be cast into a temporary, and the result lost, so it is refused."""
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError):
        ops.add_bias(x, torch.randn(8), x, torch.empty_like(x))
    out = torch.empty_like(x, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.add_bias(x.bfloat16(), torch.zeros(8), x, out=out)
    assert got is out and torch.equal(out, (2 * x).bfloat16())


def test_layer_norm_grad_uses_reference():
    x = torch.randn(3, 8, requires_grad=True)
    layer_norm(x, torch.ones(8), None, EPS).square().sum().backward()
    assert x.grad is not None


# ----------------------------------------------------------------------------------------------- Triton kernels


def _run_case(case: str, dtype: torch.dtype, device: str = "cpu") -> str | None:
    from rdm_fast.kernels import glue as kernels

    op, name = case.split(":")
    if op == "layer_norm":  # the residual-bias cases also normalise x + shift (with that bias as the shift)
        x, _, shift, w, b = ln_inputs(name, dtype, device)
        if name == "3x37x96":  # non-contiguous views: rows not evenly spaced, a column stride of 2
            x = x.transpose(0, 1)
        if name == "1x50":
            x = torch.stack([x, -x], dim=-1)[..., 0]
        err = check(kernels.layer_norm(x, w, b, EPS), layer_norm_reference(x, w, b, EPS))
        if err is None and shift is not None:
            err = check(kernels.layer_norm(x, w, b, EPS, shift=shift), layer_norm_reference(x, w, b, EPS, shift=shift))
            err = err and f"shift: {err}"
        return err
    if op == "add_layer_norm":
        args = (view_inputs(case, dtype, device) if case in VIEW_CASES else ln_inputs(name, dtype, device)) + (EPS,)
        outs = kernels.add_layer_norm(*args)
        errs = [check(o, r) for o, r in zip(outs, add_layer_norm_reference(*args), strict=True)]
        return "; ".join(e for e in errs if e) or None
    if op == "add_bias":
        x, b, r = bias_inputs(name, dtype, device)
        if name == "2x33x17x40":  # channels-last feature map as its (B, H, W, C) view; residual strided rows
            x = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
            r = torch.cat([r, r[..., :7]], dim=-1)[..., :40]
        if name == "3x5x7x24-nchw":  # an NCHW map's (B, H, W, C) view: not contiguous, result stays NCHW
            x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        out, ref = kernels.add_bias(x, b, r), add_bias_reference(x, b, r)
        if name.endswith("slice-copy") and not (x.stride(-2) == 32 and out.is_contiguous() and torch.equal(out, x)):
            return "copy of a channel slice: not an exact contiguous copy"
        if out.stride() != ref.stride() or (x.is_contiguous() or "nchw" in name) and ref.stride() != x.stride():
            return f"layout: strides {out.stride()} (kernel), {ref.stride()} (reference), {x.stride()} (x)"
        if name in ("2x33x17x40", "3x5x7x24-nchw"):  # out=: a channel slice of a wider channels-last map
            wide = torch.full(x.shape[:-1] + (x.shape[-1] + 24,), 7.0, dtype=dtype, device=device)
            got = kernels.add_bias(x, b, r, out=wide[..., 24:])
            if got.data_ptr() != wide[..., 24:].data_ptr() or not bool((wide[..., :24] == 7).all()):
                return "out=: not the given slice, or written outside it"
            err = check(wide[..., 24:], ref)
            if err:
                return f"out=: {err}"
            # out= with twice x's leading rows (a guided batch's two halves): the result into both blocks of rows
            wide = torch.full((2 * x.shape[0],) + wide.shape[1:], 7.0, dtype=dtype, device=device)
            kernels.add_bias(x, b, r, out=wide[..., 24:])
            if not bool((wide[..., :24] == 7).all()):
                return "out= with repeated rows: written outside the slice"
            err = check(wide[:x.shape[0], ..., 24:], ref) or check(wide[x.shape[0]:, ..., 24:], ref)
            if err:
                return f"out= with repeated rows: {err}"
            # the same into an NCHW map's (B, H, W, C) view: no row view, the kernel writes a temporary
            b_, h_, w_, c_ = x.shape
            nchw = torch.full((2 * b_, c_, h_, w_), 7.0, dtype=dtype, device=device).permute(0, 2, 3, 1)
            kernels.add_bias(x, b, r, out=nchw)
            err = check(nchw[:b_], ref) or check(nchw[b_:], ref)
            if err:
                return f"out= with repeated rows, NCHW: {err}"
        return check(out, ref)
    if op == "geglu":
        h = view_inputs(case, dtype, device)[0] if case in VIEW_CASES else geglu_input(name, dtype, device)
        if name == "3x5x300":
            h = h.transpose(0, 1)
        return check(kernels.geglu(h), geglu_reference(h))
    if name == "tensor-coefficients-exact":
        return tensor_coefficients_exact(dtype, device)
    if name == "eps-types":
        return eps_types(dtype, device)
    args, kind = step_inputs(name, dtype, device)
    with _dispatch.use_mode("fast"):
        out = run_step(kind, args)
    with _dispatch.use_mode("reference"):
        ref = run_step(kind, args)
    errs = [check(o, r) for o, r in zip(out, ref, strict=True)]
    return "; ".join(e for e in errs if e) or None


def eps_types(dtype: torch.dtype, device: str = "cpu") -> str | None:
    """The normalising ops in fast mode take eps as a NumPy scalar or a one-element tensor, as their references do
    (the Triton launches failed on both: they take a Python float)."""
    x, r, _, w, b = ln_inputs("3x37x96", dtype, device)
    g = _gen(5)
    w_q = torch.randn(96, 96, generator=g).to(device, dtype)
    kv = torch.randn(3, 4, 96, generator=g).to(device, dtype)
    fm = torch.randn(2, 8, 5, 3, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    calls = {"layer_norm": lambda e: ops.layer_norm(x, w, b, e),
             "add_layer_norm": lambda e: ops.add_layer_norm(x, r, None, w, b, e)[1],
             "cross_attention": lambda e: ops.cross_attention(x, w, b, e, w_q, kv, kv, 3),
             "group_norm": lambda e: ops.group_norm(fm, None, None, 4, e, silu=True)}
    for op, call in calls.items():
        with _dispatch.use_mode("fast"):
            ref = call(float(np.float32(EPS)))  # the same value as a Python float: the same bits out
            for eps in (np.float32(EPS), torch.tensor(EPS), torch.tensor([EPS], device=device)):
                if not torch.equal(call(eps), ref):
                    return f"{op}, eps {eps!r}: not the result of the same eps as a float"
    return None


KERNEL_CASES = ([f"layer_norm:{n}" for n in LN_CASES] + [f"add_layer_norm:{n}" for n in LN_CASES]
                + [f"add_bias:{n}" for n in BIAS_CASES] + [f"geglu:{n}" for n in GEGLU_CASES]
                + [f"step:{n}" for n in STEP_CASES] + VIEW_CASES + ["ops:eps-types"])
# in the interpreter only: the kernel's float64 square roots of tensor coefficients against the host's
INTERPRETER_ONLY_CASES = ["step:tensor-coefficients-exact"]
INTERPRETER_CASES = [(c, d) for c in KERNEL_CASES + INTERPRETER_ONLY_CASES for d in ("float32", "float16")]


def _child_main() -> None:
    print_results({f"{c}-{d}": _run_case(c, getattr(torch, d)) for c, d in INTERPRETER_CASES})


interpreter_results = interpreter_fixture(__file__)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case,dtype", INTERPRETER_CASES)
def test_triton_interpreter_matches_reference(interpreter_results, case, dtype):
    check_result(interpreter_results, f"{case}-{dtype}")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_triton_gpu_matches_reference(case, dtype):
    err = _run_case(case, getattr(torch, dtype), "cuda")
    assert err is None, err


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_gpu_model_shapes(dtype):
    """imagenet's 32x32 transformer level at batch 16: tokens (16, 1024, 384), GEGLU hidden 2 x 1536."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16, 1024, 384, device="cuda", generator=g).to(dtype)
    w, b = torch.randn(384, device="cuda", generator=g), torch.randn(384, device="cuda", generator=g)
    with _dispatch.use_mode("fast"):
        outs = [layer_norm(x, w.to(dtype), b.to(dtype), EPS), *add_layer_norm(x, x, b.to(dtype), w, b, EPS)]
        h = torch.randn(16, 1024, 3072, device="cuda", generator=g).to(dtype)
        outs.append(geglu(h))
    refs = [layer_norm_reference(x, w.to(dtype), b.to(dtype), EPS),
            *add_layer_norm_reference(x, x, b.to(dtype), w, b, EPS), geglu_reference(h)]
    for o, r in zip(outs, refs, strict=True):
        err = check(o, r)
        assert err is None, err


@needs_cuda
def test_gpu_step_with_device_coefficients_syncs_not_and_captures():
    """0-d CUDA coefficients: no host synchronisation, and a CUDA graph replays with new coefficient values."""
    args, _ = step_inputs("ddim-guided-tensors-2x3x7x5", torch.float32, "cuda")
    noise = torch.randn_like(args["x"])
    args.update(noise=noise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ddim_guided_step(**args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    coefs = {k: args[k].clone() for k in ("a_t", "a_prev", "sigma_t", "guidance_scale")}
    static = {**args, **coefs}
    ddim_guided_step(**static)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x_prev, x0 = ddim_guided_step(**static)
    a_t, a_prev, sigma = step_coefficients(40, 1.0)
    for k, v in (("a_t", a_t), ("a_prev", a_prev), ("sigma_t", sigma), ("guidance_scale", 1.5)):
        coefs[k].fill_(v)
    graph.replay()
    with _dispatch.use_mode("reference"):
        expected = ddim_guided_step(args["x"], args["e_uncond"], args["e_cond"], 1.5, a_t, a_prev, sigma, noise)
    for got, want in zip((x_prev, x0), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(), reason="needs triton; a GPU runs the real thing")
def test_compiles_for_sm90_without_spills():
    """Compiled mode (which the interpreter does not exercise): every kernel builds for sm_90, no spills."""
    from rdm_fast.kernels import glue as kernels

    x = torch.randn(8, 1792, dtype=torch.bfloat16)
    launches = [
        (lambda: kernels.layer_norm(x[:, :384], x[0, :384], x[0, :384], EPS), kernels._layer_norm_kernel),
        (lambda: kernels.layer_norm(x, x[0], x[0], EPS, shift=x[1].float()), kernels._layer_norm_kernel),
        (lambda: kernels.add_layer_norm(x, x, x[0], x[0], x[0], EPS), kernels._layer_norm_kernel),
        (lambda: kernels.add_layer_norm(torch.randn(2, 16384), None, None, None, None, EPS),
         kernels._layer_norm_kernel),
        (lambda: kernels.geglu(x), kernels._geglu_kernel),
        (lambda: kernels.add_bias(x, x[0], x), kernels._add_bias_kernel),
        (lambda: kernels.add_bias(x[:1], x[0], x[:1]), kernels._add_bias_kernel),  # rows == 1: a constexpr
        (lambda: kernels.add_bias(x[:1], x[0], None, out=torch.empty(2, 1792, dtype=x.dtype)),
         kernels._add_bias_kernel),  # and written twice
        (lambda: kernels.add_bias(x[:, 8:392], None, None), kernels._add_bias_kernel),  # a copy of a column slice
    ]
    e = torch.randn(3, 16, 13, 11)
    coefs = [torch.tensor(c, dtype=torch.float64) for c in step_coefficients(3, 1.0)]
    steps = [
        (e, e, e, 3.5, (), (1.0,), *step_coefficients(3, 1.0), e, False),
        (e, None, e, torch.tensor(2.0), (), (1.0,), *coefs, e, False),
        (e, e, e, 3.5, (e, e, e), (0.5, 0.2, 0.2, 0.1), *step_coefficients(3, 0.0), None, True),
    ]
    launches += [(lambda a=a: kernels.sampler_step(*a), kernels._sampler_step_kernel) for a in steps]
    for launch, kernel in launches:
        for result in compile_launches(launch, kernel):
            assert result["spill_bytes"] == 0, result


if __name__ == "__main__":
    _child_main()


# ---------------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_take_mixed_operands_under_autocast(dtype):
    """Inside torch.autocast (mixed-precision training) the ops cast float32 operands to autocast's dtype and
    give what they give for operands already in it; outside autocast mixed dtypes are still refused."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 8, generator=g).to(dtype)
    bias, residual = torch.randn(8, generator=g), torch.randn(2, 6, 5, 8, generator=g)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        got = ops.add_bias(x, bias, residual)
        ln = ops.layer_norm(x.float(), w, b, 1e-5)
    assert got.dtype == dtype and ln.dtype == dtype
    assert torch.equal(got, ops.add_bias(x, bias.to(dtype), residual.to(dtype)))
    assert torch.equal(ln, ops.layer_norm(x, w.to(dtype), b.to(dtype), 1e-5))
    with pytest.raises(ValueError, match="dtype"):
        ops.add_bias(x, bias, residual)
    # ``out`` is the caller's buffer, never cast: one of autocast's dtype is written, a float32 one refused (a cast
    # copy would take the result and leave the caller's buffer as it was, without an error)
    out, out32 = torch.zeros_like(x), torch.zeros(x.shape)
    with torch.autocast("cpu", dtype=dtype):
        assert ops.add_bias(x, bias, residual, out=out) is out
        with pytest.raises(ValueError, match=f"expected out of dtype {dtype}"):
            ops.add_bias(x, bias, residual, out=out32)
    assert torch.equal(out, got) and not out32.any()


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf"), torch.tensor(-1.0)],
                         ids=["neg", "nan", "inf", "cpu-tensor"])
@pytest.mark.parametrize("name,call", [
    ("layer_norm", lambda x, eps: layer_norm(x, None, None, eps)),
    ("layer_norm", lambda x, eps: layer_norm_reference(x, None, None, eps)),
    ("add_layer_norm", lambda x, eps: add_layer_norm(x, x, None, None, None, eps)),
    ("cross_attention", lambda x, eps: ops.cross_attention(x, None, None, eps, torch.randn(8, 8), x, x, 2)),
], ids=["layer_norm", "layer_norm_reference", "add_layer_norm", "cross_attention"])
def test_negative_or_non_finite_eps_is_refused(name, call, eps):
    """A negative LayerNorm eps gave NaN rows without an error."""
    with pytest.raises(ValueError, match=f"{name}: (ln_)?eps must be a finite number >= 0"):
        call(torch.randn(2, 3, 8), eps)


def test_ddim_step_docstring_matches_noise_check():
    """The docstring once said a None noise only drops the noise term; sigma_t > 0 without noise raises."""
    doc = " ".join(ddim_guided_step.__doc__.split())
    assert "no noise term when ``noise`` is None" not in doc
    assert "required when ``sigma_t`` > 0" in doc
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="sigma_t > 0 needs noise"):
        ddim_guided_step(x, x, x, 2.0, 0.5, 0.6, 0.1)
    ddim_guided_step(x, x, x, 2.0, 0.5, 0.6, 0.0)  # sigma_t = 0: no noise needed


@pytest.mark.parametrize("name", ["add_bias", "add_layer_norm", "attention", "conv3x3", "cross_attention", "geglu",
                                  "group_norm", "layer_norm"])
def test_ops_name_a_numpy_input(name):
    """A NumPy array has a .device (the string "cpu"): the dispatch failed on it with an AttributeError."""
    with pytest.raises(TypeError, match=f"^{name}: expected a torch.Tensor, got ndarray$"):
        getattr(ops, name)(np.zeros((2, 8, 4, 4), np.float32), None, None, None, None)
    with pytest.raises(TypeError, match=f"^{name}: argument 3 must be a torch.Tensor, not a NumPy array$"):
        getattr(ops, name)(torch.zeros(2, 8, 4, 4), None, np.zeros(8, np.float32), None, None)


def test_missing_triton_is_named_with_its_install_not_a_rebuild(fresh_dispatch, monkeypatch, caplog):
    """Without triton, the fallback warning and the fast-mode error say to install it; rebuilding rdm_fast (the
    advice for a missing compiled extension) would not help."""
    from rdm_fast.ops import _triton_kernels
    from rdm_fast.ops._dispatch import BUILD_HINT, build_hint

    def no_triton(name):
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    monkeypatch.setattr(_triton_kernels.importlib, "import_module", no_triton)
    op = _triton_kernels.TritonKernels("glue").op("doubled", lambda x: 2 * x, lambda x: None)
    x = torch.ones(3)
    with caplog.at_level(logging.WARNING, logger="rdm_fast.ops"):
        assert op.select("cuda", x).name == "reference"
    assert "doubled: falling back" in caplog.text and "pip install triton" in caplog.text
    assert BUILD_HINT not in caplog.text
    with _dispatch.use_mode("fast"), pytest.raises(RuntimeError, match="pip install triton") as info:
        op.select("cuda", x)
    assert BUILD_HINT not in str(info.value)
    assert build_hint("rdm_fast._C_cuda is not built") == f"; {BUILD_HINT}"
