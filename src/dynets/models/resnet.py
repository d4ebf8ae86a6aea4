"""Multi-exit ResNet for small images (CIFAR 32x32, MNIST 28x28, digits 8x8).

Each residual block is a stage, so exits can follow any block; `exits=[]` gives the static
baseline: the same backbone with only its final classifier, trained identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dynets.core.registry import register_model
from dynets.core.serialization import register_architecture
from dynets.depth.early_exit import EarlyExitNetwork
from dynets.depth.heads import HeadConfig, make_head


class Normalize(nn.Module):
    """Per-channel standardisation inside the model, so saved models take raw [0, 1] inputs."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.short is None else self.short(x)))


@dataclass
class ResNetConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    # Default: a ResNet-20 layout (3 groups of 3 blocks) whose stem downsamples to 16x16 and whose
    # groups are twice as wide as the classic CIFAR ResNet-20: about the same FLOPs (81 M), but on
    # CPU thin full-resolution layers run at half the FLOP rate of later ones, which makes early
    # exits cost more time than their FLOPs say. This layout keeps time proportional to FLOPs.
    # Classic ResNet-20: widths=(16, 32, 64), stem_stride=1.
    widths: tuple[int, ...] = (32, 64, 128)
    blocks: tuple[int, ...] = (3, 3, 3)
    exits: tuple[int, ...] | None = (1, 3, 5)  # blocks followed by an exit; None = every block
    head: HeadConfig = field(default_factory=HeadConfig)
    stem_stride: int = 2  # 1 = classic CIFAR stem at full resolution
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    learned_exits: bool = True

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(
                f"widths and blocks: expected equal non-empty lengths, got {self.widths} / {self.blocks}"
            )
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride: expected 1 or 2, got {self.stem_stride}")
        if self.image_size < 1 or self.in_channels < 1 or self.num_classes < 2:
            raise ValueError(
                f"image_size/in_channels >= 1 and num_classes >= 2 expected, got "
                f"{self.image_size}/{self.in_channels}/{self.num_classes}"
            )
        n = sum(self.blocks)
        if self.exits is not None and any(not 0 <= e < n - 1 for e in self.exits):
            raise ValueError(
                f"exits: expected block indices in [0, {n - 2}] (the final exit is implicit), "
                f"got {self.exits}"
            )


@register_architecture
class EarlyExitResNet(EarlyExitNetwork):
    """A ResNet whose blocks are stages; exit heads after the configured blocks."""

    config_class = ResNetConfig

    def __init__(self, config: ResNetConfig) -> None:
        c = config
        stem = [
            Normalize(_per_channel(c.mean, c.in_channels), _per_channel(c.std, c.in_channels)),
            nn.Conv2d(c.in_channels, c.widths[0], 3, c.stem_stride, 1, bias=False),
            nn.BatchNorm2d(c.widths[0]),
            nn.ReLU(),
        ]
        stages: list[nn.Module] = []
        spatial_after: list[int] = []
        channels_after: list[int] = []
        cin, spatial = c.widths[0], (c.image_size + c.stem_stride - 1) // c.stem_stride
        for g, (w, nb) in enumerate(zip(c.widths, c.blocks)):
            for b in range(nb):
                stride = 2 if (g > 0 and b == 0) else 1
                block = BasicBlock(cin, w, stride)
                spatial = (spatial + stride - 1) // stride
                stages.append(nn.Sequential(*stem, block) if not stages else block)
                spatial_after.append(spatial)
                channels_after.append(w)
                cin = w
        n = len(stages)
        exit_blocks = list(range(n - 1)) if c.exits is None else sorted(set(c.exits))
        exit_stages = exit_blocks + [n - 1]
        heads = [make_head(c.head, channels_after[s], spatial_after[s], c.num_classes) for s in exit_blocks]
        heads.append(
            make_head(HeadConfig(kind="linear"), channels_after[-1], spatial_after[-1], c.num_classes)
        )
        super().__init__(
            stages,
            heads,
            exit_stages,
            input_shape=(c.in_channels, c.image_size, c.image_size),
            num_classes=c.num_classes,
            learned_exits=c.learned_exits and len(exit_stages) > 1,
        )
        self.config = config


def _per_channel(v: tuple[float, ...], n: int) -> tuple[float, ...]:
    return tuple(v) * n if len(v) == 1 else tuple(v)


@register_model
def ee_resnet(**kw: object) -> EarlyExitResNet:
    """Multi-exit ResNet-20-style net (exits after blocks 1, 3, 5 and the last) for 32x32 images."""
    return EarlyExitResNet(_config(ResNetConfig, kw))


@register_model
def static_resnet(**kw: object) -> EarlyExitResNet:
    """The same ResNet with only its final classifier: the static baseline."""
    kw.setdefault("exits", ())
    return EarlyExitResNet(_config(ResNetConfig, kw))


def _config(cls: type, kw: dict) -> object:
    from dynets.core.config import config_from_dict

    cfg = kw.pop("config", None)
    if cfg is not None:
        return cfg
    if isinstance(kw.get("head"), dict):
        kw["head"] = HeadConfig(**kw["head"])
    for key in ("widths", "blocks", "exits", "mean", "std"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    return config_from_dict(cls, kw)
