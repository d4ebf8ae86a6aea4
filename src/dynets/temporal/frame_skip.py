"""Frame skipping with optional early classification: read a frame, decide how many to skip.

After reading frame t (one step of the recurrent cell) a small policy, a linear layer on the new
hidden state, picks a skip length k in {0, ..., max_skip}: frames t+1 .. t+k are never read (no cell,
no policy: they cost nothing) and frame t+k+1 is read next. This is LSTM-Jump-style skimming (Yu et
al. 2017) applied to frames; the policy is trained end to end with the straight-through
Gumbel-softmax: a one-hot "frames left to skip" counter c_t is carried through time,

    r_t     = c_t[0]                                      (read frame t?)
    s_t     = r_t * cell(x_t, s_{t-1}) + (1 - r_t) * s_{t-1}
    c_{t+1} = r_t * gumbel_softmax(policy(s_t), hard) + (1 - r_t) * shift(c_t)

so the classification loss reaches the policy through the reads it caused, and a budget loss on the
fraction of frames read (aux["loss"]) pushes it to skip. Inference takes the argmax skip length and
runs dynamically: at each frame only the rows due to read are gathered and stepped.

The skip bias (a run-time knob, `model.skip_bias` or forward(skip_bias=...)) trades reads for
accuracy without retraining: a cost of `skip_bias` per skipped frame is taken off the policy's
logits before the argmax, k = argmax_k (logit_k - skip_bias * k). 0 is the trained policy; a larger
bias reads more frames (bias >= the logits' spread: every frame, the full RNN's work), a negative one
fewer. The skip cap (`model.skip_cap` or forward(skip_cap=...)) bounds the skip length: after a
read, at most `skip_cap` frames are skipped (a longer choice of the policy is cut to skip_cap); 0
reads every frame, None leaves max_skip. Unlike the bias it binds however large the policy's logits have
grown in training. Both are calibrated on validation like the Skip-RNN's threshold. A model trained
with the policy alone may not get better when made to read more (its cell and classifier learned on
skipped sequences), so `train_caps=True` trains across the cap's range: each training sequence draws
its own cap from 0..max_skip.

Early classification (a run-time knob, `model.stop_confidence` or forward(stop_confidence=...)):
after every read the classifier also runs on the reading rows and a row whose top softmax
probability reaches the threshold stops reading for good. Its per-read head cost is counted. With
early_exit=True the classifier is trained on partial reads too (extra exits at 1/4, 1/2, 3/4 of
each sequence), which makes early answers worth trusting.
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
from dynets.train.estimators import budget_loss, gumbel_softmax

__all__ = ["FrameSkipConfig", "FrameSkipRNN"]

_EXIT_FRACTIONS = (0.25, 0.5, 0.75)


@dataclass
class FrameSkipConfig:
    cell: str = "gru"
    input_size: int = 1
    num_classes: int = 2
    hidden: int = 64
    layers: int = 1
    seq_len: int = 32  # reference length for input_shape and cost figures (any T runs)
    max_skip: int = 4  # after a read, skip 0..max_skip frames
    budget_weight: float = 0.01  # weight of the budget loss on the fraction of frames read
    budget_target: float = 0.0  # read fraction that costs nothing (hinge)
    tau: float = 1.0  # Gumbel-softmax temperature during training
    early_exit: bool = False  # also train the classifier on partial reads (1/4, 1/2, 3/4)
    stop_confidence: float | None = None  # run-time knob: stop reading at this confidence (None = never)
    skip_bias: float = 0.0  # run-time knob: cost per skipped frame on the skip logits (> 0: read more)
    skip_cap: int | None = None  # run-time knob: skip at most this many frames after a read (None: max_skip)
    # training: each sequence draws a skip cap uniformly from 0..max_skip, so the model learns to
    # classify at every read rate the cap can ask for (False: the policy alone)
    train_caps: bool = False

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell: expected one of {CELLS}, got {self.cell!r}")
        for name in ("input_size", "hidden", "layers", "seq_len", "max_skip"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes: expected an int >= 2, got {self.num_classes!r}")
        if self.tau <= 0 or self.budget_weight < 0 or not 0 <= self.budget_target <= 1:
            raise ValueError(
                f"tau > 0, budget_weight >= 0 and budget_target in [0, 1] expected, got "
                f"{self.tau} / {self.budget_weight} / {self.budget_target}"
            )
        if self.stop_confidence is not None:
            check_threshold("stop_confidence", self.stop_confidence)
        self.skip_bias = check_bias(self.skip_bias)
        self.skip_cap = check_cap(self.skip_cap, self.max_skip)
        if not isinstance(self.train_caps, bool):
            raise ValueError(f"train_caps: expected a bool, got {self.train_caps!r}")


def check_cap(value: object, max_skip: int) -> int | None:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= max_skip)
    if not ok:
        raise ValueError(f"skip_cap: expected None or an int in [0, max_skip={max_skip}], got {value!r}")
    return value


def check_bias(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"skip_bias: expected a finite number (0: the trained policy), got {value!r}")
    return float(value)


@register_architecture
class FrameSkipRNN(nn.Module):
    """Sequence classifier that reads some frames, skips others, and may stop early."""

    config_class = FrameSkipConfig

    def __init__(self, config: FrameSkipConfig) -> None:
        super().__init__()
        c = self.config = config
        self.stack = RecurrentStack(c.cell, c.input_size, c.hidden, c.layers)
        self.skip_policy = nn.Linear(c.hidden, c.max_skip + 1)  # logits over skip lengths 0..max_skip
        nn.init.zeros_(self.skip_policy.weight)
        with torch.no_grad():  # start by reading most frames: skip length 0 favoured
            self.skip_policy.bias.copy_(-torch.arange(c.max_skip + 1, dtype=torch.float32))
        self.head = nn.Linear(c.hidden, c.num_classes)
        self.input_shape = (c.seq_len, c.input_size)
        self.num_classes = c.num_classes

    @property
    def stop_confidence(self) -> float | None:
        return self.config.stop_confidence

    @stop_confidence.setter
    def stop_confidence(self, value: float | None) -> None:
        self.config.stop_confidence = None if value is None else check_threshold("stop_confidence", value)

    @property
    def skip_bias(self) -> float:
        return self.config.skip_bias

    @skip_bias.setter
    def skip_bias(self, value: float) -> None:
        self.config.skip_bias = check_bias(value)

    @property
    def skip_cap(self) -> int | None:
        return self.config.skip_cap

    @skip_cap.setter
    def skip_cap(self, value: int | None) -> None:
        self.config.skip_cap = check_cap(value, self.config.max_skip)

    def _knob(self, skip_bias: float | None, skip_cap: int | None | str) -> tuple[float, int | None]:
        """(bias, cap) of a call: the model's own where the call gives none ("model" for the cap)."""
        bias = self.skip_bias if skip_bias is None else check_bias(skip_bias)
        cap = self.skip_cap if skip_cap == "model" else check_cap(skip_cap, self.config.max_skip)
        return bias, cap

    def skip_lengths(self, top: torch.Tensor, knob: tuple[float, int | None]) -> torch.Tensor:
        """(B,) skip length 0..max_skip chosen from the (B, H) top hidden states at knob (bias, cap)."""
        return _choose(self.skip_policy(top), *knob)

    def unit_costs(self) -> dict[str, int]:
        """FLOPs per sample of one read (cell stack), the skip policy, the classifier."""
        if "_units" not in self.__dict__:
            h = next(self.parameters()).new_zeros(1, self.config.hidden)
            self.__dict__["_units"] = {
                "step": self.stack.step_flops(),
                "policy": measure_flops(self.skip_policy, h),
                "head": measure_flops(self.head, h),
            }
        return self.__dict__["_units"]

    def full_cost(self, steps: int | None = None) -> float:
        """FLOPs per sample when every one of `steps` frames (default seq_len) is read (cap 0)."""
        u = self.unit_costs()
        return float((steps or self.config.seq_len) * (u["step"] + u["policy"]) + u["head"])

    def init_from(self, other: nn.Module) -> FrameSkipRNN:
        """Copy the cell stack and classifier of a trained RNN (e.g. the static baseline, SkipRNN)."""
        self.stack.load_state_dict(other.stack.state_dict())
        self.head.load_state_dict(other.head.state_dict())
        return self

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None = None,
        *,
        stop_confidence: float | None = None,
        skip_bias: float | None = None,
        skip_cap: int | None | str = "model",
    ) -> DynamicOutput | MultiExitOutput:
        """skip_bias / skip_cap: the run-time knobs for this call (default: the model's; a cap of None
        lifts the model's cap)."""
        lengths = check_sequences(x, self.config.input_size, lengths)
        conf = self.stop_confidence
        if stop_confidence is not None:
            conf = check_threshold("stop_confidence", stop_confidence)
        knob = self._knob(skip_bias, skip_cap)
        if self.training:
            return self.forward_train(x, lengths)
        with torch.no_grad():
            if x.shape[0] == 1:
                return self._run_single(x, lengths, conf, knob)
            return self._run_events(x, lengths, conf, capacity=x.shape[0], knob=knob)

    def forward_train(self, x: torch.Tensor, lengths: torch.Tensor | None) -> MultiExitOutput:
        """Dense over rows and frames; hard Gumbel-softmax skip choices with straight-through gradients."""
        B, T, _ = x.shape
        K = self.config.max_skip
        valid = valid_mask(lengths, B, T, x.device).to(x.dtype)
        state = self.stack.init_state(B, x)
        w = self.stack.prepare()  # per-layer weights laid out for step()
        counter = torch.zeros(B, K + 1, dtype=x.dtype, device=x.device)
        counter[:, 0] = 1.0  # read the first frame
        caps = None  # (B, 1) each training sequence's own skip cap
        if self.config.train_caps:
            caps = torch.randint(0, K + 1, (B, 1), device=x.device)
        lengths_k = torch.arange(K + 1, device=x.device)
        reads, tops = [], []
        for t in range(T):
            r = counter[:, 0] * valid[:, t]  # (B,) exactly 0/1 forward
            state = r[:, None, None] * self.stack.step(x[:, t], state, w) + (1 - r)[:, None, None] * state
            logits = self.skip_policy(self.stack.top(state))  # (B, K+1) over skip lengths
            choice = gumbel_softmax(logits, self.config.tau, hard=True)
            if caps is not None:  # a choice longer than the cap becomes the cap: its one-hot mass moves there
                tail = choice.flip(1).cumsum(1).flip(1)  # (B, K+1) tail[j] = sum_{i >= j} choice[i]
                choice = torch.where(lengths_k < caps, choice, torch.where(lengths_k == caps, tail, 0.0))
            shifted = torch.cat([counter[:, 1:], counter.new_zeros(B, 1)], 1)
            counter = r[:, None] * choice + (1 - r)[:, None] * shifted
            reads.append(r)
            if self.config.early_exit:
                tops.append(self.stack.top(state))
        fraction = torch.stack(reads, 1).sum(1) / valid.sum(1)  # (B,)
        exits = [self.head(self.stack.top(state))]
        if self.config.early_exit and B:
            n = valid.sum(1).long()  # (B,) valid frames
            h = torch.stack(tops, 1)  # (B, T, H)
            early = []
            for f in _EXIT_FRACTIONS:
                pos = ((n.to(x.dtype) * f).long() - 1).clamp(min=0)  # last frame of the first f of each
                early.append(self.head(h[torch.arange(B, device=x.device), pos]))
            exits = early + exits
        aux = {"read_fraction": fraction.detach()}
        if B:
            c = self.config
            aux["loss"] = c.budget_weight * budget_loss(fraction, c.budget_target, "hinge")
        return MultiExitOutput(exits, aux=aux)

    def _output(self, logits: torch.Tensor, read: torch.Tensor, stop: torch.Tensor, conf: float | None):
        u = self.unit_costs()
        n = read.sum(1)
        per_read = u["step"] + u["policy"] + (u["head"] if conf is not None else 0)
        stopped = (stop >= 0).double()  # an early stop already paid for its head in per_read
        flops = n.double() * per_read + (1 - stopped) * u["head"]
        return DynamicOutput(logits, flops=flops, decisions={"read": read, "num_reads": n, "stop_step": stop})

    def run_dynamic(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None = None,
        stop_confidence: float | None = None,
        skip_bias: float | None = None,
        skip_cap: int | None | str = "model",
    ) -> DynamicOutput:
        """Event-driven executor (`run_events`): each round reads the next due frame of every live
        row, whatever its time step, and the policy's skip length says where the row reads next; a
        row that stops early (or runs past its length) leaves the batch. Knobs as in forward."""
        return self._run_events(
            x, lengths, stop_confidence, capacity=x.shape[0], knob=self._knob(skip_bias, skip_cap)
        )

    @torch.no_grad()
    def run_pooled(
        self,
        x: torch.Tensor,
        batch_size: int,
        lengths: torch.Tensor | None = None,
        stop_confidence: float | None = None,
        skip_bias: float | None = None,
        skip_cap: int | None | str = "model",
    ) -> DynamicOutput:
        """Throughput mode (continuous batching, as `SkipRNN.run_pooled`): at most `batch_size`
        sequences read at once, the next ones of x taking the places of those that finish. Same
        decisions, logits (up to float rounding) and FLOPs per sample as `run_dynamic`."""
        lengths = check_sequences(x, self.config.input_size, lengths)
        knob = self._knob(skip_bias, skip_cap)
        return self._run_events(x, lengths, stop_confidence, capacity=check_batch_size(batch_size), knob=knob)

    def _run_events(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None,
        conf: float | None,
        capacity: int,
        knob: tuple[float, int | None],
    ) -> DynamicOutput:
        if conf is not None:
            check_threshold("stop_confidence", conf)
        N, T, _ = x.shape
        stop = torch.full((N,), -1, dtype=torch.long, device=x.device)  # frame where a row stopped early
        if N == 0:
            empty = torch.zeros(0, T, dtype=torch.bool, device=x.device)
            return self._output(x.new_zeros(0, self.num_classes), empty, stop, conf)

        logits = x.new_zeros(N, self.num_classes)

        def decide(top, memory, rows, pos):
            k = self.skip_lengths(top, knob) + 1  # read the frame after the skipped ones
            if conf is not None:
                lg = self.head(top)
                done = lg.softmax(1).amax(1) >= conf  # confident: stop reading for good
                if bool(done.any()):
                    r = rows[done]
                    logits.index_copy_(0, r, lg[done])
                    stop.index_copy_(0, r, pos[done] - r * T)
                    k = torch.where(done, T, k)
            return k

        top, read = run_events(self.stack, x, lengths, capacity, decide)
        rest = (stop < 0).nonzero().squeeze(1)  # the rows that read to the end: classify them now
        if rest.numel():
            logits.index_copy_(0, rest, self.head(top.index_select(0, rest)))
        return self._output(logits, read, stop, conf)

    def _run_single(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None,
        conf: float | None,
        knob: tuple[float, int | None],
    ) -> DynamicOutput:
        """Batch size 1: jump straight from read to read; skipped frames are never touched."""
        T = x.shape[1]
        found: list = []  # (logits, frame) of an early stop

        def decide(top, memory, t):
            k = 1 + int(self.skip_lengths(top, knob))  # every read runs the policy (its FLOPs are counted)
            if conf is not None:
                lg = self.head(top)
                if float(lg.softmax(1).amax()) >= conf:
                    found.append((lg, t))
                    return T  # stop reading for good
            return k

        top, marks = run_events_single(self.stack, x, T if lengths is None else int(lengths[0]), decide)
        logits, stop = found[0] if found else (self.head(top), -1)
        read = torch.zeros(1, T, dtype=torch.bool)
        read[0, marks] = True
        stop_t = torch.tensor([stop], dtype=torch.long, device=x.device)
        return self._output(logits, read.to(x.device), stop_t, conf)

    def run_dense(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None = None,
        stop_confidence: float | None = None,
        skip_bias: float | None = None,
        skip_cap: int | None | str = "model",
    ) -> DynamicOutput:
        """Reference: every row computed at every frame; the same decisions select what is kept."""
        bias, cap = self._knob(skip_bias, skip_cap)
        K = self.config.max_skip
        costs = bias * torch.arange(K + 1, device=x.device, dtype=x.dtype)
        cap = K if cap is None else cap
        B, T, _ = x.shape
        valid = valid_mask(lengths, B, T, x.device)
        state = self.stack.init_state(B, x)
        w = self.stack.prepare()  # per-layer weights laid out for step()
        countdown = torch.zeros(B, dtype=torch.long, device=x.device)
        active = torch.ones(B, dtype=torch.bool, device=x.device)
        stop = torch.full((B,), -1, dtype=torch.long, device=x.device)
        logits = x.new_zeros(B, self.num_classes)
        read = []
        for t in range(T):
            due = (countdown == 0) & valid[:, t] & active
            new = self.stack.step(x[:, t], state, w)
            state = torch.where(due[:, None, None], new, state)
            k = (
                (self.skip_policy(self.stack.top(new)) - costs).argmax(1).clamp(max=cap)
            )  # the knobs, written out
            countdown = torch.where(due, k, countdown - 1)
            if stop_confidence is not None:
                lg = self.head(self.stack.top(new))
                done = due & (lg.softmax(1).amax(1) >= stop_confidence)
                logits = torch.where(done[:, None], lg, logits)
                stop = torch.where(done, torch.full_like(stop, t), stop)
                active = active & ~done
            read.append(due)
        logits = torch.where(active[:, None], self.head(self.stack.top(state)), logits)
        return self._output(logits, torch.stack(read, 1), stop, stop_confidence)


def _choose(logits: torch.Tensor, bias: float, cap: int | None) -> torch.Tensor:
    """(B,) skip lengths at knob (bias, cap): the argmax after bias * k off each length k's logit,
    cut to the cap."""
    if bias:
        logits = logits - bias * torch.arange(logits.shape[1], device=logits.device, dtype=logits.dtype)
    k = logits.argmax(1)
    return k if cap is None else k.clamp(max=cap)
