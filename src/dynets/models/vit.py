"""A small vision transformer for 32x32 images, the static baseline of the spatial family.

Patch 4 turns a 32x32 image into 64 tokens plus a class token; pre-norm blocks with our own
multi-head attention on `scaled_dot_product_attention`. The dynamic variants (token pruning,
halting, merging: `dynets.spatial`) subclass `ViT` and reuse its units and cost accounting.

FLOPs: PyTorch's FlopCounterMode counts CPU `scaled_dot_product_attention` as 0 FLOPs, so every
cost here is measured with the attention core switched to its eager equivalent (matmul, softmax,
matmul; `eager_attention()`), which the counter sees. Block costs depend on the token count, so
they are measured per count on first use and cached (`attn_cost(n)`, `mlp_cost(n)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynets.core.config import config_from_dict
from dynets.core.cost import measure_flops
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import register_model
from dynets.core.serialization import register_architecture
from dynets.core.tensors import all_finite
from dynets.models.resnet import Normalize

_EAGER = False  # set by eager_attention(): the attention core runs as matmul-softmax-matmul


@contextlib.contextmanager
def eager_attention() -> Iterator[None]:
    """Run attention as explicit matmul-softmax-matmul (what FlopCounterMode can count)."""
    global _EAGER
    old, _EAGER = _EAGER, True
    try:
        yield
    finally:
        _EAGER = old


def attention_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for (B, H, T, d) tensors; bias broadcasts to (B, H, T, T)."""
    if not _EAGER:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    a = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, H, T, T)
    if bias is not None:
        a = a + bias
    return a.softmax(-1) @ v


def policy_attention_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """DynamicViT's masked attention for training: token j is a key only where keep[b, j] > 0 (a
    query always sees itself, so dropped rows stay finite). keep (B, T) may carry straight-through
    gradients, which reach the decision through the attention weights."""
    T = keep.shape[1]
    eye = torch.eye(T, dtype=keep.dtype, device=keep.device)
    g = keep[:, None, None, :] + (1.0 - keep[:, None, None, :]) * eye  # (B, 1, T, T)
    a = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, H, T, T)
    top = a.masked_fill(g <= 0, float("-inf")).amax(-1, keepdim=True).detach()
    w = torch.exp((a - top).clamp(max=60.0)) * g
    return (w / w.sum(-1, keepdim=True)) @ v


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # each (B, H, T, d)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        return_keys: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        q, k, v = self.qkv_heads(x)
        o = attention_core(q, k, v, bias) if keep is None else policy_attention_core(q, k, v, keep)
        o = self.proj(o.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        # return_keys: the keys summed over heads (B, T, d), ToMe's similarity metric (only its direction
        # matters); summed in the qkv layout, where each token's heads lie side by side
        return (o, k.transpose(1, 2).sum(2)) if return_keys else o


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attn_part(self, x: torch.Tensor, bias: torch.Tensor | None = None, keep=None) -> torch.Tensor:
        return x + self.attn(self.norm1(x), bias, keep)

    def mlp_part(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, keep=None) -> torch.Tensor:
        return self.mlp_part(self.attn_part(x, bias, keep))


@dataclass
class ViTConfig:
    in_channels: int = 3
    image_size: int = 32
    patch_size: int = 4
    num_classes: int = 10
    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_size", "patch_size", "dim", "depth", "heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes: expected >= 2, got {self.num_classes}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size: expected a multiple of patch_size={self.patch_size}, got {self.image_size} "
                f"(valid sizes: {self.patch_size}, {2 * self.patch_size}, {3 * self.patch_size}, ...)"
            )
        if self.dim % self.heads:
            raise ValueError(f"dim: expected a multiple of heads={self.heads}, got {self.dim}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio: expected > 0, got {self.mlp_ratio}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.in_channels):
                raise ValueError(
                    f"{name}: expected 1 or in_channels={self.in_channels} values, got {getattr(self, name)}"
                )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def check_token_multiple(m: object) -> int:
    """The token methods' sequence-length multiple (DynamicViT, ToMe): an int >= 1, 1 = no rounding."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"token_multiple: expected an int >= 1 (1 = lengths are not rounded), got {m!r}")
    return m


def nearest_multiple(n: float, m: int) -> int:
    """The multiple of m nearest to n, halves rounded up (for sequence lengths)."""
    return m * math.floor(n / m + 0.5)


def check_images(x: object, input_shape: tuple[int, ...]) -> None:
    """Fail early on a wrong type, shape, channel count, image size, dtype or non-finite values."""
    want = f"(B, {', '.join(map(str, input_shape))})"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor of shape {want}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input: expected a 4-d image batch of shape {want}, got shape {tuple(x.shape)}")
    if x.shape[1] != input_shape[0]:
        raise ValueError(f"input: expected {input_shape[0]} channels {want}, got shape {tuple(x.shape)}")
    if tuple(x.shape[2:]) != tuple(input_shape[1:]):
        raise ValueError(
            f"input: expected images of size {input_shape[1]}x{input_shape[2]} {want}, got shape "
            f"{tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"input: expected a floating-point tensor, got dtype {x.dtype}")
    if not all_finite(x):
        raise ValueError("input: expected finite values, got NaN or inf")


def _per_channel(v: tuple[float, ...], n: int) -> tuple[float, ...]:
    return tuple(v) * n if len(v) == 1 else tuple(v)


@register_architecture
class ViT(nn.Module):
    """The static ViT: every token through every block; `forward_features` / `forward_head` split."""

    config_class = ViTConfig

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.input_shape = (c.in_channels, c.image_size, c.image_size)
        self.num_classes = c.num_classes
        self.normalize = Normalize(_per_channel(c.mean, c.in_channels), _per_channel(c.std, c.in_channels))
        self.patch_embed = nn.Conv2d(c.in_channels, c.dim, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.dim))
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._costs: dict[tuple, int] = {}

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    # ---------------------------------------------------------------- units
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + N, D): class token first, then the patches in raster order."""
        p = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(p.shape[0], -1, -1)
        return torch.cat([cls, p], 1) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) normalised token features after every block."""
        t = self.embed(x)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) normalised features -> (B, C) logits from the class token."""
        return self.head(features[:, 0])

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def check_input(self, x: torch.Tensor) -> None:
        check_images(x, self.input_shape)

    # ---------------------------------------------------------------- cost accounting
    def _measure(self, key: tuple, fn, *inputs: torch.Tensor) -> int:
        if key not in self._costs:
            with eager_attention():
                self._costs[key] = measure_flops(fn, *inputs)
        return self._costs[key]

    def _tokens(self, n: int) -> torch.Tensor:
        return torch.zeros(1, n, self.config.dim, device=self.pos_embed.device)

    def embed_cost(self) -> int:
        return self._measure(
            ("embed",), self.embed, torch.zeros(1, *self.input_shape, device=self.pos_embed.device)
        )

    def head_cost(self) -> int:
        return self._measure(("head",), lambda t: self.forward_head(self.norm(t)), self._tokens(1))

    def attn_cost(self, n: int) -> int:
        """FLOPs of LN + attention (qkv, core, proj) of one block on n tokens (blocks are alike)."""
        return self._per_count("attn", self.blocks[0].attn_part, n, degree=2)

    def mlp_cost(self, n: int) -> int:
        """FLOPs of LN + MLP of one block on n tokens."""
        return self._per_count("mlp", self.blocks[0].mlp_part, n, degree=1)

    def _per_count(self, name: str, fn, n: int, degree: int) -> int:
        """Cost of `fn` on n tokens. The counted FLOPs are a polynomial in n (linear layers grow
        like n, the attention core like n^2), so they are measured at degree + 1 counts and
        interpolated exactly; the interpolation is checked against a direct measurement at the
        full count, and if it ever disagrees every count is measured directly instead."""
        if n <= 0:
            return 0
        key = (name, "poly")
        if key not in self._costs:
            pts = list(range(1, degree + 2))
            ys = [self._measure((name, p), fn, self._tokens(p)) for p in pts]
            T = self.num_patches + 1
            coef = _fit_polynomial(pts, ys)
            exact = coef is not None and _eval_polynomial(coef, T) == self._measure(
                (name, T), fn, self._tokens(T)
            )
            self._costs[key] = coef if exact else None
        coef = self._costs[key]
        if coef is None:
            return self._measure((name, n), fn, self._tokens(n))
        return _eval_polynomial(coef, n)

    def block_cost(self, n: int) -> int:
        return 0 if n <= 0 else self.attn_cost(n) + self.mlp_cost(n)

    def full_cost(self) -> float:
        """FLOPs per sample of the static ViT: every token through every block."""
        n = self.num_patches + 1
        return float(self.embed_cost() + self.config.depth * self.block_cost(n) + self.head_cost())

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> DynamicOutput | MultiExitOutput:
        self.check_input(x)
        if self.training:
            return MultiExitOutput([self.forward_static(x)])
        with torch.no_grad():
            logits = self.forward_static(x)
        flops = torch.full((x.shape[0],), self.full_cost(), dtype=torch.float64)
        return DynamicOutput(logits, flops=flops)

    @classmethod
    def from_static(cls, static: ViT, **overrides: object) -> ViT:
        """This architecture with the backbone weights of a trained static ViT (same backbone config);
        its extra units (predictors, ...) keep their fresh initialisation."""
        base = {f.name for f in dataclasses.fields(ViTConfig)}
        fields = {**{k: v for k, v in vars(static.config).items() if k in base}, **overrides}
        model = cls(config_from_dict(cls.config_class, fields))
        missing, unexpected = model.load_state_dict(static.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"from_static: the static model has weights this one lacks: {unexpected[:5]}")
        return model.train(static.training)


def _fit_polynomial(xs: list[int], ys: list[int]) -> list[int] | None:
    """Integer coefficients (constant first) of the polynomial through the points, or None."""
    n = len(xs)
    a = torch.tensor([[float(x) ** k for k in range(n)] for x in xs], dtype=torch.float64)
    coef = torch.linalg.solve(a, torch.tensor(ys, dtype=torch.float64))
    rounded = [round(float(c)) for c in coef]
    ok = all(_eval_polynomial(rounded, x) == y for x, y in zip(xs, ys))
    return rounded if ok else None


def _eval_polynomial(coef: list[int], x: int) -> int:
    return sum(c * x**k for k, c in enumerate(coef))


def vit_config(cls: type, kw: dict) -> object:
    """A config of class `cls` from builder keyword overrides (lists become tuples)."""
    cfg = kw.pop("config", None)
    if cfg is not None:
        return cfg
    for key, v in list(kw.items()):
        if isinstance(v, list):
            kw[key] = tuple(v)
    return config_from_dict(cls, kw)


def trunc_init_(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register_model
def vit_tiny(**kw: object) -> ViT:
    """Static ViT for 32x32 images (patch 4, dim 192, depth 6, 3 heads): the spatial baseline."""
    return ViT(vit_config(ViTConfig, kw))


__all__ = [
    "Attention",
    "Block",
    "ViT",
    "ViTConfig",
    "attention_core",
    "check_images",
    "eager_attention",
    "policy_attention_core",
    "vit_tiny",
]
