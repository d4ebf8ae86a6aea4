"""Operating points: the calibrated accuracy-vs-cost curve that budgets and the controller move along.

A `Ladder` is a list of `OperatingPoint`s, most accurate (most expensive) first. Each point is a
threshold policy calibrated with `dynets.policies.calibration.calibrate` to a budget (a fraction of
the static path's FLOPs) on held-out data, with the cost ratio and accuracy it reached there. All
points share one policy kind, so a batch whose requests sit at different points still runs as
one forward: `PerSampleThresholdPolicy` carries one row of thresholds per sample, which the
executor compacts along with the batch like any policy state.

Sources, in order of preference: calibration on validation data given at start; a ladder saved
beside the model (`operating_points.json`, written by `Ladder.save`); else the model's own policy
as the single point (the operating point cannot move then).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynets.policies.calibration import calibrate
from dynets.policies.exit_policies import POLICIES, ExitPolicy, ThresholdPolicy, policy_from_dict

LADDER_FILE = "operating_points.json"


class PerSampleThresholdPolicy(ExitPolicy):
    """One threshold per sample and exit, on the score scale of a threshold policy kind.

    thresholds: (B, K-1) score thresholds; sample b stops at exit k when score >= thresholds[b, k].
    The thresholds travel in the policy state, so the executor's compaction keeps them aligned.
    """

    kind = "per_sample"

    def __init__(self, base: type[ThresholdPolicy], thresholds: torch.Tensor) -> None:
        if thresholds.dim() != 2:
            raise ValueError(f"thresholds: expected (B, K-1), got shape {tuple(thresholds.shape)}")
        self.base = base
        self.probe = base(0.5)
        self.needs_learned = base.needs_learned  # type: ignore[misc]
        self.thresholds = thresholds.float()

    @classmethod
    def from_policies(cls, policies: Sequence[ThresholdPolicy], num_exits: int) -> PerSampleThresholdPolicy:
        kinds = {type(p) for p in policies}
        if len(kinds) != 1:
            raise ValueError(
                f"policies: expected one threshold policy kind, got {sorted(k.kind for k in kinds)}"
            )
        rows = [[p.score_threshold(p.threshold_at(k)) for k in range(num_exits - 1)] for p in policies]
        return cls(kinds.pop(), torch.tensor(rows, dtype=torch.float32).reshape(len(policies), num_exits - 1))

    def init_state(self, batch_size, device):
        if batch_size != self.thresholds.shape[0]:
            raise ValueError(
                f"per-sample policy built for {self.thresholds.shape[0]} samples, got a batch of {batch_size}"
            )
        return {"thresholds": self.thresholds.to(device)}

    def step(self, k, logits, state, learned=None):
        return self.probe.score(logits, learned) >= state["thresholds"][:, k], state

    def to_dict(self):
        return {"kind": self.kind, "base": self.base.kind, "thresholds": self.thresholds.tolist()}


@dataclass
class OperatingPoint:
    budget: float  # the fraction of the full cost it was calibrated to
    policy: ExitPolicy
    cost_ratio: float  # mean FLOPs on the calibration data / full (static) cost; NaN when unknown
    accuracy: float | None = None  # on the calibration data, when labels were given

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "policy": self.policy.to_dict(),
            "cost_ratio": None if math.isnan(self.cost_ratio) else self.cost_ratio,
            "accuracy": self.accuracy,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OperatingPoint:
        from dynets.serve.knobs import KnobSetting

        ratio = d.get("cost_ratio")
        pd = d["policy"]
        return cls(
            float(d["budget"]),
            KnobSetting.from_dict(pd) if pd.get("kind") == KnobSetting.kind else policy_from_dict(pd),
            math.nan if ratio is None else float(ratio),
            d.get("accuracy"),
        )


@dataclass
class Ladder:
    points: list[OperatingPoint]  # most accurate (most expensive) first
    source: str  # "calibrated" | "saved" | "policy"

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a ladder needs at least one operating point")

    def __len__(self) -> int:
        return len(self.points)

    @property
    def cost_ratios(self) -> list[float]:
        """Cost of each level relative to the most expensive (1.0 where unknown)."""
        r = [p.cost_ratio for p in self.points]
        return [1.0] * len(r) if any(math.isnan(v) for v in r) else r

    @property
    def movable(self) -> bool:
        return len(self.points) > 1

    def level_for_budget(self, budget: float) -> int:
        """The most accurate level whose calibrated cost ratio fits `budget`, else the cheapest
        (budget 1 means the full cost: the most accurate level)."""
        if budget >= 1:
            return 0
        for i, p in enumerate(self.points):
            if not math.isnan(p.cost_ratio) and p.cost_ratio <= budget * (1 + 1e-6):
                return i
        return len(self.points) - 1

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "points": [p.to_dict() for p in self.points]}

    def save(self, path: str | Path) -> Path:
        from dynets.core.serialization import atomic_write_bytes

        path = Path(path)
        if path.is_dir():
            path = path / LADDER_FILE
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2).encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Ladder:
        path = Path(path)
        if path.is_dir():
            path = path / LADDER_FILE
        try:
            d = json.loads(path.read_text())
            return cls([OperatingPoint.from_dict(p) for p in d["points"]], "saved")
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a valid operating-point ladder ({e})") from e


def single_point_ladder(model: nn.Module) -> Ladder:
    """The model's own policy (or knob setting) as the only point (or a point with no policy for
    policy-less models)."""
    from dynets.serve.knobs import KnobSetting, knob_for

    policy = getattr(model, "policy", None)
    knob = None if isinstance(policy, ExitPolicy) else knob_for(model)
    if knob is not None:
        point = OperatingPoint(1.0, KnobSetting(knob.family, knob.get(model)), math.nan, None)
        return Ladder([point], "policy")
    if not isinstance(policy, ExitPolicy):
        from dynets.policies.exit_policies import NeverExitPolicy

        policy = NeverExitPolicy()  # a placeholder: policy-less models never receive it
    return Ladder([OperatingPoint(1.0, policy, math.nan, None)], "policy")


@torch.no_grad()
def exit_outputs(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256) -> dict[str, Any]:
    """Every exit's logits, learned scores, (K,) mean exit costs and mean full cost on `x`."""
    chunks, learned = [], []
    has_learned = len(getattr(model, "exit_predictors", [])) > 0
    for i in range(0, x.shape[0], batch_size):
        lg = model.all_exit_logits(x[i : i + batch_size])
        chunks.append([v.float() for v in lg])
        if has_learned:
            learned.append(model.learned_scores(lg))
    K = len(chunks[0])
    logits = [torch.cat([c[k] for c in chunks]) for k in range(K)]
    if hasattr(model, "lengths"):  # text: costs depend on each sentence's length
        lengths = model.lengths(x)
        costs = {b: model.exit_costs(lengths, b).mean(0) for b in (False, True)}
        full = float(model.full_cost(lengths).mean())
    else:
        costs = {b: model.exit_costs(b) for b in (False, True)}
        full = float(model.full_cost())
    return {
        "logits": logits,
        "learned": torch.cat(learned) if learned else None,
        "costs": costs,
        "full": full,
    }


def build_ladder(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    budgets: Sequence[float] | None = None,
    kind: str = "auto",
    levels: int = 8,
) -> Ladder:
    """Calibrate one policy per budget on held-out (x, y); budgets default to `levels` fractions
    spread between the first exit's cost and the full cost. Points that do not get cheaper than
    the one before are dropped, so the ladder's cost falls strictly with the level."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"calibration data: expected equal, non-zero numbers of inputs and labels, "
            f"got {x.shape[0]} and {y.shape[0]}"
        )
    if kind == "auto":
        own = getattr(model, "policy", None)
        kind = own.kind if isinstance(own, ThresholdPolicy) else "confidence"
    cls = POLICIES.get(kind)
    if cls is None or not issubclass(cls, ThresholdPolicy):
        raise ValueError(
            f"ladder policy kind: expected a threshold policy (confidence, entropy, learned), got {kind!r}"
        )
    outs = exit_outputs(model, x)
    if cls.needs_learned and outs["learned"] is None:
        raise ValueError("ladder policy 'learned' needs a model with learned exits")
    costs = outs["costs"][cls.needs_learned].double()
    full = outs["full"]
    lo, hi = float(costs[0]) / full, min(1.0, float(costs[-1]) / full)
    if budgets is None:
        budgets = [hi - (hi - lo * 1.02) * i / max(levels - 1, 1) for i in range(levels)]
    points: list[OperatingPoint] = []
    for b in sorted((float(v) for v in budgets), reverse=True):
        if not 0 < b <= 1:
            raise ValueError(f"budgets: expected fractions in (0, 1], got {b}")
        b = min(max(b, lo), hi)
        cal = calibrate(kind, outs["logits"], y, costs, b, full_cost=full, learned=outs["learned"])
        ratio = cal.val_flops / full
        if points and ratio >= points[-1].cost_ratio - 1e-9:
            continue
        points.append(OperatingPoint(round(b, 6), cal.policy, ratio, cal.val_accuracy))
    return Ladder(points, "calibrated")
