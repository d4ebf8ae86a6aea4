"""Hypernetwork layers: weights predicted per sample from the input or a given context vector.

A small hypernetwork maps the context c_b of each sample to a code z_b (B, r); the sample's
weight is a low-rank update of a shared weight (as in LoRA, but produced per sample):

    W_b = W0 + U diag(z_b) V          U (out, r), V (r, in)
    b_b = b0 + Ub z_b                 (optional per-sample bias)

The per-sample weights are never materialised in `forward`: W_b x_b = W0 x_b + U (z_b * (V x_b)),
a few einsums over the whole batch (no loop over samples), costing O(r (in + out)) on top of the
shared layer instead of O(in * out). `generate` materialises (B, out, in) when the weights
themselves are wanted (inspection, tests). `HyperConv2d` applies the same idea to a convolution:
W_b = W0 + sum_r z_br U[:, r] (x) V_r, computed as conv(x, W0) + 1x1conv_U(z * conv(x, V)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = ["HyperConv2d", "HyperLinear"]


def _hypernet(context_features: int, rank: int, hidden: int) -> nn.Module:
    if hidden > 0:
        return nn.Sequential(nn.Linear(context_features, hidden), nn.ReLU(), nn.Linear(hidden, rank))
    return nn.Linear(context_features, rank)


def _check_int(name: str, v: object, lo: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    return v


class HyperLinear(nn.Module):
    """A Linear layer whose weight (and bias) are predicted per sample by a hypernetwork.

    x: (B, in) or (B, T, in) (one weight per sample, shared by its T tokens).
    context: (B, context_features), or None to use the input itself (its mean over T for
    sequences), in which case context_features must equal in_features. The last code z is kept
    in `last_code` (B, rank), detached. U starts at zero, so at initialisation every sample sees W0.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        context_features: int | None = None,
        rank: int = 8,
        hidden: int = 64,
        bias: bool = True,
        dynamic_bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = _check_int("in_features", in_features, 1)
        self.out_features = _check_int("out_features", out_features, 1)
        self.context_features = _check_int(
            "context_features", in_features if context_features is None else context_features, 1
        )
        self.rank = _check_int("rank", rank, 1)
        _check_int("hidden", hidden, 0)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # W0
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.U = nn.Parameter(torch.zeros(out_features, rank))
        self.V = nn.Parameter(torch.empty(rank, in_features))
        self.bias_U = nn.Parameter(torch.zeros(out_features, rank)) if bias and dynamic_bias else None
        self.hyper = _hypernet(self.context_features, rank, hidden)
        self.last_code: torch.Tensor | None = None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.V, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    def _context(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if context is None:
            if self.context_features != self.in_features:
                raise ValueError(
                    f"context: expected a (B, {self.context_features}) tensor (context_features != "
                    f"in_features), got None"
                )
            return x if x.dim() == 2 else x.mean(1)
        if context.dim() != 2 or context.shape != (x.shape[0], self.context_features):
            raise ValueError(
                f"context: expected shape ({x.shape[0]}, {self.context_features}), got {tuple(context.shape)}"
            )
        return context

    def code(self, context: torch.Tensor) -> torch.Tensor:
        """(B, context_features) -> (B, rank): the per-sample code z."""
        return self.hyper(context)

    def generate(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Materialised per-sample weights (B, out, in) and biases (B, out) (None without bias)."""
        z = self.code(context)
        w = self.weight + torch.einsum("or,br,ri->boi", self.U, z, self.V)
        if self.bias is None:
            return w, None
        b = self.bias + (z @ self.bias_U.T if self.bias_U is not None else 0)
        return w, b.expand(z.shape[0], -1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input: expected shape (B, {self.in_features}) or (B, T, {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        z = self.code(self._context(x, context))  # (B, r)
        self.last_code = z.detach()
        zz = z if x.dim() == 2 else z.unsqueeze(1)  # (B, [1,] r)
        xv = torch.einsum("...i,ri->...r", x, self.V)  # (B, [T,] r)
        y = F.linear(x, self.weight, self.bias) + torch.einsum("...r,or->...o", xv * zz, self.U)
        if self.bias_U is not None:
            y = y + zz @ self.bias_U.T
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"context_features={self.context_features}, rank={self.rank}, bias={self.bias is not None}"
        )


class HyperConv2d(nn.Module):
    """A Conv2d whose kernel is W0 + sum_r z_br U[:, r] (x) V_r per sample, z_b from a hypernetwork
    on `context` (B, context_features) or, by default, on the spatially pooled input."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        *,
        context_features: int | None = None,
        rank: int = 4,
        hidden: int = 32,
    ) -> None:
        super().__init__()
        self.in_channels = _check_int("in_channels", in_channels, 1)
        self.out_channels = _check_int("out_channels", out_channels, 1)
        self.context_features = _check_int(
            "context_features", in_channels if context_features is None else context_features, 1
        )
        self.rank = _check_int("rank", rank, 1)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.U = nn.Parameter(torch.zeros(out_channels, rank))
        self.V = nn.Parameter(torch.empty(rank, in_channels, *self.kernel_size))
        self.hyper = _hypernet(self.context_features, rank, hidden)
        self.last_code: torch.Tensor | None = None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.V, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def _context(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if context is None:
            if self.context_features != self.in_channels:
                raise ValueError(f"context: expected a (B, {self.context_features}) tensor, got None")
            return x.mean((2, 3))
        if context.shape != (x.shape[0], self.context_features):
            raise ValueError(
                f"context: expected shape ({x.shape[0]}, {self.context_features}), got {tuple(context.shape)}"
            )
        return context

    def generate(self, context: torch.Tensor) -> torch.Tensor:
        """Materialised per-sample kernels (B, Cout, Cin, kh, kw)."""
        z = self.hyper(context)
        return self.weight + torch.einsum("or,br,rikl->boikl", self.U, z, self.V)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input: expected shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        z = self.hyper(self._context(x, context))  # (B, r)
        self.last_code = z.detach()
        args = (self.stride, self.padding, self.dilation)
        y = F.conv2d(x, self.weight, self.bias, *args)  # shared kernel
        t = F.conv2d(x, self.V, None, *args) * z[:, :, None, None]  # (B, r, Ho, Wo) rank-r responses
        return y + F.conv2d(t, self.U[:, :, None, None])
