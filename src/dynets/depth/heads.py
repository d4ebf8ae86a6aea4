"""Exit heads: map a stage's features to class logits.

`linear`: global average pool + linear (cheapest). `conv`: one 3x3 conv (stride 2 while the map is
at least 8x8) + BN + ReLU, then pool + linear, the Shallow-Deep Networks / MSDNet recipe that
makes shallow exits far stronger for a small cost. `mlp`: pool + hidden layer + linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


@dataclass
class HeadConfig:
    kind: str = "conv"  # "linear" | "conv" | "mlp"
    hidden: int = 0  # conv channels or MLP width; 0 = the stage's own channel count
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "conv", "mlp"):
            raise ValueError(f"head kind: expected 'linear', 'conv' or 'mlp', got {self.kind!r}")
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
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        *drop,
        nn.Linear(hidden, num_classes),
    )


class FusedChain(nn.Module):
    """Inference-only replacement of a straight chain of simple layers (an exit head after
    BatchNorm folding): the same layers called as functions in one `forward`, without a module
    call per layer. At batch size 1 a head's time is mostly that per-call overhead (a conv head
    of 1.5% of a model's FLOPs took ~65 us, its ops ~35 us), paid at every exit a sample passes.
    Build with `fuse_chain`; the layers stay submodules, so devices and dtypes follow `.to()`."""

    def __init__(self, layers: list[nn.Module], kinds: list[str]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.kinds = list(kinds)
        self._plan = list(zip(kinds, layers))

    def forward(self, x):
        for kind, m in self._plan:
            if kind == "conv":
                x = F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
            elif kind == "relu":
                x = torch.relu(x)
            elif kind == "pool1":
                x = x.mean((2, 3), keepdim=True)
            elif kind == "flatten":
                x = x.flatten(1)
            elif kind == "linear":
                x = F.linear(x, m.weight, m.bias)
            elif kind == "bn":
                x = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        return x

    def __setstate__(self, state):  # deepcopy / pickle: rebuild the plan over the copied layers
        super().__setstate__(state)
        self._plan = list(zip(self.kinds, self.layers))


def _chain_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
        return "conv"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
        return "pool1"
    if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
        return "flatten"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None:
        return "bn"
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return "skip"
    return None


def fuse_chain(mod: nn.Module) -> nn.Module:
    """`mod` as a FusedChain if it is a straight chain of supported layers (Conv2d, BatchNorm2d,
    ReLU, global average pool, Flatten, Linear, Dropout/Identity) given as an nn.Sequential or a
    torch.fx GraphModule of one; otherwise `mod` unchanged. For eval mode only."""
    layers: list[nn.Module] | None = None
    if type(mod) is nn.Sequential:
        layers = list(mod)
    elif isinstance(mod, torch.fx.GraphModule):
        nodes = [n for n in mod.graph.nodes if n.op not in ("placeholder", "output")]
        prev = next((n for n in mod.graph.nodes if n.op == "placeholder"), None)
        layers = []
        for n in nodes:  # a chain: each node a submodule call on the previous node only
            if n.op != "call_module" or n.args != (prev,) or n.kwargs or len(n.users) != 1:
                return mod
            layers.append(mod.get_submodule(n.target))
            prev = n
        outputs = [n for n in mod.graph.nodes if n.op == "output"]
        if not nodes or len(outputs) != 1 or outputs[0].args != (prev,):
            return mod
    if not layers:
        return mod
    kinds = [_chain_kind(m) for m in layers]
    if any(k is None for k in kinds):
        return mod
    keep = [(k, m) for k, m in zip(kinds, layers) if k != "skip"]
    return FusedChain([m for _, m in keep], [k for k, _ in keep])
