"""Helpers of the Triton kernel tests: the interpreter child process, tolerances, and compiling kernels for a GPU
without one.

The Triton interpreter (``TRITON_INTERPRET=1``, read when a kernel module is imported) runs in a child process
so the variable does not leak into the pytest process. It forgives things compiled mode rejects (``tl.dot``
below 16 in a dimension, some dtype mismatches) and says nothing about registers, so :func:`compile_launches`
also compiles the kernels of a real launch for sm_90 on this machine (Triton's front end, LLVM and ptxas; no
driver needed) and reports ptxas' register and spill counts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from child_env import child_env


def run_child(script: str | Path, cwd: Path, timeout: float = 600, **env_vars: str) -> dict:
    """Run ``script`` with ``TRITON_INTERPRET=1`` (and ``env_vars``) in a fresh interpreter; returns the JSON of
    its last line."""
    env = child_env(TRITON_INTERPRET="1", **env_vars)
    result = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, f"interpreter run failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def interpreter_fixture(test_file: str, timeout: float = 600, **env_vars: str):
    """A module-scoped ``interpreter_results`` fixture: ``test_file`` run once as a script in the interpreter
    (its ``__main__`` prints a JSON dict: case -> None, or what went wrong)."""
    import pytest

    @pytest.fixture(scope="module")
    def interpreter_results(tmp_path_factory) -> dict[str, str | None]:
        return run_child(Path(test_file).resolve(), tmp_path_factory.mktemp("triton"), timeout, **env_vars)

    return interpreter_results


def print_results(results: dict[str, str | None]) -> None:
    """The child's side of :func:`interpreter_fixture`: the results as the last line of stdout."""
    print(json.dumps(results))


def check_result(results: dict[str, str | None], key: str) -> None:
    """Fail unless the child ran case ``key`` and it matched."""
    assert key in results, f"{key}: not run in the interpreter"
    assert results[key] is None, results[key]


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of the floating-point format of ``t`` at each value of ``t`` (as float32)."""
    fi = torch.finfo(t.dtype)
    return torch.exp2(torch.floor(torch.log2(t.float().abs().clamp_min(fi.tiny)))) * fi.eps


def mismatch(out: torch.Tensor, ref: torch.Tensor, *, rtol32: float, atol32: float, ulps: float = 1.0,
             atol16: float = 1e-5) -> str | None:
    """None when ``out`` matches ``ref``: float32 within ``atol32 + rtol32 |ref|``; float16/bfloat16 within
    ``ulps`` units in the last place (at the larger magnitude) plus ``atol16``. Else a description."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"got {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
    diff = (out.float() - ref.float()).abs()
    if out.dtype == torch.float32:
        bad = diff > atol32 + rtol32 * ref.abs()
    else:
        bad = diff > ulps * ulp(torch.maximum(out.abs(), ref.abs())) + atol16
    bad |= out.isnan() != ref.isnan()
    if bad.any():
        return f"{int(bad.sum())} of {bad.numel()} values out of tolerance, max abs diff {diff.max().item():.3g}"
    return None


_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64"}


def compile_launches(launch: Callable[[], object], kernel, arch: int = 90) -> list[dict]:
    """Compile, for ``sm_<arch>``, every launch of ``kernel`` that ``launch()`` makes (recorded, not run).

    Arguments are typed and specialised as Triton's launcher does (pointers and integers divisible by 16 are
    marked so; integers equal to 1 become constexprs unless the kernel says ``do_not_specialize``). Returns per
    launch ``{"constexprs", "registers", "spill_bytes"}`` from ``ptxas -v``.
    """
    import pytest
    import triton

    try:  # internal APIs of Triton 3.x: a Triton that moved them skips rather than fails the check
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this Triton cannot compile for a GPU offline ({exc})")

    calls = []

    def record(*args, grid=None, warmup=False, **kwargs):
        calls.append((args, kwargs))

    kernel.run = record  # instance attribute: shadows JITFunction.run for fn[grid](...)
    try:
        launch()
    finally:
        del kernel.run  # back to the class's method
    results = []
    for args, kwargs in calls:
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        assert len(args) <= len(kernel.arg_names), f"{len(args)} arguments for {kernel.arg_names}"
        values = dict(zip(kernel.arg_names, args), **kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(kernel.arg_names):
            v = values[name]
            if i in {p.num for p in kernel.params if p.is_constexpr}:
                signature[name], constexprs[name] = "constexpr", v
            elif torch.is_tensor(v):
                signature[name] = "*" + _TYPES[v.dtype]
                if v.data_ptr() % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, bool):
                signature[name] = "i1"
            elif isinstance(v, int) and v == 1 and not kernel.params[i].do_not_specialize:
                signature[name], constexprs[name] = "constexpr", 1  # as the launcher does: no .to() on it
            elif isinstance(v, int):
                signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[name] = "fp32"
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        ptx = Path(f"{os.environ.get('TMPDIR', '/tmp')}/rdm_fast_{os.getpid()}_{kernel.fn.__name__}.ptx")
        ptx.write_text(compiled.asm["ptx"])
        try:
            out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", os.devnull],
                                 capture_output=True, text=True, check=True)
        finally:
            ptx.unlink()
        log = out.stdout + out.stderr
        registers = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        results.append({"constexprs": constexprs, "registers": int(registers.group(1)) if registers else None,
                        "spill_bytes": int(spills.group(1)) if spills else 0})
    return results
