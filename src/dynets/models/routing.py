"""Zoo: `routed_resnet`, a CIFAR ResNet whose last group(s) route each sample to a cheap or an
expensive branch.

    trunk (stem + shared groups) -> BranchRouter(gate on the trunk's features)
        branch 0 "cheap":     fewer/narrower blocks + pool + linear
        branch 1 "expensive": the ResNet's own last group(s) + pool + linear

In training the router mixes both branches with a hard Gumbel-softmax sample (straight-through)
and adds a budget term (expected branch cost fraction vs `budget`) and a balance term to
aux["loss"]. With `supervise_branches` (the default) the training output also carries each branch's
own logits on every sample as extra exits ([cheap, expensive, routed]; the loop's multi-exit loss
trains all three): both branches run on every sample in training anyway, and without this the
router's early preference starves the other branch of training (a run with routing-only loss
collapsed onto the cheap branch and left the expensive one at 33% accuracy). In eval each branch
runs on its own sub-batch. Per-sample FLOPs = trunk + gate +
the branch taken. `set_cost_penalty(lam)` / `calibrate_route_bias(model, val_x, budget)` shift the
routing toward the cheap branch at run time without retraining.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import register_model
from dynets.core.serialization import register_architecture
from dynets.models.dynamic_params import _eval_flops, _per_channel, build_config, check_model_input
from dynets.models.resnet import BasicBlock, Normalize
from dynets.routing.router import BranchRouter, PoolGate

__all__ = ["RoutedResNet", "RoutedResNetConfig"]


@dataclass
class RoutedResNetConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)  # the ResNet of models/resnet.py (the expensive path)
    blocks: tuple[int, ...] = (3, 3, 3)
    stem_stride: int = 2
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    routed_groups: int = 1  # how many of the last groups are routed (inside the branches)
    cheap_widths: tuple[int, ...] | None = None  # the cheap branch's groups; None: half the widths
    cheap_blocks: tuple[int, ...] | None = None  # None: one block per routed group
    gate_hidden: int = 32
    tau: float = 1.0  # Gumbel-softmax temperature in training (> 0)
    budget: float | None = 0.5  # target expected cost fraction of the routed part (None: no budget term)
    budget_weight: float = 1.0
    balance_weight: float = 0.01
    supervise_branches: bool = True  # train each branch on every sample too (extra exits in training)

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.in_channels < 1 or self.num_classes < 2:
            raise ValueError(
                f"image_size/in_channels >= 1 and num_classes >= 2 expected, got "
                f"{self.image_size}/{self.in_channels}/{self.num_classes}"
            )
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(
                f"widths and blocks: expected equal non-empty lengths, got {self.widths} / {self.blocks}"
            )
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride: expected 1 or 2, got {self.stem_stride}")
        if not 1 <= self.routed_groups <= len(self.widths):
            raise ValueError(
                f"routed_groups: expected an int in [1, {len(self.widths)}], got {self.routed_groups}"
            )
        n = self.routed_groups
        for name in ("cheap_widths", "cheap_blocks"):
            v = getattr(self, name)
            if v is not None and (len(v) != n or any(int(e) < 1 for e in v)):
                raise ValueError(f"{name}: expected None or {n} ints >= 1 (one per routed group), got {v}")


@register_architecture
class RoutedResNet(nn.Module):
    """A ResNet whose last `routed_groups` groups are two alternative branches chosen per sample."""

    config_class = RoutedResNetConfig

    def __init__(self, config: RoutedResNetConfig) -> None:
        super().__init__()
        c = self.config = config
        n_shared = len(c.widths) - c.routed_groups
        trunk: list[nn.Module] = [
            Normalize(_per_channel(c.mean, c.in_channels), _per_channel(c.std, c.in_channels)),
            nn.Conv2d(c.in_channels, c.widths[0], 3, c.stem_stride, 1, bias=False),
            nn.BatchNorm2d(c.widths[0]),
            nn.ReLU(),
        ]
        cin = c.widths[0]
        for g in range(n_shared):
            for b in range(c.blocks[g]):
                trunk.append(BasicBlock(cin, c.widths[g], 2 if (g > 0 and b == 0) else 1))
                cin = c.widths[g]
        self.trunk = nn.Sequential(*trunk)
        spatial = (c.image_size + c.stem_stride - 1) // c.stem_stride
        for _ in range(1, n_shared):  # each later shared group halves the map
            spatial = (spatial + 1) // 2
        trunk_shape = (cin, spatial, spatial)

        routed = range(n_shared, len(c.widths))
        cheap_w = c.cheap_widths or tuple(max(c.widths[g] // 2, 1) for g in routed)
        cheap_b = c.cheap_blocks or tuple(1 for _ in routed)
        full_w = tuple(c.widths[g] for g in routed)
        full_b = tuple(c.blocks[g] for g in routed)
        first_stride = 2 if n_shared > 0 else 1
        branches = [
            self._branch(cin, cheap_w, cheap_b, first_stride, c.num_classes),
            self._branch(cin, full_w, full_b, first_stride, c.num_classes),
        ]
        self.router = BranchRouter(
            branches,
            gate=PoolGate(cin, 2, c.gate_hidden),
            tau=c.tau,
            budget=c.budget,
            budget_weight=c.budget_weight,
            balance_weight=c.balance_weight,
            sample_shape=trunk_shape,
        )
        self.input_shape = (c.in_channels, c.image_size, c.image_size)
        self.num_classes = c.num_classes
        self._trunk_cost = float(_eval_flops(self, self.trunk, torch.zeros(1, *self.input_shape)))

    @staticmethod
    def _branch(cin: int, widths: tuple, blocks: tuple, first_stride: int, num_classes: int) -> nn.Module:
        layers: list[nn.Module] = []
        for g, (w, nb) in enumerate(zip(widths, blocks)):
            for b in range(nb):
                stride = (first_stride if g == 0 else 2) if b == 0 else 1
                layers.append(BasicBlock(cin, int(w), stride))
                cin = int(w)
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    # ---------------------------------------------------------------- costs and the run-time knob
    def branch_costs(self) -> torch.Tensor:
        """(2,) float64: FLOPs per sample of a sample taking the cheap / the expensive branch."""
        rc = self.router.costs()
        return self._trunk_cost + rc["gate"] + rc["branches"]

    def full_cost(self) -> float:
        """FLOPs per sample of the expensive route (trunk, gate, expensive branch)."""
        return float(self.branch_costs().max())

    def set_cost_penalty(self, penalty: float) -> None:
        """Shift routing toward the cheap branch (penalty > 0) or the expensive one (< 0)."""
        self.router.set_cost_penalty(penalty)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> DynamicOutput | MultiExitOutput:
        check_model_input(x, self.input_shape)
        if self.training:
            r = self.router(self.trunk(x))
            exits = [r.output]
            if self.config.supervise_branches:
                exits = [*r.branch_outputs.unbind(1), r.output]
            return MultiExitOutput(exits, aux={"loss": r.aux_loss, "branch": r.branch, "probs": r.probs})
        with torch.no_grad():
            r = self.router(self.trunk(x))
            return DynamicOutput(
                r.output, flops=self._trunk_cost + r.flops, decisions={"branch": r.branch, "probs": r.probs}
            )

    @torch.no_grad()
    def forward_branch(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        """Every sample through one branch (a static model; the reference for tests and timing)."""
        return self.router.branches[branch](self.trunk(x))


@register_model
def routed_resnet(**kw: object) -> RoutedResNet:
    """CIFAR ResNet whose last group routes each sample to a cheap or an expensive branch."""
    return RoutedResNet(build_config(RoutedResNetConfig, kw))
