"""Dynamic convolution (CondConv, Yang et al. 2019; Dynamic Convolution, Chen et al. 2020).

K expert kernels W_1..W_K; each sample gets its own kernel, a convex mixture of the experts chosen
from the sample itself:

    a = softmax(gate(mean_hw(x)) / temperature)       (B, K)   per-sample attention over experts
    W_b = sum_k a_bk W_k,  b_b = sum_k a_bk bias_k      (B, Cout, Cin, kh, kw)
    y_b = conv(x_b, W_b)

The B different convolutions run as ONE grouped convolution: the batch is folded into the channel
dimension, input (1, B*Cin, H, W), weight (B*Cout, Cin, kh, kw), groups=B. No Python loop over
samples. Mixing kernels (not outputs) keeps the cost near a single convolution: the extra work is
the gate and the K-way weighted sum of kernels, K / (Ho*Wo) of the convolution's own FLOPs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = ["DynamicConv2d"]


class DynamicConv2d(nn.Module):
    """A Conv2d (groups=1) whose kernel is a per-sample attention-weighted mixture of
    `num_experts` kernels. The last attention is kept in `last_attention` (B, K), detached.

    temperature: softmax temperature of the gate (> 0); Dynamic Convolution anneals it from ~30
    towards 1 early in training so that every expert receives gradient. reduction: the gate's hidden
    width is max(in_channels // reduction, min_hidden).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        num_experts: int = 4,
        temperature: float = 1.0,
        reduction: int = 4,
        min_hidden: int = 4,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(f"groups: only groups=1 is supported by DynamicConv2d, got {groups}")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts: expected an int >= 1, got {num_experts!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.num_experts = num_experts
        self.temperature = temperature
        K, kh, kw = num_experts, *self.kernel_size
        # (K, Cout, Cin*kh*kw): 3-D, so model.to(memory_format=channels_last) leaves it alone
        self.weight = nn.Parameter(torch.empty(K, out_channels, in_channels * kh * kw))
        self.bias = nn.Parameter(torch.empty(K, out_channels)) if bias else None
        hidden = max(in_channels // max(reduction, 1), min_hidden)
        self.gate = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, K))
        self.last_attention: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised as nn.Conv2d initialises its kernel and bias."""
        for k in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))  # fan_in = Cin*kh*kw, as in Conv2d
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def kernels(self) -> torch.Tensor:
        """The expert kernels as (K, Cout, Cin, kh, kw) (a view of `weight`)."""
        return self.weight.view(self.num_experts, self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value <= 0:
            raise ValueError(f"temperature: expected a finite gate temperature > 0, got {value!r}")
        self._temperature = float(value)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, H, W) -> (B, K) softmax attention over the experts, from the pooled input."""
        return torch.softmax(self.gate(x.mean((2, 3))) / self._temperature, dim=-1)

    def aggregate(self, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample kernels (B, Cout, Cin, kh, kw) and biases (B, Cout) as attention-weighted sums."""
        B = attention.shape[0]
        w = (attention @ self.weight.flatten(1)).view(B, *self.kernels.shape[1:])
        b = attention @ self.bias if self.bias is not None else None
        return w, b

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input: expected shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        if B == 0:
            self.last_attention = x.new_zeros(0, self.num_experts)
            return x.new_zeros(0, self.out_channels, *self.output_size(H, W))
        a = self.attention(x)  # (B, K)
        self.last_attention = a.detach()
        w, b = self.aggregate(a)  # (B, Cout, Cin, kh, kw), (B, Cout)
        y = F.conv2d(
            x.reshape(1, B * self.in_channels, H, W),  # the batch folded into channel groups
            w.reshape(B * self.out_channels, self.in_channels, *self.kernel_size),
            None if b is None else b.reshape(-1),
            self.stride,
            self.padding,
            self.dilation,
            groups=B,
        )  # (1, B*Cout, Ho, Wo)
        return y.reshape(B, self.out_channels, *y.shape[-2:])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
            f"num_experts={self.num_experts}, temperature={self._temperature}"
        )
