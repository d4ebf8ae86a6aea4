"""Per-sample channel gating of convolutions and head gating of multi-head attention.

Both follow one pattern: a cheap gate reads a pooled summary of the input and scores G groups
(channel groups of a conv's output, or attention heads) per sample; in eval mode it keeps the
top-k groups (or those with sigmoid(score) >= threshold); in training a Gumbel-perturbed hard
decision with a straight-through gradient multiplies each group's output, so the gate learns.

Real savings at inference come from grouped execution, one loop over groups (never over samples):
for group g, gather the samples that keep g, compute only g's channels (or head) for them, and
scatter-add the result back in input order.

- `ChannelGatedConv(conv, bn, next_conv)`: group g computes conv's output channels of g (a
  weight slice, then BN and ReLU on those channels) and, when `next_conv` is given, their
  contribution to next_conv (next_conv's input-channel slice of g), index_add_'ed into the output.
  So BOTH convs cost k/G of their dense FLOPs per sample. Without `next_conv` the output holds zeros
  in dropped groups and only the gated conv saves; a following dense conv would not.
- `GatedMultiheadAttention`: head h computes its q/k/v projections (rows of the qkv weight),
  its attention and its slice of the output projection for the samples that keep h.

Per-sample FLOPs are measured (FlopCounterMode, batch 1) per group unit at the input's size and
summed over the groups kept, plus the gate; BN, ReLU and the scatter are not counted (FlopCounter
counts only matmuls and convolutions, here as everywhere in dynets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynets.core.cost import measure_flops
from dynets.core.tensors import all_finite
from dynets.train.estimators import gumbel_softmax, sample_gumbel


@dataclass
class GatedResult:
    """out: the block's output in input order; keep: (B, G) bool groups kept; flops: (B,) float64
    FLOPs spent per sample (gate included); probs: (B, G) keep probabilities (differentiable in
    training, for a budget loss)."""

    out: torch.Tensor
    keep: torch.Tensor
    flops: torch.Tensor
    probs: torch.Tensor
    aux: dict[str, Any] = field(default_factory=dict)


class GroupGate(nn.Module):
    """(B, F) summary -> (B, G) group scores; top-k (`k`) or threshold (`threshold`) decisions."""

    def __init__(
        self,
        in_features: int,
        groups: int,
        *,
        k: int | None = None,
        threshold: float | None = None,
        tau: float = 1.0,
        hidden: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups: expected an int >= 1, got {groups!r}")
        if (k is None) == (threshold is None):
            raise ValueError(
                f"expected exactly one of k (top-k) or threshold, got k={k!r}, threshold={threshold!r}"
            )
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= groups):
            raise ValueError(f"k: expected an int in [1, {groups}] (the number of groups), got {k!r}")
        if threshold is not None:
            self.check_threshold(threshold)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"tau (gate temperature): expected a finite float > 0, got {tau!r}")
        self.groups, self.k, self.threshold, self.tau = groups, k, threshold, float(tau)
        layers: list[nn.Module] = [nn.Linear(in_features, hidden), nn.ReLU()] if hidden else []
        self.net = nn.Sequential(*layers, nn.Linear(hidden or in_features, groups))
        nn.init.normal_(self.net[-1].weight, std=0.01)
        nn.init.constant_(self.net[-1].bias, 1.0)

    @staticmethod
    def check_threshold(t: float) -> None:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or not 0 <= t <= 1:
            raise ValueError(f"threshold: expected a value in [0, 1], got {t!r}")

    def set_threshold(self, t: float) -> None:
        """Run-time knob (threshold mode only): keep groups with sigmoid(score) >= t."""
        if self.k is not None:
            raise ValueError("this gate keeps the top-k groups; it has no threshold to set")
        self.check_threshold(t)
        self.threshold = float(t)

    def scores(self, summary: torch.Tensor) -> torch.Tensor:
        return self.net(summary).float()  # (B, G)

    def decide(self, scores: torch.Tensor) -> torch.Tensor:
        """Inference: (B, G) bool, exactly k per sample (top-k) or sigmoid(scores) >= threshold."""
        if self.k is not None:
            top = scores.topk(self.k, dim=1).indices
            return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
        return torch.sigmoid(scores) >= self.threshold

    def train_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Training: hard 0/1 (B, G) forward, Gumbel-relaxed straight-through gradient."""
        if self.k is not None:  # Gumbel top-k: perturb, keep the top k, gradient of the sigmoid
            z = (scores + sample_gumbel(scores.shape, scores)) / self.tau
            hard = torch.zeros_like(z).scatter_(1, z.topk(self.k, dim=1).indices, 1.0)
            soft = torch.sigmoid(z)
            return hard + soft - soft.detach()
        two = torch.stack([scores, torch.zeros_like(scores)], dim=-1)  # (B, G, 2): keep vs drop
        return gumbel_softmax(two, tau=self.tau, hard=True)[..., 0]


def _check(x: Any, dims: int, channels: int, name: str, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != dims or x.shape[-1 if dims == 3 else 1] != channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected {what} with {channels} channels, got {got}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if not all_finite(x):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")


class ChannelGate(GroupGate):
    """Scores `groups` equal groups of a conv's `out_channels` from the conv's pooled input."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, **kw: Any) -> None:
        super().__init__(in_channels, groups, **kw)
        if out_channels % groups:
            raise ValueError(f"groups: expected a divisor of out_channels={out_channels}, got {groups}")
        self.group_size = out_channels // groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, G)
        return self.scores(x.mean(dim=(2, 3)))


class ChannelGatedConv(nn.Module):
    """conv -> BN -> ReLU with per-sample output-channel groups, optionally followed by next_conv
    (which then reads only the kept channels). Returns a `GatedResult`."""

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d | None = None,
        next_conv: nn.Conv2d | None = None,
        *,
        groups: int = 4,
        k: int | None = None,
        threshold: float | None = None,
        tau: float = 1.0,
        activation: bool = True,
    ) -> None:
        super().__init__()
        for name, c in (("conv", conv), ("next_conv", next_conv)):
            if c is not None and (not isinstance(c, nn.Conv2d) or c.groups != 1):
                raise ValueError(f"{name}: expected an nn.Conv2d with groups=1, got {c!r}")
        if next_conv is not None and next_conv.in_channels != conv.out_channels:
            raise ValueError(
                f"next_conv: expected {conv.out_channels} input channels (conv's output), "
                f"got {next_conv.in_channels}"
            )
        self.conv, self.bn, self.next_conv, self.activation = conv, bn, next_conv, activation
        self.gate = ChannelGate(
            conv.in_channels, conv.out_channels, groups, k=k, threshold=threshold, tau=tau
        )
        self._costs: dict[tuple[int, ...], tuple[float, float]] = {}

    def _group(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """conv -> BN -> ReLU for channel group g only: (n, C_in, H, W) -> (n, C_g, H', W')."""
        ch = slice(g * self.gate.group_size, (g + 1) * self.gate.group_size)
        c, bn = self.conv, self.bn
        y = F.conv2d(x, c.weight[ch], None if c.bias is None else c.bias[ch], c.stride, c.padding, c.dilation)
        if bn is not None:
            y = F.batch_norm(
                y, bn.running_mean[ch], bn.running_var[ch], bn.weight[ch], bn.bias[ch], False, 0.0, bn.eps
            )
        return torch.relu(y) if self.activation else y

    def _next_part(self, y: torch.Tensor, g: int) -> torch.Tensor:
        """Group g's contribution to next_conv (its input-channel slice, no bias)."""
        ch = slice(g * self.gate.group_size, (g + 1) * self.gate.group_size)
        n = self.next_conv
        return F.conv2d(y, n.weight[:, ch].contiguous(), None, n.stride, n.padding, n.dilation)

    def unit_costs(self, shape: tuple[int, ...]) -> tuple[float, float]:
        """(gate FLOPs, one group's FLOPs incl. its next_conv share) per sample at input shape (C, H, W)."""
        if shape not in self._costs:
            x = torch.zeros(1, *shape, device=self.conv.weight.device)
            gate = measure_flops(self.gate, x)
            group = measure_flops(
                lambda t: (
                    self._next_part(self._group(t, 0), 0) if self.next_conv is not None else self._group(t, 0)
                ),
                x,
            )
            self._costs[shape] = (float(gate), float(group))
        return self._costs[shape]

    def full_cost(self, shape: tuple[int, ...]) -> float:
        """FLOPs per sample of the dense conv (+ next_conv), no gate."""
        x = torch.zeros(1, *shape, device=self.conv.weight.device)
        return float(
            measure_flops(
                lambda t: self.next_conv(self.conv(t)) if self.next_conv is not None else self.conv(t), x
            )
        )

    def forward(self, x: torch.Tensor) -> GatedResult:
        _check(x, 4, self.conv.in_channels, "input", "a (B, C, H, W) tensor")
        scores = self.gate(x)  # (B, G)
        probs = torch.sigmoid(scores)
        gate_cost, group_cost = self.unit_costs(tuple(x.shape[1:]))
        if self.training:
            mask = self.gate.train_mask(scores)  # (B, G) hard values, ST gradient
            y = self.conv(x)
            y = self.bn(y) if self.bn is not None else y
            y = torch.relu(y) if self.activation else y
            y = y * mask.to(y.dtype).repeat_interleave(self.gate.group_size, dim=1)[:, :, None, None]
            out = self.next_conv(y) if self.next_conv is not None else y
            keep = mask.detach() > 0.5
        else:
            with torch.no_grad():
                keep = self.gate.decide(scores)
                out = self._grouped(x, keep)
        flops = gate_cost + keep.sum(1).cpu().double() * group_cost
        return GatedResult(out, keep, flops, probs, {"kept_fraction": keep.float().mean(1)})

    def _grouped(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, G = keep.shape
        out: torch.Tensor | None = None
        for g in range(G):
            idx = keep[:, g].nonzero().squeeze(1)  # samples that keep group g
            if idx.numel() == 0:
                continue
            xs = x if idx.numel() == B else x.index_select(0, idx)
            y = self._group(xs, g)  # (n, C_g, H', W')
            if self.next_conv is not None:
                y = self._next_part(y, g)  # (n, C_next, H'', W'')
                if out is None:
                    out = y.new_zeros(B, *y.shape[1:])
                out.index_add_(0, idx, y)
            else:
                if out is None:
                    out = y.new_zeros(B, self.conv.out_channels, *y.shape[2:])
                ch = slice(g * self.gate.group_size, (g + 1) * self.gate.group_size)
                out[:, ch].index_copy_(0, idx, y)
        if out is None:  # nothing kept anywhere (threshold mode): shape from a dry run on no samples
            ref = self.conv(x[:0])
            ref = self.next_conv(ref) if self.next_conv is not None else ref
            out = ref.new_zeros(B, *ref.shape[1:])
        if self.next_conv is not None and self.next_conv.bias is not None:
            out += self.next_conv.bias.view(1, -1, 1, 1)
        return out


class HeadGate(GroupGate):
    """Scores the heads of a multi-head attention block from the CLS token or the mean token."""

    def __init__(self, dim: int, num_heads: int, *, pool: str = "cls", **kw: Any) -> None:
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool: expected 'cls' or 'mean', got {pool!r}")
        super().__init__(dim, num_heads, **kw)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H)
        return self.scores(x[:, 0] if self.pool == "cls" else x.mean(dim=1))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out (FlopCounterMode does not count CPU fused attention)."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(dim=-1) @ v  # (B, H, T, dh)


class GatedMultiheadAttention(nn.Module):
    """Self-attention (B, T, D) -> (B, T, D) whose heads are gated per sample by a `HeadGate`.

    key_padding_mask: optional (B, T) bool, True marks padding tokens that no query attends to."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        k: int | None = None,
        threshold: float | None = None,
        tau: float = 1.0,
        pool: str = "cls",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of dim={dim}, got {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.gate = HeadGate(dim, num_heads, k=k, threshold=threshold, tau=tau, pool=pool)
        self._costs: dict[int, tuple[float, float]] = {}

    def _rows(self, h: int) -> torch.Tensor:
        """Rows of the qkv weight that produce head h's q, k and v."""
        r = torch.arange(h * self.head_dim, (h + 1) * self.head_dim)
        return torch.cat([r, r + self.dim, r + 2 * self.dim]).to(self.qkv.weight.device)

    def _head(self, xs: torch.Tensor, h: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Head h alone for a sub-batch: (n, T, D) -> its output-projection share (n, T, D), no bias."""
        rows = self._rows(h)
        b = None if self.qkv.bias is None else self.qkv.bias[rows]
        q, k, v = F.linear(xs, self.qkv.weight[rows], b).unsqueeze(1).chunk(3, dim=-1)  # (n, 1, T, dh) each
        a = _attend(q, k, v, mask).squeeze(1)  # (n, T, dh)
        cols = slice(h * self.head_dim, (h + 1) * self.head_dim)
        return F.linear(a, self.proj.weight[:, cols])

    def unit_costs(self, T: int) -> tuple[float, float]:
        """(gate FLOPs, one head's FLOPs) per sample at sequence length T."""
        if T not in self._costs:
            x = torch.zeros(1, T, self.dim, device=self.qkv.weight.device)
            self._costs[T] = (
                float(measure_flops(self.gate, x)),
                float(measure_flops(lambda t: self._head(t, 0, None), x)),
            )
        return self._costs[T]

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> GatedResult:
        _check(x, 3, self.dim, "input", "a (B, T, D) tensor")
        B, T, D = x.shape
        mask = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, T) or key_padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"key_padding_mask: expected a ({B}, {T}) bool tensor, got "
                    f"{tuple(key_padding_mask.shape)} {key_padding_mask.dtype}"
                )
            mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, T) True = may attend
        scores = self.gate(x)  # (B, H)
        probs = torch.sigmoid(scores)
        gate_cost, head_cost = self.unit_costs(T)
        if self.training:
            m = self.gate.train_mask(scores)  # (B, H)
            q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            a = _attend(q, k, v, mask)  # (B, H, T, dh)
            a = a * m.to(a.dtype)[:, :, None, None]
            out = self.proj(a.transpose(1, 2).reshape(B, T, D))
            keep = m.detach() > 0.5
        else:
            with torch.no_grad():
                keep = self.gate.decide(scores)
                out = x.new_zeros(B, T, D)
                for h in range(self.num_heads):  # one sub-batch per head: the samples that keep it
                    idx = keep[:, h].nonzero().squeeze(1)
                    if idx.numel() == 0:
                        continue
                    full = idx.numel() == B
                    xs = x if full else x.index_select(0, idx)
                    ms = None if mask is None else (mask if full else mask.index_select(0, idx))
                    out.index_add_(0, idx, self._head(xs, h, ms))
                if self.proj.bias is not None:
                    out += self.proj.bias
        flops = gate_cost + keep.sum(1).cpu().double() * head_cost
        return GatedResult(out, keep, flops, probs, {"kept_fraction": keep.float().mean(1)})
