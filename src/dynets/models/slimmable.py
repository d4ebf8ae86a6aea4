"""Slimmable ResNet: the CIFAR ResNet layout of `models/resnet.py` built from slimmable layers, run
at width multipliers (default 0.25, 0.5, 0.75, 1.0) with one set of weights, and a per-sample
width chooser (the smallest width's confidence decides who runs wider; see width/slimmable.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynets.core.registry import register_model
from dynets.core.serialization import register_architecture
from dynets.models.resnet import Normalize
from dynets.models.skipnet import build_config, per_channel
from dynets.width.slimmable import (
    SlimmableBatchNorm2d,
    SlimmableConv2d,
    SlimmableLinear,
    SlimmableNetwork,
    check_width_mults,
)


class SlimmableBasicBlock(nn.Module):
    """BasicBlock (two 3x3 convs + shortcut) whose every conv and BN runs at width index wi."""

    def __init__(self, cin: int, cout: int, stride: int, width_mults: tuple[float, ...], switchable: bool):
        super().__init__()
        kw = dict(width_mults=width_mults)
        self.conv1 = SlimmableConv2d(cin, cout, 3, stride, 1, **kw)
        self.bn1 = SlimmableBatchNorm2d(cout, width_mults, switchable)
        self.conv2 = SlimmableConv2d(cout, cout, 3, 1, 1, **kw)
        self.bn2 = SlimmableBatchNorm2d(cout, width_mults, switchable)
        self.short_conv = self.short_bn = None
        if stride != 1 or cin != cout:
            self.short_conv = SlimmableConv2d(cin, cout, 1, stride, 0, **kw)
            self.short_bn = SlimmableBatchNorm2d(cout, width_mults, switchable)

    def forward(
        self, x: torch.Tensor, wi: int
    ) -> torch.Tensor:  # (B, c_in(wi), H, W) -> (B, c_out(wi), H', W')
        out = torch.relu(self.bn1(self.conv1(x, wi), wi))
        out = self.bn2(self.conv2(out, wi), wi)
        short = x if self.short_conv is None else self.short_bn(self.short_conv(x, wi), wi)
        return torch.relu(out + short)


@dataclass
class SlimmableResNetConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)  # channels at width 1.0: static_resnet's default layout
    blocks: tuple[int, ...] = (3, 3, 3)
    stem_stride: int = 2
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    width_mults: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    switchable_bn: bool = True  # False: shared affine BN, private statistics (recalibrate after training)
    sandwich_random: int = 2  # random intermediate widths per training step (besides smallest, largest)
    distill_temperature: float = 1.0  # sandwich_loss "distill" only
    sandwich_loss: str = "label"  # "label": every width on the labels; "distill": in-place distillation
    thresholds: tuple[float, ...] = (0.9,)  # initial width policy

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths or min(self.blocks) < 1:
            raise ValueError(
                f"widths and blocks: expected equal non-empty lengths and blocks >= 1, "
                f"got {self.widths} / {self.blocks}"
            )
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride: expected 1 or 2, got {self.stem_stride}")
        if self.image_size < 1 or self.in_channels < 1 or self.num_classes < 2:
            raise ValueError(
                f"image_size/in_channels >= 1 and num_classes >= 2 expected, got "
                f"{self.image_size}/{self.in_channels}/{self.num_classes}"
            )
        self.width_mults = check_width_mults(self.width_mults)
        if isinstance(self.thresholds, (int, float)):
            self.thresholds = (float(self.thresholds),)


@register_architecture
class SlimmableResNet(SlimmableNetwork):
    """A ResNet with one set of weights at several widths and a per-sample width chooser."""

    config_class = SlimmableResNetConfig

    def __init__(self, config: SlimmableResNetConfig) -> None:
        c = config
        super().__init__(
            width_mults=c.width_mults,
            input_shape=(c.in_channels, c.image_size, c.image_size),
            num_classes=c.num_classes,
            sandwich_random=c.sandwich_random,
            distill_temperature=c.distill_temperature,
            sandwich_loss=c.sandwich_loss,
            thresholds=c.thresholds,
        )
        wm, sw = self.width_mults, c.switchable_bn
        self.normalize = Normalize(per_channel(c.mean, c.in_channels), per_channel(c.std, c.in_channels))
        self.stem_conv = SlimmableConv2d(c.in_channels, c.widths[0], 3, c.stem_stride, 1, width_mults=wm)
        self.stem_bn = SlimmableBatchNorm2d(c.widths[0], wm, sw)
        blocks, cin = [], c.widths[0]
        for g, (w, nb) in enumerate(zip(c.widths, c.blocks)):
            for b in range(nb):
                blocks.append(SlimmableBasicBlock(cin, w, 2 if (g > 0 and b == 0) else 1, wm, sw))
                cin = w
        self.blocks = nn.ModuleList(blocks)
        self.fc = SlimmableLinear(cin, c.num_classes)
        self.config = config

    @torch.no_grad()
    def init_from_static(self, static: nn.Module) -> SlimmableResNet:
        """Start from a trained `static_resnet` of the same layout: its weights become the full
        width, narrower widths start from their first channels (then train with the sandwich rule)."""
        stages = list(static.stages)
        if len(stages) != len(self.blocks):
            raise ValueError(f"static model: expected {len(self.blocks)} blocks, got {len(stages)}")
        first = list(stages[0])
        self.stem_conv.weight.copy_(first[1].weight)
        self.stem_bn.load_full_width(first[2])
        for mine, theirs in zip(self.blocks, [first[4], *stages[1:]]):
            mine.conv1.weight.copy_(theirs.conv1.weight)
            mine.bn1.load_full_width(theirs.bn1)
            mine.conv2.weight.copy_(theirs.conv2.weight)
            mine.bn2.load_full_width(theirs.bn2)
            if mine.short_conv is not None:
                mine.short_conv.weight.copy_(theirs.short[0].weight)
                mine.short_bn.load_full_width(theirs.short[1])
        fc = static.heads[-1][-1]
        self.fc.weight.copy_(fc.weight)
        self.fc.bias.copy_(fc.bias)
        return self

    def forward_width(self, x: torch.Tensor, wi: int) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, num_classes), every layer at width index wi."""
        h = torch.relu(self.stem_bn(self.stem_conv(self.normalize(x), wi), wi))
        for block in self.blocks:
            h = block(h, wi)
        return self.fc(h.mean(dim=(2, 3)))  # (B, c_last(wi)) -> (B, num_classes)


@register_model
def slimmable_resnet(**kw: object) -> SlimmableResNet:
    """ResNet-20-style slimmable net (widths 0.25-1.0, switchable BN) with a per-sample width chooser."""
    return SlimmableResNet(build_config(SlimmableResNetConfig, kw))
