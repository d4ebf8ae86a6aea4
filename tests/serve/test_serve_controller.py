"""The SLO controller against a simulated server under a load step: it moves to cheaper operating
points as load rises (keeping p95 within the SLO where the fixed point breaks it) and back when
load falls. Simulated time, so no sleeps and no timing assertions on the real machine."""

from __future__ import annotations

import math
import random
from collections import deque

import pytest

from dynets.serve.controller import ControllerConfig, SLOController

COSTS = [1.0, 0.8, 0.62, 0.47, 0.33]  # the ladder's cost ratios, most accurate first
SEC_FULL = 0.002  # seconds per sample at full cost: 500 samples/s at level 0, ~1500/s at the cheapest
OVERHEAD = 0.001  # per batch
SLO = 0.100
PHASES = [(3.0, 150.0), (6.0, 900.0), (7.0, 150.0)]  # (duration s, arrivals per second)


def simulate(adaptive: bool, seed: int = 0, *, overhead=OVERHEAD, sec_full=SEC_FULL, phases=PHASES):
    """Poisson arrivals, one worker taking up to 32 queued samples per batch; returns per-request
    (arrival time, latency) and the level over time."""
    rng = random.Random(seed)
    ctrl = SLOController(COSTS, ControllerConfig(slo_s=SLO, batch_delay_s=0.0))
    ctrl.calibrate([(32, overhead + sec_full * 32), (1, overhead + sec_full)])  # the warm-up measurements
    arrivals, t = [], 0.0
    for duration, rate in phases:
        end = t + duration
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                t = end
                break
            arrivals.append(t)
    queue: deque[float] = deque()
    done, levels = [], []
    now, i, next_tick = 0.0, 0, 0.0
    while i < len(arrivals) or queue:
        if not queue and i < len(arrivals) and arrivals[i] > now:
            now = arrivals[i]
        while i < len(arrivals) and arrivals[i] <= now:
            queue.append(arrivals[i])
            ctrl.observe_arrival(arrivals[i])
            i += 1
        if adaptive and now >= next_tick:
            ctrl.update(now, len(queue))
            next_tick = now + 0.05
        batch = [queue.popleft() for _ in range(min(32, len(queue)))]
        level = ctrl.level if adaptive else 0
        seconds = overhead + sec_full * COSTS[level] * len(batch)
        now += seconds
        ctrl.observe_batch(seconds, COSTS[level] * len(batch), len(batch))
        for a in batch:
            done.append((a, now - a))
            ctrl.observe_latency(now, now - a)
        levels.append((now, level))
        if adaptive:
            ctrl.update(now, len(queue))
    return done, levels, ctrl


def p95(values: list[float]) -> float:
    v = sorted(values)
    return v[math.ceil(0.95 * len(v)) - 1]


def window(done, start: float, end: float) -> list[float]:
    return [lat for a, lat in done if start <= a < end]


def level_at(levels, t: float) -> int:
    return next((lv for when, lv in levels if when >= t), levels[-1][1])


def test_controller_moves_down_under_load_and_back_when_it_falls():
    fixed, _, _ = simulate(adaptive=False)
    done, levels, ctrl = simulate(adaptive=True)
    assert len(done) == len(fixed)  # every request answered
    # low load: the most accurate point, within the SLO
    assert {lv for when, lv in levels if when < 3.0} == {0}
    assert p95(window(done, 0.5, 3.0)) <= SLO
    # 900/s is 1.8x what the most accurate point serves: the fixed server breaks the SLO ...
    assert p95(window(fixed, 5.0, 9.0)) > 5 * SLO
    # ... the controller moves to a cheaper point within a second, and p95 stays within the SLO
    assert level_at(levels, 4.0) >= 2
    assert p95(window(done, 4.0, 9.0)) <= SLO
    # load falls: back to the most accurate point, without flapping on the way
    assert level_at(levels, 15.9) == 0
    assert p95(window(done, 10.0, 16.0)) <= SLO
    assert ctrl.changes <= 12


def test_controller_returns_to_the_accurate_point_when_batches_are_mostly_overhead():
    """At light load batches hold one or two samples and their time is mostly fixed overhead; the
    time model must not read that overhead as per-sample cost (else, once load has pushed it to a
    cheap point, the accurate points look unaffordable at any load and it never moves back)."""
    phases = [(3.0, 100.0), (5.0, 1500.0), (8.0, 100.0)]
    kw = {"overhead": 0.004, "sec_full": 0.0008, "phases": phases}
    fixed, _, _ = simulate(adaptive=False, **kw)
    done, levels, ctrl = simulate(adaptive=True, **kw)
    assert p95(window(fixed, 4.0, 8.0)) > 5 * SLO  # 1500/s overloads the most accurate point
    assert level_at(levels, 5.0) >= 2 and p95(window(done, 4.0, 8.0)) <= SLO
    assert level_at(levels, 15.9) == 0  # light load again: back at the most accurate point
    assert p95(window(done, 9.0, 16.0)) <= SLO
    overhead, spu = ctrl.overhead_s, ctrl.sec_per_unit
    assert overhead == pytest.approx(0.004, rel=0.05) and spu == pytest.approx(0.0008, rel=0.05)


def test_controller_time_model_fits_overhead_and_per_sample_cost():
    ctrl = SLOController(COSTS, ControllerConfig(slo_s=SLO))
    assert ctrl.sec_per_unit is None and ctrl.predicted_latency(0, 10) == 0.0
    for n in (1, 2, 3, 1, 2, 8, 16, 4):  # seconds = 3 ms + 0.5 ms per unit of cost
        ctrl.observe_batch(0.003 + 0.0005 * n * 0.5, n * 0.5, n)
    assert ctrl.overhead_s == pytest.approx(0.003) and ctrl.sec_per_unit == pytest.approx(0.0005)
    assert ctrl.estimate_batch_seconds(10, 0) == pytest.approx(0.003 + 10 * 0.0005)
    same = SLOController(COSTS, ControllerConfig(slo_s=SLO))
    same.calibrate([(1.0, 0.004), (32.0, 0.035)])  # anchors: 3 ms + 1 ms per unit
    for _ in range(10):
        same.observe_batch(0.005, 2.0, 2)  # one batch size only: the anchors keep the overhead
    assert same.overhead_s == pytest.approx(0.003, rel=0.2) and same.sec_per_unit < 0.0015
    with pytest.raises(ValueError, match="cost_units > 0"):
        same.calibrate([(0.0, 0.1)])
    with pytest.raises(ValueError, match="fit_batches"):
        ControllerConfig(slo_s=1, fit_batches=1)


def test_controller_holds_steady_load_without_flapping():
    ctrl = SLOController(COSTS, ControllerConfig(slo_s=SLO))
    ctrl.observe_batch(SEC_FULL * 10, 10)
    now = 0.0
    for _ in range(400):  # 20 s at a constant 600/s: needs level >= 1 (util 1.2 at level 0)
        now += 0.05
        ctrl.observe_arrival(now, 30)
        ctrl.observe_latency(now, 0.02)
        ctrl.update(now, queue_depth=8)
    assert ctrl.level >= 1 and ctrl.utilization(ctrl.level, 600) <= ctrl.config.target_utilization
    assert ctrl.changes <= 3


def test_controller_reacts_to_observed_latency_and_validates_config():
    ctrl = SLOController(COSTS, ControllerConfig(slo_s=SLO, hold_s=0.5))
    ctrl.observe_batch(0.001, 10)  # the time model says everything fits ...
    for k in range(20):
        ctrl.observe_latency(0.01 * k, 0.3)  # ... but requests take 3x the SLO
    ctrl.update(0.2, queue_depth=0)
    assert ctrl.level == 1
    for k in range(20, 40):
        ctrl.observe_latency(0.05 * k, 0.3)  # still slow, but the window still holds the old spell
    ctrl.update(1.0, queue_depth=0)
    assert ctrl.level == 1  # one p95-driven step per window, not one per tick
    ctrl.update(2.3, queue_depth=0)
    assert ctrl.level == 2  # a whole window later and still over the SLO: one more
    with pytest.raises(ValueError, match="latency SLO"):
        ControllerConfig(slo_s=0)
    with pytest.raises(ValueError, match="target_utilization"):
        ControllerConfig(slo_s=1, target_utilization=1.5)
    single = SLOController([1.0], ControllerConfig(slo_s=SLO))
    single.observe_batch(1.0, 1)
    assert single.update(1.0, 1000) == 0  # one point: nowhere to move
