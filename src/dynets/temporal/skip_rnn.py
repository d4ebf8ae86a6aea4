"""Skip-RNN (Campos et al., ICLR 2018): an LSTM or GRU that learns to skip state updates.

A binary update gate u_t decides whether step t runs the cell or copies the state forward:

    u_t      = 1[ũ_t >= threshold]                          (ũ_1 = 1: the first step always updates)
    s_t      = u_t * cell(x_t, s_{t-1}) + (1 - u_t) * s_{t-1}
    Δũ_t     = sigmoid(w · m_t + b)  if u_t  else  Δũ_{t-1}  (m_t: top-layer c for an LSTM, h for a GRU)
    ũ_{t+1}  = u_t * Δũ_t + (1 - u_t) * min(ũ_t + Δũ_{t-1}, 1)

so after an update with Δũ = p the cell sleeps: its next update is ceil(threshold / p) steps later,
the first step at which ũ = min(k p, 1) reaches the threshold. Training runs every row densely with
the straight-through estimator (hard gate forward, identity gradient) and adds a budget loss on the
fraction of steps updated (aux["loss"]). Inference is event-driven (`run_dynamic`): since each
update fixes the next one, a row's skipped steps are never visited; each round steps every live row
at its own next update (one dense step of the live rows, whatever their time steps), and rows leave
the batch when their sequence ends. `run_pooled` streams many sequences with at most `batch_size`
live (continuous batching), so rounds stay full instead of ending on the few rows that update most.
Skipped steps cost no FLOPs: per-sample FLOPs = updates x (cell + gate) + classifier. The threshold
is a run-time knob (`model.threshold`, `forward(threshold=...)`), calibrated to an update budget
with `calibrate_update_threshold`. A one-layer LSTM steps with `RecurrentStack.lstm1_step` (the
cell's arithmetic in the fewest ops); other stacks with PyTorch's own cells.

`skip=False` gives the static baseline (the same weights, every step, no gate), run with the fused
nn.LSTM / nn.GRU kernel, the fastest static implementation. Batch size 1 takes a separate loop
that never touches a skipped step at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dynets.core.cost import measure_flops
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.serialization import register_architecture
from dynets.core.tensors import check_batch_size
from dynets.temporal.base import (
    CELLS,
    RecurrentStack,
    check_sequences,
    check_threshold,
    run_events,
    run_events_single,
    valid_mask,
)
from dynets.train.estimators import budget_loss, straight_through_threshold

__all__ = ["SkipRNN", "SkipRNNConfig", "calibrate_update_threshold"]


@dataclass
class SkipRNNConfig:
    cell: str = "lstm"  # "lstm" or "gru"
    input_size: int = 1
    num_classes: int = 2
    hidden: int = 64
    layers: int = 1
    seq_len: int = 32  # reference length: input_shape and the FLOPs of a full pass (any T runs)
    skip: bool = True  # False: the static baseline (every step updates, no gate, fused kernel)
    threshold: float = 0.5  # run-time knob: a step updates when ũ_t >= threshold
    budget_weight: float = 0.01  # weight of the budget loss in aux["loss"]
    budget_target: float = 0.0  # update fraction that costs nothing (hinge); 0 = penalise every update
    gate_bias: float = 2.0  # initial gate bias: sigmoid(2) = 0.88, so training starts near "always update"

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell: expected one of {CELLS}, got {self.cell!r}")
        for name in ("input_size", "hidden", "layers", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes: expected an int >= 2, got {self.num_classes!r}")
        check_threshold("threshold", self.threshold)
        if self.budget_weight < 0 or not 0 <= self.budget_target <= 1:
            raise ValueError(
                f"budget_weight >= 0 and budget_target in [0, 1] expected, got "
                f"{self.budget_weight} / {self.budget_target}"
            )


@register_architecture
class SkipRNN(nn.Module):
    """Sequence classifier: a Skip-RNN (or, with skip=False, a plain RNN) read to the end, then a head."""

    config_class = SkipRNNConfig

    def __init__(self, config: SkipRNNConfig) -> None:
        super().__init__()
        c = self.config = config
        self.stack = RecurrentStack(c.cell, c.input_size, c.hidden, c.layers)
        self.gate = nn.Linear(c.hidden, 1) if c.skip else None
        if self.gate is not None:
            nn.init.constant_(self.gate.bias, c.gate_bias)
        self.head = nn.Linear(c.hidden, c.num_classes)
        self.input_shape = (c.seq_len, c.input_size)
        self.num_classes = c.num_classes

    # ------------------------------------------------------------------ knobs and costs
    @property
    def threshold(self) -> float:
        return self.config.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.config.threshold = check_threshold("threshold", value)

    def unit_costs(self) -> dict[str, int]:
        """FLOPs per sample: one step of the cell stack, the update gate, the classifier."""
        if "_units" not in self.__dict__:
            h = next(self.parameters()).new_zeros(1, self.config.hidden)
            self.__dict__["_units"] = {
                "step": self.stack.step_flops(),
                "gate": measure_flops(self.gate, h) if self.gate is not None else 0,
                "head": measure_flops(self.head, h),
            }
        return self.__dict__["_units"]

    def update_cost(self) -> int:
        """FLOPs of one state update: the cell stack plus (for a Skip-RNN) the update gate."""
        u = self.unit_costs()
        return u["step"] + u["gate"]

    def full_cost(self, steps: int | None = None) -> float:
        """FLOPs per sample of the static path (every step, no gate) over `steps` (default seq_len)."""
        u = self.unit_costs()
        return float((steps or self.config.seq_len) * u["step"] + u["head"])

    def init_from(self, other: SkipRNN) -> SkipRNN:
        """Copy the cell stack and classifier of a trained model (e.g. the static baseline)."""
        self.stack.load_state_dict(other.stack.state_dict())
        self.head.load_state_dict(other.head.state_dict())
        return self

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None, *, threshold: float | None = None
    ) -> DynamicOutput | MultiExitOutput:
        lengths = check_sequences(x, self.config.input_size, lengths)
        thr = self.threshold if threshold is None else check_threshold("threshold", threshold)
        if self.training:
            return self.forward_train(x, lengths, thr)
        with torch.no_grad():
            if not self.config.skip:
                return self.run_static(x, lengths)
            if x.shape[0] == 1:
                return self._run_single(x, lengths, thr)
            return self.run_dynamic(x, lengths, thr)

    def _output(self, h: torch.Tensor, updated: torch.Tensor) -> DynamicOutput:
        n = updated.sum(1)
        flops = n.double() * self.update_cost() + self.unit_costs()["head"]
        return DynamicOutput(self.head(h), flops=flops, decisions={"updated": updated, "num_updates": n})

    def forward_train(self, x: torch.Tensor, lengths: torch.Tensor | None, thr: float) -> MultiExitOutput:
        """Every row, every step; hard gates forward with straight-through gradients; budget in aux."""
        B, T, _ = x.shape
        if not self.config.skip:
            return MultiExitOutput([self.head(self.stack.run_fused(x, lengths))])
        valid = valid_mask(lengths, B, T, x.device).to(x.dtype)  # (B, T)
        state = self.stack.init_state(B, x)  # (B, R, H)
        w = self.stack.prepare()  # per-layer weights laid out for step()
        ut = x.new_ones(B)  # ũ_1 = 1
        used = []
        for t in range(T):
            u = straight_through_threshold(ut, thr) * valid[:, t]  # (B,) hard 0/1, gradient to ũ
            new = self.stack.step(x[:, t], state, w)
            state = u[:, None, None] * new + (1 - u)[:, None, None] * state
            delta = torch.sigmoid(self.gate(self.stack.memory(state))).squeeze(1)  # (B,)
            ut = u * delta + (1 - u) * (ut + delta).clamp(max=1.0)
            used.append(u)
        fraction = torch.stack(used, 1).sum(1) / valid.sum(1)  # (B,) share of steps updated
        c = self.config
        aux = {"update_fraction": fraction.detach()}
        if B:
            aux["loss"] = c.budget_weight * budget_loss(fraction, c.budget_target, "hinge")
        return MultiExitOutput([self.head(self.stack.top(state))], aux=aux)

    def run_static(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> DynamicOutput:
        """Every step of every sample with the fused kernel (the static baseline's inference)."""
        B, T, _ = x.shape
        updated = valid_mask(lengths, B, T, x.device)
        if B == 0:
            return self._empty(x, T)
        h = self.stack.run_fused(x, lengths)
        n = updated.sum(1)
        flops = n.double() * self.unit_costs()["step"] + self.unit_costs()["head"]
        return DynamicOutput(self.head(h), flops=flops, decisions={"updated": updated, "num_updates": n})

    def run_loop(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> DynamicOutput:
        """Every step of every sample with the per-step cell and no gate: the full RNN run by the same
        step-by-step executor as the Skip-RNN (padding steps are not computed). Timing it beside
        `run_static` separates what skipping saves from what the fused kernel's C++ loop adds."""
        B, T, _ = x.shape
        if B == 0:
            return self._empty(x, T)
        valid = valid_mask(lengths, B, T, x.device)
        steps = T if lengths is None else int(lengths.max())
        state = self.stack.init_state(B, x)
        w = self.stack.prepare()  # per-layer weights laid out for step()
        xt = x.transpose(0, 1).contiguous()  # (T, B, F)
        for t in range(steps):
            if lengths is None or bool(valid[:, t].all()):
                state = self.stack.step(xt[t], state, w)
            else:
                idx = valid[:, t].nonzero().squeeze(1)
                state.index_copy_(
                    0, idx, self.stack.step(xt[t].index_select(0, idx), state.index_select(0, idx), w)
                )
        n = valid.sum(1)
        flops = n.double() * self.unit_costs()["step"] + self.unit_costs()["head"]
        h = self.stack.top(state)
        return DynamicOutput(self.head(h), flops=flops, decisions={"updated": valid, "num_updates": n})

    def _empty(self, x: torch.Tensor, T: int) -> DynamicOutput:
        return DynamicOutput(
            x.new_zeros(0, self.num_classes),
            flops=torch.zeros(0, dtype=torch.float64),
            decisions={
                "updated": torch.zeros(0, T, dtype=torch.bool),
                "num_updates": torch.zeros(0, dtype=torch.long),
            },
        )

    def update_probability(self, memory: torch.Tensor) -> torch.Tensor:
        """Δũ (b, 1) of the rows whose memory (b, H) is given, for the inference paths: the gate's own
        arithmetic as one addmm (the hot loops inline it with the weights looked up once per pass,
        since the module call and attribute lookups cost a few microseconds per step)."""
        return torch.addmm(self.gate.bias, memory, self.gate.weight.t()).sigmoid_()

    @staticmethod
    def sleep_steps(delta: torch.Tensor, thr: float, cap: int) -> torch.Tensor:
        """Steps from an update to the next one, given the update's Δũ: the first k >= 1 with
        k * Δũ >= threshold in exact arithmetic (at least 1, at most `cap`), as int64.

        ceil(threshold / Δũ) in float64, plus one where the quotient was rounded down onto a whole
        number (k * Δũ is exact in float64 for a float32 Δũ, so the check is too). The step-by-step
        float32 sum ũ + Δũ of the paper's formulation (training) can differ from this by a step where
        threshold / Δũ lies within rounding of a whole number. Every inference path (dense reference,
        dynamic, pooled, batch 1, exported runtime) decides by this same arithmetic."""
        d = delta.double()
        k = torch.div(d.new_tensor(thr), d).ceil_().clamp_(1, cap)
        return k.add_(k * d < thr).long()

    def run_dynamic(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None, threshold: float | None = None
    ) -> DynamicOutput:
        """Event-driven executor: each round advances every live sample straight to its own next
        update (whatever its time step), so a round is one dense step of the live rows and a batch
        takes as many rounds as its busiest sample has updates, instead of T steps of gathering.

        Skipped steps are never visited: once a row updates at step t with Δũ, its next update is at
        t + ceil(threshold / Δũ) (`sleep_steps`). Rows whose next update lies past their last step
        leave the live set (their state is written out) and the rest are compacted."""
        thr = self.threshold if threshold is None else check_threshold("threshold", threshold)
        return self._run_events(x, lengths, thr, capacity=x.shape[0])

    @torch.no_grad()
    def run_pooled(
        self,
        x: torch.Tensor,
        batch_size: int,
        lengths: torch.Tensor | None = None,
        threshold: float | None = None,
    ) -> DynamicOutput:
        """Throughput mode (continuous batching): at most `batch_size` sequences are live at once, and
        as sequences finish, the next ones of `x` (N, T, F) take their places (in chunks of a quarter
        of `batch_size`), so the rounds keep running on nearly full batches instead of on the few
        rows that update most, which is what a batch that only shrinks ends on. Same decisions,
        logits (up to float rounding) and FLOPs per sample as `run_dynamic`; results in input order.
        A sequence may wait for a free place, so use this for offline or server-side throughput."""
        lengths = check_sequences(x, self.config.input_size, lengths)
        check_batch_size(batch_size)
        if not self.config.skip:
            raise ValueError("run_pooled: expected a Skip-RNN (skip=True), got the static model")
        thr = self.threshold if threshold is None else check_threshold("threshold", threshold)
        return self._run_events(x, lengths, thr, capacity=batch_size)

    def _run_events(
        self, x: torch.Tensor, lengths: torch.Tensor | None, thr: float, capacity: int
    ) -> DynamicOutput:
        """`run_events` with the update gate deciding each row's next update (`sleep_steps`)."""
        N, T, _ = x.shape
        if N == 0:
            return self._empty(x, T)

        w, b, sleep = self.gate.weight.t(), self.gate.bias, self.sleep_steps  # attribute lookups, once

        def decide(top, memory, rows, pos):  # the gate as in update_probability, without the calls
            return sleep(torch.addmm(b, memory, w).sigmoid_().view(-1), thr, T)

        top, updated = run_events(self.stack, x, lengths, capacity, decide)
        return self._output(top, updated)

    def run_dense(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None, threshold: float | None = None
    ) -> DynamicOutput:
        """Reference (and the masked baseline): every row is computed at every step, and the gate
        decisions, taken by the same rule, only select which result is kept. Saves nothing."""
        thr = self.threshold if threshold is None else check_threshold("threshold", threshold)
        B, T, _ = x.shape
        if B == 0:
            return self._empty(x, T)
        valid = valid_mask(lengths, B, T, x.device)
        state = self.stack.init_state(B, x)
        nxt = torch.zeros(B, dtype=torch.long, device=x.device)  # each row's next update step
        w = self.stack.prepare()  # per-layer weights laid out for step()
        updated = []
        for t in range(T):
            upd = (nxt == t) & valid[:, t]
            new = self.stack.step(x[:, t], state, w)
            state = torch.where(upd[:, None, None], new, state)
            delta = self.update_probability(self.stack.memory(new)).view(-1)
            nxt = torch.where(upd, t + self.sleep_steps(delta, thr, T), nxt)
            updated.append(upd)
        return self._output(self.stack.top(state), torch.stack(updated, 1))

    def _run_single(self, x: torch.Tensor, lengths: torch.Tensor | None, thr: float) -> DynamicOutput:
        """Batch size 1: jump from update to update (`sleep_steps` in Python floats, no tensor ops)."""
        T = x.shape[1]
        w, b = self.gate.weight.t(), self.gate.bias

        def decide(top, memory, t):
            delta = torch.addmm(b, memory, w).sigmoid_().item()  # update_probability, inlined
            k = T if delta == 0.0 else min(max(math.ceil(thr / delta), 1), T)  # as sleep_steps
            return k + (k * delta < thr)

        top, marks = run_events_single(self.stack, x, T if lengths is None else int(lengths[0]), decide)
        updated = torch.zeros(1, T, dtype=torch.bool)
        updated[0, marks] = True
        return self._output(top, updated.to(x.device))


@torch.no_grad()
def calibrate_update_threshold(
    model: SkipRNN,
    val_x: torch.Tensor,
    budget: float,
    *,
    lengths: torch.Tensor | None = None,
    batch_size: int = 256,
    iters: int = 14,
) -> float:
    """The smallest threshold whose mean update fraction on `val_x` is at most `budget` (in (0, 1]).

    Bisection over (0, 1] (the update count falls as the threshold rises); sets model.threshold and
    returns it. A budget below what threshold 1 reaches raises ValueError with that minimum.
    """
    budget = check_threshold("budget", budget)
    if not model.config.skip:
        raise ValueError("calibrate_update_threshold: expected a Skip-RNN (skip=True), got the static model")
    lengths = check_sequences(val_x, model.config.input_size, lengths)
    if val_x.shape[0] == 0:
        raise ValueError("val_x: expected at least one validation sequence, got an empty batch")
    model.eval()
    steps = lengths.double() if lengths is not None else torch.full((val_x.shape[0],), float(val_x.shape[1]))

    def fraction(thr: float) -> float:
        n = []
        for i in range(0, val_x.shape[0], batch_size):
            lg = None if lengths is None else lengths[i : i + batch_size]
            n.append(model.run_dynamic(val_x[i : i + batch_size], lg, thr).decisions["num_updates"])
        return float((torch.cat(n).double().cpu() / steps.cpu()).mean())

    top = fraction(1.0)
    if top > budget:
        raise ValueError(
            f"budget: {budget:.4f} is below the smallest update fraction this model reaches "
            f"({top:.4f} at threshold 1.0); expected a budget in [{top:.4f}, 1]"
        )
    lo, hi = 0.0, 1.0  # fraction(lo) may exceed the budget, fraction(hi) does not
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if fraction(mid) <= budget:
            hi = mid
        else:
            lo = mid
    model.threshold = hi
    return hi
