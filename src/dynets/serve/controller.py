"""The latency-SLO controller: moves the operating point along the ladder as load rises and falls.

Pure logic with an injected clock (every method takes `now`), so it is tested with a simulated
server and load, without threads or sleeps. Level 0 is the most accurate point; higher levels
are cheaper. From what the server reports it keeps

  - the arrival rate (samples/s) and the p95 latency over a sliding window,
  - a time model of one batch, seconds = overhead + sec_per_unit * cost_units, where cost_units
    is the sum of the batch's per-sample cost fractions: a least-squares line through the last
    `fit_batches` batches, anchored by the warm-up measurements (`calibrate`). The fixed
    per-batch overhead matters: at light load batches are small and their time is mostly
    overhead, and a model without it would read that overhead as per-sample cost, conclude that
    the accurate levels cannot keep up, and never move back to them.
  - the mean batch size (an EMA), which spreads the overhead over the samples of a batch.

and on each `update(now, queue_depth)` picks the most accurate level L with

  utilisation   rate * (sec_per_unit * cost[L] + overhead / mean_batch)  <= target_utilization
  queue drain   overhead + (queue + 1) * sec_per_unit * cost[L] + delay  <= latency_headroom * SLO

If the observed p95 exceeds the SLO it goes at least one level cheaper than now (at most once per
window: a single slow spell keeps the window's p95 high until it has passed). Moving cheaper
happens at once; moving back goes to the most accurate level whose utilisation is below
`up_margin` * target, only after `hold_s` without a change and with p95 well inside the SLO
(hysteresis, so the point does not flap at a load boundary).
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
    ema: float = 0.3  # weight of the newest batch in the mean batch size
    fit_batches: int = 64  # recent batches in the least-squares time model
    prior_weight: float = 8.0  # each warm-up measurement counts as this many batches in the fit

    def __post_init__(self) -> None:
        if not (self.slo_s > 0 and math.isfinite(self.slo_s)):
            raise ValueError(f"latency SLO: expected a positive number of seconds, got {self.slo_s!r}")
        for name in ("target_utilization", "latency_headroom", "up_margin", "p95_up_fraction", "ema"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name}: expected a value in (0, 1], got {v!r}")
        if int(self.fit_batches) < 2:
            raise ValueError(f"fit_batches: expected an int >= 2, got {self.fit_batches!r}")
        if not self.prior_weight >= 0:
            raise ValueError(f"prior_weight: expected a number >= 0, got {self.prior_weight!r}")


class SLOController:
    """Chooses the ladder level; `cost_ratios` (most accurate first) are the levels' mean costs."""

    def __init__(self, cost_ratios: Sequence[float], config: ControllerConfig, *, level: int = 0) -> None:
        if not cost_ratios:
            raise ValueError("cost_ratios: expected at least one level")
        self.costs = [float(c) for c in cost_ratios]
        self.config = config
        self.level = int(level)
        self.last_change = -math.inf
        self.changes = 0
        self._arrivals: deque[tuple[float, int]] = deque()
        self._latencies: deque[tuple[float, float]] = deque()
        self._batches: deque[tuple[float, float]] = deque(maxlen=int(config.fit_batches))
        self._prior: list[tuple[float, float]] = []
        self._fit: tuple[float, float] | None = None  # (overhead s, sec_per_unit), None = stale
        self.mean_batch = 1.0

    # ------------------------------------------------------------------ observations
    def observe_arrival(self, now: float, n: int = 1) -> None:
        self._arrivals.append((now, n))

    def observe_latency(self, now: float, seconds: float) -> None:
        self._latencies.append((now, seconds))

    def calibrate(self, measurements: Sequence[tuple[float, float]]) -> None:
        """Anchor the time model with warm-up measurements, (cost_units, seconds) pairs; two of them
        at different batch sizes (one sample and a full batch) separate the fixed per-batch overhead
        from the per-sample cost. Replaces earlier anchors; keeps the batches seen since."""
        pts = [(float(u), float(s)) for u, s in measurements]
        bad = [p for p in pts if not (p[0] > 0 and math.isfinite(p[0]) and p[1] >= 0 and math.isfinite(p[1]))]
        if bad:
            raise ValueError(f"calibrate: expected (cost_units > 0, seconds >= 0) pairs, got {bad[0]}")
        self._prior, self._fit = pts, None

    def observe_batch(self, seconds: float, cost_units: float, n: int | None = None) -> None:
        """A batch of `n` samples took `seconds`; their cost fractions add up to `cost_units`."""
        if cost_units <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        self._batches.append((float(cost_units), float(seconds)))
        self._fit = None
        if n is not None and n > 0:
            a = self.config.ema
            self.mean_batch = max(1.0, (1 - a) * self.mean_batch + a * n)

    def _time_model(self) -> tuple[float, float] | None:
        """(overhead, sec_per_unit): weighted least squares through the recent batches and the
        warm-up anchors, with overhead >= 0 and sec_per_unit > 0; None before any measurement."""
        if self._fit is not None:
            return self._fit
        w0 = self.config.prior_weight
        pts = [(u, s, 1.0) for u, s in self._batches] + [(u, s, w0) for u, s in self._prior if w0 > 0]
        if not pts:
            return None
        W = sum(w for *_, w in pts)
        mu = sum(w * u for u, _, w in pts) / W
        mt = sum(w * s for _, s, w in pts) / W
        suu = sum(w * (u - mu) ** 2 for u, _, w in pts)
        sut = sum(w * (u - mu) * (s - mt) for u, s, w in pts)
        if suu > W * (0.05 * mu) ** 2 and sut > 0:  # enough spread in batch cost to fit a line
            spu = sut / suu
            overhead = mt - spu * mu
            if overhead < 0:  # a line through the origin instead
                overhead = 0.0
                spu = sum(w * u * s for u, s, w in pts) / sum(w * u * u for u, _, w in pts)
        else:  # one batch size only: keep the anchors' overhead (if any), the rest is per unit
            overhead = 0.0
            if len(self._prior) >= 2 and w0 > 0:  # the anchors' line: smallest and largest batch
                (u0, s0), (u1, s1) = min(self._prior), max(self._prior)
                if u1 > u0:
                    overhead = s0 - max((s1 - s0) / (u1 - u0), 0.0) * u0
            overhead = min(overhead, mt)
            spu = (mt - overhead) / mu
        self._fit = (max(0.0, overhead), max(spu, 1e-9))
        return self._fit

    @property
    def sec_per_unit(self) -> float | None:
        fit = self._time_model()
        return None if fit is None else fit[1]

    @property
    def overhead_s(self) -> float | None:
        fit = self._time_model()
        return None if fit is None else fit[0]

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
        fit = self._time_model()
        if fit is None:
            return 0.0
        overhead, spu = fit
        return rate * (spu * self.costs[level] + overhead / self.mean_batch)

    def predicted_latency(self, level: int, queue_depth: int) -> float:
        fit = self._time_model()
        if fit is None:
            return 0.0
        overhead, spu = fit
        return overhead + (queue_depth + 1) * spu * self.costs[level] + self.config.batch_delay_s

    def estimate_batch_seconds(self, n: int, level: int) -> float:
        fit = self._time_model()
        return 0.0 if fit is None else fit[0] + n * fit[1] * self.costs[level]

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
        if last == 0 or self._time_model() is None:
            return self.level
        rate, p95 = self.arrival_rate(now), self.p95(now)
        want = next((L for L in range(last + 1) if self._fits(L, rate, queue_depth)), last)
        # The observed p95 is a backstop for what the time model misses; one slow spell keeps it
        # high for a whole window, so it forces at most one step per window.
        if p95 is not None and p95 > c.slo_s and now - self.last_change >= c.window_s:
            want = max(want, min(self.level + 1, last))
        if want > self.level:
            self._set(want, now)
        elif want < self.level and now - self.last_change >= c.hold_s:
            calm = p95 is None or p95 <= c.p95_up_fraction * c.slo_s
            # straight to the most accurate level that fits with the margin (not one step a hold)
            up = next((L for L in range(self.level) if self._fits(L, rate, queue_depth, c.up_margin)), None)
            if calm and up is not None:
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
            "overhead_s": self.overhead_s,
            "mean_batch": self.mean_batch,
            "changes": self.changes,
            "config": asdict(self.config),
        }
