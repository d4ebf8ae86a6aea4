"""Exit policies: how an exit's scores become a decision "stop here" for each sample.

A policy is a small object, set at run time and swappable without retraining; it never holds
network parameters. Each policy sees, at exit k, that exit's logits (B, C) and (for the learned
policy) the model's learned correctness score (B,), plus a per-sample state dict that the executor
compacts together with the batch. The last exit always stops every remaining sample.

Threshold policies (confidence, entropy, learned) map logits to a score where higher means more
sure, and stop when score >= threshold_k; thresholds may be one value or one per exit, which is
what budget calibration produces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

State = dict[str, torch.Tensor]
_SCALAR_CLASSES = 64  # up to this many classes, batch-1 decisions are computed on Python floats


def _scalar_logits(logits: torch.Tensor) -> list[float] | None:
    """One sample's logits (1, C) as Python floats, or None for more than _SCALAR_CLASSES classes
    (then the tensor ops are cheaper). Callers keep the arithmetic to a pass or two: at batch 1 the
    decision runs between convolutions that have just evicted the interpreter's working set from
    the CPU caches, so every Python operation there costs several times its isolated time."""
    if logits.shape[-1] > _SCALAR_CLASSES:
        return None
    return logits.tolist()[0]


def _scalar_confidence(z: list[float]) -> float:
    """max softmax = 1 / sum_i exp(z_i - max z)."""
    m = max(z)
    return 1.0 / sum([math.exp(v - m) for v in z])


def _scalar_entropy(z: list[float]) -> float:
    """H(softmax(z)) in nats = log S - sum_i e_i (z_i - m) / S, with e_i = exp(z_i - m), S = sum e_i."""
    m = max(z)
    d = [v - m for v in z]
    e = [math.exp(v) for v in d]
    total = sum(e)
    return math.log(total) - sum([a * b for a, b in zip(e, d)]) / total


class ExitPolicy:
    """Base class. Subclasses implement `step`; threshold policies derive from ThresholdPolicy."""

    kind: ClassVar[str] = "base"
    needs_learned: ClassVar[bool] = False

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return {}

    def step(
        self, k: int, logits: torch.Tensor, state: State, learned: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        """Return (stop (B,) bool, new state) for the samples still running at exit k."""
        raise NotImplementedError

    def step_single(
        self, k: int, logits: torch.Tensor, state: State, learned: torch.Tensor | None = None
    ) -> tuple[bool, State]:
        """`step` for one sample (logits (1, C)), the decision as a Python bool: the batch-1 path
        calls this, and policies override it with a few scalar operations instead of a chain of
        tensor ops (each ~10 us of fixed overhead, which at batch 1 is most of a policy step)."""
        stop, state = self.step(k, logits, state, learned)
        return bool(stop[0]), state

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class ThresholdPolicy(ExitPolicy):
    """Stop at exit k when score(logits) >= threshold_k. Thresholds are in the user's units."""

    low: ClassVar[float] = 0.0
    high: ClassVar[float] = 1.0

    def __init__(self, threshold: float | Sequence[float] = 0.9) -> None:
        values = [threshold] if isinstance(threshold, (int, float)) else list(threshold)
        if not values:
            raise ValueError(
                f"{self.kind} threshold: expected a number or a non-empty list, got {threshold!r}"
            )
        for t in values:
            if not isinstance(t, (int, float)) or math.isnan(t) or not (self.low <= t <= self.high):
                raise ValueError(f"{self.kind} threshold must lie in [{self.low}, {self.high}], got {t!r}")
        self.thresholds = [float(t) for t in values]

    def threshold_at(self, k: int) -> float:
        if len(self.thresholds) == 1:
            return self.thresholds[0]
        if k >= len(self.thresholds):
            raise ValueError(
                f"{self.kind} policy has {len(self.thresholds)} per-exit thresholds but was asked "
                f"about exit {k}; expected one threshold per non-final exit"
            )
        return self.thresholds[k]

    # The score is "higher means more sure"; score_threshold maps the user's threshold onto it.
    def score(self, logits: torch.Tensor, learned: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def score_threshold(self, t: float) -> float:
        return t

    @classmethod
    def from_score_thresholds(cls, values: Sequence[float]) -> ThresholdPolicy:
        """Build the policy from thresholds expressed on the score scale (used by calibration)."""
        return cls([min(max(float(v), cls.low), cls.high) for v in values])

    def step(self, k, logits, state, learned=None):
        return self.score(logits, learned) >= self.score_threshold(self.threshold_at(k)), state

    def score_single(self, logits: torch.Tensor, learned: torch.Tensor | None = None) -> float:
        """score() of one sample as a float (subclasses compute it without tensor ops)."""
        return float(self.score(logits, learned)[0])

    def step_single(self, k, logits, state, learned=None):
        return self.score_single(logits, learned) >= self.score_threshold(self.threshold_at(k)), state

    def to_dict(self) -> dict[str, Any]:
        t = self.thresholds[0] if len(self.thresholds) == 1 else list(self.thresholds)
        return {"kind": self.kind, "threshold": t}


class ConfidencePolicy(ThresholdPolicy):
    """Max-softmax probability (Shallow-Deep Networks, MSDNet): stop when max p >= threshold."""

    kind = "confidence"

    def score(self, logits, learned=None):
        return logits.float().softmax(dim=-1).amax(dim=-1)

    def score_single(self, logits, learned=None):
        z = _scalar_logits(logits)
        return super().score_single(logits, learned) if z is None else _scalar_confidence(z)


class EntropyPolicy(ThresholdPolicy):
    """Prediction entropy (DeeBERT): stop when H(p) / log(C) <= threshold.

    Entropy is normalised by log(C) so one threshold scale in [0, 1] fits any class count.
    Internally score = 1 - H/log C, so calibration treats it like the others.
    """

    kind = "entropy"

    def score(self, logits, learned=None):
        return 1.0 - self._entropy(logits) / math.log(max(logits.shape[-1], 2))

    @staticmethod
    def _entropy(logits: torch.Tensor) -> torch.Tensor:
        return torch.special.entr(logits.float().softmax(dim=-1)).sum(dim=-1)  # (B,) nats

    def score_threshold(self, t: float) -> float:
        return 1.0 - t

    @classmethod
    def from_score_thresholds(cls, values):
        return cls([min(max(1.0 - float(v), 0.0), 1.0) for v in values])

    def step(self, k, logits, state, learned=None):
        # Compare in entropy units (few ops: this runs at every exit of every batch).
        limit = self.threshold_at(k) * math.log(max(logits.shape[-1], 2))
        return self._entropy(logits) <= limit, state

    def step_single(self, k, logits, state, learned=None):
        z = _scalar_logits(logits)
        if z is None:
            return super().step_single(k, logits, state, learned)
        return _scalar_entropy(z) <= self.threshold_at(k) * math.log(max(len(z), 2)), state


class LearnedPolicy(ThresholdPolicy):
    """A learned exit: the model's small per-exit head predicts P(this exit is already right);
    stop when that probability >= threshold. The head belongs to the model (trained with
    `fit_learned_exits`); the policy holds only the threshold."""

    kind = "learned"
    needs_learned = True

    def score(self, logits, learned=None):
        if learned is None:
            raise ValueError(
                "learned policy needs the model's learned-exit scores, got none; "
                "train them first with dynets.depth.fit_learned_exits"
            )
        return learned.float()


class PatiencePolicy(ExitPolicy):
    """PABEE: stop once `patience` consecutive exits agree on the prediction.

    State per sample: the previous exit's prediction and how many exits in a row agreed with it.
    """

    kind = "patience"

    def __init__(self, patience: int = 2) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        self.patience = patience

    def init_state(self, batch_size, device):
        return {
            "prev": torch.full((batch_size,), -1, dtype=torch.long, device=device),
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def step(self, k, logits, state, learned=None):
        pred = logits.argmax(dim=-1)
        count = torch.where(pred == state["prev"], state["count"] + 1, torch.zeros_like(state["count"]))
        return count >= self.patience, {"prev": pred, "count": count}

    def to_dict(self):
        return {"kind": self.kind, "patience": self.patience}


class NeverExitPolicy(ExitPolicy):
    """Run every sample to the last exit: the static reference through the dynamic path."""

    kind = "never"

    def step(self, k, logits, state, learned=None):
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), state

    def to_dict(self):
        return {"kind": self.kind}


POLICIES: dict[str, type[ExitPolicy]] = {
    p.kind: p for p in (ConfidencePolicy, EntropyPolicy, LearnedPolicy, PatiencePolicy, NeverExitPolicy)
}


def policy_from_dict(data: dict[str, Any]) -> ExitPolicy:
    """Inverse of `ExitPolicy.to_dict`."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in POLICIES:
        raise ValueError(f"unknown policy kind {kind!r}; expected one of {sorted(POLICIES)}")
    return POLICIES[kind](**data)


def make_policy(kind: str, value: float | int | Sequence[float] | None = None) -> ExitPolicy:
    """Build a policy by name with its one knob (threshold or patience)."""
    if kind not in POLICIES:
        raise ValueError(f"unknown policy {kind!r}; expected one of {sorted(POLICIES)}")
    cls = POLICIES[kind]
    if value is None:
        return cls()
    if kind == "patience":
        return cls(int(value))  # type: ignore[arg-type]
    return cls(value)  # type: ignore[call-arg]
