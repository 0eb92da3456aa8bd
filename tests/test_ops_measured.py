"""Measured: the per-shape choice between fast implementations by timing (the timer is faked here; the GPU tests
of geglu_linear and attention run the real one)."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from rdm_fast.ops._measured import Measured

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture
def timings(monkeypatch):
    """Fake ``triton.testing.do_bench``: the time of each candidate comes from ``times[name]``."""
    import triton.testing

    times: dict[str, float] = {}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: times[fn()])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # no GPU here
    return times


def _candidates(calls: list):
    def make(name):
        def fn(x):
            calls.append(name)
            return name
        return fn
    return {"kernel": make("kernel"), "vendor": make("vendor")}


def test_measures_once_per_key_and_keeps_the_fastest(timings, caplog):
    calls = []
    m = Measured("op", _candidates(calls))
    timings.update(kernel=2.0, vendor=1.0)
    with caplog.at_level(logging.INFO, logger="rdm_fast.ops"):
        assert m("shape-a", lambda: "shape a", 0) == "vendor"
    assert "op at shape a: kernel 2.000 ms, vendor 1.000 ms -> vendor" in caplog.text
    calls.clear()
    timings.update(kernel=0.5)  # a later change of speed does not re-open a decided shape
    assert m("shape-a", lambda: "unused", 0) == "vendor" and calls == ["vendor"]
    assert m("shape-b", lambda: "shape b", 0) == "kernel"  # a new shape is measured afresh
    assert m.chosen == {"shape-a": "vendor", "shape-b": "kernel"}


def test_inside_a_graph_capture_runs_the_last_candidate_without_deciding(timings, monkeypatch):
    calls = []
    m = Measured("op", _candidates(calls))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert m("shape", lambda: "shape", 0) == "vendor" and calls == ["vendor"] and m.chosen == {}


def test_a_failing_candidate_is_left_out_visibly(timings, caplog):
    def broken(x):
        raise RuntimeError("no kernel for this shape")

    m = Measured("op", {"kernel": broken, "vendor": lambda x: "vendor"})
    timings.update(vendor=1.0)
    with caplog.at_level(logging.WARNING, logger="rdm_fast.ops"):
        assert m("shape", lambda: "shape", 0) == "vendor"
    assert "kernel failed (RuntimeError: no kernel for this shape)" in caplog.text
    with pytest.raises(RuntimeError, match="no kernel"):
        Measured("op", {"kernel": broken})("shape", lambda: "shape", 0)
