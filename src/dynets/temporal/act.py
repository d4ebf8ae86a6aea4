"""Adaptive computation time for RNNs (Graves 2016): each time step ponders as long as it needs.

At step t the cell runs n = 1, 2, ... times on the same input (with a flag marking the first pass),
and a halting unit h^n = sigmoid(w · h_t^n + b) accumulates until it reaches 1 - epsilon:

    N(t) = min{ n : sum_{i<=n} h^i >= 1 - epsilon }   (at most max_ponder)
    p^n  = h^n for n < N(t),   R(t) = 1 - sum_{i<N(t)} h^i   for n = N(t)
    s_t  = sum_n p^n s_t^n                                 (the state carried to step t + 1)

The ponder cost rho_t = N(t) + R(t), averaged over steps and samples and weighted by ponder_weight,
is the model's aux["loss"] in training (its gradient flows through the remainders R).

Training runs every row for as many ponder passes as the slowest row needs (masking). Inference is
compacted: a row that halts leaves the ponder loop at once (its weighted state is written back with
index_copy_), so a sample that halts after one pass costs one pass. Per-sample FLOPs = total passes
x (cell + halting unit) + classifier; decisions["ponder"] is (B, T) passes per step (0 on padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynets.core.cost import measure_flops
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.serialization import register_architecture
from dynets.temporal.base import CELLS, RecurrentStack, check_sequences, valid_mask

__all__ = ["ACTRNN", "ACTRNNConfig"]


@dataclass
class ACTRNNConfig:
    cell: str = "gru"
    input_size: int = 1
    num_classes: int = 2
    hidden: int = 64
    layers: int = 1
    seq_len: int = 32  # reference length for input_shape and cost figures (any T runs)
    max_ponder: int = 8  # passes per step at most
    epsilon: float = 0.01  # halt once the halting sum reaches 1 - epsilon
    ponder_weight: float = 1e-3  # time penalty tau on the mean ponder cost
    halt_bias: float = 1.0  # initial halting bias (Graves: a positive bias starts with little pondering)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell: expected one of {CELLS}, got {self.cell!r}")
        for name in ("input_size", "hidden", "layers", "seq_len", "max_ponder"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes: expected an int >= 2, got {self.num_classes!r}")
        if not 0 < self.epsilon < 1 or self.ponder_weight < 0:
            raise ValueError(
                f"epsilon in (0, 1) and ponder_weight >= 0 expected, got {self.epsilon} and "
                f"{self.ponder_weight}"
            )


@register_architecture
class ACTRNN(nn.Module):
    """A sequence classifier whose recurrent cell ponders a variable number of passes per step."""

    config_class = ACTRNNConfig

    def __init__(self, config: ACTRNNConfig) -> None:
        super().__init__()
        c = self.config = config
        self.stack = RecurrentStack(c.cell, c.input_size + 1, c.hidden, c.layers)  # + first-pass flag
        self.halt = nn.Linear(c.hidden, 1)
        nn.init.constant_(self.halt.bias, c.halt_bias)
        self.head = nn.Linear(c.hidden, c.num_classes)
        self.input_shape = (c.seq_len, c.input_size)
        self.num_classes = c.num_classes

    def unit_costs(self) -> dict[str, int]:
        """FLOPs per sample of one ponder pass (cell stack), the halting unit, the classifier."""
        if "_units" not in self.__dict__:
            h = next(self.parameters()).new_zeros(1, self.config.hidden)
            self.__dict__["_units"] = {
                "step": self.stack.step_flops(),
                "halt": measure_flops(self.halt, h),
                "head": measure_flops(self.head, h),
            }
        return self.__dict__["_units"]

    def pass_cost(self) -> int:
        u = self.unit_costs()
        return u["step"] + u["halt"]

    def _halting(self, state: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.halt(self.stack.top(state))).squeeze(1)  # (b,)

    @staticmethod
    def _with_flag(x: torch.Tensor, first: bool) -> torch.Tensor:
        return torch.cat([x, x.new_full((x.shape[0], 1), 1.0 if first else 0.0)], 1)  # (b, F + 1)

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> DynamicOutput | MultiExitOutput:
        lengths = check_sequences(x, self.config.input_size, lengths)
        if self.training:
            logits, _, cost = self._run_masked(x, lengths)
            aux = {"ponder_cost": cost.detach()}
            if x.shape[0]:
                aux["loss"] = self.config.ponder_weight * cost.mean()
            return MultiExitOutput([logits], aux=aux)
        with torch.no_grad():
            return self.run_dynamic(x, lengths)

    def _output(self, logits: torch.Tensor, ponder: torch.Tensor) -> DynamicOutput:
        flops = ponder.sum(1).double() * self.pass_cost() + self.unit_costs()["head"]
        return DynamicOutput(logits, flops=flops, decisions={"ponder": ponder})

    def _run_masked(
        self, x: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every row runs until the slowest row of the step halts; halted rows are masked out.
        Returns logits (B, C), passes (B, T) int64 and the mean ponder cost per sample (B,)."""
        B, T, _ = x.shape
        eps, N = self.config.epsilon, self.config.max_ponder
        valid = valid_mask(lengths, B, T, x.device)
        state = self.stack.init_state(B, x)
        w = self.stack.prepare()  # per-layer weights laid out for step()
        cost = x.new_zeros(B)
        passes = []
        for t in range(T):
            running = valid[:, t].clone()
            first, rest = self._with_flag(x[:, t], True), self._with_flag(x[:, t], False)
            s, cum, acc = state, x.new_zeros(B), torch.zeros_like(state)
            used = torch.zeros(B, dtype=torch.long, device=x.device)
            for n in range(1, N + 1):
                s = self.stack.step(first if n == 1 else rest, s, w)
                h = self._halting(s)
                stop = (cum + h >= 1 - eps) | (n == N)
                live = running.to(x.dtype)
                p = torch.where(stop, 1 - cum, h) * live  # this pass's weight; 0 for halted rows
                acc = acc + p[:, None, None] * s
                cost = cost + torch.where(running & stop, n + (1 - cum), torch.zeros_like(cum))
                used = used + running.long()
                cum = cum + torch.where(stop, torch.zeros_like(h), h) * live
                running = running & ~stop
                if not bool(running.any()):
                    break
            state = torch.where(valid[:, t][:, None, None], acc, state)
            passes.append(used)
        n_steps = valid.sum(1).clamp(min=1).to(x.dtype)
        return self.head(self.stack.top(state)), torch.stack(passes, 1), cost / n_steps

    def run_dense(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> DynamicOutput:
        """Reference: the masked (training-mode) computation without gradients; saves nothing."""
        lengths = check_sequences(x, self.config.input_size, lengths)
        with torch.no_grad():
            logits, passes, _ = self._run_masked(x, lengths)
        return self._output(logits, passes)

    def run_dynamic(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> DynamicOutput:
        """Compacting executor: halted rows leave the ponder loop at once."""
        B, T, _ = x.shape
        eps, N = self.config.epsilon, self.config.max_ponder
        ponder = torch.zeros(B, T, dtype=torch.long, device=x.device)
        if B == 0:
            return self._output(x.new_zeros(0, self.num_classes), ponder)
        valid = valid_mask(lengths, B, T, x.device).T.contiguous()  # (T, B)
        steps = T if lengths is None else int(lengths.max())
        state = self.stack.init_state(B, x)
        w = self.stack.prepare()  # per-layer weights laid out for step()
        everyone = torch.arange(B, device=x.device)
        for t in range(steps):
            rows = everyone if lengths is None else valid[t].nonzero().squeeze(1)  # input positions
            xt = x[:, t].index_select(0, rows)
            first, rest = self._with_flag(xt, True), self._with_flag(xt, False)
            s = state.index_select(0, rows)  # (b, R, H)
            cum, acc = xt.new_zeros(rows.numel()), torch.zeros_like(s)
            for n in range(1, N + 1):
                s = self.stack.step(first if n == 1 else rest, s, w)
                h = self._halting(s)
                stop = (cum + h >= 1 - eps) | (n == N)
                acc += torch.where(stop, 1 - cum, h)[:, None, None] * s
                if n == N or bool(stop.all()):  # everyone left: write back and finish the step
                    state.index_copy_(0, rows, acc)
                    ponder[rows, t] = n
                    break
                if bool(stop.any()):
                    gone, keep = stop.nonzero().squeeze(1), (~stop).nonzero().squeeze(1)
                    state.index_copy_(0, rows[gone], acc.index_select(0, gone))
                    ponder[rows[gone], t] = n
                    rows, s, acc = rows[keep], s.index_select(0, keep), acc.index_select(0, keep)
                    cum, h, rest = cum[keep], h[keep], rest.index_select(0, keep)
                cum = cum + h
        return self._output(self.head(self.stack.top(state)), ponder)
