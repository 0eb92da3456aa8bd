"""Measured: the per-shape choice between fast implementations by timing (the timer is faked here; the GPU tests
of attention, and the one of ``replay_time`` below, run the real one)."""

from __future__ import annotations

import logging

import pytest
import torch

from rdm_fast.ops import _measured
from rdm_fast.ops._measured import Measured, replay_time


@pytest.fixture
def timings(monkeypatch):
    """Fake ``replay_time``: the time of each candidate comes from ``times[name]`` (a missing name: the
    candidate cannot be captured)."""
    times: dict[str, float] = {}

    def fake(fn, **kw):
        name = fn()
        if name not in times:
            raise RuntimeError("operation not permitted when stream is capturing")
        return times[name]

    monkeypatch.setattr(_measured, "replay_time", fake)
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


def test_a_candidate_that_runs_but_cannot_be_timed_is_left_out(timings, caplog):
    calls = []
    m = Measured("op", _candidates(calls))
    timings.update(vendor=1.0)  # "kernel" runs eagerly but its capture fails
    with caplog.at_level(logging.WARNING, logger="rdm_fast.ops"):
        assert m("shape", lambda: "shape", 0) == "vendor"
    assert "kernel could not be timed in a CUDA graph (RuntimeError: operation not permitted" in caplog.text


def test_with_nothing_timed_the_last_candidate_that_ran_is_chosen(timings, caplog):
    def broken(x):
        raise RuntimeError("no kernel for this shape")

    calls = []
    m = Measured("op", {**_candidates(calls), "vendor2": broken})
    with caplog.at_level(logging.WARNING, logger="rdm_fast.ops"):
        assert m("shape", lambda: "shape", 0) == "vendor"
    assert "no candidate could be timed; vendor runs untimed" in caplog.text and m.chosen == {"shape": "vendor"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_replay_time_counts_per_call_gpu_time():
    """One matrix product of 4096^3 takes more GPU time than one of 256^3 (by far more than the graph's launch
    cost), the per-call figure does not depend on how many calls the graph holds, and the calls ran."""
    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(4096, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    small = torch.randn(256, 256, device="cuda", generator=g, dtype=torch.bfloat16)
    out = torch.full((4096, 4096), float("nan"), device="cuda", dtype=torch.bfloat16)
    torch.mm(big, big, out=out)  # warm-up outside the graph
    want = big.float() @ big.float()
    out.fill_(float("nan"))  # from here on only the graph replays write it
    t_big = replay_time(lambda: torch.mm(big, big, out=out))
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=1.0)
    out.fill_(float("nan"))
    t_big4 = replay_time(lambda: torch.mm(big, big, out=out), calls=4)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=1.0)
    t_small = replay_time(lambda: torch.mm(small, small))
    assert t_big > 10 * t_small > 0, (t_big, t_small)
    assert 0.7 < t_big / t_big4 < 1.4, (t_big, t_big4)
