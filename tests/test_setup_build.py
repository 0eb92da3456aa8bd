"""setup.py's build: an extension it does not build is not installed from an earlier build's leftovers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
def test_build_without_cuda_removes_an_earlier_cuda_extension(tmp_path):
    """``build/lib*`` outlives a build: a _C_cuda built earlier (e.g. against a CUDA torch since replaced) was
    shipped by a later ``RDM_FAST_BUILD_CUDA=0`` or CPU-torch build, and failed to load."""
    spec = importlib.util.find_spec("rdm_fast._C")
    if spec is None or spec.origin is None:
        pytest.skip("rdm_fast._C is not built")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    src = tmp_path / "src"
    for f in tracked.decode().split("\0"):
        if f and (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)  # sources keep their times: the built _C below is up to date
    lib = tmp_path / "lib" / "rdm_fast"
    lib.mkdir(parents=True)
    built = shutil.copy2(spec.origin, lib / Path(spec.origin).name)
    os.utime(built)
    stale = lib / Path(spec.origin).name.replace("_C.", "_C_cuda.", 1)
    stale.write_bytes(b"built against another torch")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib")],
                       cwd=src, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "RDM_FAST_BUILD_CUDA": "0"})
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and "removing" in r.stdout
    assert (lib / Path(spec.origin).name).is_file()
