"""Budget calibration on synthetic scores: the mean cost lands on the budget, on fresh data too."""

import pytest
import torch

from dynets.policies import PatiencePolicy
from dynets.policies.calibration import calibrate
from dynets.policies.replay import replay_exits

COSTS = torch.tensor([10.0, 25.0, 45.0, 70.0, 100.0], dtype=torch.float64)


def synthetic(n: int, seed: int, k: int = 5, c: int = 10):
    """Exit logits whose confidence grows with depth, labels right more often when sure."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    difficulty = torch.rand(n, generator=g)
    logits = []
    for j in range(k):
        margin = (1 + 2 * j) * (1.2 - difficulty)[:, None]
        lg = torch.randn(n, c, generator=g)
        lg[torch.arange(n), labels] += 2 * margin[:, 0]
        logits.append(lg)
    return logits, labels


@pytest.mark.parametrize("kind", ["confidence", "entropy"])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_budget_met_on_validation_and_held_out(kind, budget):
    val_logits, val_y = synthetic(4000, 0)
    cal = calibrate(kind, val_logits, val_y, COSTS, budget, full_cost=100.0)
    assert abs(cal.val_flops - budget * 100) / (budget * 100) < 0.02
    test_logits, _ = synthetic(4000, 1)
    idx = replay_exits(cal.policy, test_logits)
    test_cost = float(COSTS[idx].mean())
    assert abs(test_cost - budget * 100) / (budget * 100) < 0.05
    assert sum(cal.exit_fractions) == pytest.approx(1.0)


def test_absolute_budget_and_strategies():
    logits, y = synthetic(2000, 3)
    for strategy in ("geometric", "shared"):
        cal = calibrate("confidence", logits, y, COSTS, 40.0, strategy=strategy)
        assert cal.strategy == strategy
        assert abs(cal.val_flops - 40.0) / 40.0 < 0.03


def test_more_budget_more_accuracy():
    logits, y = synthetic(3000, 4)
    accs = [
        calibrate("confidence", logits, y, COSTS, b, full_cost=100.0).val_accuracy for b in (0.2, 0.5, 0.9)
    ]
    assert accs[0] <= accs[1] + 0.01 <= accs[2] + 0.02


def test_learned_needs_scores_and_uses_them():
    logits, y = synthetic(2000, 5)
    learned = torch.stack([lg.softmax(-1).amax(-1) for lg in logits[:-1]], 1)
    cal = calibrate("learned", logits, y, COSTS, 0.5, full_cost=100.0, learned=learned)
    assert abs(cal.val_flops - 50) / 50 < 0.03


@pytest.mark.parametrize(
    "budget, match",
    [
        (0.05, "outside what this model can spend"),
        (0.0, "expected a fraction"),
        (-2.0, "expected a fraction"),
        (500.0, "outside what this model can spend"),
    ],
)
def test_bad_budgets(budget, match):
    logits, y = synthetic(100, 6)
    with pytest.raises(ValueError, match=match):
        calibrate("confidence", logits, y, COSTS, budget, full_cost=100.0)


def test_non_threshold_policy_rejected():
    logits, y = synthetic(100, 7)
    with pytest.raises(ValueError, match="needs a threshold policy"):
        calibrate("patience", logits, y, COSTS, 0.5, full_cost=100.0)
    with pytest.raises(ValueError, match="strategy"):
        calibrate("confidence", logits, y, COSTS, 0.5, full_cost=100.0, strategy="magic")
    assert PatiencePolicy(1)
