"""The latency-SLO controller: moves the operating point along the ladder as load rises and falls.

Pure logic with an injected clock (every method takes `now`), so it is tested with a simulated
server and load, without threads or sleeps. Level 0 is the most accurate point; higher levels
are cheaper. From what the server reports it keeps

  - the arrival rate (samples/s) and the p95 latency over a sliding window,
  - seconds per unit of cost: batch time / sum of the batch's per-sample cost fractions (an
    EMA), so the time a batch takes at another level is predicted from its calibrated cost.

and on each `update(now, queue_depth)` picks the most accurate level L with

  utilisation   rate * sec_per_unit * cost[L]            <= target_utilization
  queue drain   (queue + 1) * sec_per_unit * cost[L] + delay <= latency_headroom * SLO

If the observed p95 already exceeds the SLO it goes at least one level cheaper than now. Moving
cheaper happens at once; moving back to a more accurate level goes one step at a time, only after
`hold_s` without a change, with p95 well inside the SLO and the utilisation at the more accurate
level below `up_margin` * target (hysteresis, so the point does not flap at a load boundary).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass
class ControllerConfig:
    slo_s: float
    target_utilization: float = 0.8
    latency_headroom: float = 0.6
    window_s: float = 2.0  # sliding window for p95 latency and arrival rate
    hold_s: float = 1.0  # no move to a more accurate level within this long after any change
    up_margin: float = 0.75  # move up only if utilisation there <= up_margin * target
    p95_up_fraction: float = 0.6  # ... and the observed p95 <= this fraction of the SLO
    batch_delay_s: float = 0.0  # the batcher's max delay, part of every request's latency
    ema: float = 0.3  # weight of the newest batch in sec_per_unit

    def __post_init__(self) -> None:
        if not (self.slo_s > 0 and math.isfinite(self.slo_s)):
            raise ValueError(f"latency SLO: expected a positive number of seconds, got {self.slo_s!r}")
        for name in ("target_utilization", "latency_headroom", "up_margin", "p95_up_fraction", "ema"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name}: expected a value in (0, 1], got {v!r}")


class SLOController:
    """Chooses the ladder level; `cost_ratios` (most accurate first) are the levels' mean costs."""

    def __init__(self, cost_ratios: Sequence[float], config: ControllerConfig, *, level: int = 0) -> None:
        if not cost_ratios:
            raise ValueError("cost_ratios: expected at least one level")
        self.costs = [float(c) for c in cost_ratios]
        self.config = config
        self.level = int(level)
        self.sec_per_unit: float | None = None
        self.last_change = -math.inf
        self.changes = 0
        self._arrivals: deque[tuple[float, int]] = deque()
        self._latencies: deque[tuple[float, float]] = deque()

    # ------------------------------------------------------------------ observations
    def observe_arrival(self, now: float, n: int = 1) -> None:
        self._arrivals.append((now, n))

    def observe_latency(self, now: float, seconds: float) -> None:
        self._latencies.append((now, seconds))

    def observe_batch(self, seconds: float, cost_units: float) -> None:
        """A batch took `seconds` for samples whose cost fractions add up to `cost_units`."""
        if cost_units <= 0 or not math.isfinite(seconds):
            return
        spu = seconds / cost_units
        a = self.config.ema
        self.sec_per_unit = spu if self.sec_per_unit is None else (1 - a) * self.sec_per_unit + a * spu

    def _trim(self, now: float) -> None:
        cut = now - self.config.window_s
        while self._arrivals and self._arrivals[0][0] < cut:
            self._arrivals.popleft()
        while self._latencies and self._latencies[0][0] < cut:
            self._latencies.popleft()

    def arrival_rate(self, now: float) -> float:
        self._trim(now)
        return sum(n for _, n in self._arrivals) / self.config.window_s

    def p95(self, now: float) -> float | None:
        self._trim(now)
        if len(self._latencies) < 5:
            return None
        v = sorted(s for _, s in self._latencies)
        return v[min(len(v) - 1, math.ceil(0.95 * len(v)) - 1)]

    # ------------------------------------------------------------------ predictions
    def utilization(self, level: int, rate: float) -> float:
        return 0.0 if self.sec_per_unit is None else rate * self.sec_per_unit * self.costs[level]

    def predicted_latency(self, level: int, queue_depth: int) -> float:
        if self.sec_per_unit is None:
            return 0.0
        return (queue_depth + 1) * self.sec_per_unit * self.costs[level] + self.config.batch_delay_s

    def estimate_batch_seconds(self, n: int, level: int) -> float:
        return 0.0 if self.sec_per_unit is None else n * self.sec_per_unit * self.costs[level]

    # ------------------------------------------------------------------ decision
    def _fits(self, level: int, rate: float, queue_depth: int, util_scale: float = 1.0) -> bool:
        c = self.config
        return (
            self.utilization(level, rate) <= util_scale * c.target_utilization
            and self.predicted_latency(level, queue_depth) <= c.latency_headroom * c.slo_s
        )

    def update(self, now: float, queue_depth: int) -> int:
        """Re-decide the level from the current load; returns it."""
        c, last = self.config, len(self.costs) - 1
        if last == 0 or self.sec_per_unit is None:
            return self.level
        rate, p95 = self.arrival_rate(now), self.p95(now)
        want = next((L for L in range(last + 1) if self._fits(L, rate, queue_depth)), last)
        if p95 is not None and p95 > c.slo_s and now - self.last_change >= c.window_s / 4:
            want = max(want, min(self.level + 1, last))
        if want > self.level:
            self._set(want, now)
        elif want < self.level and now - self.last_change >= c.hold_s:
            up = self.level - 1
            calm = p95 is None or p95 <= c.p95_up_fraction * c.slo_s
            if calm and self._fits(up, rate, queue_depth, c.up_margin):
                self._set(up, now)
        return self.level

    def _set(self, level: int, now: float) -> None:
        self.level, self.last_change = level, now
        self.changes += 1

    def state(self, now: float) -> dict[str, object]:
        return {
            "level": self.level,
            "cost_ratio": self.costs[self.level],
            "arrival_rate": self.arrival_rate(now),
            "p95_s": self.p95(now),
            "sec_per_unit": self.sec_per_unit,
            "changes": self.changes,
            "config": asdict(self.config),
        }
