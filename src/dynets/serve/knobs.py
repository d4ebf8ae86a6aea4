"""Operating points for families whose run-time knob is one model setting rather than an exit policy.

Early-exit models move along their accuracy-vs-cost curve by swapping the exit policy (ladder.py).
Block skipping, routing and Skip-RNNs have a scalar knob of their own, with a calibrator that fits
it to a budget on held-out data:

    family    models               knob                        calibrator
    skip      SkipNetwork          gate threshold              depth.skipping.calibrate_skip_threshold
    route     RoutedResNet         routing cost penalty        routing.router.calibrate_route_bias
    skip_rnn  SkipRNN (skip=True)  update threshold            temporal.skip_rnn.calibrate_update_threshold
    frames    FrameSkipRNN         skip cap (0..max_skip)      the dearest cap whose mean FLOPs fit
    width     SlimmableNetwork     width-chooser thresholds    width.slimmable.calibrate_width_policy
    dvit      DynamicViT           keep ratio                  bisection on the measured mean FLOPs
    avit      HaltingViT (A-ViT)   halting threshold           bisection on the measured mean FLOPs
    tome      ToMeViT              tokens merged per block     bisection (integers) on the mean FLOPs

A `KnobSetting` stands where a ladder point holds a policy: the server applies it to the model
before a forward (`ServedModel.forward`), and a batch whose requests sit at different levels runs
one forward per level (a knob is one value per forward, unlike per-sample exit thresholds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Knob:
    family: str
    matches: Callable[[nn.Module], bool]
    get: Callable[[nn.Module], Any]  # a number, or a list of numbers (width thresholds)
    apply: Callable[[nn.Module, Any], None]
    calibrate: Callable[[nn.Module, torch.Tensor, float], Any]  # sets the knob, returns its value
    cheapest: Callable[[nn.Module, torch.Tensor], float]  # lowest cost fraction reachable (about)


def _is(module: str, name: str) -> Callable[[nn.Module], bool]:
    def check(model: nn.Module) -> bool:
        import importlib

        return isinstance(model, getattr(importlib.import_module(module), name))

    return check


@torch.no_grad()
def _mean_flops(model: nn.Module, x: torch.Tensor, bs: int = 256) -> float:
    return float(
        torch.cat([model(x[i : i + bs]).flops.double().cpu() for i in range(0, x.shape[0], bs)]).mean()
    )


def _bisect(
    family: str,
    matches: Callable[[nn.Module], bool],
    attr: str,
    cheap: float,
    dear: float,
    *,
    integer: bool = False,
    iters: int = 12,
) -> Knob:
    """A knob set as `model.<attr>` whose cost moves monotonically from `cheap` to `dear`: the
    calibrator bisects for the dearest value whose mean FLOPs on the data stay within the budget."""

    def apply(model: nn.Module, v: float) -> None:
        setattr(model, attr, int(round(v)) if integer else float(v))

    def calibrate(model: nn.Module, x: torch.Tensor, budget: float) -> float:
        target = budget * float(model.full_cost())

        def fits(v: float) -> bool:
            apply(model, v)
            return _mean_flops(model, x) <= target * (1 + 1e-9)

        lo, hi = cheap, dear  # invariant: lo fits (or nothing does), hi does not
        if fits(hi):
            return hi
        for _ in range(iters):
            mid = round((lo + hi) / 2) if integer else (lo + hi) / 2
            if mid in (lo, hi):
                break
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        apply(model, lo)
        return float(lo)

    def cheapest(model: nn.Module, x: torch.Tensor) -> float:
        old = getattr(model, attr)
        apply(model, cheap)
        ratio = _mean_flops(model, x[:256]) / float(model.full_cost())
        setattr(model, attr, old)
        return ratio

    return Knob(family, matches, lambda m: float(getattr(m, attr)), apply, calibrate, cheapest)


def _skip_apply(model: nn.Module, value: float) -> None:
    from dynets.depth.skipping import SkipPolicy

    model.skip_policy = SkipPolicy(value)


def _skip_calibrate(model: nn.Module, x: torch.Tensor, budget: float) -> float:
    from dynets.depth.skipping import calibrate_skip_threshold

    return calibrate_skip_threshold(model, x, budget).policy.threshold_at(0)


def _route_calibrate(model: nn.Module, x: torch.Tensor, budget: float) -> float:
    from dynets.routing.router import calibrate_route_bias

    return float(calibrate_route_bias(model, x, budget)["penalty"])


def _rnn_calibrate(model: nn.Module, x: torch.Tensor, budget: float) -> float:
    from dynets.temporal.skip_rnn import calibrate_update_threshold

    return calibrate_update_threshold(model, x, budget)


def _rnn_apply(model: nn.Module, value: float) -> None:
    model.threshold = value


def _cap_get(model: nn.Module) -> float:
    return float(model.config.max_skip if model.skip_cap is None else model.skip_cap)


def _cap_apply(model: nn.Module, value: float) -> None:
    model.skip_cap = int(round(value))


def _cap_calibrate(model: nn.Module, x: torch.Tensor, budget: float) -> float:
    """The smallest skip cap (the most frames read) whose mean FLOPs on x fit the budget; the
    largest cap (max_skip) when none does, as the bisected knobs do."""
    target = budget * float(model.full_cost())
    for cap in range(model.config.max_skip + 1):
        model.skip_cap = cap
        if _mean_flops(model, x) <= target * (1 + 1e-9):
            return float(cap)
    return float(model.config.max_skip)


def _cap_cheapest(model: nn.Module, x: torch.Tensor) -> float:
    old = model.skip_cap
    model.skip_cap = model.config.max_skip
    ratio = _mean_flops(model, x[:256]) / float(model.full_cost())
    model.skip_cap = old
    return ratio


def _width_apply(model: nn.Module, value: list[float]) -> None:
    from dynets.width.slimmable import WidthPolicy

    model.width_policy = WidthPolicy(value)


def _width_calibrate(model: nn.Module, x: torch.Tensor, budget: float) -> list[float]:
    from dynets.width.slimmable import calibrate_width_policy

    return list(calibrate_width_policy(model, x, budget).policy.thresholds)


KNOBS = (
    Knob(
        "skip",
        _is("dynets.depth.skipping", "SkipNetwork"),
        lambda m: m.skip_policy.threshold_at(0),
        _skip_apply,
        _skip_calibrate,
        lambda m, x: m.min_cost() / m.full_cost(),
    ),
    Knob(
        "route",
        _is("dynets.models.routing", "RoutedResNet"),
        lambda m: float(m.router.cost_penalty),
        lambda m, v: m.set_cost_penalty(v),
        _route_calibrate,
        lambda m, x: float(m.branch_costs().min()) / m.full_cost(),
    ),
    Knob(
        "skip_rnn",
        lambda m: _is("dynets.temporal.skip_rnn", "SkipRNN")(m) and m.config.skip,
        lambda m: m.threshold,
        _rnn_apply,
        _rnn_calibrate,
        lambda m, x: 0.05,
    ),
    Knob(
        "frames",
        _is("dynets.temporal.frame_skip", "FrameSkipRNN"),
        _cap_get,
        _cap_apply,
        _cap_calibrate,
        _cap_cheapest,
    ),
    Knob(  # a list of thresholds (one per width but the largest): the setting is a list
        "width",
        _is("dynets.width.slimmable", "SlimmableNetwork"),
        lambda m: list(m.width_policy.thresholds),
        _width_apply,
        _width_calibrate,
        lambda m, x: float(m.width_costs()[0] / m.width_costs()[-1]),
    ),
    _bisect("dvit", _is("dynets.spatial.token_pruning", "DynamicViT"), "keep_ratio", 0.05, 1.0),
    _bisect("avit", _is("dynets.spatial.halting", "HaltingViT"), "threshold", 0.01, 1.0),
    _bisect("tome", _is("dynets.spatial.merging", "ToMeViT"), "merge_r", 32, 0, integer=True),
)


BY_FAMILY = {k.family: k for k in KNOBS}


def knob_for(model: nn.Module) -> Knob | None:
    """The knob of `model`'s family, or None (no scalar knob: exit policy or nothing)."""
    return next((k for k in KNOBS if k.matches(model)), None)


class KnobSetting:
    """One operating point of a knob family: the knob's value (a number, or a list of numbers for
    the width chooser's thresholds). Serialised as a ladder 'policy'."""

    kind = "knob"

    def __init__(self, family: str, value: float) -> None:
        if family not in BY_FAMILY:
            raise ValueError(f"knob family: expected one of {sorted(BY_FAMILY)}, got {family!r}")
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise ValueError(f"knob value: expected a finite number or a list of them, got {value!r}")
        self.family = family
        self.value: Any = [float(v) for v in values] if isinstance(value, (list, tuple)) else float(value)

    def apply(self, model: nn.Module) -> None:
        BY_FAMILY[self.family].apply(model, self.value)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "family": self.family, "value": self.value}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KnobSetting:
        return cls(d["family"], d["value"])

    def __repr__(self) -> str:
        return f"KnobSetting({self.family!r}, {self.value!r})"


@torch.no_grad()
def _measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 256) -> tuple[float, float]:
    """(mean FLOPs, accuracy) of the model as it is set, on (x, y)."""
    outs = [model(x[i : i + bs]) for i in range(0, x.shape[0], bs)]
    flops = torch.cat([o.flops.double().cpu() for o in outs])
    pred = torch.cat([o.logits.argmax(-1).cpu() for o in outs])
    return float(flops.mean()), float((pred == y.cpu()).double().mean())


def build_knob_ladder(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    budgets: Sequence[float] | None = None,
    levels: int = 8,
) -> Any:
    """Calibrate the model's knob to each budget on held-out (x, y), as `ladder.build_ladder` does
    for exit policies; points that do not get cheaper than the one before are dropped. The knob is
    left at the most accurate point."""
    from dynets.serve.ladder import Ladder, OperatingPoint

    knob = knob_for(model)
    if knob is None:
        raise ValueError(
            f"{type(model).__name__}: expected a model with a run-time knob ({sorted(BY_FAMILY)})"
        )
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"calibration data: expected equal, non-zero numbers of inputs and labels, "
            f"got {x.shape[0]} and {y.shape[0]}"
        )
    model.eval()
    full = float(model.full_cost())
    lo = min(max(knob.cheapest(model, x), 0.0), 1.0)
    if budgets is None:
        budgets = [1.0 - (1.0 - lo * 1.02) * i / max(levels - 1, 1) for i in range(levels)]
    points: list[OperatingPoint] = []
    for b in sorted((float(v) for v in budgets), reverse=True):
        if not 0 < b <= 1:
            raise ValueError(f"budgets: expected fractions in (0, 1], got {b}")
        try:
            value = knob.calibrate(model, x, max(b, lo))
        except ValueError:  # below what the knob can reach on this data
            continue
        flops, acc = _measure(model, x, y)
        ratio = flops / full
        if points and ratio >= points[-1].cost_ratio - 1e-9:
            continue
        points.append(OperatingPoint(round(b, 6), KnobSetting(knob.family, value), ratio, acc))
    if not points:
        raise ValueError(f"no budget in {list(budgets)} could be calibrated for {type(model).__name__}")
    points[0].policy.apply(model)
    return Ladder(points, "calibrated")
