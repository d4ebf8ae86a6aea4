"""The inference server's engine: a model, its operating points, the SLO controller and the batcher.

`InferenceServer` owns everything except HTTP (that is `app.py`) and start-up (`launch.py`): it
turns a request's parsed samples into batcher items with a budget level and a deadline, fixes each
item's operating point when its batch forms (`prepare`, on the event loop), runs batches
(`run_batch`, in the worker thread) and feeds the controller and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dynets.serve.adapter import InputError, ServedModel
from dynets.serve.batcher import Batcher, Item
from dynets.serve.controller import ControllerConfig, SLOController
from dynets.serve.ladder import (
    Ladder,
    PerSampleThresholdPolicy,
)
from dynets.serve.metrics import Counter, Gauge, Histogram, Registry

log = logging.getLogger("dynets.serve")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class DeadlineExceeded(Exception):
    """The request's deadline passed before its batch could start."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_batch_delay_ms: float = 5.0
    max_queue: int = 256  # samples waiting; past it requests get 503 + Retry-After
    max_inputs_per_request: int = 64
    max_body_bytes: int = 8 * 1024 * 1024
    latency_slo_ms: float | None = None  # None: the operating point stays where it is put
    budget: float | None = None  # pin the operating point to this budget (no controller)
    threads: int = 1  # torch threads of the worker
    graceful_timeout_s: float = 10.0
    warmup: bool = True
    log_level: str = "warning"
    # serve the model's inference copy where it has one (early-exit networks: BatchNorm folded,
    # layers called as functions, NHWC; same outputs up to float rounding); False: as saved
    optimize: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_inputs_per_request < 1:
            raise ValueError(
                f"max_batch_size, max_queue and max_inputs_per_request: expected >= 1, got "
                f"{self.max_batch_size}, {self.max_queue}, {self.max_inputs_per_request}"
            )
        if self.max_inputs_per_request > self.max_queue:
            raise ValueError(
                f"max_inputs_per_request ({self.max_inputs_per_request}) must not exceed max_queue "
                f"({self.max_queue}), or such a request could never be queued"
            )
        if self.max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay_ms: expected >= 0, got {self.max_batch_delay_ms}")
        if self.latency_slo_ms is not None and not self.latency_slo_ms > 0:
            raise ValueError(f"latency_slo_ms: expected > 0, got {self.latency_slo_ms}")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"budget: expected a fraction in (0, 1], got {self.budget}")
        if self.budget is not None and self.latency_slo_ms is not None:
            raise ValueError("budget pins the operating point; it cannot be combined with latency_slo_ms")


class InferenceServer:
    def __init__(self, served: ServedModel, ladder: Ladder, config: ServeConfig) -> None:
        self.served, self.ladder, self.config = served, ladder, config
        self.adaptive = config.latency_slo_ms is not None and served.supports_policy and ladder.movable
        self.fixed_level = ladder.level_for_budget(config.budget) if config.budget is not None else 0
        slo_s = (config.latency_slo_ms or 1000.0) / 1000.0
        self.controller = SLOController(
            ladder.cost_ratios,
            ControllerConfig(slo_s=slo_s, batch_delay_s=config.max_batch_delay_ms / 1000.0),
            level=self.fixed_level,
        )
        self.batcher = Batcher(
            self.run_batch,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_batch_delay_ms / 1000.0,
            max_queue=config.max_queue,
            prepare=self.prepare,
            on_batch=self.on_batch,
            retry_hint=self.retry_after,
        )
        self.draining = False
        self.started = time.time()
        self._tick_task: asyncio.Task | None = None
        self._init_metrics()

    # ------------------------------------------------------------------ metrics
    def _init_metrics(self) -> None:
        r = self.registry = Registry()
        self.m_requests = r.add(
            Counter("dynets_requests_total", "Prediction requests answered, by HTTP status.")
        )
        self.m_samples = r.add(Counter("dynets_samples_total", "Samples predicted."))
        self.m_rejected = r.add(Counter("dynets_rejected_total", "Requests refused, by reason."))
        self.m_latency = r.add(
            Histogram(
                "dynets_request_latency_seconds", "Latency of answered /predict requests.", LATENCY_BUCKETS
            )
        )
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, self.config.max_batch_size})
        self.m_batch = r.add(Histogram("dynets_batch_size", "Samples per forward batch.", sizes))
        self.m_batch_s = r.add(
            Histogram("dynets_batch_seconds", "Time of one forward batch.", LATENCY_BUCKETS)
        )
        self.m_flops = r.add(
            Counter("dynets_flops_total", "FLOPs spent on predictions (measured per sample).")
        )
        self.m_mean_flops = r.add(Gauge("dynets_flops_per_sample_mean", "Mean FLOPs per sample so far."))
        self.m_cost = r.add(
            Gauge("dynets_cost_fraction_mean", "Mean cost per sample as a fraction of the full cost.")
        )
        self.m_exits = r.add(Counter("dynets_exit_total", "Samples by the exit they left at."))
        self.m_decisions = r.add(Counter("dynets_decision_total", "Per-sample decisions, by name and value."))
        self.m_batch_failures = r.add(
            Counter("dynets_batch_failures_total", "Batches that raised and were re-run sample by sample.")
        )
        self.m_queue = r.add(Gauge("dynets_queue_depth", "Samples queued or running."))
        r.add(Gauge("dynets_queue_capacity", "Samples the queue holds before 503.", self.config.max_queue))
        self.m_available = r.add(
            Gauge(
                "dynets_operating_point_available",
                "1 if the model has an adjustable operating point.",
                float(self.served.supports_policy),
            )
        )
        self.m_level = r.add(
            Gauge("dynets_operating_point_level", "Current ladder level (0 = most accurate).")
        )
        self.m_budget = r.add(
            Gauge("dynets_operating_point_budget", "Budget of the current operating point.")
        )
        self.m_ratio = r.add(
            Gauge("dynets_operating_point_cost_ratio", "Calibrated cost of the current point.")
        )
        self.m_changes = r.add(
            Gauge("dynets_operating_point_changes", "Moves of the operating point so far.")
        )
        self.m_rate = r.add(Gauge("dynets_arrival_rate", "Samples per second arriving (sliding window)."))
        self.m_p95 = r.add(Gauge("dynets_latency_p95_seconds", "p95 latency over the controller's window."))
        self._cost_sum = 0.0
        self._cost_n = 0

    def render_metrics(self) -> str:
        now = time.perf_counter()
        level = self.level
        n = self.m_samples.total()
        self.m_mean_flops.set(self.m_flops.total() / n if n else 0.0)
        self.m_cost.set(self._cost_sum / self._cost_n if self._cost_n else math.nan)
        self.m_queue.set(self.batcher.queue_depth)
        point = self.ladder.points[level]
        self.m_level.set(level if self.served.supports_policy else math.nan)
        self.m_budget.set(point.budget if self.served.supports_policy else math.nan)
        self.m_ratio.set(point.cost_ratio if self.served.supports_policy else math.nan)
        self.m_changes.set(self.controller.changes)
        self.m_rate.set(self.controller.arrival_rate(now))
        p95 = self.controller.p95(now)
        self.m_p95.set(math.nan if p95 is None else p95)
        return self.registry.render()

    # ------------------------------------------------------------------ operating point
    @property
    def level(self) -> int:
        return self.controller.level if self.adaptive else self.fixed_level

    def operating_point(self) -> dict[str, Any] | None:
        if not self.served.supports_policy:
            return None
        p = self.ladder.points[self.level]
        return {"level": self.level, "levels": len(self.ladder), "adaptive": self.adaptive, **p.to_dict()}

    def retry_after(self, depth: int) -> float:
        est = self.controller.predicted_latency(self.level, depth)
        return max(1.0, math.ceil(est))

    # ------------------------------------------------------------------ request path (event loop)
    def budget_level(self, budget: float | None) -> int:
        if budget is None:
            return 0
        if not self.served.supports_policy:
            raise InputError(
                f"budget: this model ({self.served.architecture}) has no exit policy, so operating points "
                f"are unavailable; send the request without 'budget'"
            )
        return self.ladder.level_for_budget(budget)

    def submit(
        self, xs: list[torch.Tensor], *, budget: float | None, deadline_ms: float | None, return_logits: bool
    ) -> list[asyncio.Future]:
        now = time.perf_counter()
        futures = self.batcher.submit(
            xs,
            budget_level=self.budget_level(budget),
            deadline=None if deadline_ms is None else now + deadline_ms / 1000.0,
            info={"return_logits": return_logits},
        )
        self.controller.observe_arrival(now, len(xs))
        return futures

    def observe_response(self, status: int, latency_s: float | None) -> None:
        self.m_requests.inc(status=str(status))
        if latency_s is not None:
            self.m_latency.observe(latency_s)
            self.controller.observe_latency(time.perf_counter(), latency_s)

    def prepare(self, batch: list[Item], now: float) -> list[Item]:
        """Each item's level: the controller's (or the pinned one), its budget's if cheaper, or cheaper
        still to make its deadline; items whose deadline has passed are answered here."""
        base, last = self.level, len(self.ladder) - 1
        kept = []
        for it in batch:
            level = max(base, it.budget_level)
            if it.deadline is not None:
                left = it.deadline - now
                if left <= 0:
                    self.m_rejected.inc(reason="deadline")
                    it.future.set_exception(
                        DeadlineExceeded(
                            f"deadline passed {1000 * -left:.1f} ms before the batch could start"
                        )
                    )
                    continue
                if self.served.supports_policy:
                    while level < last and self.controller.estimate_batch_seconds(len(batch), level) > left:
                        level += 1
            it.level = level
            kept.append(it)
        return kept

    def on_batch(self, batch: list[Item], seconds: float) -> None:
        units = sum(it.info.get("cost_fraction", 1.0) for it in batch if not it.info.get("failed"))
        self.controller.observe_batch(seconds, units, len(batch))
        self.m_batch.observe(len(batch))
        self.m_batch_s.observe(seconds)
        if self.adaptive:
            self.controller.update(time.perf_counter(), self.batcher.queue_depth)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            if self.adaptive:
                self.controller.update(time.perf_counter(), self.batcher.queue_depth)

    async def start(self) -> None:
        torch.set_num_threads(self.config.threads)
        if self.config.warmup:
            await asyncio.get_running_loop().run_in_executor(None, self.warmup)
        self.batcher.start()
        self._tick_task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        self.draining = True
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
        await self.batcher.close(timeout_s=self.config.graceful_timeout_s)

    # ------------------------------------------------------------------ batch path (worker thread)
    def policy_for(self, levels: list[int]) -> Any:
        if not self.served.supports_policy:
            return None
        if len(set(levels)) == 1:
            return self.ladder.points[levels[0]].policy
        return PerSampleThresholdPolicy.from_policies(
            [self.ladder.points[v].policy for v in levels],
            int(self.served.num_exits),  # type: ignore[list-item]
        )

    def run_batch(self, items: list[Item]) -> list[Any]:
        """Run one batch (grouped by input shape); every item gets a result dict or its own exception."""
        torch.set_num_threads(self.config.threads)
        results: list[Any] = [None] * len(items)
        for positions, x in self.served.group([it.x for it in items]):
            group = [items[j] for j in positions]
            try:
                res = self._run_group(x, group)
            except Exception as e:  # isolate the failing sample so the others still get answers
                self.m_batch_failures.inc()
                log.warning(
                    "batch of %d failed (%s: %s); running its samples one by one",
                    len(group),
                    type(e).__name__,
                    e,
                )
                if len(group) == 1:
                    group[0].info = {**group[0].info, "failed": True}
                    res = [e]
                else:
                    res = [self.run_batch([it])[0] for it in group]
            for j, r in zip(positions, res):
                results[j] = r
        return results

    def _run_group(self, x: torch.Tensor, group: list[Item]) -> list[dict[str, Any]]:
        levels = [it.level for it in group]
        if self.served.knob is not None and len(set(levels)) > 1:
            # a knob is one value per forward: one forward per level, results back in group order
            res: list[Any] = [None] * len(group)
            for level in sorted(set(levels)):
                pos = [j for j, v in enumerate(levels) if v == level]
                for j, r in zip(pos, self._run_group(x[pos], [group[j] for j in pos])):
                    res[j] = r
            return res
        out = self.served.forward(x, self.policy_for(levels))
        full = self.served.full_cost(x)
        logits = out.logits.float()
        conf, pred = logits.softmax(-1).max(-1)
        flops = out.flops.double().cpu()
        res = []
        for b, it in enumerate(group):
            label = int(pred[b])
            r: dict[str, Any] = {
                "label": label,
                "class_name": self.served.labels[label] if label < len(self.served.labels) else str(label),
                "confidence": float(conf[b]),
                "exit": None if out.exit_index is None else int(out.exit_index[b]),
                "flops": float(flops[b]),
                "cost_fraction": None if full is None else float(flops[b] / full[b]),
                "level": it.level if self.served.supports_policy else None,
                "batch_size": len(group),
            }
            small = {
                k: v[b]
                for k, v in out.decisions.items()
                if isinstance(v, torch.Tensor) and v[b].numel() <= 64
            }
            if small:
                r["decisions"] = {k: v.tolist() for k, v in small.items()}
            if it.info.get("return_logits"):
                r["logits"] = logits[b].tolist()
            it.info = {
                **it.info,
                "cost_fraction": r["cost_fraction"] if r["cost_fraction"] is not None else 1.0,
            }
            res.append(r)
        self._record(out, flops, full)
        return res

    def _record(self, out: Any, flops: torch.Tensor, full: torch.Tensor | None) -> None:
        n = int(flops.numel())
        self.m_samples.inc(n)
        self.m_flops.inc(float(flops.sum()))
        if full is not None:
            self._cost_sum += float((flops / full).sum())
            self._cost_n += n
        if out.exit_index is not None:
            for k, c in enumerate(torch.bincount(out.exit_index.cpu()).tolist()):
                if c:
                    self.m_exits.inc(c, exit=str(k))
        for name, v in out.decisions.items():
            if isinstance(v, torch.Tensor) and v.dim() == 1 and not v.is_floating_point():
                vals, counts = torch.unique(v.cpu(), return_counts=True)
                for val, c in zip(vals.tolist(), counts.tolist()):
                    self.m_decisions.inc(c, name=name, value=str(val))
            elif isinstance(v, torch.Tensor) and v.dim() == 2 and v.dtype == torch.bool:
                for unit, c in enumerate(v.sum(0).tolist()):
                    self.m_decisions.inc(c, name=name, value=f"unit{unit}")

    def warmup(self) -> None:
        """Full batches and single samples at the most accurate point: warms the kernels and anchors
        the controller's time model (per-batch overhead and per-sample cost)."""
        torch.set_num_threads(self.config.threads)
        x = self._example_batch(self.config.max_batch_size)
        if x is None:
            return
        policy = self.ladder.points[0].policy if self.served.supports_policy else None
        anchors = []
        for xb in (x, x[:1]):
            times = []
            for _ in range(3):
                start = time.perf_counter()
                out = self.served.forward(xb, policy)
                times.append(time.perf_counter() - start)
            full = self.served.full_cost(xb)
            units = float((out.flops / full).sum()) if full is not None else float(xb.shape[0])
            anchors.append((units, min(times[1:])))
        self.controller.calibrate(anchors)

    def _example_batch(self, n: int) -> torch.Tensor | None:
        gen = torch.Generator().manual_seed(0)
        if self.served.kind == "text":
            return self.served.group([self.served.parse(None, ["a warm up sentence"])[0]] * n)[0][1]
        if self.served.input_shape is None:
            return None
        return torch.rand((n, *self.served.input_shape), generator=gen)

    def info(self) -> dict[str, Any]:
        return {
            "model": self.served.describe(),
            "server": asdict(self.config),
            "adaptive": self.adaptive,
            "ladder": self.ladder.to_dict() if self.served.supports_policy else None,
            "operating_point": self.operating_point(),
            # the controller's view: load, p95, its time model (overhead + seconds per unit of cost)
            "controller": self.controller.state(time.perf_counter()) if self.adaptive else None,
        }
