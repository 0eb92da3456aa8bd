"""bench/'s suites and GPU check script, run here without timing anything or a GPU."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from rdm_fast import ops
from rdm_fast.ops import _dispatch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_db_build  # noqa: E402
import bench_step  # noqa: E402
import bench_encoders  # noqa: E402


def fake_benchmark(stats=None) -> SimpleNamespace:
    """pytest-benchmark's fixture as far as the suites use it; ``stats`` None as under ``--benchmark-disable``
    (``pedantic`` then calls the function once and records nothing)."""
    return SimpleNamespace(pedantic=lambda target, args=(), kwargs=None, **_: target(*args, **(kwargs or {})),
                           stats=stats, extra_info={})


def test_throughput_figures_only_from_timed_runs():
    """``pytest bench/ --benchmark-disable`` (a quick pass of the suites) failed in the encoder and database-build
    benchmarks, which read ``benchmark.stats`` (None there) for their images/s; timed runs still record them."""
    calls = []
    disabled = fake_benchmark()
    bench_encoders._run(disabled, lambda: calls.append(1), "cpu", 8)
    bench_db_build.record_rate(disabled, workers=2, encoder="clip")
    assert len(calls) == 2 and disabled.extra_info == {"workers": 2, "encoder": "clip"}

    timed = fake_benchmark(SimpleNamespace(stats=SimpleNamespace(mean=0.5)))
    bench_encoders._run(timed, lambda: None, "cpu", 8)
    assert timed.extra_info == {"images_per_s": 16.0}
    timed = fake_benchmark({"median": 2.0})
    bench_db_build.record_rate(timed, workers=0, encoder="clip")
    assert timed.extra_info == {"images_per_s": bench_db_build.N_IMAGES / 2.0, "workers": 0, "encoder": "clip"}


def test_gpu_check_rejects_an_unknown_mode_before_any_work(tmp_path):
    """A mistyped mode ends gpu_check.sh before it writes anything or starts Python (it queried the GPU and imported
    torch first, out of a short lease)."""
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "ful"], capture_output=True, text=True,
                         env={**os.environ, "OUT": str(out), "PYTHON": sys.executable}, timeout=120)
    assert run.returncode == 2 and "unknown mode 'ful'" in run.stdout
    assert not out.exists()


def test_ops_ran_names_the_implementation_each_op_took():
    """The step, UNet, decoder and training benchmarks record which implementation each op took in their warm-up:
    on the CPU, an auto-mode UNet call runs the C++ GroupNorm (where built) and the references of the other ops,
    though ``fast_backends`` reports Triton and the CUDA extension loaded."""
    model, x, ctx = bench_step.make_case("tiny", 1, torch.device("cpu"), torch.float32)
    t = torch.full((1,), 500)
    first_use = _dispatch.log_first_use
    ran = {}
    for mode in ("auto", "reference"):
        with ops.use_mode(mode), torch.inference_mode(), bench_step.ops_ran() as ran[mode]:
            model.unet(x, t, ctx)
    assert _dispatch.log_first_use is first_use
    assert {"group_norm", "attention", "layer_norm", "geglu"} <= ran["reference"].keys() <= ran["auto"].keys()
    assert all(impls == ["reference"] for impls in ran["reference"].values())
    assert ran["auto"]["group_norm"] == ["cpu-ext" if ops.available_backends()["cpu-ext"] else "reference"]
    assert all(impls == ["reference"] for op, impls in ran["auto"].items() if op != "group_norm")
