"""Estimators for discrete decisions: gradient behaviour on toy problems."""

import pytest
import torch

from dynets.train.estimators import (
    ScoreFunctionEstimator,
    budget_loss,
    gumbel_softmax,
    straight_through_bernoulli,
    straight_through_threshold,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gumbel_soft_sums_to_one_and_sharpens_with_low_tau():
    logits = torch.randn(64, 5, generator=_gen(1))
    soft = gumbel_softmax(logits, tau=1.0, generator=_gen(2))
    assert torch.allclose(soft.sum(-1), torch.ones(64), atol=1e-6)
    assert (soft > 0).all()
    cold = gumbel_softmax(logits, tau=1e-4, generator=_gen(2))
    # the same noise at low temperature: one-hot (up to exact near-ties) at the same argmax
    assert (cold.max(-1).values > 0.999).float().mean() > 0.95
    assert torch.equal(cold.argmax(-1), soft.argmax(-1))
    # mean max-probability grows as tau shrinks
    maxes = [gumbel_softmax(logits, tau=t, generator=_gen(3)).max(-1).values.mean() for t in (5.0, 1.0, 0.2)]
    assert maxes[0] < maxes[1] < maxes[2]


def test_gumbel_generator_is_deterministic_and_dim_works():
    logits = torch.randn(3, 4, 6)
    a = gumbel_softmax(logits, tau=0.5, dim=1, generator=_gen(7))
    b = gumbel_softmax(logits, tau=0.5, dim=1, generator=_gen(7))
    assert torch.equal(a, b)
    assert torch.allclose(a.sum(1), torch.ones(3, 6), atol=1e-6)


def test_gumbel_sampling_frequencies_match_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0]).expand(20000, 3)
    hard = gumbel_softmax(logits, hard=True, generator=_gen(4))
    freq = hard.mean(0)
    assert torch.allclose(freq, torch.softmax(logits[0], 0), atol=0.02)


def test_gumbel_hard_is_one_hot_with_soft_gradient():
    logits = torch.randn(8, 4, generator=_gen(5))
    w = torch.randn(8, 4, generator=_gen(6))
    lh = logits.clone().requires_grad_(True)
    hard = gumbel_softmax(lh, tau=0.7, hard=True, generator=_gen(9))
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.detach().sum(-1), torch.ones(8))
    (hard * w).sum().backward()
    ls = logits.clone().requires_grad_(True)
    soft = gumbel_softmax(ls, tau=0.7, hard=False, generator=_gen(9))
    assert torch.equal(hard.detach().argmax(-1), soft.detach().argmax(-1))
    (soft * w).sum().backward()
    assert torch.allclose(lh.grad, ls.grad, atol=1e-6)
    assert lh.grad.abs().sum() > 0


def test_gumbel_bad_tau():
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax(torch.zeros(2, 3), tau=0.0)
    with pytest.raises(ValueError, match="logits"):
        gumbel_softmax(torch.tensor([[float("nan"), 0.0]]))


def test_straight_through_bernoulli_samples_and_identity_gradient():
    probs = torch.full((20000,), 0.3, requires_grad=True)
    b = straight_through_bernoulli(probs, generator=_gen(1))
    assert set(b.detach().unique().tolist()) <= {0.0, 1.0}
    assert abs(b.detach().mean().item() - 0.3) < 0.02
    w = torch.randn(20000)
    (b * w).sum().backward()
    assert torch.allclose(probs.grad, w)
    b2 = straight_through_bernoulli(probs.detach(), generator=_gen(1))
    assert torch.equal(b.detach(), b2)
    assert torch.equal(straight_through_bernoulli(torch.tensor([0.0, 1.0])), torch.tensor([0.0, 1.0]))


def test_straight_through_threshold_identity_gradient():
    probs = torch.tensor([0.1, 0.5, 0.49, 0.9], requires_grad=True)
    g = straight_through_threshold(probs, threshold=0.5)
    assert g.tolist() == [0.0, 1.0, 0.0, 1.0]
    (g * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert probs.grad.tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="probs"):
        straight_through_threshold(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="threshold"):
        straight_through_threshold(torch.tensor([0.5]), threshold=2.0)


def test_straight_through_learns_gate_towards_reward():
    # a gate that pays +1 when open: the ST gradient opens it
    logit = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([logit], lr=0.5)
    g = _gen(0)
    for _ in range(50):
        gate = straight_through_bernoulli(torch.sigmoid(logit).expand(16), generator=g)
        loss = -gate.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.sigmoid(logit).item() > 0.9


def test_reinforce_two_armed_bandit_learns_better_arm():
    torch.manual_seed(0)
    logits = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    est = ScoreFunctionEstimator(momentum=0.9)
    g = _gen(11)
    arm_means = torch.tensor([0.2, 0.8])
    for _ in range(150):
        dist = torch.distributions.Categorical(logits=logits.expand(32, 2))
        a = torch.multinomial(dist.probs.detach(), 1, generator=g).squeeze(1)
        reward = arm_means[a] + 0.1 * torch.randn(32, generator=g)
        loss = est(dist.log_prob(a), reward)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.softmax(logits, 0)[1].item() > 0.9
    # the baseline tracks the running reward (between the two arms' means, close to the better one)
    assert 0.5 < est.baseline.item() < 0.85


def test_reinforce_baseline_first_call_and_eval_freeze():
    est = ScoreFunctionEstimator(momentum=0.5)
    lp = torch.zeros(4, 3, requires_grad=True)  # trailing dims summed
    est(lp, torch.tensor([1.0, 1.0, 3.0, 3.0]))
    assert est.baseline.item() == pytest.approx(2.0)
    est(lp, torch.tensor([4.0, 4.0, 4.0, 4.0]))
    assert est.baseline.item() == pytest.approx(3.0)
    est.eval()
    est(lp, torch.tensor([100.0] * 4))
    assert est.baseline.item() == pytest.approx(3.0)
    # surrogate gradient: d/d lp_b = -(r_b - baseline) / B for each trailing entry
    lp2 = torch.zeros(2, requires_grad=True)
    est(lp2, torch.tensor([5.0, 1.0])).backward()
    assert lp2.grad.tolist() == pytest.approx([-1.0, 1.0])
    with pytest.raises(ValueError, match="log_prob"):
        est(torch.zeros(3), torch.zeros(4))


def test_budget_loss_hinge_and_square():
    under = torch.tensor([0.2, 0.4], requires_grad=True)
    loss = budget_loss(under, target=0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(under.grad, torch.zeros(2))
    over = torch.tensor([0.8, 0.6], requires_grad=True)
    loss = budget_loss(over, target=0.5)
    assert loss.item() == pytest.approx(0.2)
    loss.backward()
    assert (over.grad > 0).all()  # descending lowers the cost
    sq_under = torch.tensor([0.2, 0.4], requires_grad=True)
    loss = budget_loss(sq_under, target=0.5, kind="square")
    assert loss.item() == pytest.approx(0.04)
    loss.backward()
    assert (sq_under.grad < 0).all()  # square pulls cost up towards the target
    with pytest.raises(ValueError, match="kind"):
        budget_loss(over, 0.5, kind="l1")
    with pytest.raises(ValueError, match="target"):
        budget_loss(over, -0.1)
