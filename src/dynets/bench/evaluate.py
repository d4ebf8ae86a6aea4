"""Evaluation: all-exit outputs, anytime accuracy, policy sweeps and accuracy-vs-cost tables.

`collect` runs every exit once over a dataset (eval mode, no dynamic execution); sweeps then
replay policies on the stored logits, so a whole accuracy-vs-FLOPs curve costs one pass. Dynamic
execution itself is what the wall-clock benchmark times.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dynets.depth.early_exit import EarlyExitNetwork
from dynets.policies.exit_policies import ExitPolicy, make_policy
from dynets.policies.replay import replay_exits


@dataclass
class ExitOutputs:
    exit_logits: list[torch.Tensor]  # K tensors (N, C)
    labels: torch.Tensor  # (N,)
    learned: torch.Tensor | None  # (N, K-1) learned-exit scores, if the model has them
    exit_costs: torch.Tensor  # (K,) cumulative FLOPs without learned predictors
    exit_costs_learned: torch.Tensor  # (K,) with them
    full_cost: float  # the static path's FLOPs

    def accuracy_per_exit(self) -> list[float]:
        return [float((lg.argmax(-1) == self.labels).double().mean()) for lg in self.exit_logits]

    def evaluate(self, policy: ExitPolicy) -> dict[str, float | list[float]]:
        idx = replay_exits(policy, self.exit_logits, self.learned)
        preds = torch.stack([lg.argmax(-1) for lg in self.exit_logits], 1).gather(1, idx[:, None]).squeeze(1)
        costs = self.exit_costs_learned if policy.needs_learned else self.exit_costs
        flops = float(costs[idx].mean())
        return {
            "accuracy": float((preds == self.labels).double().mean()),
            "mean_flops": flops,
            "flops_ratio": flops / self.full_cost,
            "exit_fractions": (
                torch.bincount(idx, minlength=len(self.exit_logits)).double() / max(idx.numel(), 1)
            ).tolist(),
        }


@torch.no_grad()
def collect(model: EarlyExitNetwork, data, *, batch_size: int = 256, progress: bool = False) -> ExitOutputs:
    """Run every exit of `model` on `data` (an object with tensors .x, .y)."""
    model.eval()
    outs: list[list[torch.Tensor]] = []
    learned = []
    has_learned = len(model.exit_predictors) > 0
    starts = range(0, len(data.y), batch_size)
    for i in tqdm(starts, desc="all exits", disable=not progress, leave=False):
        lg = model.all_exit_logits(data.x[i : i + batch_size])
        outs.append(lg)
        if has_learned:
            learned.append(model.learned_scores(lg))
    K = model.num_exits
    exit_logits = (
        [torch.cat([o[k] for o in outs]) for k in range(K)]
        if outs
        else [torch.zeros(0, model.num_classes) for _ in range(K)]
    )
    return ExitOutputs(
        exit_logits,
        data.y.clone(),
        torch.cat(learned) if learned else None,
        model.exit_costs(False),
        model.exit_costs(has_learned),
        model.full_cost(),
    )


DEFAULT_SWEEPS: dict[str, list[float]] = {
    "confidence": [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999],
    "entropy": [0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.02, 0.01],
    "patience": [1, 2, 3, 4],
    "learned": [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99],
}


def sweep(
    outputs: ExitOutputs,
    kinds: Iterable[str] = ("confidence", "entropy", "patience", "learned"),
    values: dict[str, list[float]] | None = None,
) -> list[dict]:
    """Accuracy and mean FLOPs for each policy setting (rows ready for a table or a plot)."""
    values = values or DEFAULT_SWEEPS
    rows = []
    for kind in kinds:
        if kind == "learned" and outputs.learned is None:
            continue
        for v in values[kind]:
            if kind == "patience" and v > len(outputs.exit_logits) - 1:
                continue
            rows.append({"policy": kind, "value": v, **outputs.evaluate(make_policy(kind, v))})
    return rows


def format_table(rows: list[dict], static: dict | None = None) -> str:
    """A Markdown table of accuracy vs FLOPs, the static baseline first."""
    lines = [
        "| model / policy | setting | accuracy | mean MFLOPs | FLOPs vs static |",
        "|---|---|---:|---:|---:|",
    ]
    if static:
        lines.append(
            f"| static | - | {100 * static['accuracy']:.2f}% | {static['mean_flops'] / 1e6:.2f} | 1.00 |"
        )
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['value']} | {100 * r['accuracy']:.2f}% | {r['mean_flops'] / 1e6:.2f} "
            f"| {r['flops_ratio']:.2f} |"
        )
    return "\n".join(lines)


@torch.no_grad()
def evaluate_dynamic(model: torch.nn.Module, data, *, batch_size: int = 256, progress: bool = False) -> dict:
    """Any dynamic model (block skipping, widths, experts, routes, tokens, steps): run its eval
    forward over `data` (an object with .x and .y) at its current run-time setting and report
    accuracy, mean per-sample FLOPs, the ratio to its static cost where it has one, and the mean of
    each per-sample decision (the share of blocks run, the mean width, ...)."""
    model.eval()
    x, y = data.x, data.y
    if x.shape[0] == 0:
        raise ValueError("evaluate_dynamic: expected a non-empty dataset, got 0 samples")
    correct, flops, n = 0, 0.0, 0
    decision_sums: dict[str, float] = {}
    for i in tqdm(range(0, x.shape[0], batch_size), desc="eval", disable=not progress, leave=False):
        out = model(x[i : i + batch_size])
        yb = y[i : i + batch_size]
        correct += int((out.logits.argmax(-1) == yb).sum())
        flops += float(out.flops.double().sum())
        n += yb.shape[0]
        for name, v in (getattr(out, "decisions", None) or {}).items():
            if isinstance(v, torch.Tensor) and v.numel() and (v.is_floating_point() or v.dtype == torch.bool):
                decision_sums[name] = decision_sums.get(name, 0.0) + float(v.double().mean()) * yb.shape[0]
    result = {"samples": n, "accuracy": correct / n, "mean_flops": flops / n}
    full = getattr(model, "full_cost", None)
    if callable(full):
        try:
            cost = full()
            cost = cost.double().mean() if isinstance(cost, torch.Tensor) else cost
            result["full_flops"] = float(cost)
            result["flops_ratio"] = result["mean_flops"] / result["full_flops"]
        except TypeError:  # a full cost that needs arguments (e.g. sentence lengths)
            pass
    result["decisions_mean"] = {k: v / n for k, v in decision_sums.items()}
    return result
