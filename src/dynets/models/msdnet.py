"""Multi-Scale Dense Network (MSDNet; Huang et al., ICLR 2018) for small images, as an early-exit network.

MSDNet keeps features at S scales at once (1, 1/2, 1/4 by default), so even the first exits see
coarse, classifier-ready features, and connects layers densely, so later layers reuse what earlier
exits already computed instead of overwriting it. Here the features are a list of S tensors,
finest first, which `EarlyExitNetwork` compacts like any tensor:

    [(B, c*1, H, W), (B, c*2, H/2, W/2), (B, c*4, H/4, W/4)]     c grows by `growth` per layer

  stage 0:  Normalize + the first layer: a 3x3 conv at scale 0, then a strided 3x3 conv per scale
  stage b:  `layers_per_block` MSD layers. At scale s a layer appends growth*2^s channels:
            cat(x_s, strided conv(x_{s-1}), conv(x_s)), each conv a 1x1 bottleneck then a 3x3.
            The finest scale is dropped every ceil(L/S) layers (MSDNet's "max" pruning, so the list
            gets shorter and the coarsest scale stays last), each drop followed by a 1x1 transition
            that keeps `reduction` of the channels.
  exit:     after every block, reading the coarsest scale: two 3x3 conv-BN-ReLU (stride 2 if the
            map is larger than 4x4), global average pool, linear, MSDNet's CIFAR classifier.

Channel and bottleneck widths double per scale, as MSDNet's grFactor / bnFactor 1-2-4. The defaults
(24 channels, growth 6, 5 blocks of 2 layers, 64-channel heads; the paper's CIFAR nets use 16 channels
and 128-channel heads) cost about 70 MFLOPs on the static path at 32x32, close to ResNet-20's 82, and
trade a few FLOPs for speed: many thin convs run slower per FLOP on CPU than ResNet's wider ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dynets.core.registry import register_model
from dynets.core.serialization import register_architecture
from dynets.depth.early_exit import EarlyExitNetwork
from dynets.depth.heads import HeadConfig, make_head
from dynets.models.resnet import Normalize, _per_channel

Scales = list[torch.Tensor]  # finest first; scale s is (B, C_s, H / 2^s, W / 2^s)


@dataclass
class MSDHeadConfig(HeadConfig):
    """Exit heads: "msdnet" (the paper's two-conv classifier, `hidden` channels) or any HeadConfig kind
    ("linear", "conv", "mlp"; there hidden=0 means the coarsest scale's channel count)."""

    kind: str = "msdnet"
    hidden: int = 64  # the paper's CIFAR heads use 128 (about 2x the heads' FLOPs)

    def __post_init__(self) -> None:
        if self.kind != "msdnet":
            super().__post_init__()
        elif self.hidden < 1:
            raise ValueError(f"head hidden: expected >= 1 for the msdnet classifier, got {self.hidden}")


@dataclass
class MSDNetConfig:
    in_channels: int = 3
    image_size: int = 32  # must be divisible by 2^(scales-1)
    num_classes: int = 10
    blocks: int = 5  # stages after stage 0, each followed by an exit
    layers_per_block: int | tuple[int, ...] = 2  # one count for every block, or one per block
    channels: int = 24  # channels at scale 0 after the first layer (x2 per scale)
    growth: int = 6  # channels added per layer at scale 0 (x2 per scale)
    scales: int = 3
    bottleneck: int = 1  # 1x1 bottleneck width = bottleneck * 2^s * conv output
    reduction: float = 0.5  # transitions keep this fraction of channels; 1 = none
    exits: tuple[int, ...] | None = None  # blocks followed by an exit; None = every block
    head: MSDHeadConfig = field(default_factory=MSDHeadConfig)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    learned_exits: bool = True

    def __post_init__(self) -> None:
        for name in ("layers_per_block", "exits", "mean", "std"):  # lists (e.g. from JSON) become tuples
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        for name in ("in_channels", "image_size", "blocks", "channels", "growth", "scales", "bottleneck"):
            _check(
                name,
                _is_int(getattr(self, name)) and getattr(self, name) >= 1,
                "an integer >= 1",
                getattr(self, name),
            )
        _check(
            "num_classes",
            _is_int(self.num_classes) and self.num_classes >= 2,
            "an integer >= 2",
            self.num_classes,
        )
        _check(
            "image_size",
            self.image_size % 2 ** (self.scales - 1) == 0,
            f"a multiple of 2^(scales-1) = {2 ** (self.scales - 1)}",
            self.image_size,
        )
        lpb = self.layers_per_block
        lpb_ok = _is_int(lpb) or (isinstance(lpb, tuple) and len(lpb) in (1, self.blocks))
        _check(
            "layers_per_block",
            lpb_ok and all(_is_int(n) and n >= 1 for n in self.steps),
            f"an integer >= 1 or a tuple of {self.blocks} such integers",
            lpb,
        )
        _check(
            "reduction",
            isinstance(self.reduction, (int, float)) and 0 < self.reduction <= 1,
            "a number in (0, 1]",
            self.reduction,
        )
        exits_ok = self.exits is None or all(_is_int(e) and 0 <= e < self.blocks - 1 for e in self.exits)
        _check(
            "exits",
            isinstance(self.exits, tuple | None) and exits_ok,
            f"None or block indices in [0, {self.blocks - 2}] (the final exit is implicit)",
            self.exits,
        )
        for name in ("mean", "std"):
            v = getattr(self, name)
            _check(
                name,
                isinstance(v, tuple) and len(v) in (1, self.in_channels),
                f"a tuple of 1 or in_channels={self.in_channels} numbers",
                v,
            )
        _check("std", all(s > 0 for s in self.std), "positive values", self.std)
        _check("head", isinstance(self.head, HeadConfig), "an MSDHeadConfig", self.head)

    @property
    def steps(self) -> tuple[int, ...]:
        """Number of MSD layers in each block."""
        lpb = self.layers_per_block
        return (lpb,) * self.blocks if _is_int(lpb) else tuple(lpb) * (self.blocks if len(lpb) == 1 else 1)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(name: str, ok: bool, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"MSDNetConfig.{name}: expected {expected}, got {value!r}")


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def bottleneck_conv(cin: int, cout: int, stride: int, width: int) -> nn.Sequential:
    """1x1 to min(cin, width * cout) channels, then a 3x3 (strided when coming from a finer scale)."""
    inner = min(cin, width * cout)
    return nn.Sequential(conv_bn(cin, inner, 1), conv_bn(inner, cout, 3, stride))


class FirstLayer(nn.Module):
    """Image -> every scale: a 3x3 conv at scale 0, then one strided 3x3 conv per coarser scale."""

    def __init__(self, cin: int, channels: int, scales: int) -> None:
        super().__init__()
        widths = [cin] + [channels * 2**s for s in range(scales)]
        self.convs = nn.ModuleList(conv_bn(widths[s], widths[s + 1], 3, 2 if s else 1) for s in range(scales))

    def forward(self, x: torch.Tensor) -> Scales:
        out = []
        for conv in self.convs:
            x = conv(x)
            out.append(x)
        return out


class ScaleUnit(nn.Module):
    """One scale of an MSD layer: cat(x, down(finer), same(x)) appends `growth` channels to x."""

    def __init__(self, c_finer: int, c_same: int, growth: int, width: int) -> None:
        super().__init__()
        # the finer scale's bottleneck is half as wide (width = bottleneck * 2^s, s >= 1 here)
        self.down = bottleneck_conv(c_finer, growth // 2, 2, width // 2) if c_finer else None
        self.same = bottleneck_conv(c_same, growth - growth // 2 if c_finer else growth, 1, width)

    def forward(self, finer: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if self.down is None:
            return torch.cat([x, self.same(x)], 1)
        return torch.cat([x, self.down(finer), self.same(x)], 1)


class MSDLayer(nn.Module):
    """Dense layer: scales [first_in, S) in, scales [first, S) out (first = first_in + 1 drops one)."""

    def __init__(self, c: int, growth: int, scales: int, first_in: int, first: int, bottleneck: int) -> None:
        super().__init__()
        self.drop = first - first_in
        # a scale takes a strided branch from its finer neighbour whenever that neighbour is an input
        # (as in MSDNet, also when the neighbour is being dropped by this very layer)
        self.units = nn.ModuleList(
            ScaleUnit(c * 2 ** (s - 1) if s > first_in else 0, c * 2**s, growth * 2**s, bottleneck * 2**s)
            for s in range(first, scales)
        )

    def forward(self, xs: Scales) -> Scales:
        # input index of output j is j + drop; its finer neighbour is the entry before it (if any)
        return [u(xs[i - 1] if i > 0 else None, xs[i]) for i, u in enumerate(self.units, start=self.drop)]


class Transition(nn.Module):
    """1x1 conv-BN-ReLU at every scale: c * 2^s -> c_out * 2^s channels."""

    def __init__(self, c: int, c_out: int, scales: int, first: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv_bn(c * 2**s, c_out * 2**s, 1) for s in range(first, scales))

    def forward(self, xs: Scales) -> Scales:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class Coarsest(nn.Module):
    """Heads read the coarsest scale: the last entry of the list."""

    def forward(self, xs: Scales) -> torch.Tensor:
        return xs[-1]


def msdnet_head(cfg: MSDHeadConfig, channels: int, spatial: int, num_classes: int) -> nn.Sequential:
    """(list of scales) -> (B, num_classes) logits from the coarsest scale (B, channels, spatial, spatial)."""
    if cfg.kind != "msdnet":
        return nn.Sequential(
            Coarsest(),
            make_head(HeadConfig(cfg.kind, cfg.hidden, cfg.dropout), channels, spatial, num_classes),
        )
    stride = 2 if spatial > 4 else 1
    drop = [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else []
    return nn.Sequential(
        Coarsest(),
        conv_bn(channels, cfg.hidden, 3, stride),  # (B, hidden, 4, 4) at 32x32
        conv_bn(cfg.hidden, cfg.hidden, 3, stride),  # (B, hidden, 2, 2)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        *drop,
        nn.Linear(cfg.hidden, num_classes),
    )


@register_architecture
class EarlyExitMSDNet(EarlyExitNetwork):
    """MSDNet whose blocks are stages (stage 0 = normalisation + first layer); exits after blocks."""

    config_class = MSDNetConfig

    def __init__(self, config: MSDNetConfig) -> None:
        c = config
        S, total = c.scales, sum(c.steps)
        interval = math.ceil(total / S)  # drop the finest scale every `interval` layers
        first_layer = FirstLayer(c.in_channels, c.channels, S)
        stages: list[nn.Module] = [
            nn.Sequential(
                Normalize(_per_channel(c.mean, c.in_channels), _per_channel(c.std, c.in_channels)),
                first_layer,
            )
        ]
        width, first, n = c.channels, 0, 0  # scale-0 channel count, first kept scale, layers so far
        channels_after: list[int] = []
        for steps in c.steps:
            layers: list[nn.Module] = []
            for _ in range(steps):
                n += 1
                new_first = min(S - 1, (n - 1) // interval)
                layers.append(MSDLayer(width, c.growth, S, first, new_first, c.bottleneck))
                width += c.growth
                if new_first > first and c.reduction < 1:
                    layers.append(Transition(width, max(1, int(width * c.reduction)), S, new_first))
                    width = max(1, int(width * c.reduction))
                first = new_first
            stages.append(nn.Sequential(*layers))
            channels_after.append(width * 2 ** (S - 1))
        spatial = c.image_size // 2 ** (S - 1)
        exit_blocks = list(range(c.blocks - 1)) if c.exits is None else sorted(set(c.exits))
        exit_stages = [b + 1 for b in exit_blocks] + [c.blocks]
        heads = [msdnet_head(c.head, channels_after[s - 1], spatial, c.num_classes) for s in exit_stages]
        super().__init__(
            stages,
            heads,
            exit_stages,
            input_shape=(c.in_channels, c.image_size, c.image_size),
            num_classes=c.num_classes,
            learned_exits=c.learned_exits and len(exit_stages) > 1,
        )
        self.config = config


@register_model
def msdnet(**kw: object) -> EarlyExitMSDNet:
    """Multi-scale dense network (MSDNet) for 32x32 images, with an exit after each of its 5 blocks."""
    return EarlyExitMSDNet(_config(kw))


@register_model
def static_msdnet(**kw: object) -> EarlyExitMSDNet:
    """The same MSDNet with only its final classifier: the static baseline."""
    kw.setdefault("exits", ())
    return EarlyExitMSDNet(_config(kw))


def _config(kw: dict) -> MSDNetConfig:
    from dynets.core.config import config_from_dict

    cfg = kw.pop("config", None)
    return cfg if cfg is not None else config_from_dict(MSDNetConfig, kw)
