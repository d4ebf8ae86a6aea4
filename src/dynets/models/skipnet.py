"""SkipNet-style ResNet: the CIFAR ResNet of `models/resnet.py` with a skip gate before every block
except the first of each group (those change resolution or width, so they cannot be skipped).

With the same widths, blocks and stem as `static_resnet`, the backbone is identical module for
module, so `init_from_static` can start the gated model from a trained static one (SkipNet's
recipe: pre-train, then fine-tune with gates and the budget loss).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dynets.core.config import config_from_dict
from dynets.core.registry import register_model
from dynets.core.serialization import register_architecture
from dynets.depth.skipping import SkipNetwork
from dynets.models.resnet import BasicBlock, Normalize


@dataclass
class SkipResNetConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)  # the default layout of static_resnet (81 MFLOPs)
    blocks: tuple[int, ...] = (3, 3, 3)
    stem_stride: int = 2
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    budget_target: float = 0.5  # fraction of the gated blocks' FLOPs to run, on average (training)
    budget_weight: float = 2.0
    budget_kind: str = "square"
    estimator: str = "gumbel"
    tau: float = 1.0
    gate_hidden: int = 0
    threshold: float = 0.5  # initial run-time threshold on the gate probability

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
        if max(self.blocks) < 2:
            raise ValueError(
                f"blocks: expected at least one group with 2+ blocks (a gate), got {self.blocks}"
            )


def per_channel(v: tuple[float, ...], n: int) -> tuple[float, ...]:
    return tuple(v) * n if len(v) == 1 else tuple(v)


def resnet_stem(c: SkipResNetConfig, width: int) -> nn.Sequential:
    """Normalize + 3x3 conv + BN + ReLU, as in `static_resnet`'s first stage."""
    return nn.Sequential(
        Normalize(per_channel(c.mean, c.in_channels), per_channel(c.std, c.in_channels)),
        nn.Conv2d(c.in_channels, width, 3, c.stem_stride, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    )


@register_architecture
class SkipResNet(SkipNetwork):
    """A ResNet whose non-downsampling blocks sit behind per-sample skip gates."""

    config_class = SkipResNetConfig

    def __init__(self, config: SkipResNetConfig) -> None:
        c = config
        blocks, gated, cin = [], [], c.widths[0]
        for g, (w, nb) in enumerate(zip(c.widths, c.blocks)):
            for b in range(nb):
                blocks.append(BasicBlock(cin, w, 2 if (g > 0 and b == 0) else 1))
                gated.append(b > 0)
                cin = w
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, c.num_classes))
        super().__init__(
            resnet_stem(c, c.widths[0]),
            blocks,
            head,
            gated,
            input_shape=(c.in_channels, c.image_size, c.image_size),
            num_classes=c.num_classes,
            budget_target=c.budget_target,
            budget_weight=c.budget_weight,
            budget_kind=c.budget_kind,
            estimator=c.estimator,
            tau=c.tau,
            gate_hidden=c.gate_hidden,
            threshold=c.threshold,
        )
        self.config = config

    def init_from_static(self, static: nn.Module) -> SkipResNet:
        """Copy stem, blocks and classifier from a trained `static_resnet` of the same layout."""
        stages = list(static.stages)
        if len(stages) != len(self.blocks):
            raise ValueError(f"static model: expected {len(self.blocks)} blocks, got {len(stages)}")
        first = list(stages[0])
        self.stem.load_state_dict(nn.Sequential(*first[: len(self.stem)]).state_dict())
        self.blocks[0].load_state_dict(first[len(self.stem)].state_dict())
        for i in range(1, len(stages)):
            self.blocks[i].load_state_dict(stages[i].state_dict())
        self.head.load_state_dict(static.heads[-1].state_dict())
        return self


def build_config(cls: type, kw: dict) -> object:
    """A config from builder keywords (JSON lists become tuples); `config=` passes one through."""
    cfg = kw.pop("config", None)
    if cfg is not None:
        return cfg
    for key in ("widths", "blocks", "mean", "std", "width_mults"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    return config_from_dict(cls, kw)


@register_model
def skip_resnet(**kw: object) -> SkipResNet:
    """ResNet-20-style net with per-sample skip gates before each non-downsampling block (SkipNet)."""
    return SkipResNet(build_config(SkipResNetConfig, kw))
