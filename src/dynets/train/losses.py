"""Losses for multi-exit networks: joint weighted cross-entropy plus optional self-distillation and
knowledge distillation from an external teacher.

Shape taken from torchtune's early-exit loss: one scalar that is a weighted sum of per-exit losses,
with the weighting given by a named scale function ("uniform", "linear", "sqrt") or explicit numbers.
Self-distillation (the deepest exit teaches the shallower ones, as in BYOT / SDN-style training) is
folded into the same call so a training loop needs exactly one loss function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["EXIT_WEIGHT_SCHEMES", "exit_weights", "multi_exit_loss"]

EXIT_WEIGHT_SCHEMES = ("uniform", "linear", "sqrt")


def exit_weights(n_exits: int, scheme: str | Sequence[float] | torch.Tensor = "uniform") -> torch.Tensor:
    """Per-exit loss weights (n_exits,) float32 that sum to 1.

    "uniform": all equal; "linear": exit k (0-based) gets k+1, so deeper exits weigh more;
    "sqrt": sqrt(k+1), between the two. An explicit sequence of n_exits non-negative numbers (not
    all zero) is normalised the same way, so only the ratios matter.
    """
    if isinstance(n_exits, bool) or not isinstance(n_exits, int) or n_exits < 1:
        raise ValueError(f"n_exits: expected an int >= 1, got {n_exits!r}")
    if isinstance(scheme, str):
        k = torch.arange(1, n_exits + 1, dtype=torch.float64)
        if scheme == "uniform":
            w = torch.ones_like(k)
        elif scheme == "linear":
            w = k
        elif scheme == "sqrt":
            w = k.sqrt()
        else:
            raise ValueError(
                f"exit weight scheme: expected one of {EXIT_WEIGHT_SCHEMES} or a list of {n_exits} "
                f"non-negative floats, got {scheme!r}"
            )
    else:
        values = scheme.tolist() if isinstance(scheme, torch.Tensor) else list(scheme)
        if len(values) != n_exits:
            raise ValueError(
                f"exit weights: expected {n_exits} values (one per exit), got {len(values)}: {values!r}"
            )
        try:
            w = torch.tensor([float(v) for v in values], dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"exit weights: expected numbers, got {values!r}") from e
        if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"exit weights: expected finite values >= 0, not all zero, got {values!r}")
    return (w / w.sum()).to(torch.float32)


def multi_exit_loss(
    exit_logits: Sequence[torch.Tensor] | torch.Tensor,
    target: torch.Tensor,
    *,
    weights: str | Sequence[float] | torch.Tensor | None = None,
    distill: float = 0.0,
    temperature: float = 3.0,
    label_smoothing: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
    kd: float = 0.0,
) -> torch.Tensor:
    """Joint loss over every exit: sum_k w_k * loss_k, a scalar.

    exit_logits: the exits' logits, shallowest first, each (B, C); a single tensor counts as one exit.
    target: (B,) int64 class indices. weights: a scheme name or explicit numbers (see `exit_weights`);
    None means uniform.
    With distill > 0 every early exit also learns from the last exit's softened prediction:
        loss_k = (1 - distill) * CE_k + distill * T^2 * KL(softmax(z_last / T) || softmax(z_k / T))
    The teacher is detached, so the distillation term never pulls the last exit towards the early
    ones; the T^2 factor keeps its gradient scale independent of T (Hinton et al.). The last exit
    gets no self-distillation.
    teacher_logits (B, C), from an external teacher (e.g. a larger static model), with kd in (0, 1]:
    knowledge distillation into every exit, the last one included, mixed in after the above:
        loss_k <- (1 - kd) * loss_k + kd * T^2 * KL(softmax(t / T) || softmax(z_k / T))
    """
    logits = [exit_logits] if isinstance(exit_logits, torch.Tensor) else list(exit_logits)
    if not logits:
        raise ValueError("exit_logits: expected at least one (B, C) tensor, got an empty sequence")
    if not isinstance(distill, (int, float)) or isinstance(distill, bool) or not 0.0 <= distill <= 1.0:
        raise ValueError(f"distill: expected a float in [0, 1], got {distill!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite float > 0, got {temperature!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected a float in [0, 1), got {label_smoothing!r}")
    if not isinstance(target, torch.Tensor) or target.dim() != 1 or target.dtype != torch.int64:
        got = (
            f"shape {tuple(target.shape)} {target.dtype}"
            if isinstance(target, torch.Tensor)
            else type(target)
        )
        raise ValueError(f"target: expected a (B,) int64 tensor of class indices, got {got}")
    if target.shape[0] == 0:
        raise ValueError("target: expected a non-empty batch, got B = 0")
    n_classes = logits[-1].shape[-1] if logits[-1].dim() == 2 else None
    for k, z in enumerate(logits):
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape != (target.shape[0], n_classes):
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(
                f"exit_logits[{k}]: expected shape (B, C) = ({target.shape[0]}, {n_classes}) matching "
                f"target and the last exit, got {got}"
            )
    if not isinstance(kd, (int, float)) or isinstance(kd, bool) or not 0.0 <= kd <= 1.0:
        raise ValueError(f"kd: expected a float in [0, 1], got {kd!r}")
    if (teacher_logits is None) != (kd == 0):
        raise ValueError(
            "teacher_logits and kd: expected both (a (B, C) tensor and kd in (0, 1]) or neither, got "
            f"teacher_logits={'None' if teacher_logits is None else 'a tensor'} and kd={kd!r}"
        )
    if teacher_logits is not None and (
        not isinstance(teacher_logits, torch.Tensor) or teacher_logits.shape != (target.shape[0], n_classes)
    ):
        got = (
            tuple(teacher_logits.shape) if isinstance(teacher_logits, torch.Tensor) else type(teacher_logits)
        )
        raise ValueError(
            f"teacher_logits: expected shape (B, C) = ({target.shape[0]}, {n_classes}) matching the exits, "
            f"got {got}"
        )
    w = exit_weights(len(logits), "uniform" if weights is None else weights).tolist()

    last = len(logits) - 1
    if distill > 0 and last > 0:
        # (B, C) teacher log-probabilities; detached so only the students learn from this term.
        teacher = F.log_softmax(logits[last].detach() / temperature, dim=-1)
    outside = None  # the external teacher's (B, C) log-probabilities, never trained through
    if teacher_logits is not None:
        outside = F.log_softmax(teacher_logits.detach().to(logits[-1].dtype) / temperature, dim=-1)
    total = logits[0].new_zeros(())
    for k, z in enumerate(logits):
        loss_k = F.cross_entropy(z, target, label_smoothing=label_smoothing)
        if distill > 0 and k < last:
            student = F.log_softmax(z / temperature, dim=-1)
            kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
            loss_k = (1.0 - distill) * loss_k + distill * temperature**2 * kl
        if outside is not None:
            student = F.log_softmax(z / temperature, dim=-1)
            kl = F.kl_div(student, outside, reduction="batchmean", log_target=True)
            loss_k = (1.0 - kd) * loss_k + kd * temperature**2 * kl
        total = total + w[k] * loss_k
    return total
