"""Configure and build the CMake project (CMakeLists.txt), then check the built libraries.

Slow (a clean build takes about a minute here, the CUDA target included): marked ``slow``. The build
folder is cached in ``<repo>/build/cmake-test`` (override with ``RDM_FAST_CMAKE_BUILD_DIR``). The CPU
target is always built; the CUDA target only when nvcc is found and torch is a CUDA build, for a
single architecture (sm_90) to keep the time down. The libraries are loaded in a child process:
the installed ``rdm_fast._C`` registers the same operator schema, which may exist only once per
process; ``rdm_fast.ops.group_norm`` is imported there for the reference only and must not load it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from child_env import child_env


REPO = Path(__file__).resolve().parents[1]
BUILD_DIR = Path(os.environ.get("RDM_FAST_CMAKE_BUILD_DIR", REPO / "build" / "cmake-test"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed"),
]


def _find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    candidates += [str(Path(os.environ[v]) / "bin" / "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cmake_build() -> dict[str, Path | None]:
    """Paths of the built libraries ({"cpu": ..., "cuda": ... or None})."""
    nvcc = _find_nvcc() if torch.version.cuda else None
    configure = ["cmake", "-S", str(REPO), "-B", str(BUILD_DIR), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if nvcc:
        configure += ["-DRDM_FAST_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_CUDA_ARCHITECTURES=90"]
    else:
        configure += ["-DRDM_FAST_CUDA=OFF"]
    result = _run(configure, 300)
    if result.returncode != 0 and (BUILD_DIR / "CMakeCache.txt").exists():
        shutil.rmtree(BUILD_DIR)  # stale cache (moved checkout, other torch); start clean once
        result = _run(configure, 300)
    assert result.returncode == 0, f"cmake configure failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    result = _run(["cmake", "--build", str(BUILD_DIR), "--parallel", str(os.cpu_count() or 2)], 900)
    assert result.returncode == 0, f"cmake build failed:\n{result.stdout[-5000:]}\n{result.stderr[-3000:]}"
    cuda_lib = BUILD_DIR / "librdm_fast_ops_cuda.so"
    return {"cpu": BUILD_DIR / "librdm_fast_ops.so", "cuda": cuda_lib if nvcc else None}


def _run_child(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300
    )


CHECK_CPU = r"""
import sys
import torch
from rdm_fast.ops.group_norm import group_norm_reference

torch.ops.load_library(sys.argv[1])
assert "rdm_fast._C" not in sys.modules, "importing rdm_fast.ops.group_norm loaded the extension"
torch.manual_seed(0)
cases = [((3, 96, 7, 5), 32), ((2, 32, 33, 17), 32), ((3, 48, 19), 6), ((2, 32, 3, 5, 7), 8), ((4, 64), 16)]
n = 0
for shape, groups in cases:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for cl in (False, True) if len(shape) == 4 else (False,):
            x = (torch.randn(shape) + 0.5).to(dtype)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            w, b, add = torch.randn(shape[1]), torch.randn(shape[1]), torch.randn(shape[:2])
            out = torch.ops.rdm_fast.group_norm(x, w, b, groups, 1e-5, add, True)
            ref = group_norm_reference(x, w, b, groups, 1e-5, add=add, silu=True)
            assert out.stride() == ref.stride() and out.dtype == ref.dtype
            tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
            torch.testing.assert_close(out, ref, rtol=tol, atol=1e-5 + tol)
            n += 1
print("checked", n)
"""

CHECK_CUDA = r"""
import sys
import torch

torch.ops.load_library(sys.argv[1])
torch.ops.load_library(sys.argv[2])
assert torch._C._dispatch_has_kernel_for_dispatch_key("rdm_fast::group_norm", "CUDA")
if torch.cuda.is_available():
    from rdm_fast.ops.group_norm import group_norm_reference

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 128, 16, 16, device="cuda").to(dtype).to(memory_format=torch.channels_last)
        add = torch.randn(4, 128, device="cuda")
        out = torch.ops.rdm_fast.group_norm(x, None, None, 32, 1e-5, add, True)
        ref = group_norm_reference(x, None, None, 32, 1e-5, add=add, silu=True)
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(out, ref, rtol=tol, atol=2e-5 + tol)
print("ok")
"""


def test_cmake_cpu_library_matches_reference(cmake_build, tmp_path):
    assert cmake_build["cpu"].is_file()
    result = _run_child(CHECK_CPU, tmp_path, str(cmake_build["cpu"]))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "checked 21" in result.stdout


def test_cmake_cuda_library_registers_cuda_kernel(cmake_build, tmp_path):
    if cmake_build["cuda"] is None:
        pytest.skip("nvcc not found or torch is not a CUDA build: CUDA target not built")
    assert cmake_build["cuda"].is_file()
    result = _run_child(CHECK_CUDA, tmp_path, str(cmake_build["cpu"]), str(cmake_build["cuda"]))
    assert result.returncode == 0, result.stderr[-4000:]
