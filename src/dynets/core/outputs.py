"""Output dataclasses shared by every dynamic model.

One `forward`, two behaviours: in eval mode a dynamic model runs dynamically and returns a
`DynamicOutput` (logits in input order plus what each sample did and cost); in training mode it
returns a `MultiExitOutput` holding everything the losses need (every exit's logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DynamicOutput:
    """Result of a dynamic forward pass.

    logits:      (B, C) in the order of the input batch.
    exit_index:  (B,) int64, which exit (decision point) produced each sample's logits; None for
                 models without exits (block skipping, experts, token pruning, ...).
    flops:       (B,) float64, FLOPs actually spent on each sample (sum of the units it ran).
    record:      optional per-sample detail (e.g. the scores seen at each exit); None unless asked.
    decisions:   per-sample decisions by name, each a tensor whose first dimension is B, e.g.
                 {"blocks_run": (B, n_blocks) bool, "width": (B,), "expert": (B, T, k) int64}.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor | None = None
    flops: torch.Tensor | None = None
    record: dict[str, Any] | None = None
    decisions: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.flops is None:
            raise TypeError("DynamicOutput: expected per-sample `flops` (a (B,) tensor), got None")

    @property
    def prediction(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)

    def __len__(self) -> int:
        return self.logits.shape[0]


@dataclass
class MultiExitOutput:
    """Training-mode output: the logits of every exit, shallowest first, each (B, C).

    `aux` carries optional extra tensors (e.g. learned-exit scores) keyed by name. A scalar
    `aux["loss"]` (a budget, load-balancing or z-loss term the model computed) is added to the
    task loss by the default training loss; a static or single-exit model passes `[logits]`.
    """

    exit_logits: list[torch.Tensor]
    aux: dict[str, Any] = field(default_factory=dict)

    @property
    def logits(self) -> torch.Tensor:
        """The final exit's logits, so code written for static models keeps working."""
        return self.exit_logits[-1]
