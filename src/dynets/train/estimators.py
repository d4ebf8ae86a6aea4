"""Gradient estimators for discrete decisions (gates, routes, exits) and compute-budget losses.

A dynamic network takes hard 0/1 or one-of-K decisions, which have no gradient. Three standard ways
to train the scores behind them:

- Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017): a soft, reparameterised sample of a
  categorical; with `hard=True` the forward value is the one-hot argmax while the gradient is the
  soft sample's (straight-through).
- Straight-through (Bengio et al. 2013): forward a hard 0/1 (sampled or thresholded), backward as if
  the hard value were the probability itself (identity gradient).
- Score function / REINFORCE (Williams 1992): unbiased, works for any non-differentiable reward;
  a moving-average baseline cuts its variance.

`budget_loss` pushes the mean per-sample compute fraction below (or towards) a target.
Random draws take an optional `torch.Generator` so a training run can be made bit-reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = [
    "BUDGET_KINDS",
    "ScoreFunctionEstimator",
    "budget_loss",
    "gumbel_softmax",
    "sample_gumbel",
    "straight_through_bernoulli",
    "straight_through_threshold",
]

BUDGET_KINDS = ("hinge", "square")


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values, got NaN or inf")


def _check_probs(name: str, probs: torch.Tensor) -> None:
    _check_finite(name, probs)
    if probs.numel() and (probs.min() < 0 or probs.max() > 1):
        raise ValueError(
            f"{name}: expected probabilities in [0, 1], got values in "
            f"[{probs.min().item():.4g}, {probs.max().item():.4g}]"
        )


def _uniform(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) draws of `shape` with like's dtype/device (drawn on the generator's device)."""
    gen_device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return u.to(device=like.device, dtype=like.dtype)


def sample_gumbel(
    shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise -log(-log U), with U kept away from 0 and 1 so it stays finite."""
    tiny = torch.finfo(like.dtype).tiny
    u = _uniform(shape, like, generator).clamp(tiny, 1.0 - torch.finfo(like.dtype).eps)
    return -torch.log(-torch.log(u))


def gumbel_softmax(
    logits: torch.Tensor,
    tau: float = 1.0,
    hard: bool = False,
    dim: int = -1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A Gumbel-softmax sample over `dim`: softmax((logits + g) / tau), g ~ Gumbel(0, 1).

    Soft samples sum to 1 along `dim` and approach one-hot as tau -> 0 (at the price of higher
    gradient variance). hard=True returns the one-hot argmax of the same sample in the forward pass
    with the soft sample's gradient (straight-through), so downstream code can index with it.
    """
    _check_finite("logits", logits)
    if not isinstance(tau, int | float) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau: expected a finite temperature > 0, got {tau!r}")
    if logits.dim() == 0:
        raise ValueError("logits: expected at least 1 dimension (the categories), got a scalar")
    g = sample_gumbel(logits.shape, logits, generator)
    soft = torch.softmax((logits + g) / tau, dim=dim)
    if not hard:
        return soft
    index = soft.argmax(dim=dim, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return one_hot + (soft - soft.detach())  # value: one_hot; gradient: d soft


def straight_through_bernoulli(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample b ~ Bernoulli(probs) (0/1 in probs' dtype); the gradient w.r.t. probs is the identity."""
    _check_probs("probs", probs)
    sample = (_uniform(probs.shape, probs, generator) < probs).to(probs.dtype)
    return probs + (sample - probs).detach()


def straight_through_threshold(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Deterministic gate 1[probs >= threshold] forward; identity gradient w.r.t. probs backward."""
    _check_probs("probs", probs)
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a number in [0, 1], got {threshold!r}")
    hard = (probs >= threshold).to(probs.dtype)
    return probs + (hard - probs).detach()


class ScoreFunctionEstimator(nn.Module):
    """REINFORCE with a moving-average baseline, as a surrogate loss to minimise.

        loss = -mean_b( log p(a_b) * (r_b - baseline) ) [- entropy_weight * mean entropy]

    Its gradient is an unbiased estimate of -grad E[r]. log_prob is (B,) or (B, ...) (trailing
    dimensions are summed: independent decisions of one sample multiply). The baseline is an
    exponential moving average of the batch-mean reward, updated after each call in training mode
    (it is a buffer, so it is saved with the model that owns the estimator). The first call sets it
    to the batch mean, so early losses are not dominated by a zero baseline.
    """

    def __init__(self, momentum: float = 0.9, normalize: bool = False) -> None:
        super().__init__()
        if not isinstance(momentum, int | float) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.normalize = bool(normalize)
        self.register_buffer("baseline", torch.zeros((), dtype=torch.float64))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(
        self,
        log_prob: torch.Tensor,
        reward: torch.Tensor,
        entropy: torch.Tensor | None = None,
        entropy_weight: float = 0.0,
    ) -> torch.Tensor:
        _check_finite("log_prob", log_prob)
        _check_finite("reward", reward)
        if log_prob.dim() == 0 or reward.dim() != 1 or log_prob.shape[0] != reward.shape[0]:
            raise ValueError(
                f"log_prob, reward: expected shapes (B, ...) and (B,), got {tuple(log_prob.shape)} "
                f"and {tuple(reward.shape)}"
            )
        if reward.numel() == 0:
            return log_prob.sum() * 0.0
        lp = log_prob.reshape(log_prob.shape[0], -1).sum(dim=1)  # (B,)
        r = reward.detach().to(torch.float64)
        if not bool(self.initialized):
            baseline = r.mean()
        else:
            baseline = self.baseline
        advantage = r - baseline
        if self.normalize and advantage.numel() > 1:
            advantage = advantage / (r.std() + 1e-8)
        loss = -(lp * advantage.to(lp.dtype)).mean()
        if entropy is not None and entropy_weight:
            loss = loss - entropy_weight * entropy.mean()
        if self.training:
            with torch.no_grad():
                if bool(self.initialized):
                    self.baseline.mul_(self.momentum).add_((1.0 - self.momentum) * r.mean())
                else:
                    self.baseline.copy_(r.mean())
                    self.initialized.fill_(True)
        return loss


def budget_loss(cost_fraction: torch.Tensor, target: float, kind: str = "hinge") -> torch.Tensor:
    """Penalty on the mean per-sample compute fraction c = mean(cost_fraction) against `target`.

    cost_fraction: (B,) differentiable expected compute of each sample as a fraction of the full
    model (e.g. the sum of gate probabilities times each block's share of FLOPs).
    "hinge": max(0, c - target) -- zero (and no gradient) while under budget; use it for "at most".
    "square": (c - target)^2 -- pulls c to the target from both sides; use it for "exactly".
    """
    _check_finite("cost_fraction", cost_fraction)
    if not isinstance(target, int | float) or isinstance(target, bool) or not math.isfinite(target):
        raise ValueError(f"target: expected a finite number >= 0, got {target!r}")
    if target < 0:
        raise ValueError(f"target: expected a compute fraction >= 0, got {target!r}")
    if kind not in BUDGET_KINDS:
        raise ValueError(f"kind: expected one of {BUDGET_KINDS}, got {kind!r}")
    if cost_fraction.numel() == 0:
        return cost_fraction.sum() * 0.0
    c = cost_fraction.mean()
    if kind == "hinge":
        return torch.relu(c - target)
    return (c - target) ** 2
