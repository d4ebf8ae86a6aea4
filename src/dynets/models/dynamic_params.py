"""Zoo: dynamic-parameter models. `dyconv_resnet` (the CIFAR ResNet with dynamic convolutions in its
blocks) and `hyper_mlp` (a small classifier whose hidden layer is a HyperLinear).

Every sample runs the same units, so per-sample FLOPs are equal (measured once at batch 1); what
varies per sample are the parameters, reported as decisions: "kernel_attention" (B, n_convs, K)
for dyconv_resnet, "hyper_code" (B, rank) for hyper_mlp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dynets.core.config import config_from_dict
from dynets.core.cost import measure_flops
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import register_model
from dynets.core.serialization import register_architecture
from dynets.core.tensors import all_finite
from dynets.models.resnet import BasicBlock, Normalize
from dynets.params.dynamic_conv import DynamicConv2d
from dynets.params.hypernet import HyperLinear

__all__ = [
    "DyConvResNet",
    "DyConvResNetConfig",
    "HyperMLP",
    "HyperMLPConfig",
    "build_config",
    "check_model_input",
]


def check_model_input(x: torch.Tensor, input_shape: Sequence[int]) -> None:
    """ValueError/TypeError naming `input`, what was expected and what was given."""
    want = f"(B, {', '.join(map(str, input_shape))})"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor of shape {want}, got {type(x).__name__}")
    if tuple(x.shape[1:]) != tuple(input_shape) or x.dim() != len(input_shape) + 1:
        raise ValueError(f"input: expected shape {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"input: expected a floating-point tensor, got dtype {x.dtype}")
    if not all_finite(x):
        raise ValueError("input: expected finite values, got NaN or inf")


def build_config(cls: type, kw: dict) -> object:
    """A builder's keyword overrides as a config (JSON lists become tuples); `config=` passes one."""
    cfg = kw.pop("config", None)
    if cfg is not None:
        return cfg
    return config_from_dict(cls, {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


def _per_channel(v: tuple[float, ...], n: int) -> tuple[float, ...]:
    return tuple(v) * n if len(v) == 1 else tuple(v)


def _check_image_config(c: object) -> None:
    if c.image_size < 1 or c.in_channels < 1 or c.num_classes < 2:
        raise ValueError(
            f"image_size/in_channels >= 1 and num_classes >= 2 expected, got "
            f"{c.image_size}/{c.in_channels}/{c.num_classes}"
        )


def _eval_flops(model: nn.Module, fn: object, x1: torch.Tensor) -> int:
    was = model.training
    model.eval()
    try:
        return measure_flops(fn, x1)
    finally:
        model.train(was)


# ----------------------------------------------------------------------------- dyconv_resnet
@dataclass
class DyConvResNetConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)  # the ResNet of models/resnet.py
    blocks: tuple[int, ...] = (3, 3, 3)
    stem_stride: int = 2
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    num_experts: int = 4
    temperature: float = 1.0  # gate softmax temperature (> 0); set_temperature anneals it
    reduction: int = 4  # gate hidden width = in_channels // reduction
    # Groups whose block convolutions are dynamic. Mixing K kernels costs K / (Ho*Wo) of a conv's
    # FLOPs, so on 4x4 maps (the last group at 32x32 input) it adds 25% for K=4: the default keeps
    # the first two groups dynamic, under 5% extra FLOPs in all.
    dynamic_groups: tuple[int, ...] = (0, 1)

    def __post_init__(self) -> None:
        _check_image_config(self)
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError(
                f"widths and blocks: expected equal non-empty lengths, got {self.widths} / {self.blocks}"
            )
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride: expected 1 or 2, got {self.stem_stride}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts: expected an int >= 1, got {self.num_experts}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected a gate temperature > 0, got {self.temperature}")
        if any(not 0 <= g < len(self.widths) for g in self.dynamic_groups):
            raise ValueError(
                f"dynamic_groups: expected group indices in [0, {len(self.widths) - 1}], "
                f"got {self.dynamic_groups}"
            )


@register_architecture
class DyConvResNet(nn.Module):
    """ResNet whose BasicBlocks (in `dynamic_groups`) use DynamicConv2d for both 3x3 convolutions."""

    config_class = DyConvResNetConfig

    def __init__(self, config: DyConvResNetConfig) -> None:
        super().__init__()
        c = self.config = config
        layers: list[nn.Module] = [
            Normalize(_per_channel(c.mean, c.in_channels), _per_channel(c.std, c.in_channels)),
            nn.Conv2d(c.in_channels, c.widths[0], 3, c.stem_stride, 1, bias=False),
            nn.BatchNorm2d(c.widths[0]),
            nn.ReLU(),
        ]
        cin = c.widths[0]
        dyn = dict(num_experts=c.num_experts, temperature=c.temperature, reduction=c.reduction)
        for g, (w, nb) in enumerate(zip(c.widths, c.blocks)):
            for b in range(nb):
                stride = 2 if (g > 0 and b == 0) else 1
                block = BasicBlock(cin, w, stride)
                if g in c.dynamic_groups:  # same block, its 3x3 convolutions made dynamic
                    block.conv1 = DynamicConv2d(cin, w, 3, stride, 1, bias=False, **dyn)
                    block.conv2 = DynamicConv2d(w, w, 3, 1, 1, bias=False, **dyn)
                layers.append(block)
                cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, c.num_classes))
        self.input_shape = (c.in_channels, c.image_size, c.image_size)
        self.num_classes = c.num_classes
        self._cost = float(_eval_flops(self, self.logits, torch.zeros(1, *self.input_shape)))

    @property
    def dynamic_convs(self) -> list[DynamicConv2d]:
        return [m for m in self.modules() if isinstance(m, DynamicConv2d)]

    def set_temperature(self, temperature: float) -> None:
        """Set every gate's softmax temperature (kept in the config, so it is saved)."""
        for m in self.dynamic_convs:
            m.temperature = temperature
        self.config.temperature = float(temperature)

    def full_cost(self) -> float:
        """FLOPs per sample (the same for every sample)."""
        return self._cost

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> DynamicOutput | MultiExitOutput:
        check_model_input(x, self.input_shape)
        B = x.shape[0]
        if self.training:
            logits = self.logits(x)
            return MultiExitOutput([logits], aux={"loss": logits.new_zeros(()), **self._decisions(B)})
        with torch.no_grad():
            if B == 0:
                return DynamicOutput(
                    x.new_zeros(0, self.num_classes),
                    flops=torch.zeros(0, dtype=torch.float64),
                    decisions={
                        "kernel_attention": x.new_zeros(0, len(self.dynamic_convs), self.config.num_experts)
                    },
                )
            logits = self.logits(x)
            flops = torch.full((B,), self._cost, dtype=torch.float64, device=x.device)
            return DynamicOutput(logits, flops=flops, decisions=self._decisions(B))

    def _decisions(self, B: int) -> dict[str, torch.Tensor]:
        convs = self.dynamic_convs
        if not convs:
            return {}
        return {"kernel_attention": torch.stack([m.last_attention for m in convs], 1)}  # (B, n, K)


@register_model
def dyconv_resnet(**kw: object) -> DyConvResNet:
    """CIFAR ResNet whose blocks use dynamic convolution (a per-sample mixture of 4 kernels)."""
    return DyConvResNet(build_config(DyConvResNetConfig, kw))


# ----------------------------------------------------------------------------- hyper_mlp
@dataclass
class HyperMLPConfig:
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    input_size: int | None = None  # feature vectors of this length instead of images
    mean: tuple[float, ...] = (0.5,)  # per channel (images), per feature or one value (vectors)
    std: tuple[float, ...] = (0.25,)
    hidden: int = 256
    rank: int = 16
    hyper_hidden: int = 64

    def __post_init__(self) -> None:
        _check_image_config(self)
        if self.input_size is not None and self.input_size < 1:
            raise ValueError(f"input_size: expected None or an int >= 1, got {self.input_size}")
        for name in ("hidden", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)}")


@register_architecture
class HyperMLP(nn.Module):
    """flatten -> Linear -> ReLU -> HyperLinear (weights predicted from its own input) -> ReLU -> Linear."""

    config_class = HyperMLPConfig

    def __init__(self, config: HyperMLPConfig) -> None:
        super().__init__()
        c = self.config = config
        if c.input_size is None:
            self.input_shape: tuple[int, ...] = (c.in_channels, c.image_size, c.image_size)
            mean, std = _per_channel(c.mean, c.in_channels), _per_channel(c.std, c.in_channels)
            shape = (1, -1, 1, 1)
        else:
            self.input_shape = (c.input_size,)
            n = c.input_size
            mean = tuple(c.mean) * n if len(c.mean) == 1 else tuple(c.mean)
            std = tuple(c.std) * n if len(c.std) == 1 else tuple(c.std)
            shape = (1, -1)
        if len(mean) != self.input_shape[0] or len(std) != self.input_shape[0]:
            raise ValueError(
                f"mean/std: expected 1 or {self.input_shape[0]} values, got {len(c.mean)}/{len(c.std)}"
            )
        self.register_buffer("mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(shape), persistent=False)
        d = 1
        for s in self.input_shape:
            d *= s
        self.embed = nn.Linear(d, c.hidden)
        self.hyper = HyperLinear(c.hidden, c.hidden, rank=c.rank, hidden=c.hyper_hidden)
        self.classifier = nn.Linear(c.hidden, c.num_classes)
        self.num_classes = c.num_classes
        self._cost = float(_eval_flops(self, self.logits, torch.zeros(1, *self.input_shape)))

    def full_cost(self) -> float:
        return self._cost

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(((x - self.mean) / self.std).flatten(1)))  # (B, hidden)
        return self.classifier(torch.relu(self.hyper(h)))

    def forward(self, x: torch.Tensor) -> DynamicOutput | MultiExitOutput:
        check_model_input(x, self.input_shape)
        B = x.shape[0]
        if self.training:
            logits = self.logits(x)
            return MultiExitOutput(
                [logits], aux={"loss": logits.new_zeros(()), "hyper_code": self.hyper.last_code}
            )
        with torch.no_grad():
            if B == 0:
                return DynamicOutput(
                    x.new_zeros(0, self.num_classes),
                    flops=torch.zeros(0, dtype=torch.float64),
                    decisions={"hyper_code": x.new_zeros(0, self.config.rank)},
                )
            logits = self.logits(x)
            flops = torch.full((B,), self._cost, dtype=torch.float64, device=x.device)
            return DynamicOutput(logits, flops=flops, decisions={"hyper_code": self.hyper.last_code})


@register_model
def hyper_mlp(**kw: object) -> HyperMLP:
    """MLP classifier whose hidden layer's weights are predicted per sample by a hypernetwork."""
    if isinstance(kw.get("mean"), (int, float)):
        kw["mean"] = (float(kw["mean"]),)
    if isinstance(kw.get("std"), (int, float)):
        kw["std"] = (float(kw["std"]),)
    return HyperMLP(build_config(HyperMLPConfig, kw))
