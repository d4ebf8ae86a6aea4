"""The wall-clock harness, on a fake clock: alternation, chunking and medians, no real timing."""

from __future__ import annotations

import pytest
import torch

from dynets.bench import wallclock
from dynets.bench.wallclock import compare_wallclock, split_batches


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_compare_wallclock_ratio_and_chunked_alternation(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(wallclock.time, "perf_counter", clock.perf_counter)
    calls = []

    def static(b):  # 2 ms per sample
        calls.append("s")
        clock.now += 0.002 * b.shape[0]

    def dynamic(b):  # 0.5 ms per sample, plus a burst of load that hits every 7th call
        calls.append("d")
        clock.now += 0.0005 * b.shape[0] + (0.05 if len(calls) % 7 == 0 else 0.0)

    batches = split_batches(torch.zeros(40, 3), 4)
    assert len(batches) == 10 and batches[-1].shape[0] == 4
    out = compare_wallclock(static, dynamic, batches, rounds=5, warmup=0, chunks=5)
    assert out["samples"] == 40 and out["chunks"] == 5 and out["rounds"] == 5
    assert out["static_s"] == pytest.approx(0.08)  # 40 samples x 2 ms, every round
    assert out["speedup"] <= 4.0  # the bursts slow the dynamic side, never speed it up
    assert calls[:4] == ["s", "s", "d", "d"]  # group 1: static first ...
    assert calls[4:8] == ["d", "d", "s", "s"]  # ... group 2: dynamic first
    quiet = compare_wallclock(
        static, lambda b: clock.__setattr__("now", clock.now + 0.0005 * b.shape[0]), batches, chunks=99
    )
    assert quiet["speedup"] == pytest.approx(4.0) and quiet["chunks"] == 10  # at most one group per batch


def test_compare_wallclock_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one batch"):
        compare_wallclock(lambda b: None, lambda b: None, [])
    with pytest.raises(ValueError, match="rounds"):
        compare_wallclock(lambda b: None, lambda b: None, [torch.zeros(1)], rounds=0)
    with pytest.raises(ValueError, match="chunks"):
        compare_wallclock(lambda b: None, lambda b: None, [torch.zeros(1)], chunks=0)
