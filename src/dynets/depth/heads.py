"""Exit heads: map a stage's features to class logits.

`linear`: global average pool + linear (cheapest). `conv`: one 3x3 conv (stride 2 while the map is
at least 8x8) + BN + ReLU, then pool + linear, the Shallow-Deep Networks / MSDNet recipe that
makes shallow exits far stronger for a small cost. `conv2`: two such convs (the second at stride 1),
as MSDNet's classifiers: stronger again, at several times the cost. `mlp`: pool + hidden layer + linear.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class HeadConfig:
    kind: str = "conv"  # "linear" | "conv" | "conv2" | "mlp"
    hidden: int = 0  # conv channels or MLP width; 0 = the stage's own channel count
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "conv", "conv2", "mlp"):
            raise ValueError(f"head kind: expected 'linear', 'conv', 'conv2' or 'mlp', got {self.kind!r}")
        if self.hidden < 0:
            raise ValueError(f"head hidden: expected >= 0, got {self.hidden}")


def make_head(cfg: HeadConfig, channels: int, spatial: int, num_classes: int) -> nn.Module:
    """A head for features of shape (B, channels, spatial, spatial)."""
    drop = [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else []
    hidden = cfg.hidden or channels
    if cfg.kind == "linear":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), *drop, nn.Linear(channels, num_classes))
    if cfg.kind == "mlp":
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, hidden),
            nn.ReLU(),
            *drop,
            nn.Linear(hidden, num_classes),
        )
    stride = 2 if spatial >= 8 else 1
    second = (
        [
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        ]
        if cfg.kind == "conv2"
        else []
    )
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        *second,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        *drop,
        nn.Linear(hidden, num_classes),
    )
