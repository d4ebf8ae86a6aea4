"""Slimmable networks: one set of weights run at several widths, and a per-sample width chooser.

Layers (Yu et al., Slimmable Neural Networks, 2019; US-Nets for BN calibration):
- `SlimmableConv2d` / `SlimmableLinear` run at width index `wi` with the FIRST channels of their
  weights: a real, narrower convolution (weight[:c_out, :c_in]), never a zero-masked one.
- `SlimmableBatchNorm2d`: private running statistics per width (they differ a lot between widths);
  affine parameters private too ("switchable BN", `switchable=True`) or shared and sliced
  (`switchable=False`, then refresh the statistics with `recalibrate_bn` after training).

`SlimmableNetwork` (subclasses implement `forward_width(x, wi)`) trains with the sandwich rule: each
training forward runs the largest width, the smallest and `sandwich_random` random intermediate
widths; `dynets.train.train` needs no special loss. With `sandwich_loss="label"` (the default, as in
the first slimmable networks) every width's logits are returned as exits, smallest first, so the
train loop's multi-exit loss trains each on the labels (`TrainConfig.distill` > 0 mixes in
distillation from the largest, as for early exits). With "distill" (US-Nets' in-place
distillation) only the largest learns from the labels and the others from its detached prediction
(`aux["loss"]`). From scratch, distillation from a network that is itself near chance pulls the
shared weights towards uniform predictions (an ad-hoc check, CIFAR-10 ResNet, one epoch on 12,800 images: full
width 26.4% with "distill", 39.3% with "label", 37.6% for the static net; 18 epochs with "distill"
reached only 72.3%). Fine-tuned from a trained static model, "distill" is the better one
(`dynets.bench.skip_width`: width chooser at 60% of the FLOPs 79.81% vs 79.19% with "label").
In eval mode it picks a width per sample:

  1. run every sample at the smallest width                     logits0: (B, C)
  2. the `WidthPolicy` reads its confidence (max softmax) and picks a width index per sample:
     the first k with conf >= thresholds[k], else the largest
  3. each width group k > 0 runs as its own sub-batch (index_select), results index_copy_'d
     back in input order; samples kept at the smallest width reuse logits0

A sample's FLOPs are the smallest width's cost plus, if it escalated, its width's cost. The
thresholds are the run-time knob; `calibrate_width_policy` fits them to a FLOPs budget. The
width policy is saved beside the weights (`width_policy.json`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynets.core.cost import measure_flops
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.tensors import check_batch_size, pop_groups, take_rows
from dynets.depth.skipping import check_input

POLICY_FILE = "width_policy.json"
SANDWICH_LOSSES = ("label", "distill")


def check_width_mults(width_mults: Sequence[float]) -> tuple[float, ...]:
    """Width multipliers: non-empty, strictly increasing, each in (0, 1]."""
    w = tuple(width_mults)
    bad = [v for v in w if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1]
    if not w or bad:
        raise ValueError(f"width_mults: expected multipliers in (0, 1], got {list(w)}")
    if any(b <= a for a, b in zip(w, w[1:])):
        raise ValueError(f"width_mults: expected strictly increasing values, got {list(w)}")
    return tuple(float(v) for v in w)


def scaled(channels: int, width: float) -> int:
    """Channels of a layer with `channels` at full width, run at multiplier `width` (>= 1)."""
    return max(1, int(channels * width + 0.5))


def _tracing() -> bool:
    """Under torch.export / torch.compile: no cache (traced tensors have no data to key it by)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _is_nhwc(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class SlimmableConv2d(nn.Conv2d):
    """Conv2d whose output channels shrink with the width; input channels follow the input tensor.

    slim_out=False keeps all output channels (e.g. a fixed-size embedding); the first layer keeps
    its input channels because the image has them all."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        width_mults: Sequence[float],
        bias: bool = False,
        slim_out: bool = True,
    ) -> None:
        super().__init__(cin, cout, kernel_size, stride, padding, bias=bias)
        self.width_mults = check_width_mults(width_mults)
        self.slim_out = slim_out
        self._cache: dict[int, tuple[tuple[int, int], torch.Tensor, torch.Tensor | None]] = {}

    def out_at(self, wi: int) -> int:
        return scaled(self.out_channels, self.width_mults[wi]) if self.slim_out else self.out_channels

    def sliced(self, wi: int, cin: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (c_out, c_in, k, k) weight slice (and bias) for width `wi`; contiguous copies are cached
        for inference and dropped as soon as the weights change (their version counter moves)."""
        cout = self.out_at(wi)
        if cin > self.in_channels:
            raise ValueError(f"input: expected at most {self.in_channels} channels, got {cin}")
        if cout == self.out_channels and cin == self.in_channels:
            return self.weight, self.bias
        if (torch.is_grad_enabled() and self.weight.requires_grad) or _tracing():
            return self.weight[:cout, :cin], None if self.bias is None else self.bias[:cout]
        key = (self.weight._version, self.weight.data_ptr())
        hit = self._cache.get(wi)
        if hit is None or hit[0] != key or hit[1].shape[1] != cin:
            b = None if self.bias is None else self.bias[:cout].detach().clone()
            fmt = torch.channels_last if _is_nhwc(self.weight) else torch.contiguous_format
            hit = (key, self.weight[:cout, :cin].detach().contiguous(memory_format=fmt), b)
            self._cache[wi] = hit
        return hit[1], hit[2]

    def forward(self, x: torch.Tensor, wi: int = -1) -> torch.Tensor:  # (B, c_in, H, W) -> (B, c_out, H', W')
        w, b = self.sliced(wi % len(self.width_mults), x.shape[1])
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, 1)


class SlimmableLinear(nn.Linear):
    """Linear layer reading the first `x.shape[-1]` input features (full-size output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cin = x.shape[-1]
        if cin > self.in_features:
            raise ValueError(f"input: expected at most {self.in_features} features, got {cin}")
        return F.linear(x, self.weight[:, :cin], self.bias)


class SlimmableBatchNorm2d(nn.Module):
    """One BatchNorm2d per width (private statistics); affine private (switchable) or shared."""

    def __init__(self, channels: int, width_mults: Sequence[float], switchable: bool = True) -> None:
        super().__init__()
        self.width_mults = check_width_mults(width_mults)
        self.switchable = switchable
        self.bn = nn.ModuleList(
            nn.BatchNorm2d(scaled(channels, w), affine=switchable) for w in self.width_mults
        )
        if not switchable:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))

    @torch.no_grad()
    def load_full_width(self, bn: nn.BatchNorm2d) -> None:
        """Initialise every width from a full-width BatchNorm2d (its first channels)."""
        for sub in self.bn:
            c = sub.num_features
            sub.running_mean.copy_(bn.running_mean[:c])
            sub.running_var.copy_(bn.running_var[:c])
            if self.switchable:
                sub.weight.copy_(bn.weight[:c])
                sub.bias.copy_(bn.bias[:c])
        if not self.switchable:
            self.weight.copy_(bn.weight)
            self.bias.copy_(bn.bias)

    def forward(self, x: torch.Tensor, wi: int = -1) -> torch.Tensor:
        y = self.bn[wi](x)
        if self.switchable:
            return y
        c = x.shape[1]
        return y * self.weight[:c].view(1, c, 1, 1) + self.bias[:c].view(1, c, 1, 1)


class WidthPolicy:
    """Per-sample width from the smallest width's confidence: the first width index k with
    confidence >= thresholds[k], else the largest. One threshold per width except the largest, or a
    single one (then only the smallest and the largest width are used)."""

    kind = "width_confidence"

    def __init__(self, thresholds: float | Sequence[float] = 0.9) -> None:
        values = [thresholds] if isinstance(thresholds, (int, float)) else list(thresholds)
        if not values:
            raise ValueError(f"width thresholds: expected a number or a non-empty list, got {thresholds!r}")
        for t in values:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or not 0 <= t <= 1:
                raise ValueError(f"width threshold: expected a value in [0, 1], got {t!r}")
        self.thresholds = [float(t) for t in values]

    def choose(self, confidence: torch.Tensor, n_widths: int) -> torch.Tensor:
        """(B,) confidences in [0, 1] -> (B,) int64 width indices."""
        if len(self.thresholds) not in (1, n_widths - 1) and n_widths > 1:
            raise ValueError(
                f"width policy: expected 1 or {n_widths - 1} thresholds for {n_widths} widths, "
                f"got {len(self.thresholds)}"
            )
        out = torch.full(confidence.shape, n_widths - 1, dtype=torch.long, device=confidence.device)
        for k in reversed(range(min(len(self.thresholds), n_widths - 1))):  # the first match wins
            out = torch.where(confidence >= self.thresholds[k], k, out)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "thresholds": list(self.thresholds)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WidthPolicy:
        if data.get("kind") != cls.kind:
            raise ValueError(f"width policy: expected kind {cls.kind!r}, got {data.get('kind')!r}")
        return cls(data["thresholds"])

    def __repr__(self) -> str:
        return f"WidthPolicy(thresholds={self.thresholds!r})"


def inplace_distillation(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), the teacher detached."""
    t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(s, t, reduction="batchmean", log_target=True)


class SlimmableNetwork(nn.Module):
    """Base class: subclasses build slimmable layers and implement `forward_width(x, wi) -> (B, C)`."""

    def __init__(
        self,
        *,
        width_mults: Sequence[float],
        input_shape: Sequence[int],
        num_classes: int,
        sandwich_random: int = 2,
        distill_temperature: float = 1.0,
        sandwich_loss: str = "label",
        thresholds: float | Sequence[float] = 0.9,
    ) -> None:
        super().__init__()
        self.width_mults = check_width_mults(width_mults)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        if isinstance(sandwich_random, bool) or not isinstance(sandwich_random, int) or sandwich_random < 0:
            raise ValueError(f"sandwich_random: expected an int >= 0, got {sandwich_random!r}")
        if not (isinstance(distill_temperature, (int, float)) and distill_temperature > 0):
            raise ValueError(f"distill_temperature: expected a float > 0, got {distill_temperature!r}")
        if sandwich_loss not in SANDWICH_LOSSES:
            raise ValueError(f"sandwich_loss: expected one of {SANDWICH_LOSSES}, got {sandwich_loss!r}")
        self.sandwich_random, self.distill_temperature = sandwich_random, float(distill_temperature)
        self.sandwich_loss = sandwich_loss
        self.width_policy = WidthPolicy(thresholds)

    def forward_width(self, x: torch.Tensor, wi: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_widths(self) -> int:
        return len(self.width_mults)

    def width_index(self, width: float) -> int:
        """The index of multiplier `width`; ValueError if this model was not built with it."""
        for i, w in enumerate(self.width_mults):
            if isinstance(width, (int, float)) and abs(w - width) < 1e-9:
                return i
        raise ValueError(f"width: {width!r} is not available; expected one of {list(self.width_mults)}")

    # ---------------------------------------------------------------- cost accounting
    def width_costs(self) -> torch.Tensor:
        """(K,) float64 FLOPs per sample of the whole network at each width (measured, batch 1)."""
        if "width_flops" not in self.__dict__:
            was = self.training
            self.eval()
            x = torch.zeros(1, *self.input_shape, device=self._device())
            costs = [
                measure_flops(lambda t, i=i: self.forward_width(t, i), x) for i in range(self.num_widths)
            ]
            self.train(was)
            self.__dict__["width_flops"] = torch.tensor(costs, dtype=torch.float64)
        return self.__dict__["width_flops"]

    def full_cost(self) -> float:
        """FLOPs per sample at the largest width (the static network)."""
        return float(self.width_costs()[-1])

    def flops_of(self, width_index: torch.Tensor) -> torch.Tensor:
        """(B,) width indices -> (B,) float64 FLOPs: smallest width + the chosen one if wider."""
        c = self.width_costs()
        wi = width_index.cpu()
        return c[0] + torch.where(wi > 0, c[wi], torch.zeros((), dtype=torch.float64))

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        policy: WidthPolicy | None = None,
        *,
        width: float | None = None,
        record: bool = False,
    ) -> DynamicOutput | MultiExitOutput:
        """Training: the sandwich rule (or one fixed `width`). Eval: per-sample widths under `policy`
        (default `self.width_policy`), or every sample at one `width`."""
        check_input(x, self.input_shape)
        wi = None if width is None else self.width_index(width)
        if policy is not None and not isinstance(policy, WidthPolicy):
            raise TypeError(f"policy: expected a WidthPolicy or None, got {type(policy).__name__}")
        if self.training:
            if wi is not None:
                return MultiExitOutput([self.forward_width(x, wi)])
            if self._stochastic():
                return self.sandwich(x)
            # The train loop's validation (root flag on, layers in eval): every width, largest last.
            return MultiExitOutput([self.forward_width(x, i) for i in range(self.num_widths)])
        with torch.no_grad():
            if wi is not None:
                index = torch.full((x.shape[0],), wi, dtype=torch.long)
                c = self.width_costs()[wi]
                return DynamicOutput(
                    self.forward_width(x, wi),
                    flops=c.repeat(x.shape[0]),
                    decisions={"width": self._widths_of(index), "width_index": index},
                )
            return self.run_dynamic(x, policy or self.width_policy, record=record)

    def _stochastic(self) -> bool:
        return any(m.training for m in self.children())

    def sandwich(self, x: torch.Tensor) -> MultiExitOutput:
        """The largest width, the smallest and `sandwich_random` random ones. "label": all of them as
        exits (smallest first, largest last) for the train loop's multi-exit loss; "distill": the
        largest as the only exit, the others distilled from it in aux["loss"]."""
        K = self.num_widths
        big = self.forward_width(x, K - 1)
        if K == 1:
            return MultiExitOutput([big])
        middle = list(range(1, K - 1))
        n = min(self.sandwich_random, len(middle))
        picked = [middle[i] for i in torch.randperm(len(middle))[:n].tolist()] if n else []
        widths = [0, *sorted(picked)]
        if self.sandwich_loss == "label":
            return MultiExitOutput(
                [*(self.forward_width(x, wi) for wi in widths), big], {"widths": [*widths, K - 1]}
            )
        kd = big.new_zeros((), dtype=torch.float32)
        for wi in widths:
            kd = kd + inplace_distillation(self.forward_width(x, wi), big, self.distill_temperature)
        return MultiExitOutput([big], {"loss": kd, "widths": [*widths, K - 1]})

    def all_width_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every sample at every width (the reference for tests and the input of calibration)."""
        return [self.forward_width(x, i) for i in range(self.num_widths)]

    def _widths_of(self, index: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.width_mults, dtype=torch.float32)[index.cpu()]

    def run_dynamic(self, x: torch.Tensor, policy: WidthPolicy, *, record: bool = False) -> DynamicOutput:
        B, K = x.shape[0], self.num_widths
        if B == 0:
            return DynamicOutput(
                x.new_zeros(0, self.num_classes),
                flops=torch.zeros(0, dtype=torch.float64),
                decisions={"width": torch.zeros(0), "width_index": torch.zeros(0, dtype=torch.long)},
            )
        logits = self.forward_width(x, 0)  # 1. (B, C) at the smallest width
        conf = logits.float().softmax(-1).amax(-1)  # (B,)
        index = policy.choose(conf, K)  # 2. (B,) width index per sample
        if B == 1:
            k = int(index[0])
            if k > 0:
                logits = self.forward_width(x, k)
        else:
            for k in range(1, K):  # 3. one sub-batch per wider width, scattered back in order
                idx = (index == k).nonzero().squeeze(1)
                if idx.numel() == B:
                    logits = self.forward_width(x, k)
                elif idx.numel():
                    logits.index_copy_(0, idx, self.forward_width(take_rows(x, idx), k))
        rec = {"confidence": conf.cpu()} if record else None
        return DynamicOutput(
            logits,
            flops=self.flops_of(index),
            record=rec,
            decisions={"width": self._widths_of(index), "width_index": index.cpu()},
        )

    @torch.no_grad()
    def run_pooled(
        self, x: torch.Tensor, batch_size: int, policy: WidthPolicy | None = None
    ) -> DynamicOutput:
        """Throughput mode over many batches: `x` is fed in batches of `batch_size` at the smallest
        width, and the samples that escalate to each wider width are pooled across batches until a
        full batch (whole pending groups are taken, so a batch may run somewhat over `batch_size`)
        waits for that width; the remainders are flushed at the end. So no width runs on the small
        sub-batches one batch's escalations make. Same decisions, logits (up to float rounding) and
        FLOPs as `run_dynamic` on each batch; results in input order. A sample may wait for others
        before its wider pass, so use this for offline / server-side throughput and `forward` for
        the latency of one batch."""
        check_input(x, self.input_shape)
        check_batch_size(batch_size)
        if policy is not None and not isinstance(policy, WidthPolicy):
            raise TypeError(f"policy: expected a WidthPolicy or None, got {type(policy).__name__}")
        policy = policy if policy is not None else self.width_policy
        was = self.training
        self.eval()
        try:
            N, K = x.shape[0], self.num_widths
            out = x.new_empty(N, self.num_classes)
            index = torch.empty(N, dtype=torch.long, device=x.device)
            queues: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(K)]
            counts = [0] * K

            def run_width(k: int, flush: bool) -> None:
                while counts[k] >= batch_size or (flush and counts[k] > 0):
                    parts, n = pop_groups(queues[k], batch_size, rows=1)
                    xb = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
                    idx = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
                    counts[k] -= n
                    out.index_copy_(0, idx, self.forward_width(xb, k))

            for start in range(0, N, batch_size):
                xb = x[start : start + batch_size]
                logits = self.forward_width(xb, 0)
                chosen = policy.choose(logits.float().softmax(-1).amax(-1), K)
                index[start : start + xb.shape[0]] = chosen
                pos = torch.arange(start, start + xb.shape[0], device=x.device)
                stay = (chosen == 0).nonzero().squeeze(1)
                if stay.numel():
                    out.index_copy_(0, pos[stay], logits.index_select(0, stay))
                for k in range(1, K):
                    rows = (chosen == k).nonzero().squeeze(1)
                    if rows.numel():
                        queues[k].append((take_rows(xb, rows), pos[rows]))
                        counts[k] += int(rows.numel())
                    run_width(k, flush=False)
            for k in range(1, K):
                run_width(k, flush=True)
        finally:
            self.train(was)
        return DynamicOutput(
            out,
            flops=self.flops_of(index),
            decisions={"width": self._widths_of(index), "width_index": index.cpu()},
        )

    # ---------------------------------------------------------------- saving the policy
    def save_extra_files(self, directory: Path) -> None:
        (Path(directory) / POLICY_FILE).write_text(json.dumps(self.width_policy.to_dict()))

    @classmethod
    def from_saved_directory(cls, config: Any, directory: Path) -> SlimmableNetwork:
        model = cls(config)
        path = Path(directory) / POLICY_FILE
        if path.is_file():
            model.width_policy = WidthPolicy.from_dict(json.loads(path.read_text()))
        return model


def _inputs(data: Any) -> torch.Tensor:
    x = getattr(data, "x", data)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(
            f"data: expected a non-empty (N, ...) tensor or an object with .x, got {type(data).__name__}"
        )
    return x


@torch.no_grad()
def recalibrate_bn(model: SlimmableNetwork, data: Any, width: float, *, batch_size: int = 256) -> None:
    """Re-estimate the BatchNorm statistics of one width from `data` (exact averages over it).

    Needed with shared BN (switchable=False) and useful after any training; other widths untouched."""
    x, wi = _inputs(data), model.width_index(width)
    bns = [m.bn[wi] for m in model.modules() if isinstance(m, SlimmableBatchNorm2d)]
    was = model.training
    model.eval()
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs the same
        bn.train()
    try:
        for i in range(0, x.shape[0], batch_size):
            model.forward_width(x[i : i + batch_size], wi)
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m
        model.train(was)


def train_slimmable(
    model: SlimmableNetwork, data: Any, config: Any, *, recalibrate: int = 2048, **kwargs: Any
) -> Any:
    """`dynets.train.train` with the sandwich rule (built into the model's training forward), then BN
    recalibration of every width on the first `recalibrate` training samples (0 = none)."""
    from dynets.train import train

    result = train(model, data, config, **kwargs)
    if recalibrate:
        for w in model.width_mults:
            recalibrate_bn(model, _inputs(data)[:recalibrate], w)
    model.eval()
    return result


@dataclass
class WidthCalibration:
    policy: WidthPolicy
    strategy: str
    target_flops: float
    val_flops: float
    val_accuracy: float | None
    width_fractions: list[float]


def _assign(conf: torch.Tensor, shares: torch.Tensor) -> list[float]:
    """Thresholds giving the most confident shares[0] of samples width 0, the next shares[1] width 1..."""
    v = conf.double().sort(descending=True).values
    N, thr, taken = v.numel(), [], 0
    for q in shares[:-1].tolist():
        taken = min(N, taken + int(round(q * N)))
        if taken == 0:
            thr.append(1.0)
        elif taken >= N:
            thr.append(0.0)
        else:
            thr.append(float(min(1.0, max(0.0, (v[taken - 1] + v[taken]) / 2))))
    return thr  # non-increasing: each boundary lies further down the sorted confidences


def _geometric_shares(costs: torch.Tensor, target: float) -> torch.Tensor:
    K = costs.numel()
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = (lo + hi) / 2
        q = torch.softmax(mid * torch.arange(K, dtype=torch.float64), 0)
        lo, hi = (mid, hi) if float((q * costs).sum()) < target else (lo, mid)
    return torch.softmax(lo * torch.arange(K, dtype=torch.float64), 0)


@torch.no_grad()
def calibrate_width_policy(
    model: SlimmableNetwork,
    val_x: torch.Tensor,
    budget: float,
    *,
    val_y: torch.Tensor | None = None,
    batch_size: int = 256,
) -> WidthCalibration:
    """Fit the width thresholds so mean FLOPs on `val_x` meet `budget` (a fraction of the largest
    width's FLOPs) and set `model.width_policy`; see `fit_width_policy`. One pass at the smallest
    width (every width, when `val_y` is given to compare strategies by accuracy)."""
    x = _inputs(val_x)
    _check_budget(model.width_costs(), budget)
    model.eval()
    chunks = [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]
    if val_y is None:
        logits = [torch.cat([model.forward_width(b, 0) for b in chunks])]
    else:
        logits = [torch.cat(z) for z in zip(*(model.all_width_logits(b) for b in chunks))]
    best = fit_width_policy(logits, model.width_costs(), budget, labels=val_y)
    model.width_policy = best.policy
    return best


def _check_budget(costs: torch.Tensor, budget: float) -> torch.Tensor:
    per_width = costs.clone().double()
    per_width[1:] += costs[0]  # an escalated sample pays the smallest width too
    full = float(costs[-1])
    lo, hi = float(per_width.min()) / full, float(per_width.max()) / full
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not lo <= budget <= hi:
        raise ValueError(
            f"budget: expected a fraction of the full FLOPs in [{lo:.3f}, {hi:.3f}], got {budget!r}"
        )
    return per_width


def fit_width_policy(
    width_logits: Sequence[torch.Tensor],
    width_costs: torch.Tensor,
    budget: float,
    *,
    labels: torch.Tensor | None = None,
) -> WidthCalibration:
    """Width thresholds meeting `budget` (fraction of the largest width's FLOPs) on stored logits.

    width_logits: (N, C) logits per width, smallest first (only the smallest is needed without
    labels); width_costs: (K,) FLOPs per width. Decisions depend only on the smallest width's
    confidence, so the fit is exact on these samples. Strategy "geometric": width shares q_k ~ p^k
    (MSDNet's budgeted classification), p bisected to the budget, the most confident samples on the
    narrowest widths; with labels, "extremes" (smallest or largest only) is tried too and the more
    accurate one is kept."""
    K = width_costs.numel()
    per_width = _check_budget(width_costs, budget)
    target = budget * float(width_costs[-1])
    conf = width_logits[0].float().softmax(-1).amax(-1)  # (N,)
    candidates = {"geometric": _geometric_shares(per_width, target)}
    if labels is not None and K > 2:
        q = min(1.0, max(0.0, (float(per_width[-1]) - target) / float(per_width[-1] - per_width[0])))
        candidates["extremes"] = torch.tensor([q] + [0.0] * (K - 2) + [1 - q], dtype=torch.float64)
    best: WidthCalibration | None = None
    for name, shares in candidates.items():
        policy = WidthPolicy(_assign(conf, shares))
        index = policy.choose(conf, K)
        acc = None
        if labels is not None:
            if len(width_logits) != K:
                raise ValueError(
                    f"width_logits: expected {K} tensors (one per width) with labels, got {len(width_logits)}"
                )
            pred = torch.stack(list(width_logits), 1).argmax(-1).gather(1, index[:, None]).squeeze(1)
            acc = float((pred == labels).double().mean())
        frac = (torch.bincount(index, minlength=K).double() / max(index.numel(), 1)).tolist()
        cal = WidthCalibration(policy, name, target, float(per_width[index].mean()), acc, frac)
        if best is None or (acc is not None and acc > (best.val_accuracy or 0.0)):
            best = cal
    return best
