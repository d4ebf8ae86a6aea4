"""Glance and focus (GFNet-style, Wang et al. 2020): a cheap look first, a closer look if needed.

1. glance: a small CNN classifies a downsampled copy of the image (32x32 -> 16x16 by area
   averaging); a policy (max-softmax confidence by default) stops the samples it is sure of.
2. select: for the others only, a patch selector scores a grid of candidate crops (e.g. 3x3
   top-left positions of a 20x20 crop) from the glance features and takes the best one.
3. focus: a second CNN looks at that crop at full resolution; its features, concatenated with
   the glance features, give the final logits.

Samples that stop after the glance leave the batch (index_select), the rest are focused and
scattered back in input order. The policy is a dynets ExitPolicy over two exits (glance,
focus), so `dynets.policies.calibrate` fits its threshold to a FLOPs budget, and the model
offers the early-exit interface `all_exit_logits` / `exit_costs` / `full_cost` that the
evaluation and calibration tools use.

Training: both exits' logits (MultiExitOutput), so the default multi-exit loss trains glance and
focus jointly; the patch is a straight-through Gumbel-softmax sample over the candidates, the
crop the one-hot-weighted sum of the candidate crops, so the focus loss trains the selector.

decisions: "focused" (B,) bool, "patch" (B, 2) int64 top-left (row, col) of the crop (-1 when the
sample stopped after the glance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynets.core.cost import measure_flops
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import register_model
from dynets.core.serialization import register_architecture
from dynets.models.resnet import BasicBlock, Normalize
from dynets.models.vit import check_images, vit_config
from dynets.policies.exit_policies import ConfidencePolicy, ExitPolicy
from dynets.train.estimators import gumbel_softmax


@dataclass
class GlanceFocusConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    glance_size: int = 16  # the glance sees the image downsampled to this size
    patch_size: int = 20  # the focus sees a crop of this size at full resolution
    patch_grid: int = 3  # candidate crops: patch_grid x patch_grid evenly spaced positions
    widths: tuple[int, ...] = (32, 64, 128)
    glance_blocks: tuple[int, ...] = (1, 1, 1)
    focus_blocks: tuple[int, ...] = (1, 1, 1)
    focus_stem_stride: int = 1  # 1: the crop at full resolution
    tau: float = 1.0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)

    def __post_init__(self) -> None:
        if not 1 <= self.glance_size <= self.image_size:
            raise ValueError(f"glance_size: expected 1..image_size={self.image_size}, got {self.glance_size}")
        if not 1 <= self.patch_size <= self.image_size:
            raise ValueError(f"patch_size: expected 1..image_size={self.image_size}, got {self.patch_size}")
        if self.patch_grid < 1 or (self.patch_grid > 1 and self.patch_size == self.image_size):
            raise ValueError(
                f"patch_grid: expected >= 1 (1 if patch_size == image_size), got {self.patch_grid}"
            )
        if len(self.widths) != len(self.glance_blocks) or len(self.widths) != len(self.focus_blocks):
            raise ValueError(
                f"widths, glance_blocks, focus_blocks: expected equal lengths, got {self.widths}, "
                f"{self.glance_blocks}, {self.focus_blocks}"
            )
        if self.focus_stem_stride not in (1, 2):
            raise ValueError(f"focus_stem_stride: expected 1 or 2, got {self.focus_stem_stride}")
        if self.num_classes < 2 or self.in_channels < 1:
            raise ValueError(
                f"num_classes >= 2 and in_channels >= 1 expected, got {self.num_classes}/{self.in_channels}"
            )

    def positions(self) -> list[tuple[int, int]]:
        """Top-left (row, col) of every candidate crop, row-major."""
        span = self.image_size - self.patch_size
        steps = (
            [round(i * span / (self.patch_grid - 1)) for i in range(self.patch_grid)]
            if self.patch_grid > 1
            else [0]
        )
        return [(r, c) for r in steps for c in steps]


class SmallCNN(nn.Module):
    """Stem conv + groups of residual blocks + global average pooling -> (B, widths[-1])."""

    def __init__(self, cin: int, widths: tuple[int, ...], blocks: tuple[int, ...], stem_stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(cin, widths[0], 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        ]
        c = widths[0]
        for g, (w, n) in enumerate(zip(widths, blocks)):
            for b in range(n):
                layers.append(BasicBlock(c, w, 2 if g > 0 and b == 0 else 1))
                c = w
        self.body = nn.Sequential(*layers)
        self.out_dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))


@register_architecture
class GlanceFocusNet(nn.Module):
    config_class = GlanceFocusConfig

    def __init__(self, config: GlanceFocusConfig, policy: ExitPolicy | None = None) -> None:
        super().__init__()
        c = self.config = config
        self.input_shape = (c.in_channels, c.image_size, c.image_size)
        self.num_classes = c.num_classes
        mean = tuple(c.mean) * c.in_channels if len(c.mean) == 1 else tuple(c.mean)
        std = tuple(c.std) * c.in_channels if len(c.std) == 1 else tuple(c.std)
        self.normalize = Normalize(mean, std)
        self.glance = SmallCNN(c.in_channels, c.widths, c.glance_blocks, 1)
        self.glance_head = nn.Linear(self.glance.out_dim, c.num_classes)
        n_pos = len(c.positions())
        self.selector = nn.Sequential(nn.Linear(self.glance.out_dim, 64), nn.ReLU(), nn.Linear(64, n_pos))
        self.focus = SmallCNN(c.in_channels, c.widths, c.focus_blocks, c.focus_stem_stride)
        self.focus_head = nn.Linear(self.glance.out_dim + self.focus.out_dim, c.num_classes)
        self.register_buffer("pos", torch.tensor(c.positions(), dtype=torch.long), persistent=False)  # (P, 2)
        self.policy: ExitPolicy = policy if policy is not None else ConfidencePolicy(0.9)
        self.exit_predictors = nn.ModuleList()  # no learned exits (the evaluation tools ask)
        self._costs: torch.Tensor | None = None

    num_exits = 2

    # ---------------------------------------------------------------- units
    def run_glance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) raw images -> glance features (B, F), glance logits (B, K)."""
        small = F.adaptive_avg_pool2d(self.normalize(x), self.config.glance_size)
        g = self.glance(small)
        return g, self.glance_head(g)

    def crops(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Crop candidate `index` (B,) of each normalised image x (B, C, H, W) -> (B, C, p, p)."""
        p = self.config.patch_size
        ar = torch.arange(p, device=x.device)
        rows = self.pos[index, 0][:, None] + ar  # (B, p)
        cols = self.pos[index, 1][:, None] + ar
        b = torch.arange(x.shape[0], device=x.device)[:, None, None]
        return x[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, p, p, C) -> (B, C, p, p)

    def run_focus(self, x: torch.Tensor, g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Focus on candidate `index` (B,) of raw images x; g the glance features -> logits (B, K)."""
        f = self.focus(self.crops(self.normalize(x), index))
        return self.focus_head(torch.cat([g, f], 1))

    def select(self, g: torch.Tensor) -> torch.Tensor:
        return self.selector(g).argmax(-1)  # (B,) candidate index

    # ---------------------------------------------------------------- costs
    def exit_costs(self, learned: bool = False) -> torch.Tensor:
        """(2,) float64: FLOPs per sample stopping after the glance, and after the focus."""
        if self._costs is None:
            dev = self.pos.device
            x = torch.zeros(1, *self.input_shape, device=dev)
            was = self.training
            self.eval()
            glance = measure_flops(self.run_glance, x)
            g = torch.zeros(1, self.glance.out_dim, device=dev)
            select = measure_flops(self.select, g)
            focus = measure_flops(
                lambda x_, g_: self.run_focus(x_, g_, torch.zeros(1, dtype=torch.long, device=dev)), x, g
            )
            self.train(was)
            self._costs = torch.tensor([glance, glance + select + focus], dtype=torch.float64)
        return self._costs

    def full_cost(self) -> float:
        """FLOPs of a sample that is glanced and focused (the most this model spends)."""
        return float(self.exit_costs()[-1])

    # ---------------------------------------------------------------- forward
    def all_exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Glance on all, select and focus on all (no stopping): the reference, and `collect`'s view."""
        g, g_logits = self.run_glance(x)
        return [g_logits, self.run_focus(x, g, self.select(g))]

    def forward(
        self, x: torch.Tensor, policy: ExitPolicy | None = None, *, threshold: float | None = None
    ) -> DynamicOutput | MultiExitOutput:
        check_images(x, self.input_shape)
        if self.training:
            return self.forward_train(x)
        if threshold is not None:
            policy = ConfidencePolicy(threshold)
        policy = policy if policy is not None else self.policy
        with torch.no_grad():
            return self.run_dynamic(x, policy)

    def forward_train(self, x: torch.Tensor) -> MultiExitOutput:
        g, g_logits = self.run_glance(x)
        xn = self.normalize(x)
        P = self.pos.shape[0]
        w = (
            gumbel_softmax(self.selector(g), tau=self.config.tau, hard=True)
            if self.selector.training
            else F.one_hot(self.select(g), P).to(x.dtype)
        )  # (B, P) one-hot forward, soft gradient
        idx = torch.arange(P, device=x.device)
        cand = torch.stack(
            [self.crops(xn, idx[j].expand(x.shape[0])) for j in range(P)], 1
        )  # (B, P, C, p, p)
        crop = torch.einsum("bp,bpchw->bchw", w, cand)
        f_logits = self.focus_head(torch.cat([g, self.focus(crop)], 1))
        return MultiExitOutput([g_logits, f_logits])

    def run_dynamic(self, x: torch.Tensor, policy: ExitPolicy) -> DynamicOutput:
        if policy.needs_learned:
            raise ValueError(f"policy {policy.kind!r} needs learned exits, but glance_focus has none")
        B = x.shape[0]
        costs = self.exit_costs()
        patch = torch.full((B, 2), -1, dtype=torch.long, device=x.device)
        if B == 0:
            return DynamicOutput(
                x.new_zeros(0, self.num_classes),
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.float64),
                decisions={"focused": torch.zeros(0, dtype=torch.bool), "patch": patch},
            )
        g, logits = self.run_glance(x)  # 1. glance at everyone
        stop, _ = policy.step(0, logits, policy.init_state(B, x.device))
        focused = ~stop
        idx = focused.nonzero().squeeze(1)
        if idx.numel():  # 2-3. only the unsure ones: select a patch, focus, scatter back in order
            g_sub = g.index_select(0, idx)
            choice = self.select(g_sub)
            f_logits = self.run_focus(x.index_select(0, idx), g_sub, choice)
            logits = logits.index_copy(0, idx, f_logits)
            patch.index_copy_(0, idx, self.pos[choice])
        exit_index = focused.long()
        flops = costs.to(x.device)[exit_index]
        return DynamicOutput(logits, exit_index, flops, decisions={"focused": focused, "patch": patch})


@register_model
def glance_focus(**kw: object) -> GlanceFocusNet:
    """GFNet-style glance (16x16 downsample) and focus (a 20x20 full-resolution crop) CNNs."""
    return GlanceFocusNet(vit_config(GlanceFocusConfig, kw))
