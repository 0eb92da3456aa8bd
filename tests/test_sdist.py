"""The source distribution (``python setup.py sdist``) holds every file a build from it needs.

setuptools packs the packages and the extensions' listed sources by default, not the C++ headers they include:
an sdist without MANIFEST.in failed to compile. The check compares the sdist's files with the git checkout's
tracked ones (so it runs in a checkout only; an unpacked sdist has no git history to compare with)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_SHIPPED = (".ci/", ".gitignore", "bench/results/")  # CI's script, git's settings, raw benchmark outputs


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
def test_sdist_holds_every_tracked_source_file(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = [f for f in tracked.decode().split("\0") if f and (REPO / f).is_file()]
    src = tmp_path / "src"  # a copy, so the sdist's egg-info is written there and not into the checkout
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
    missing = sorted(f for f in files if not f.startswith(NOT_SHIPPED) and f not in packed)
    assert not missing, f"tracked files missing from the sdist (add them to MANIFEST.in): {missing}"
    assert any(f.startswith("csrc/") and f.endswith(".h") for f in packed)  # the headers that were missing
