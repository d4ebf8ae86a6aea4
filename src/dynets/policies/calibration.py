"""Budget calibration: per-exit thresholds that meet a mean cost per sample on held-out data.

MSDNet's budgeted batch classification: assume a geometric share of samples leaves at each exit,
q_k ~ p^k; bisect p so that sum_k q_k * cost_k equals the budget; then at exit k let the q_k*N
most confident remaining validation samples leave, which fixes threshold_k. A second strategy
bisects one shared threshold for all exits. `calibrate` tries both and keeps the one with the
better validation accuracy, so the knob is just "the budget".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynets.policies.exit_policies import POLICIES, ThresholdPolicy
from dynets.policies.replay import replay_exits


@dataclass
class Calibration:
    policy: ThresholdPolicy
    strategy: str
    target_flops: float
    val_flops: float
    val_accuracy: float
    exit_fractions: list[float]


def _score_matrix(
    cls: type[ThresholdPolicy], exit_logits: Sequence[torch.Tensor], learned: torch.Tensor | None
) -> torch.Tensor:
    probe = cls(0.5)
    return torch.stack(
        [
            probe.score(exit_logits[k], learned[:, k] if learned is not None else None)
            for k in range(len(exit_logits) - 1)
        ],
        dim=1,
    ).double()  # (N, K-1)


def _geometric(scores: torch.Tensor, costs: torch.Tensor, budget: float) -> list[float]:
    N, K = scores.shape[0], costs.numel()

    def shares(logp: float) -> torch.Tensor:
        q = torch.exp(logp * torch.arange(K, dtype=torch.float64))
        return q / q.sum()

    lo, hi = -20.0, 20.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if float((shares(mid) * costs).sum()) < budget:
            lo = mid
        else:
            hi = mid
    q = shares((lo + hi) / 2)
    remaining = torch.ones(N, dtype=torch.bool)
    thresholds: list[float] = []
    for k in range(K - 1):
        n_k = int(round(float(q[k]) * N))
        cand = scores[remaining, k]
        if n_k <= 0 or cand.numel() == 0:
            thresholds.append(float("inf"))
            continue
        n_k = min(n_k, cand.numel())
        t = float(cand.topk(n_k).values[-1])
        thresholds.append(t)
        remaining &= ~(scores[:, k] >= t)
    return thresholds


def _shared(scores: torch.Tensor, costs: torch.Tensor, budget: float) -> list[float]:
    def cost_at(t: float) -> float:
        stop = scores >= t
        first = torch.where(
            stop.any(1), stop.float().argmax(1), torch.full((scores.shape[0],), costs.numel() - 1)
        )
        return float(costs[first].mean())

    values = torch.unique(scores)
    lo, hi = 0, values.numel() - 1  # cost rises with the threshold; find the smallest t with cost >= budget
    while lo < hi:
        mid = (lo + hi) // 2
        if cost_at(float(values[mid])) >= budget:
            hi = mid
        else:
            lo = mid + 1
    t = float(values[lo])
    if lo > 0 and abs(cost_at(float(values[lo - 1])) - budget) < abs(cost_at(t) - budget):
        t = float(values[lo - 1])
    return [t] * (scores.shape[1])


def calibrate(
    kind: str,
    exit_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    exit_costs: torch.Tensor,
    budget: float,
    *,
    full_cost: float | None = None,
    learned: torch.Tensor | None = None,
    strategy: str = "best",
) -> Calibration:
    """Thresholds for policy `kind` so the mean cost on this (validation) data equals `budget`.

    budget: FLOPs per sample, or a fraction of `full_cost` when 0 < budget <= 1 and full_cost is given.
    exit_costs: (K,) cumulative FLOPs of leaving at each exit; exit_logits: K tensors (N, C).
    """
    cls = POLICIES.get(kind)
    if cls is None or not issubclass(cls, ThresholdPolicy):
        names = sorted(k for k, c in POLICIES.items() if issubclass(c, ThresholdPolicy))
        raise ValueError(f"budget calibration needs a threshold policy, one of {names}; got {kind!r}")
    if strategy not in ("best", "geometric", "shared"):
        raise ValueError(f"strategy: expected 'best', 'geometric' or 'shared', got {strategy!r}")
    costs = exit_costs.double().cpu()
    if full_cost is not None and 0 < budget <= 1:
        target = budget * full_cost
    elif budget > 1:
        target = float(budget)
    else:
        raise ValueError(
            f"budget: expected a fraction in (0, 1] of the full cost or FLOPs > 1, got {budget!r}"
        )
    if not float(costs[0]) <= target <= float(costs[-1]) * 1.0001:
        raise ValueError(
            f"budget {target:.4g} FLOPs is outside what this model can spend: expected between the "
            f"first exit's {float(costs[0]):.4g} and the last exit's {float(costs[-1]):.4g}"
        )
    scores = _score_matrix(cls, exit_logits, learned)
    labels = labels.cpu()
    results = []
    for name, fn in (("geometric", _geometric), ("shared", _shared)):
        if strategy not in ("best", name):
            continue
        policy = cls.from_score_thresholds(
            [t if t != float("inf") else 2.0 for t in fn(scores, costs, target)]
        )
        idx = replay_exits(policy, exit_logits, learned)
        preds = torch.stack([lg.argmax(-1).cpu() for lg in exit_logits], 1).gather(1, idx[:, None]).squeeze(1)
        acc = float((preds == labels).double().mean())
        frac = torch.bincount(idx, minlength=costs.numel()).double() / idx.numel()
        results.append(Calibration(policy, name, target, float(costs[idx].mean()), acc, frac.tolist()))
    return max(results, key=lambda r: (r.val_accuracy, -abs(r.val_flops - target)))
