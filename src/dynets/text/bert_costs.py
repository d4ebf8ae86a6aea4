"""Length-dependent FLOPs of a BERT layer, an exit head and the embeddings, measured not derived.

A transformer layer's cost depends on the sentence length L: the projections and the feed-forward
block grow with L, the attention scores with L^2. So each unit is measured with `measure_flops`
(FlopCounterMode) at three lengths, the exact quadratic c + a*L + b*L^2 through them is solved in
rational arithmetic, and a fourth length checks that the fit reproduces the counter exactly. A
sample's cost is then evaluated at its own unpadded length.

Why the layer is measured with eager attention: PyTorch's FLOP counter has formulas for the
CUDA flash / memory-efficient SDPA kernels but not for the CPU kernel
(`_scaled_dot_product_flash_attention_for_cpu`), so on CPU the L^2 term would silently count 0.
The eager path computes the same two matmuls (Q K^T and P V), which the counter does count, so
the layer is measured on a copy whose config says "eager" (the live model is left untouched).
DynaBERT's narrow layers (`dynabert.narrow_layer`) are measured the same way through their own
`eager=True` path (`fit_layer_cost`), one fit per width.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from dynets.core.cost import measure_flops

FIT_LENGTHS = (8, 16, 32)  # the quadratic is solved through these ...
CHECK_LENGTH = 24  # ... and must reproduce this one exactly


@dataclass(frozen=True)
class LengthCost:
    """FLOPs per sample as an exact quadratic in the sequence length: c + a*L + b*L^2."""

    constant: Fraction
    linear: Fraction
    quadratic: Fraction

    def at(self, length: int) -> int | float:
        """Cost at one length (an int when the coefficients are integral, as they are for counters)."""
        v = self.constant + self.linear * length + self.quadratic * length * length
        return int(v) if v.denominator == 1 else float(v)

    def __call__(self, lengths: torch.Tensor | float) -> torch.Tensor | float:
        """lengths (any shape) -> float64 FLOPs of that shape (exact for integral coefficients below
        2**53); a Python number gives a Python float by the same float64 operations."""
        L = lengths.to(torch.float64) if isinstance(lengths, torch.Tensor) else float(lengths)
        return float(self.constant) + float(self.linear) * L + float(self.quadratic) * L * L


def fit_length_cost(
    measure: Callable[[int], int], lengths: Sequence[int] = FIT_LENGTHS, check: int | None = CHECK_LENGTH
) -> LengthCost:
    """Solve c + a*L + b*L^2 through `measure` at three lengths; verify it at `check`.

    Raises RuntimeError when the measured cost is not such a quadratic (e.g. a unit with a
    data-dependent or L^3 cost), rather than extrapolating silently.
    """
    if len(set(lengths)) != 3:
        raise ValueError(f"lengths: expected three distinct sequence lengths, got {list(lengths)}")
    pts = [(Fraction(L), Fraction(measure(int(L)))) for L in lengths]
    (x0, y0), (x1, y1), (x2, y2) = pts
    # Newton's divided differences: exact in rational arithmetic.
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    b = (d12 - d01) / (x2 - x0)
    a = d01 - b * (x0 + x1)
    c = y0 - a * x0 - b * x0 * x0
    fit = LengthCost(c, a, b)
    if check is not None:
        got, want = fit.at(check), measure(check)
        if got != want:
            raise RuntimeError(
                f"cost fit c + a*L + b*L^2 through lengths {list(lengths)} predicts {got} FLOPs at "
                f"L={check}, but the counter measured {want}; the unit's cost is not quadratic in L"
            )
    return fit


def fit_layer_cost(
    layer: Callable[[torch.Tensor], torch.Tensor], hidden_size: int, device: torch.device | str = "cpu"
) -> LengthCost:
    """The length cost of a layer given as a function of hidden states (1, L, H) alone, e.g. a
    DynaBERT narrow layer; its attention must be countable (eager matmuls, not CPU SDPA)."""
    return fit_length_cost(lambda L: measure_flops(layer, torch.zeros(1, L, hidden_size, device=device)))


def eager_copy(layer: nn.Module) -> nn.Module:
    """A deep copy of a Hugging Face layer whose attention runs the eager (countable) path."""
    twin = copy.deepcopy(layer).eval()
    for m in twin.modules():  # hooks the user put on the live layer must not fire while measuring
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    configs = {id(m.config): m.config for m in twin.modules() if hasattr(m, "config")}
    for cfg in configs.values():
        cfg._attn_implementation = "eager"
    return twin


def measure_units(
    embeddings: nn.Module,
    layer: nn.Module,
    head: nn.Module,
    predictor: nn.Module | None,
    *,
    hidden_size: int,
    num_labels: int,
) -> dict[str, LengthCost | int]:
    """Measure one of each unit: embeddings(L), layer(L), exit head(L) and the learned-exit predictor."""
    device = next(layer.parameters()).device
    twin = eager_copy(layer)
    head_was_training = head.training
    head.eval()
    emb_was_training = embeddings.training
    embeddings.eval()
    try:
        units: dict[str, LengthCost | int] = {
            "embeddings": fit_length_cost(
                lambda L: measure_flops(embeddings, torch.zeros(1, L, dtype=torch.long, device=device))
            ),
            # attention mask None = every position valid, exactly a sample at its own length
            "layer": fit_length_cost(
                lambda L: measure_flops(twin, torch.zeros(1, L, hidden_size, device=device))
            ),
            "head": fit_length_cost(
                lambda L: measure_flops(head, torch.zeros(1, L, hidden_size, device=device))
            ),
            "predictor": (
                measure_flops(predictor, torch.zeros(1, num_labels, device=device))
                if predictor is not None
                else 0
            ),
        }
    finally:
        head.train(head_was_training)
        embeddings.train(emb_was_training)
    return units
