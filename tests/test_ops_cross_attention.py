"""Cross-attention: the reference vs an independent composition, the fast path (LayerNorm kernel, GEMM, flash
attention) vs the reference (in the Triton interpreter on the CPU, compiled on a GPU), errors and dispatch.

Tolerances. The reference rounds the normalised x and q where the fast path does; the fast path also rounds
the softmax probabilities to v's dtype before the second product (the flash kernel), the reference does not.
float32 outputs agree within 2e-5 + 2e-5 |ref| (summation order). float16/bfloat16: the summation order can
move a rounding of q to the neighbouring value and the probability rounding moves outputs by about one
machine epsilon of the output range, so outputs agree within 2 ulps plus 4 eps max|ref|. The reference itself
is checked against ``F.layer_norm`` + ``F.linear`` + ``F.scaled_dot_product_attention`` in float64 (float32
inputs: 1e-5) and, for float16 inputs, against that composition on the rounded operands (only the output's
rounding is left: within 1 float16 ulp at |out| < 4, 2e-3).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import math

import pytest
import torch
import torch.nn.functional as F
from triton_testing import check_result, interpreter_fixture, mismatch, print_results

from rdm_fast.ops import _dispatch
from rdm_fast.ops.cross_attention import (
    CROSS_ATTENTION,
    cross_attention,
    cross_attention_reference,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
EPS = 1e-5

# name -> (B, N, C, M, heads, k batch 1?, LayerNorm affine?)
CASES = {
    "b2-n1-c64-m1": (2, 1, 64, 1, 2, False, True),
    "b2-n37-c96-m4-kb1": (2, 37, 96, 4, 3, True, True),
    "b1-n257-c64-m11": (1, 257, 64, 11, 2, True, True),
    "b2-n37-c192-m21-noaffine": (2, 37, 192, 21, 6, False, False),
    "b3-n17-c96-m11": (3, 17, 96, 11, 3, False, True),
    "b1-n257-c192-m4": (1, 257, 192, 4, 6, False, True),
    "b2-n9-c96-m32": (2, 9, 96, 32, 3, False, True),
    "b1-n5-c768-m11-kb1": (1, 5, 768, 11, 24, True, True),
    "b2-n37-c128-m21-d64": (2, 37, 128, 21, 2, False, True),
}


def make_inputs(case: tuple, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> tuple:
    b, n, c, m, heads, kb1, affine = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=gen) * 2 + 0.5
    lnw = 1 + 0.3 * torch.randn(c, generator=gen) if affine else None
    lnb = 0.3 * torch.randn(c, generator=gen) if affine else None
    w_q = torch.randn(c, c, generator=gen) / math.sqrt(c)
    kbatch = 1 if kb1 else b
    k = 2 * torch.randn(kbatch, m, c, generator=gen)  # logits of spread ~2: softmax far from uniform
    v = torch.randn(kbatch, m, c, generator=gen)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x), cast(lnw), cast(lnb), EPS, cast(w_q), cast(k), cast(v), heads


def check(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    return mismatch(out, ref, rtol32=2e-5, atol32=2e-5, ulps=2, atol16=4 * torch.finfo(ref.dtype).eps * scale)


def composition(x, lnw, lnb, eps, w_q, k, v, heads, dtype=torch.float64) -> torch.Tensor:
    """Independent cross-attention: torch's LayerNorm, Linear and SDPA in ``dtype``."""
    up = lambda t: None if t is None else t.to(dtype)
    xn = F.layer_norm(up(x), (x.shape[-1],), up(lnw), up(lnb), eps)
    q = F.linear(xn.to(w_q.dtype).to(dtype), up(w_q)).to(k.dtype).to(dtype)
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)
    kk, vv = (up(t).expand(x.shape[0], -1, -1) for t in (k, v))
    out = F.scaled_dot_product_attention(split(q), split(kk), split(vv))
    return out.transpose(1, 2).flatten(2)


# --- the reference against an independent composition


@pytest.mark.parametrize("name", ["b2-n37-c96-m4-kb1", "b2-n37-c192-m21-noaffine", "b2-n37-c128-m21-d64",
                                  "b1-n5-c768-m11-kb1"])
def test_reference_matches_torch_composition_float32(name):
    args = make_inputs(CASES[name], torch.float32)
    ref = cross_attention_reference(*args)
    assert ref.shape == args[0].shape[:2] + (args[4].shape[0],) and ref.dtype == torch.float32
    torch.testing.assert_close(ref.double(), composition(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["b2-n37-c96-m4-kb1", "b2-n37-c192-m21-noaffine"])
def test_reference_shift_matches_torch_composition(name):
    """``shift``: the queries come from LayerNorm(x + shift)."""
    args = make_inputs(CASES[name], torch.float32)
    shift = torch.randn(args[0].shape[-1], generator=torch.Generator().manual_seed(5))
    ref = cross_attention_reference(*args, shift=shift)
    expected = composition(args[0].double() + shift.double(), *args[1:])
    torch.testing.assert_close(ref.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shift of shape"):
        cross_attention(*args, shift=shift[:-1])


@pytest.mark.parametrize("name", ["b2-n37-c96-m4-kb1", "b3-n17-c96-m11"])
def test_reference_float16_close_to_composition(name):
    args = make_inputs(CASES[name], torch.float16)
    ref = cross_attention_reference(*args)
    assert ref.dtype == torch.float16
    torch.testing.assert_close(ref.double(), composition(*args), rtol=1e-3, atol=2e-3)


def test_reference_uniform_over_zero_keys():
    """k = v = 0 (the unconditional context) gives exactly 0: the property the model's guidance shortcut uses."""
    x, lnw, lnb, eps, w_q, k, v, heads = make_inputs(CASES["b3-n17-c96-m11"], torch.float32)
    out = cross_attention_reference(x, lnw, lnb, eps, w_q, torch.zeros_like(k), torch.zeros_like(v), heads)
    assert torch.equal(out, torch.zeros_like(out))


# --- errors


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "x": a["x"][0]}, "x of shape"),
    (lambda a: {**a, "w_q": a["w_q"][:, :-1]}, "w_q of shape"),
    (lambda a: {**a, "heads": 5}, "not divisible into 5 heads"),
    (lambda a: {**a, "k": a["k"][:, :0]}, "k of shape"),
    (lambda a: {**a, "k": torch.cat([a["k"], a["k"]])}, "k of shape"),
    (lambda a: {**a, "v": a["v"][:, :1]}, "v of shape"),
    (lambda a: {**a, "ln_weight": a["ln_weight"][:-1]}, "ln_weight of shape"),
    (lambda a: {**a, "x": a["x"].to(torch.int32)}, "unsupported x dtype"),
])
def test_bad_arguments_raise(change, match):
    names = ["x", "ln_weight", "ln_bias", "ln_eps", "w_q", "k", "v", "heads"]
    args = change(dict(zip(names, make_inputs(CASES["b3-n17-c96-m11"], torch.float32))))
    with pytest.raises(ValueError, match=match):
        cross_attention(**args)


# --- dispatch


def test_cpu_auto_uses_reference_and_fast_needs_interpreter(fresh_dispatch, caplog):
    args = make_inputs(CASES["b3-n17-c96-m11"], torch.float32)
    with caplog.at_level(logging.INFO, logger="rdm_fast.ops"):
        out = cross_attention(*args)
    assert "cross_attention: reference (cpu, float32)" in caplog.text
    assert torch.equal(out, cross_attention_reference(*args))
    if os.environ.get("TRITON_INTERPRET") != "1":  # pytest itself may run under the interpreter
        with _dispatch.use_mode("fast"), pytest.raises(RuntimeError, match="Triton interpreter is off"):
            cross_attention(*args)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cuda_selection(fresh_dispatch):
    """Selection for CUDA tensors (made on the CPU: ``select`` only inspects them)."""
    args = list(make_inputs(CASES["b3-n17-c96-m11"], torch.bfloat16))
    assert CROSS_ATTENTION.select("cuda", *args).name == "triton"
    mixed = args[:4] + [args[4].float()] + args[5:]
    grad = [args[0].float().requires_grad_()] + args[1:4] + [t.float() for t in args[4:7]] + args[7:]
    odd_heads = args[:7] + [2]  # head dim 48
    for bad in (mixed, grad, odd_heads):
        assert CROSS_ATTENTION.select("cuda", *bad).name == "reference"
        with _dispatch.use_mode("fast"), pytest.raises(RuntimeError, match="no fast implementation"):
            CROSS_ATTENTION.select("cuda", *bad)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cuda_selection_takes_every_head_dim_of_the_flash_kernel(fresh_dispatch):
    """Cross-attention's own head-dim check lists the flash kernel's head dims (16 to 128): every one of them
    takes the fast path on CUDA, others the reference. Every case had head dim 32 or 64, so a list that had
    lost 16 or 128 (layers of such heads silently on the reference) passed."""
    from rdm_fast.kernels.attention import HEAD_DIMS

    for d in sorted({*HEAD_DIMS, 8, 48, 256}):
        args = list(make_inputs((1, 3, 2 * d, 2, 2, False, True), torch.bfloat16))  # two heads of d
        expected = "triton" if d in HEAD_DIMS else "reference"
        assert CROSS_ATTENTION.select("cuda", *args).name == expected, d


def test_grad_flows_through_reference():
    x, lnw, lnb, eps, w_q, k, v, heads = make_inputs(CASES["b3-n17-c96-m11"], torch.float32)
    w_q.requires_grad_()
    cross_attention(x, lnw, lnb, eps, w_q, k, v, heads).square().sum().backward()
    assert w_q.grad is not None and w_q.grad.abs().sum() > 0


# --- the fast path (LayerNorm and flash-attention kernels around the vendor GEMM) in the interpreter (child
# process) and compiled on a GPU


def _run_case(name: str, dtype: torch.dtype, device: str = "cpu", layout: str = "contiguous") -> str | None:
    args = list(make_inputs(CASES[name], dtype, device))
    if layout == "padded-rows":  # x a column slice of a wider buffer: row stride > C
        x = args[0]
        args[0] = torch.cat([x, torch.full_like(x[..., :5], 1e4)], dim=-1)[..., : x.shape[-1]]
    kwargs = {}
    if layout == "shift":  # a per-channel bias the caller owes x, joined before the LayerNorm
        kwargs["shift"] = torch.randn(args[0].shape[-1], generator=torch.Generator().manual_seed(5)).to(device)
    with _dispatch.use_mode("fast"):
        out = cross_attention(*args, **kwargs)
    return check(out, cross_attention_reference(*args, **kwargs))


INTERPRETER_CASES = [(n, d, "contiguous") for n in CASES for d in ("float32", "float16")]
INTERPRETER_CASES += [("b2-n37-c96-m4-kb1", "float32", "padded-rows"), ("b2-n37-c96-m4-kb1", "float32", "shift"),
                      ("b3-n17-c96-m11", "float16", "shift")]


def _child_main() -> None:
    print_results({f"{n}-{d}-{lay}": _run_case(n, getattr(torch, d), layout=lay) for n, d, lay in INTERPRETER_CASES})


interpreter_results = interpreter_fixture(__file__)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name,dtype,layout", INTERPRETER_CASES)
def test_triton_interpreter_matches_reference(interpreter_results, name, dtype, layout):
    check_result(interpreter_results, f"{name}-{dtype}-{layout}")


# Released shapes, per transformer level: imagenet (C = 384/576/960, M = 4), rdm768 (C = 448...1792, M = 11).
GPU_CASES = {
    "imagenet-32x32": (8, 1024, 384, 4, 12, False, True),
    "imagenet-8x8": (8, 64, 960, 4, 30, False, True),
    "rdm768-48x48": (2, 2304, 448, 11, 14, False, True),
    "rdm768-mid-6x6": (4, 36, 1792, 11, 56, True, True),
    "odd-m21": (3, 77, 192, 21, 6, False, False),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("name", list(GPU_CASES) + ["b2-n37-c96-m4-kb1", "b1-n257-c64-m11"])
def test_triton_gpu_matches_reference(name, dtype):
    case = GPU_CASES.get(name) or CASES[name]
    args = make_inputs(case, getattr(torch, dtype), "cuda")
    with _dispatch.use_mode("fast"):
        out = cross_attention(*args)
    err = check(out, cross_attention_reference(*args))
    assert err is None, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("layout", ["shift", "padded-rows"])
def test_triton_gpu_shift_and_padded_rows_match_reference(dtype, layout):
    err = _run_case("b3-n17-c96-m11", getattr(torch, dtype), "cuda", layout=layout)
    assert err is None, err


if __name__ == "__main__":
    _child_main()
