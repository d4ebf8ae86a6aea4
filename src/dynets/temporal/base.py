"""Shared pieces of the temporal family: a steppable recurrent stack, input checks, per-step costs.

`RecurrentStack` holds the weights of a plain `nn.LSTM` / `nn.GRU` (so a model can also run the
fused whole-sequence kernel) and steps them one time step at a time on any subset of rows, which is
what lets a dynamic executor compute only the samples that update. Its state is one tensor
S: (B, R, H), R = 2 * layers for an LSTM (h of every layer, then c) and layers for a GRU, so a
single index_select / index_copy_ along dim 0 (whole contiguous rows, the fast path) moves a
sample's whole state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dynets.core.cost import measure_flops
from dynets.core.tensors import all_finite

CELLS = ("lstm", "gru")


def check_sequences(x: object, input_size: int, lengths: object = None) -> torch.Tensor | None:
    """Validate a padded batch x (B, T, F) and optional lengths (B,); return lengths as int64 or None."""
    if isinstance(x, (list, tuple)):
        raise ValueError(
            f"x: variable-length sequences given as a {type(x).__name__} of {len(x)} tensors; expected one "
            "padded tensor (B, T, F) and lengths=(B,) with each sample's number of valid steps"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor of shape (B, T, {input_size}), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[2] != input_size:
        raise ValueError(f"x: expected shape (B, T, F={input_size}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError(f"x: expected sequences of at least one step, got T = {x.shape[1]}")
    if not all_finite(x):
        raise ValueError("x: expected finite values, got NaN or inf")
    if lengths is None:
        return None
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.shape != (x.shape[0],) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths: expected an integer tensor of shape (B,) = ({x.shape[0]},), got "
            f"{tuple(lengths.shape)} {lengths.dtype}"
        )
    lengths = lengths.to(device=x.device, dtype=torch.int64)
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > x.shape[1]):
        raise ValueError(
            f"lengths: expected values in [1, T={x.shape[1]}] (a sequence has at least one step), got "
            f"[{int(lengths.min())}, {int(lengths.max())}]"
        )
    return lengths


def check_threshold(name: str, value: object, low_open: bool = True) -> float:
    """A threshold in (0, 1] (or [0, 1] with low_open=False), as a float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not ((0 < value <= 1) if low_open else (0 <= value <= 1)):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")
    return float(value)


class RecurrentStack(nn.Module):
    """A multi-layer LSTM or GRU whose weights can run fused (whole sequence) or one step at a time."""

    def __init__(self, cell: str, input_size: int, hidden: int, layers: int) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
        if min(input_size, hidden, layers) < 1:
            raise ValueError(
                f"input_size, hidden, layers: expected ints >= 1, got {input_size}, {hidden}, {layers}"
            )
        self.cell, self.hidden, self.layers = cell, hidden, layers
        self.input_size = input_size
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(input_size, hidden, layers, batch_first=True)
        self.state_rows = 2 * layers if cell == "lstm" else layers

    def init_state(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch, self.state_rows, self.hidden)  # (B, R, H)

    def prepare(self) -> list[tuple[torch.Tensor | None, ...]]:
        """Per-layer weights for `step`, made once per forward pass: (w_ih, w_hh, b_ih, b_hh); for an
        LSTM the two biases are summed into one (b_hh None), which saves an add per step."""
        r, out = self.rnn, []
        for k in range(self.layers):
            w_ih, w_hh = getattr(r, f"weight_ih_l{k}"), getattr(r, f"weight_hh_l{k}")
            b_ih, b_hh = getattr(r, f"bias_ih_l{k}"), getattr(r, f"bias_hh_l{k}")
            if self.cell == "lstm":
                out.append((w_ih, w_hh, b_ih + b_hh, None))
            else:
                out.append((w_ih, w_hh, b_ih, b_hh))
        return out

    def step(
        self,
        x: torch.Tensor,
        state: torch.Tensor,
        weights: list[tuple[torch.Tensor | None, ...]] | None = None,
    ) -> torch.Tensor:
        """One time step for the rows given: x (b, F), state (b, R, H) -> new state (b, R, H).

        Each layer is one call of PyTorch's own cell (`torch.lstm_cell` / `torch.gru_cell`, the
        arithmetic of nn.LSTM / nn.GRU, its gates computed in C++), since at small batch sizes a
        step's cost is mostly per-op overhead."""
        w = self.prepare() if weights is None else weights
        L = self.layers
        inp, hs, cs = x, [], []
        for k in range(L):
            w_ih, w_hh, b_ih, b_hh = w[k]
            if self.cell == "gru":
                inp = torch.gru_cell(inp, state[:, k], w_ih, w_hh, b_ih, b_hh)
            else:
                inp, c = torch.lstm_cell(inp, (state[:, k], state[:, L + k]), w_ih, w_hh, b_ih, b_hh)
                cs.append(c)
            hs.append(inp)
        return torch.stack(hs + cs, 1)

    def lstm1_weights(self) -> tuple[torch.Tensor, ...]:
        """Weights of a one-layer LSTM laid out for `lstm1_step`: (W_ih^T (F, 4H), W_hh^T (H, 4H), summed
        bias (4H,)), the cell-candidate block (gates i, f, g, o: the third) doubled, so that one sigmoid
        over all four gates also gives tanh(g) = 2 * sigmoid(2g) - 1."""
        if self.cell != "lstm" or self.layers != 1:
            raise ValueError(f"lstm1_weights: expected a one-layer LSTM, got {self.layers}-layer {self.cell}")
        r, H = self.rnn, self.hidden
        scale = torch.ones(4 * H, 1, dtype=r.weight_hh_l0.dtype, device=r.weight_hh_l0.device)
        scale[2 * H : 3 * H] = 2.0
        w_ih, w_hh = r.weight_ih_l0 * scale, r.weight_hh_l0 * scale
        return w_ih.t().contiguous(), w_hh.t().contiguous(), (r.bias_ih_l0 + r.bias_hh_l0) * scale[:, 0]

    @staticmethod
    def lstm1_step(
        x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, weights: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of a one-layer LSTM for the rows given: x (b, F), h and c (b, H) -> new (h, c).

        The arithmetic of nn.LSTM in the fewest ops (two matmuls, one sigmoid, five elementwise): at
        the batch sizes a dynamic executor sees, each op's fixed cost matters as much as its work."""
        w_ih_t, w_hh_t, b = weights
        # one input feature: the input projection is an outer product (a quarter of addmm's time)
        s = torch.addcmul(b, x, w_ih_t) if x.shape[1] == 1 else torch.addmm(b, x, w_ih_t)
        s = s.addmm_(h, w_hh_t).sigmoid_()
        i, f, g, o = s.chunk(4, 1)  # g holds sigmoid(2 * candidate)
        c = (f * c).addcmul_(i, g, value=2.0).sub_(i)  # f c + i (2 sigmoid(2 g) - 1) = f c + i tanh(g)
        return o * c.tanh(), c

    def top(self, state: torch.Tensor) -> torch.Tensor:
        """The top layer's output h, (b, H)."""
        return state[:, self.layers - 1]

    def memory(self, state: torch.Tensor) -> torch.Tensor:
        """The top layer's memory: c for an LSTM (the Skip-RNN gate reads it), h for a GRU."""
        return state[:, -1]

    def run_fused(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Every step of every sample with the fused kernel; the top h at each sample's last step."""
        if lengths is None:
            out, _ = self.rnn(x)
            return out[:, -1]
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, hn = self.rnn(packed)
        h = hn[0] if self.cell == "lstm" else hn  # (L, B, H), in input order
        return h[-1]

    def step_flops(self) -> int:
        """FLOPs of one time step of one sample through every layer (measured at batch size 1)."""
        if "_step_flops" not in self.__dict__:
            p = next(self.parameters())
            x = p.new_zeros(1, self.input_size)
            self.__dict__["_step_flops"] = measure_flops(self.step, x, self.init_state(1, x))
        return self.__dict__["_step_flops"]


# decide(top, memory, rows, pos) -> (n,) int64 >= 1: steps from each live row's current step to its next
# one (a value that reaches past the row's length ends it); top and memory are the live rows' top h and
# c (LSTM) or h (GRU) after this step, rows their input positions, pos their flat index row * T + t
Decide = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def run_events(
    stack: RecurrentStack,
    x: torch.Tensor,
    lengths: torch.Tensor | None,
    capacity: int,
    decide: Decide,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Event-driven executor of the skipping RNNs: each round steps every live sequence at its own
    next step (one dense step of the n live rows, whatever their time steps), and `decide` says how
    far each one jumps next, so skipped steps are never visited and a batch takes as many rounds as
    its busiest sequence has steps computed. At most `capacity` sequences are live: rows of x enter
    in input order whenever a quarter of the places (or all the rest) are free, and leave when their
    next step lies past their length (their state is written out, the rest compacted). capacity =
    len(x) is one batch; less is continuous batching. Every row computes step 0.

    A one-layer LSTM steps with `lstm1_step` (h and c kept apart); other stacks with `stack.step`.
    Returns each row's top-layer h after its last step (N, H) and the steps computed (N, T) bool."""
    N, T, F = x.shape
    fast = stack.cell == "lstm" and stack.layers == 1
    if fast:
        w = stack.lstm1_weights()
        blank = x.new_zeros(0, stack.hidden)
        state: tuple[torch.Tensor, ...] = (blank, blank)
    else:
        w = stack.prepare()
        state = (stack.init_state(0, x),)  # (n, R, H)
    final = [s.new_empty(N, *s.shape[1:]) for s in state]  # each row's state after its last step
    xflat = x.reshape(N * T, F)
    rows = torch.zeros(0, dtype=torch.long, device=x.device)  # input positions of the live rows
    pos = rows  # flat index (row * T + t) of each live row's next step
    end = rows  # flat index past each live row's last step
    admitted, refill, marks = 0, max(1, capacity // 4), []
    while True:
        free = capacity - rows.numel()
        if admitted < N and free >= min(refill, N - admitted):  # admit the next rows, at step 0
            new = torch.arange(admitted, min(N, admitted + free), device=x.device)
            admitted += new.numel()
            start = new * T
            last = start + (T if lengths is None else lengths.index_select(0, new))
            state = tuple(torch.cat([s, s.new_zeros(new.numel(), *s.shape[1:])]) for s in state)
            rows, pos, end = torch.cat([rows, new]), torch.cat([pos, start]), torch.cat([end, last])
        if not rows.numel():
            break
        marks.append(pos)
        xt = xflat.index_select(0, pos)
        if fast:
            state = stack.lstm1_step(xt, *state, w)
            top, memory = state
        else:
            state = (stack.step(xt, state[0], w),)
            top, memory = stack.top(state[0]), stack.memory(state[0])
        pos = pos + decide(top, memory, rows, pos)
        done = pos >= end
        if not bool(done.any()):
            continue
        fin, keep = done.nonzero().squeeze(1), (~done).nonzero().squeeze(1)
        idx = rows.index_select(0, fin)
        for out, s in zip(final, state):
            out.index_copy_(0, idx, s.index_select(0, fin))
        state = tuple(s.index_select(0, keep) for s in state)
        rows, pos, end = (v.index_select(0, keep) for v in (rows, pos, end))
    computed = torch.zeros(N * T, dtype=torch.bool, device=x.device)
    if marks:
        computed[torch.cat(marks)] = True
    return (final[0] if fast else stack.top(final[0])), computed.view(N, T)


def run_events_single(
    stack: RecurrentStack, x: torch.Tensor, steps: int, decide: Callable[..., int]
) -> tuple[torch.Tensor, list[int]]:
    """`run_events` for one sequence x (1, T, F) of `steps` valid steps, in Python ints (no
    compaction, no index tensors): decide(top, memory, t) -> the steps to the next one (>= 1).
    Returns the top-layer h after the last step computed (1, H) and the steps computed."""
    fast = stack.cell == "lstm" and stack.layers == 1
    if fast:
        w = stack.lstm1_weights()
        state: tuple[torch.Tensor, ...] = (x.new_zeros(1, stack.hidden), x.new_zeros(1, stack.hidden))
    else:
        w = stack.prepare()
        state = (stack.init_state(1, x),)
    xs, t, marks = x[0], 0, []
    while t < steps:
        marks.append(t)
        if fast:
            state = stack.lstm1_step(xs[t : t + 1], *state, w)
            top, memory = state
        else:
            state = (stack.step(xs[t : t + 1], state[0], w),)
            top, memory = stack.top(state[0]), stack.memory(state[0])
        t += decide(top, memory, t)
    return (state[0] if fast else stack.top(state[0])), marks


def valid_mask(lengths: torch.Tensor | None, batch: int, steps: int, device: torch.device) -> torch.Tensor:
    """(B, T) bool: True where step t < length (all True without lengths)."""
    if lengths is None:
        return torch.ones(batch, steps, dtype=torch.bool, device=device)
    return torch.arange(steps, device=device)[None, :] < lengths[:, None]
