"""Multi-head attention op: reference vs a float64 oracle, Triton paths vs the reference, dispatch, errors.

The Triton kernels run on the CPU only in the Triton interpreter (``TRITON_INTERPRET=1``, read when the kernel
module is imported), so those cases run in a child interpreter, as in test_triton_group_norm.py: this file run
as a script with ``TRITON_INTERPRET=1`` evaluates every case through the public op in ``fast`` mode (forward
and backward, through the custom op's autograd) and prints JSON; a module fixture starts it once. GPU cases
(compiled kernels, bfloat16 included, long sequences) run in process and skip without CUDA.

Inputs are unit-scale normal values (and a few stress cases: see INTERPRETER_CASES). Tolerances
(``diff <= atol * max(max|ref|, 0.1) + rtol * |ref|``, per tensor; the floor covers gradients that are exactly
zero in the reference):
float32 atol = rtol = 1e-5 (output and gradients; float32 accumulation in another order), atol raised to 4 eps32
times the largest |logit| where that is more: a float32 logit s is only known to about eps32 |s|, and so is a
probability computed from it. The kernels' error there is larger than the reference's (they form
p = exp2(s log2(e) - lse log2(e)) from the stored log-sum-exp, itself about |s|, where the reference takes
exp(s - max)): in the gain-60 stress case (|s| up to 236) the float32 reference's dv is 1.4e-5 from float64, ours
1.1e-4, against a tolerance of 5.1e-4. At unit gain the floor stays below 1e-5. float16 atol = 1e-3,
rtol = 2e-3 (about 2e-3 absolute on unit-scale data: the probability tile is rounded to float16 before its
product with v, like every flash-attention kernel, then the output is rounded once); float16 gradients
atol = rtol = 2e-3 (dS is rounded too); bfloat16 (GPU only) 8x the float16 values. In the interpreter the
largest errors are below 0.3x these tolerances (float16 output) and 0.1x (float32, float16 gradients), except
in the stress cases: "offset" (float16 gradients) 0.52x, "halves" (float16 output) 0.6x, "negative" (float16
dq) 0.66x. The float32 gain-60 case measured 0.53x of the plain 1e-5 tolerance on one machine and 2.4x on
another (an AVX-512 CPU, whose BLAS sums the interpreter's products in another order), which led to the logit
floor above.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os

import numpy as np
import pytest
import torch
from triton_testing import check_result, interpreter_fixture, print_results

from rdm_fast.ops import use_mode
from rdm_fast.ops._dispatch import Impl, Op
from rdm_fast.ops.attention import (
    ATTENTION,
    attention,
    attention_reference,
    attention_triton,
    check_args,
)

SCALE_FLOOR = 0.1  # exact zeros (one key: dq = dk = 0) leave rounding residue
LOGIT_ROUNDING = 4  # float32 tolerances are at least this many eps times the largest |logit| (see the docstring)
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

TOLERANCES = {  # dtype -> ((atol, rtol) of the output, (atol, rtol) of the gradients)
    torch.float32: ((1e-5, 1e-5), (1e-5, 1e-5)),
    torch.float16: ((1e-3, 2e-3), (2e-3, 2e-3)),
    torch.bfloat16: ((8e-3, 1.6e-2), (1.6e-2, 1.6e-2)),
}

# id -> (B, Nq, Nk, heads, d, dtype name, layout, logit gain). layout "views": q, k, v are column blocks of one
# (B, N, 3C) tensor (strided rows, read in place); "strided-v": q, k contiguous, v the first columns of a
# (B, Nk, 2C) tensor (row and batch strides unlike k's); "offset": v and grad_out 0.5 N(0, 1) + 1.5, so dP and
# delta = rowsum(P dP) are large and nearly cancel in dS; "halves": v +4 on the first half of the keys and -4
# on the second, plus 0.5 N(0, 1) (with a small gain: the running sum of p @ v grows, then cancels); "shared":
# see SHARED_CASES.
# Interpreter blocks: forward and dQ 32 queries x 16 keys, dK/dV 32 keys x 16 queries, so 77, 50, 130, 33
# exercise partial blocks on both axes; gain 4 makes the softmax peaked, gain 60 spreads the logits over
# hundreds (the running max must be kept across key blocks).
INTERPRETER_CASES = {}
for _shape in [(1, 1, 1, 1, 32), (2, 77, 77, 3, 32), (2, 77, 50, 3, 32), (1, 130, 130, 2, 64),
               (1, 20, 130, 2, 64), (2, 64, 64, 6, 32)]:
    for _dtype in ("float32", "float16"):
        INTERPRETER_CASES["x".join(map(str, _shape)) + f"-{_dtype}"] = (*_shape, _dtype, "dense", 1.0)
INTERPRETER_CASES["2x64x64x6x32-float16-views"] = (2, 64, 64, 6, 32, "float16", "views", 1.0)
INTERPRETER_CASES["2x77x50x3x32-float32-peaked"] = (2, 77, 50, 3, 32, "float32", "dense", 4.0)
INTERPRETER_CASES["1x40x33x2x16-float32"] = (1, 40, 33, 2, 16, "float32", "dense", 1.0)
INTERPRETER_CASES["1x33x17x1x128-float16"] = (1, 33, 17, 1, 128, "float16", "dense", 1.0)
for _dtype in ("float32", "float16"):
    INTERPRETER_CASES[f"2x40x50x2x32-{_dtype}-strided-v"] = (2, 40, 50, 2, 32, _dtype, "strided-v", 1.0)
INTERPRETER_CASES["1x20x130x2x64-float32-gain60"] = (1, 20, 130, 2, 64, "float32", "dense", 60.0)
INTERPRETER_CASES["1x40x50x2x32-float16-offset"] = (1, 40, 50, 2, 32, "float16", "offset", 1.0)
INTERPRETER_CASES["1x32x512x1x32-float16-halves"] = (1, 32, 512, 1, 32, "float16", "halves", 0.05)
# "negative": q = -gain/3 (the keys' shared row + 0.3 N(0, 1)) against the "shared" keys (below), so every logit
# of every row is far below zero (-196 to -123 at gain 10; below -149 in the kernels' log2 units, where exp2
# underflows float32: the online softmax must start its running max at -inf, not 0). Softmax is shift-invariant.
for _dtype in ("float32", "float16"):
    INTERPRETER_CASES[f"1x40x50x2x32-{_dtype}-negative"] = (1, 40, 50, 2, 32, _dtype, "negative", 10.0)
# "shared": k = 3 c_k + 0.5 N(0, 1) and v = 3 c_v + N(0, 1), c_k and c_v one N(0, 1) row shared by all keys (the
# tokens of one image share a component), with a small gain: nearly uniform attention. An error common to a row
# of dS (such as a delta taken from the 16-bit output) is then multiplied by the keys' mean in dQ instead of
# cancelling. float32 itself determines these gradients only to about 1e-5, so the yardstick is plain PyTorch
# attention in the same dtype against float64 (:func:`compare_with_plain`).
SHARED_CASES = {f"2x70x70x2x32-{dtype}-shared": (2, 70, 70, 2, 32, dtype, "shared", 0.3)
                for dtype in ("float32", "float16")}
# run with the grid limit made 7: 3 heads give launches of 2 samples (5 samples: 2 + 2 + 1), 8 heads 1 sample
BATCH_SPLIT_CASES = {"split-5x40x24x3x32-float32": (5, 40, 24, 3, 32, "float32", "dense", 1.0),
                     "split-3x33x33x8x32-float16-views": (3, 33, 33, 8, 32, "float16", "views", 1.0)}


def _inputs(case: tuple, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(q, k, v, grad_out) for a case; q, k, v are leaves that require grad."""
    b, nq, nk, heads, d, dtype, layout, gain = case
    dtype = getattr(torch, dtype)
    width = heads * d
    gen = torch.Generator().manual_seed(seed)
    if layout == "views":
        assert nq == nk
        qkv = torch.randn(b, nq, 3 * width, generator=gen).to(device, dtype)
        qkv[..., :width] *= gain
        qkv.requires_grad_(True)
        q, k, v = qkv.split(width, dim=-1)
        leaves = (qkv,)
    else:
        q = (torch.randn(b, nq, width, generator=gen) * gain).to(device, dtype).requires_grad_(True)
        k = torch.randn(b, nk, width, generator=gen)
        if layout in ("shared", "negative"):
            k = 3 * torch.randn(b, 1, width, generator=gen) + 0.5 * k
        if layout == "negative":
            q = (-gain / 3 * (k[:, :1] + 0.3 * torch.randn(b, nq, width, generator=gen))).to(device, dtype)
            q.requires_grad_(True)
        k = k.to(device, dtype).requires_grad_(True)
        if layout == "strided-v":
            v_wide = torch.randn(b, nk, 2 * width, generator=gen).to(device, dtype).requires_grad_(True)
            v = v_wide[..., :width]
            leaves = (q, k, v_wide)
        else:
            v = torch.randn(b, nk, width, generator=gen)
            if layout == "offset":
                v = 0.5 * v + 1.5
            elif layout == "halves":
                v = 0.5 * v + torch.where(torch.arange(nk) < nk // 2, 4.0, -4.0)[:, None]
            elif layout == "shared":
                v = 3 * torch.randn(b, 1, width, generator=gen) + v
            v = v.to(device, dtype).requires_grad_(True)
            leaves = (q, k, v)
    grad_out = torch.randn(b, nq, width, generator=gen)
    grad_out = (0.5 * grad_out + 1.5 if layout == "offset" else grad_out).to(device, dtype)
    return q, k, v, grad_out, leaves


def _mismatch(name: str, out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> str | None:
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"{name}: got {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return f"{name}: non-finite values"
    diff = (out - ref).abs()
    bad = diff > atol * max(ref.abs().max().item(), SCALE_FLOOR) + rtol * ref.abs()
    if bad.any():
        return f"{name}: {int(bad.sum())} of {bad.numel()} values out of tolerance, max abs diff {diff.max().item():.3g}"
    return None


def compare_with_reference(fn, case: tuple, device: str = "cpu") -> str | None:
    """None when ``fn``'s output and gradients (w.r.t. every input leaf) match the reference's, else why not."""
    heads = case[3]
    q, k, v, grad_out, leaves = _inputs(case, device)
    out = fn(q, k, v, heads)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref = attention_reference(q, k, v, heads)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    (oa, orr), (ga, gr) = TOLERANCES[q.dtype]
    if q.dtype == torch.float32:  # large logits: rounding them moves each probability by up to eps * |logit|
        floor = LOGIT_ROUNDING * torch.finfo(torch.float32).eps * max_logit(q, k, heads)
        oa, ga = max(oa, floor), max(ga, floor)  # on the absolute part (x the tensor's largest value) only
    errors = [_mismatch("output", out, ref, oa, orr)]
    errors += [_mismatch(f"grad {i}", g, r, ga, gr) for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True))]
    errors = [e for e in errors if e]
    return "; ".join(errors) or None


def max_logit(q: torch.Tensor, k: torch.Tensor, heads: int) -> float:
    """The largest |q . k| / sqrt(d) over all heads and pairs (in float64)."""
    split = lambda t: t.detach().double().unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    return float((split(q) @ split(k).transpose(-1, -2)).abs().max()) * (q.shape[-1] // heads) ** -0.5


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Unfused attention as autocast runs it: products in the inputs' dtype, the softmax in float32."""
    b, n, width = q.shape
    d = width // heads
    split = lambda t: t.unflatten(-1, (heads, d)).transpose(1, 2)  # noqa: E731
    probs = torch.softmax((split(q) @ split(k).transpose(-1, -2)).float() * d**-0.5, dim=-1).to(q.dtype)
    return (probs @ split(v)).transpose(1, 2).reshape(b, n, width)


def compare_with_plain(fn, case: tuple, device: str = "cpu") -> str | None:
    """None when ``fn``'s output and gradients are within 4 times plain attention's distance (relative L2) from
    float64 attention, for every tensor; else why not."""
    heads = case[3]
    q, k, v, grad_out, leaves = _inputs(case, device)
    exact = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want_out = float64_attention(*exact, heads)
    want = [want_out, *torch.autograd.grad(want_out, exact, grad_out.double())]
    errors = {}
    for name, f in (("ours", fn), ("plain", plain_attention)):
        out = f(q, k, v, heads)
        got = [out, *torch.autograd.grad(out, (q, k, v), grad_out)]
        errors[name] = [float((g.detach().double() - w.detach()).norm() / w.detach().norm())
                        for g, w in zip(got, want, strict=True)]
    bad = [f"{what}: {ours:.2e} against plain {plain:.2e}" for what, ours, plain
           in zip(("output", "dq", "dk", "dv"), errors["ours"], errors["plain"], strict=True)
           if not ours <= 4 * plain + 1e-7]
    return "; ".join(bad) or None


def _child_main() -> None:
    """Evaluate every interpreter case through the public op in fast mode; print {id: error or None} as JSON."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    results = {}
    with use_mode("fast"):
        for name, case in INTERPRETER_CASES.items():
            q, k, v, _, _ = _inputs(case)
            chosen = ATTENTION.select("cpu", q, k, v, case[3]).name
            if chosen != "triton-interpreter":
                results[name] = f"dispatch chose {chosen}"
                continue
            results[name] = compare_with_reference(attention, case)
        for name, case in SHARED_CASES.items():
            results[name] = compare_with_plain(attention, case)

        # batch * heads above the launch grid's second axis: one launch per batch slice (the limit made small)
        kernels = importlib.import_module("rdm_fast.kernels.attention")
        saved, kernels.MAX_GRID_Y = kernels.MAX_GRID_Y, 7
        try:
            for name, case in BATCH_SPLIT_CASES.items():
                results[name] = compare_with_reference(attention, case)
        finally:
            kernels.MAX_GRID_Y = saved

        # keys and values made under inference_mode (a context projected there), gradients for the queries only:
        # autograd could not save them ("Inference tensors cannot be saved for backward")
        q, k, v, grad_out, _ = _inputs((2, 9, 5, 2, 32, "float32", "dense", 1.0))
        with torch.inference_mode():
            k_inf, v_inf = k.detach().clone(), v.detach().clone()
        try:
            q_ = q.detach().requires_grad_()
            attention(q_, k_inf, v_inf, 2).backward(grad_out)
            q_ref = q.detach().requires_grad_()
            attention_reference(q_ref, k.detach(), v.detach(), 2).backward(grad_out)
            results["inference-mode keys"] = _mismatch("dq", q_.grad, q_ref.grad, 1e-5, 1e-5)
        except RuntimeError as e:
            results["inference-mode keys"] = str(e).splitlines()[0]

        # no queries: an empty output, and zero gradients for the keys and values (not the uninitialised memory
        # the backward allocates them in)
        q, k, v, grad_out, _ = _inputs((2, 0, 5, 2, 32, "float32", "dense", 1.0))
        out = attention(q, k, v, 2)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
        results["no queries"] = None if out.shape == dq.shape == q.shape and not (dk.any() or dv.any()) else (
            f"output {tuple(out.shape)}, dq {tuple(dq.shape)}, |dk| {dk.abs().max():.3g}, |dv| {dv.abs().max():.3g}")

        # The custom ops' registrations (schema, fake tensors, autograd, AOT dispatch).
        q, k, v, grad_out, _ = _inputs((1, 20, 17, 1, 32, "float32", "dense", 1.0))
        checks = torch.library.opcheck(torch.ops.rdm_fast.attention_triton.default, (q, k, v, 1))
        _, lse = torch.ops.rdm_fast.attention_triton(q, k, v, 1)
        args = (grad_out, q.detach(), k.detach(), v.detach(), lse.detach(), 1)
        checks.update({f"backward {key}": val for key, val in torch.library.opcheck(
            torch.ops.rdm_fast.attention_triton_backward.default, args).items()})
        failed = {key: str(val) for key, val in checks.items() if val != "SUCCESS"}
        results["opcheck"] = json.dumps(failed) if failed else None

        # torch.compile traces the dispatch and the custom op (fake kernels) without graph breaks.
        compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
        results["torch.compile"] = compare_with_reference(compiled, (2, 40, 24, 2, 32, "float32", "dense", 1.0))
    print_results(results)


interpreter_results = interpreter_fixture(__file__, timeout=900, RDM_FAST_OPS="auto")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", [*INTERPRETER_CASES, *SHARED_CASES, *BATCH_SPLIT_CASES, "inference-mode keys",
                                  "no queries", "opcheck", "torch.compile"])
def test_interpreter_matches_reference(interpreter_results, name):
    check_result(interpreter_results, name)


# ----------------------------------------------------------------------------------------------------------------
# Reference and SDPA (CPU, in process)


def float64_attention(q, k, v, heads):
    """Attention from first principles in float64: exp of max-shifted scores over their sum."""
    b, nq, width = q.shape
    d = width // heads
    qh, kh, vh = (t.double().reshape(b, -1, heads, d) for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", qh, kh) / d**0.5
    weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("bhqk,bkhd->bqhd", weights, vh).reshape(b, nq, width)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 32), (2, 77, 50, 3, 32), (1, 20, 130, 2, 64), (2, 9, 9, 4, 48)])
def test_reference_matches_float64(shape):
    q, k, v, _, _ = _inputs((*shape, "float32", "dense", 2.0))
    out = attention_reference(q, k, v, shape[3])
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), float64_attention(q, k, v, shape[3]), rtol=1e-5, atol=1e-6)


def test_reference_rounds_once_to_input_dtype():
    """float16 inputs: float32 math, one rounding: within half a float16 ulp (+ float32 error) of the exact value."""
    q, k, v, _, _ = _inputs((2, 30, 20, 2, 32, "float16", "dense", 1.0))
    out = attention_reference(q, k, v, 2)
    assert out.dtype == torch.float16
    exact = float64_attention(q, k, v, 2)
    half_ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2.0**-14)))) * 2.0**-11
    assert ((out.double() - exact).abs() <= half_ulp + 1e-6).all()


def test_compare_with_reference_detects_errors():
    """The comparison used everywhere fails on a wrong scale and on a wrong gradient."""
    case = (1, 20, 20, 2, 32, "float32", "dense", 1.0)
    assert compare_with_reference(lambda q, k, v, h: attention_reference(q * 1.01, k, v, h), case) is not None
    assert compare_with_reference(
        lambda q, k, v, h: attention_reference(q, k, v, h) + 1e-3 * (q - q.detach()), case
    ) is not None


# ----------------------------------------------------------------------------------------------------------------
# Dispatch and validation


def _small(dtype=torch.float32, d=32, heads=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 10, heads * d, generator=g).to(dtype) for _ in range(3)]


def test_dispatch_cpu_modes():
    q, k, v = _small()
    with use_mode("auto"):
        assert ATTENTION.select("cpu", q, k, v, 2).name == "reference"
    with use_mode("reference"):
        assert ATTENTION.select("cpu", q, k, v, 2).name == "reference"
    if os.environ.get("TRITON_INTERPRET") != "1":
        with use_mode("fast"), pytest.raises(RuntimeError, match="Triton interpreter is off"):
            ATTENTION.select("cpu", q, k, v, 2)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_unsupported_calls_fall_back_in_auto_and_raise_in_fast():
    """An op whose only fast implementation is the Triton one: head dim 48 goes to the reference in auto mode
    and raises in fast mode, naming the reason; head dim 32 is accepted."""
    impl = ATTENTION.impl("triton")
    op = Op("attention", reference=ATTENTION.reference,
            by_device={"cpu": [Impl("triton", attention_triton, impl.unsupported, impl.unavailable)]})
    q, k, v = _small(d=48)
    with use_mode("auto"):
        assert op.select("cpu", q, k, v, 2).name == "reference"
    with use_mode("fast"), pytest.raises(RuntimeError, match="head dim 48"):
        op.select("cpu", q, k, v, 2)
    with use_mode("fast"):
        assert op.select("cpu", *_small(d=32), 2).name == "triton"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_unsupported_reasons():
    unsupported = ATTENTION.impl("triton").unsupported
    for d in (16, 32, 64, 128):
        assert unsupported(*_small(d=d, heads=1), 1) is None
    for d in (8, 48, 256):
        assert f"head dim {d}" in unsupported(*_small(d=d, heads=1), 1)
    big = torch.empty(2, 4, 32 * 40000, device="meta")
    assert unsupported(big, big, big, 40000) is None  # batch * heads above the grid's limit: launched in slices
    interp = ATTENTION.impl("triton-interpreter").unsupported
    assert "bfloat16" in interp(*_small(torch.bfloat16), 2)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_batch_chunks_keep_batch_times_heads_within_the_grid(monkeypatch):
    """The launch slices: batch * heads per launch at most the grid's second axis (one sample per launch when
    the heads alone exceed it), covering the batch in order. The interpreter has no grid limit, so the split
    cases there check only the values."""
    kernels = importlib.import_module("rdm_fast.kernels.attention")
    monkeypatch.setattr(kernels, "MAX_GRID_Y", 7)
    t = torch.arange(5.0)[:, None, None]
    for heads, samples in ((1, [5]), (2, [3, 2]), (3, [2, 2, 1]), (7, [1] * 5), (8, [1] * 5)):
        chunks = list(kernels._batch_chunks(heads, t, 2 * t))
        assert [rows for rows, _ in chunks] == [n * heads for n in samples], heads
        assert torch.equal(torch.cat([a for _, (a, _) in chunks]), t)
        assert torch.equal(torch.cat([b for _, (_, b) in chunks]), 2 * t)


def test_interpreter_impl_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in ATTENTION.impl("triton-interpreter").unavailable()


@pytest.mark.parametrize(
    "shapes,heads,match",
    [
        (((2, 10, 64), (2, 10, 64), (2, 10)), 2, "expected v of shape"),
        (((2, 10, 64), (3, 10, 64), (3, 10, 64)), 2, "expected q"),
        (((2, 10, 64), (2, 10, 64), (2, 9, 64)), 2, "expected q"),
        (((2, 10, 64), (2, 10, 32), (2, 10, 32)), 2, "same width"),
        (((2, 10, 64), (2, 10, 64), (2, 10, 64)), 3, "divisible by heads=3"),
        (((2, 10, 64), (2, 10, 64), (2, 10, 64)), 0, "positive int"),
        (((2, 10, 64), (2, 10, 64), (2, 10, 64)), True, "positive int"),
        (((2, 10, 64), (2, 10, 64), (2, 10, 64)), 2.0, "positive int"),
        (((2, 10, 64), (2, 0, 64), (2, 0, 64)), 2, "no tokens"),
    ],
)
def test_invalid_shapes_raise(shapes, heads, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, heads)
    with pytest.raises(ValueError, match=match):
        attention_reference(q, k, v, heads)


def test_numpy_integer_heads_are_accepted():
    """A head count read from a NumPy array (np.int64) means the same as the Python int."""
    q, k, v = _small()
    torch.testing.assert_close(attention(q, k, v, np.int64(2)), attention(q, k, v, 2), rtol=0, atol=0)


def test_invalid_dtypes_raise():
    q, k, v = _small()
    with pytest.raises(ValueError, match="unsupported q dtype torch.float64"):
        attention(q.double(), k, v, 2)
    with pytest.raises(ValueError, match="share a dtype"):
        attention(q, k.half(), v, 2)
    with pytest.raises(ValueError, match="one device"):
        attention(q, k.to("meta"), v, 2)


def test_cuda_entry_runs_the_kernels_for_gradients_and_times_only_inference(monkeypatch):
    """The CUDA entry (driven here with stand-ins: no GPU needed) calls the Triton kernels when gradients are
    needed or in ``fast`` mode, and leaves the choice to the timed candidates only for inference in ``auto``."""
    module = importlib.import_module("rdm_fast.ops.attention")  # the package's attribute is the function
    calls = []
    monkeypatch.setattr(module, "attention_triton", lambda *a: calls.append("triton"))
    monkeypatch.setattr(module, "_MEASURED", lambda *a: calls.append("measured"))
    q = torch.randn(2, 5, 64)
    with use_mode("auto"):
        module._cuda_attention(q.requires_grad_(True), q, q, 2)
        module._cuda_attention(q.detach(), q.detach(), q.detach(), 2)
        with torch.no_grad():
            module._cuda_attention(q, q, q, 2)
    with use_mode("fast"), torch.no_grad():
        module._cuda_attention(q, q, q, 2)
    assert calls == ["triton", "measured", "measured", "triton"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cuda_calls_the_kernels_cannot_run_go_to_sdpa_for_inference_only(fresh_dispatch):
    """On CUDA (selection only: no GPU needed), a head dim the Triton kernels lack (the first stages' single
    512-channel head; 48 here) runs PyTorch's SDPA for inference in auto mode, the float32 reference when
    gradients are needed, and is refused in fast mode; SDPA's result there matches the reference."""
    q, k, v = _small(d=48)
    with use_mode("auto"):
        assert ATTENTION.select("cuda", q, k, v, 2).name == "sdpa"
        grad_q = q.clone().requires_grad_(True)
        assert ATTENTION.select("cuda", grad_q, k, v, 2).name == "reference"
        assert ATTENTION.select("cuda", *_small(d=32), 2).name == "triton"
    with use_mode("fast"), pytest.raises(RuntimeError, match="head dim 48"):
        ATTENTION.select("cuda", q, k, v, 2)
    sdpa = ATTENTION.impl("sdpa").fn(q, k, v, 2)
    assert sdpa.shape == q.shape and sdpa.is_contiguous()
    torch.testing.assert_close(sdpa, attention_reference(q, k, v, 2), rtol=1e-5, atol=1e-5)


def test_check_args_accepts_cross_attention_lengths():
    check_args(torch.zeros(2, 100, 64), torch.zeros(2, 5, 64), torch.zeros(2, 5, 64), 2)


def test_custom_op_fake_shapes():
    q = torch.empty(3, 50, 96, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(3, 7, 96, device="meta", dtype=torch.bfloat16)
    out, lse = torch.ops.rdm_fast.attention_triton(q, kv, kv, 3)
    assert (out.shape, out.dtype, out.is_contiguous()) == ((3, 50, 96), torch.bfloat16, True)
    assert (lse.shape, lse.dtype) == ((3, 3, 50), torch.float32)
    dq, dk, dv = torch.ops.rdm_fast.attention_triton_backward(out, q, kv, kv, lse, 3)
    assert [t.shape for t in (dq, dk, dv)] == [q.shape, kv.shape, kv.shape]


# ----------------------------------------------------------------------------------------------------------------
# Compiled kernels on a GPU (in process)

# bfloat16 on every shape; float16 and float32 on fewer (each dtype and head dim compiles its own kernels).
GPU_SHAPES = [(1, 1, 1, 1, 32), (2, 77, 50, 3, 32), (3, 1000, 777, 4, 64), (2, 4096, 4096, 2, 32),
              (1, 4096, 4096, 2, 64), (4, 2304, 2304, 3, 32), (2, 300, 300, 2, 16), (2, 129, 200, 2, 128)]
GPU_CASES = [(s, "bfloat16") for s in GPU_SHAPES]
GPU_CASES += [(s, "float16") for s in GPU_SHAPES[1:4]] + [(s, "float32") for s in GPU_SHAPES[1:3]]


@pytest.fixture
def exact_float32(monkeypatch):
    """The float32 reference must not use TF32 products."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("shape,dtype", GPU_CASES, ids=["x".join(map(str, s)) + f"-{d}" for s, d in GPU_CASES])
def test_triton_gpu_matches_reference(exact_float32, shape, dtype):
    q, k, v, _, _ = _inputs((*shape, dtype, "dense", 1.0), "cuda")
    with use_mode("auto"):
        assert ATTENTION.select("cuda", q, k, v, shape[3]).name == "triton"
    err = compare_with_reference(attention_triton, (*shape, dtype, "dense", 1.0), "cuda")
    assert err is None, err


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_triton_gpu_strided_views_and_peaked_softmax(dtype):
    for case in [(2, 1024, 1024, 12, 32, dtype, "views", 1.0), (2, 577, 577, 4, 64, dtype, "views", 4.0),
                 (2, 600, 700, 4, 32, dtype, "strided-v", 1.0)]:
        err = compare_with_reference(attention_triton, case, "cuda")
        assert err is None, f"{case}: {err}"


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_triton_gpu_gradients_with_shared_components(dtype):
    """Nearly uniform attention over keys and values with a large shared component (SHARED_CASES), compiled: as
    close to float64 as plain attention in the same dtype, at the released models' token counts."""
    for case in [(2, 1024, 1024, 12, 32, dtype, "shared", 0.3), (4, 257, 11, 4, 32, dtype, "shared", 0.3)]:
        err = compare_with_plain(attention_triton, case, "cuda")
        assert err is None, f"{case}: {err}"


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_triton_gpu_public_op_and_reference_fallback():
    """auto mode on CUDA: head dim 32 runs the Triton kernels (inputs that need gradients: no timed choice),
    head dim 48 the reference, or SDPA for inference; the outputs match float64 attention (the bfloat16 output
    tolerance)."""
    (atol, rtol), _ = TOLERANCES[torch.bfloat16]
    for d, grad, expected in ((32, True, "triton"), (48, True, "reference"), (48, False, "sdpa")):
        q, k, v, _, _ = _inputs((2, 64, 40, 2, d, "bfloat16", "dense", 1.0), "cuda")
        q, k, v = (t.detach().requires_grad_(grad) for t in (q, k, v))
        with use_mode("auto"):
            assert ATTENTION.select("cuda", q, k, v, 2).name == expected
            out = attention(q, k, v, 2).detach().double()
        with torch.no_grad():
            err = _mismatch("output", out, float64_attention(q, k, v, 2), atol, rtol)
        assert err is None, f"head dim {d}: {err}"


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_gpu_inference_measures_triton_against_sdpa_once_per_shape(monkeypatch, caplog):
    """auto-mode inference: the first call of a shape times the Triton kernels against SDPA (logged) and keeps
    the faster; both candidates match the reference; with gradients the Triton kernels always run."""
    module = importlib.import_module("rdm_fast.ops.attention")  # the package's attribute is the function

    monkeypatch.setattr(module._MEASURED, "chosen", {})
    for case in [(4, 64, 64, 30, 32, "bfloat16", "views", 1.0), (4, 1024, 4, 12, 32, "bfloat16", "dense", 1.0)]:
        q, k, v, _, _ = _inputs(case, "cuda")
        with use_mode("auto"), torch.no_grad(), caplog.at_level(logging.INFO, logger="rdm_fast.ops"):
            caplog.clear()
            out, again = attention(q, k, v, case[3]), attention(q, k, v, case[3])
            assert caplog.text.count("triton") >= 1 and caplog.text.count(" -> ") == 1, caplog.text
        for candidate in (module.attention_triton, module._sdpa):
            err = compare_with_reference(candidate, case, "cuda")
            assert err is None, f"{case} {candidate.__name__}: {err}"
        torch.testing.assert_close(out, again, rtol=0, atol=0)
    assert len(module._MEASURED.chosen) == 2


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_triton_gpu_torch_compile():
    """torch.compile (inductor) traces the op through its fake kernels and runs the Triton kernels."""
    compiled = torch.compile(attention, fullgraph=True)
    with use_mode("auto"):
        err = compare_with_reference(compiled, (2, 256, 256, 6, 32, "bfloat16", "dense", 1.0), "cuda")
    assert err is None, err


if __name__ == "__main__":
    _child_main()


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="offline compile check (a GPU runs the real thing)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_configs_compile_for_sm90_without_spills(dtype):
    """Every autotuning candidate of the forward kernel at head dim 32 (the released models') builds for sm_90
    with no register spills, the 16-key tiles for the neighbour cross-attention included."""
    from triton_testing import compile_launches

    from rdm_fast.kernels import attention as kernels

    q = torch.zeros(2, 36, 4 * 32, dtype=dtype)
    k = torch.zeros(2, 11, 4 * 32, dtype=dtype)
    out, lse = torch.empty_like(q), torch.empty(2, 4, 36)
    fn = kernels._attn_fwd_kernel.fn  # the kernel under the autotuner

    def launch():
        for cfg in kernels._FWD_CONFIGS:
            fn[(1, 8)](q, k, k, out, lse, *q.stride()[:2], *k.stride()[:2], *k.stride()[:2], *out.stride()[:2],
                       4, 36, 11, 0.25, HEAD_DIM=32, PRECISION="tf32", num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, **cfg.kwargs)

    results = compile_launches(launch, fn)
    assert len(results) == len(kernels._FWD_CONFIGS)
    assert all(r["spill_bytes"] == 0 for r in results), results


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="offline compile check (a GPU runs the real thing)")
def test_backward_configs_compile_for_sm90():
    """Every autotuning candidate of the two backward kernels at head dim 32 builds for sm_90 (bf16)."""
    from triton_testing import compile_launches

    from rdm_fast.kernels import attention as kernels

    t = torch.zeros(2, 37, 4 * 32, dtype=torch.bfloat16)
    stats = torch.zeros(2, 4, 37)
    for autotuned, configs, tensors in ((kernels._attn_bwd_dq_kernel, kernels._DQ_CONFIGS, 5),
                                        (kernels._attn_bwd_dkdv_kernel, kernels._DKDV_CONFIGS, 6)):
        fn = autotuned.fn
        strides = [*t.stride()[:2]] * tensors

        def launch():
            for cfg in configs:
                fn[(1, 8)](*[t] * tensors, stats, stats, *strides, 4, 37, 37, 0.25, 0.18, HEAD_DIM=32,
                           PRECISION="tf32", num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs)

        results = compile_launches(launch, fn)
        assert len(results) == len(configs), fn.fn.__name__
