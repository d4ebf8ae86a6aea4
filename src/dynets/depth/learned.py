"""Training the learned exit: a small head per exit predicting "this exit is already right".

The network is frozen; each exit's predictor learns, with binary cross-entropy on held-out data,
whether argmax of that exit's logits equals the label. The LearnedPolicy then thresholds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynets.depth.early_exit import EarlyExitNetwork


def fit_learned_exits(
    model: EarlyExitNetwork,
    exit_logits: list[torch.Tensor],
    labels: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> list[float]:
    """Fit `model.exit_predictors` on precomputed exit logits; returns the final loss per exit."""
    if not len(model.exit_predictors):
        raise ValueError("model has no learned exits (built with learned_exits=False)")
    if len(exit_logits) != model.num_exits:
        raise ValueError(f"exit_logits: expected {model.num_exits} tensors, got {len(exit_logits)}")
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for k, pred in enumerate(model.exit_predictors):
        logits = exit_logits[k].detach().float()
        target = (logits.argmax(-1) == labels).float()
        for p in pred.parameters():
            p.requires_grad_(True)
        for m in pred.modules():
            if isinstance(m, torch.nn.Linear):
                g = torch.randn(m.weight.shape, generator=gen) * (1.0 / m.in_features) ** 0.5
                m.weight.data.copy_(g)
                m.bias.data.zero_()
        opt = torch.optim.Adam(pred.parameters(), lr=lr)
        pred.train()
        for _ in range(steps):
            opt.zero_grad()
            loss = F.binary_cross_entropy(pred(logits).clamp(1e-6, 1 - 1e-6), target)
            loss.backward()
            opt.step()
        pred.eval()
        for p in pred.parameters():
            p.requires_grad_(False)
        losses.append(float(loss.detach()))
    return losses
