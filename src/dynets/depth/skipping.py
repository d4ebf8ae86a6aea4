"""Block skipping (SkipNet, BlockDrop): a per-sample gate before a residual block decides whether
the block runs; a skipped residual block is the identity.

`SkipNetwork(stem, blocks, head, gated)` puts a cheap `SkipGate` (global average pool + linear, a
per-sample execute probability) before every block marked in `gated`; gated blocks must keep the
shape of their input. In training mode the gate's hard 0/1 decision is drawn with a Gumbel
(binary Gumbel-softmax) or straight-through Bernoulli estimator and blended as
`d * block(h) + (1 - d) * h`, so the gate learns from the task loss; a compute-budget loss pulls the
expected fraction of gated-block FLOPs executed towards `budget_target` (returned in
`MultiExitOutput.aux["loss"]`). In eval mode it runs dynamically:

  1. the gate scores the current batch                           p: (B,)
  2. the policy thresholds it                                    run = p >= threshold
  3. index_select the executing rows, run the block on them only (B_run, C, H, W)
  4. index_copy_ the results back in place; skipped rows keep h  (identity)

so a skipped block costs nothing for that sample. The threshold is a run-time `SkipPolicy`
(`model.skip_policy`, or `model(x, policy=...)`), fitted to a FLOPs budget on held-out data with
`calibrate_skip_threshold`. It is saved next to the weights (`skip_policy.json`), not under the
name `policy`, which `dynets.save` reserves for exit policies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynets.core.cost import measure_flops
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.tensors import all_finite, take_rows
from dynets.train.estimators import budget_loss, gumbel_softmax, straight_through_bernoulli

ESTIMATORS = ("gumbel", "straight_through")
POLICY_FILE = "skip_policy.json"


def check_input(x: Any, input_shape: Sequence[int], name: str = "input") -> None:
    """ValueError/TypeError naming `name` unless x is a finite float tensor of shape (B, *input_shape)."""
    shape = ", ".join(map(str, input_shape))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (B, {shape}), got {type(x).__name__}")
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{name}: expected shape (B, {shape}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if not all_finite(x):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")


class SkipPolicy:
    """Run a gated block for a sample when its gate probability >= threshold (one value, or one per
    gated block). Threshold 0 runs every block; higher thresholds skip more."""

    kind = "skip_threshold"

    def __init__(self, threshold: float | Sequence[float] = 0.5) -> None:
        values = [threshold] if isinstance(threshold, (int, float)) else list(threshold)
        if not values:
            raise ValueError(f"skip threshold: expected a number or a non-empty list, got {threshold!r}")
        for t in values:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or not 0 <= t <= 1:
                raise ValueError(f"skip threshold: expected a value in [0, 1], got {t!r}")
        self.thresholds = [float(t) for t in values]

    def threshold_at(self, i: int) -> float:
        if len(self.thresholds) == 1:
            return self.thresholds[0]
        if i >= len(self.thresholds):
            raise ValueError(
                f"skip policy has {len(self.thresholds)} per-gate thresholds, asked about gate {i}; "
                f"expected one threshold per gated block"
            )
        return self.thresholds[i]

    def to_dict(self) -> dict[str, Any]:
        t = self.thresholds[0] if len(self.thresholds) == 1 else list(self.thresholds)
        return {"kind": self.kind, "threshold": t}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipPolicy:
        if data.get("kind") != cls.kind:
            raise ValueError(f"skip policy: expected kind {cls.kind!r}, got {data.get('kind')!r}")
        return cls(data["threshold"])

    def __repr__(self) -> str:
        return f"SkipPolicy(threshold={self.to_dict()['threshold']!r})"


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class SkipGate(nn.Module):
    """(B, C, H, W) -> (B,) execute logit: global average pool, then linear (or a small MLP).

    The bias starts at `init_bias` (default +3, p ~ 0.95) so a fresh gate runs nearly every block
    and fine-tuning from a trained static backbone starts at its accuracy."""

    def __init__(self, channels: int, hidden: int = 0, init_bias: float = 3.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(channels, hidden), nn.ReLU()] if hidden else []
        self.net = nn.Sequential(*layers, nn.Linear(hidden or channels, 1))
        nn.init.constant_(self.net[-1].bias, init_bias)
        nn.init.normal_(self.net[-1].weight, std=0.01)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.mean(dim=(2, 3))).squeeze(-1)  # (B,)

    def logit_one(self, h: torch.Tensor) -> float:
        """The execute logit of a single sample h (1, C, H, W), as a Python float: for a linear gate
        one dot product of h's memory with the weight tiled over the positions (divided by H * W),
        instead of a pooling, a linear layer and a squeeze (at batch 1, each op's fixed cost is what
        counts; a pooling over an NHWC tensor is the slowest of them). Equal to forward(h) up to
        float rounding (another summation order)."""
        if len(self.net) > 1 or torch.is_grad_enabled():
            return float(self.forward(h))
        _, c, hh, ww = h.shape
        nhwc = not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last)
        lin = self.net[-1]
        key = (c, hh, ww, nhwc, lin.weight._version, lin.weight.data_ptr(), lin.bias._version, h.dtype)
        hit = self.__dict__.get("_one")
        if hit is None or hit[0] != key:
            w = lin.weight.detach()[0].to(h.dtype) / (hh * ww)
            tiled = w.repeat(hh * ww) if nhwc else w.repeat_interleave(hh * ww)  # memory order of h
            hit = self.__dict__["_one"] = (key, tiled, float(lin.bias))
        flat = h.permute(0, 2, 3, 1).reshape(-1) if nhwc else h.reshape(-1)
        return float(torch.dot(flat, hit[1])) + hit[2]


class SkipNetwork(nn.Module):
    """stem -> blocks (some behind gates) -> head, with per-sample block skipping.

    stem, head:  modules; head maps the last block's features to (B, C) logits.
    blocks:      residual blocks; `gated[i]` puts a gate before block i (shape-preserving blocks only).
    budget_target: fraction of gated-block FLOPs a sample should execute on average (training).
    budget_weight, budget_kind: weight and kind ("square" or "hinge") of the budget loss.
    estimator:   "gumbel" (binary Gumbel-softmax, straight-through, temperature `tau`) or
                 "straight_through" (Bernoulli sample, identity gradient).
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        gated: Sequence[bool],
        *,
        input_shape: Sequence[int],
        num_classes: int,
        budget_target: float = 0.6,
        budget_weight: float = 2.0,
        budget_kind: str = "square",
        estimator: str = "gumbel",
        tau: float = 1.0,
        gate_hidden: int = 0,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if len(gated) != len(blocks):
            raise ValueError(f"gated: expected one flag per block ({len(blocks)}), got {len(gated)}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau (gate temperature): expected a finite float > 0, got {tau!r}")
        if not 0 <= budget_target <= 1:
            raise ValueError(f"budget_target: expected a fraction in [0, 1], got {budget_target!r}")
        if budget_kind not in ("square", "hinge"):
            raise ValueError(f"budget_kind: expected 'square' or 'hinge', got {budget_kind!r}")
        self.stem, self.blocks, self.head = stem, nn.ModuleList(blocks), head
        self.gated = [bool(g) for g in gated]
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.budget_target, self.budget_weight, self.budget_kind = budget_target, budget_weight, budget_kind
        self.estimator, self.tau = estimator, float(tau)
        self.skip_policy = SkipPolicy(threshold)
        # One gate per gated block, sized from the block's input channels (found with a dry run).
        shapes = self._block_shapes()
        gates = []
        for i, g in enumerate(self.gated):
            if g and shapes[i][0] != shapes[i][1]:
                raise ValueError(
                    f"gated[{i}]: a skipped block must be the identity, so it must keep its input shape; "
                    f"block {i} maps {shapes[i][0]} to {shapes[i][1]}"
                )
            if g:
                gates.append(SkipGate(shapes[i][0][0], gate_hidden))
        self.gates = nn.ModuleList(gates)

    @property
    def num_gated(self) -> int:
        return len(self.gates)

    def _block_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        was = self.training
        self.eval()
        with torch.no_grad():
            h, shapes = self.stem(torch.zeros(1, *self.input_shape)), []
            for block in self.blocks:
                out = block(h)
                shapes.append((tuple(h.shape[1:]), tuple(out.shape[1:])))
                h = out
        self.train(was)
        return shapes

    # ---------------------------------------------------------------- cost accounting
    def unit_costs(self) -> dict[str, Any]:
        """FLOPs per sample of stem, each gate, each block and the head (FlopCounterMode, batch 1)."""
        if "units" not in self.__dict__:
            was = self.training
            self.eval()
            h = torch.zeros(1, *self.input_shape, device=self._device())
            blocks, gates = [], []
            with torch.no_grad():
                stem = measure_flops(self.stem, h)
                h = self.stem(h)
                gi = 0
                for i, block in enumerate(self.blocks):
                    if self.gated[i]:
                        gates.append(measure_flops(self.gates[gi], h))
                        gi += 1
                    blocks.append(measure_flops(block, h))
                    h = block(h)
                head = measure_flops(self.head, h)
            self.train(was)
            self.__dict__["units"] = {"stem": stem, "gates": gates, "blocks": blocks, "head": head}
        return self.__dict__["units"]

    def full_cost(self) -> float:
        """FLOPs per sample of the static backbone: every block, no gates (the static model's cost)."""
        u = self.unit_costs()
        return float(u["stem"] + sum(u["blocks"]) + u["head"])

    def min_cost(self) -> float:
        """FLOPs per sample when every gated block is skipped (gates still run)."""
        u = self.unit_costs()
        ungated = sum(c for c, g in zip(u["blocks"], self.gated) if not g)
        return float(u["stem"] + sum(u["gates"]) + ungated + u["head"])

    def flops_of(self, blocks_run: torch.Tensor) -> torch.Tensor:
        """(B, n_gated) bool -> (B,) float64 FLOPs: stem + all gates + ungated blocks + run blocks + head."""
        u = self.unit_costs()
        gated_costs = torch.tensor([c for c, g in zip(u["blocks"], self.gated) if g], dtype=torch.float64)
        return self.min_cost() + blocks_run.cpu().double() @ gated_costs

    def _gated_share(self) -> torch.Tensor:
        u = self.unit_costs()
        c = torch.tensor([c for c, g in zip(u["blocks"], self.gated) if g], dtype=torch.float32)
        return c / c.sum().clamp_min(1.0)

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ---------------------------------------------------------------- forward
    def forward(
        self, x: torch.Tensor, policy: SkipPolicy | float | None = None, *, record: bool = False
    ) -> DynamicOutput | MultiExitOutput:
        check_input(x, self.input_shape)
        policy = self._policy(policy)
        if self.training:
            return self._forward_train(x, policy)
        with torch.no_grad():
            return self.run_dynamic(x, policy, record=record)

    def _policy(self, policy: SkipPolicy | float | None) -> SkipPolicy:
        if policy is None:
            return self.skip_policy
        if isinstance(policy, SkipPolicy):
            return policy
        if isinstance(policy, (int, float)) and not isinstance(policy, bool):
            return SkipPolicy(float(policy))
        raise TypeError(f"policy: expected a SkipPolicy, a threshold in [0, 1] or None, got {policy!r}")

    def _forward_train(self, x: torch.Tensor, policy: SkipPolicy) -> MultiExitOutput:
        """Every block runs on every sample; the decision d blends block(h) and h. With the gates in
        eval mode (the train loop's validation) d is the deterministic policy decision instead."""
        stochastic = self.gates.training
        h = self.stem(x)
        probs, hard = [], []
        gi = 0
        for i, block in enumerate(self.blocks):
            if not self.gated[i]:
                h = block(h)
                continue
            z = self.gates[gi](h).float()  # (B,) execute logit
            p = torch.sigmoid(z)
            if not stochastic:
                d = (p >= policy.threshold_at(gi)).float()
            elif self.estimator == "gumbel":  # binary Gumbel-softmax over (run, skip) logits
                two = torch.stack([z, torch.zeros_like(z)], dim=-1)  # (B, 2)
                d = gumbel_softmax(two, tau=self.tau, hard=True)[:, 0]
            else:
                d = straight_through_bernoulli(p)
            dv = d.to(h.dtype).view(-1, *([1] * (h.dim() - 1)))
            h = dv * block(h) + (1 - dv) * h
            probs.append(p)
            hard.append(d.detach() > 0.5)
            gi += 1
        logits = self.head(h)
        aux: dict[str, Any] = {}
        if probs:
            P = torch.stack(probs, dim=1)  # (B, n_gated)
            frac = P @ self._gated_share().to(P.device)  # (B,) expected share of gated FLOPs run
            aux = {
                "gate_probs": P.detach(),
                "blocks_run": torch.stack(hard, dim=1),
                "execute_rate": float(torch.stack(hard, 1).float().mean()) if x.shape[0] else 0.0,
            }
            if stochastic:
                aux["budget_loss"] = budget_loss(frac, self.budget_target, self.budget_kind)
                aux["loss"] = self.budget_weight * aux["budget_loss"]
        return MultiExitOutput([logits], aux)

    def run_dynamic(self, x: torch.Tensor, policy: SkipPolicy, *, record: bool = False) -> DynamicOutput:
        """Dynamic execution: each gated block runs on its executing sub-batch only."""
        B, G = x.shape[0], self.num_gated
        if B == 0:
            return DynamicOutput(
                x.new_zeros(0, self.num_classes),
                flops=torch.zeros(0, dtype=torch.float64),
                decisions={"blocks_run": torch.zeros(0, G, dtype=torch.bool)},
            )
        if B == 1 and not record:
            return self._run_single(x, policy)
        blocks_run = torch.zeros(B, G, dtype=torch.bool)
        probs = torch.zeros(B, G) if record else None
        h = self.stem(x)
        if h.data_ptr() == x.data_ptr():  # never write into the caller's tensor
            h = h.clone()
        gi = 0
        for i, block in enumerate(self.blocks):
            if not self.gated[i]:
                h = block(h)
                continue
            p = torch.sigmoid(self.gates[gi](h).float())  # 1. (B,)
            run = p >= policy.threshold_at(gi)  # 2. (B,) bool
            if probs is not None:
                probs[:, gi] = p.cpu()
            blocks_run[:, gi] = run.cpu()
            n = int(run.sum())
            if n == B:
                h = block(h)
            elif n > 0:
                idx = run.nonzero().squeeze(1)  # 3. executing rows
                h.index_copy_(0, idx, block(take_rows(h, idx)))  # 4. skipped rows keep h
            gi += 1
        logits = self.head(h)
        rec = {"gate_probs": probs} if record else None
        return DynamicOutput(
            logits, flops=self.flops_of(blocks_run), record=rec, decisions={"blocks_run": blocks_run}
        )

    def _run_single(self, x: torch.Tensor, policy: SkipPolicy) -> DynamicOutput:
        """Batch size 1: each gate's decision as a Python bool, a skipped block is simply not
        called, and nothing is written in place (a few Python operations per gate instead of a
        chain of tensor ops, each of which costs ~10 us of fixed overhead at batch 1)."""
        h = self.stem(x)
        run: list[bool] = []
        gates = tuple(self.gates)
        for block, gated in zip(self.blocks, self.gated):
            if gated:
                gi = len(run)
                run.append(_sigmoid(gates[gi].logit_one(h)) >= policy.threshold_at(gi))
                if not run[-1]:
                    continue
            h = block(h)
        blocks_run = torch.tensor([run], dtype=torch.bool).reshape(1, len(run))
        return DynamicOutput(
            self.head(h), flops=self.flops_of(blocks_run), decisions={"blocks_run": blocks_run}
        )

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """The static backbone: every block, no gates."""
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    # ---------------------------------------------------------------- saving the policy
    def save_extra_files(self, directory: Path) -> None:
        (Path(directory) / POLICY_FILE).write_text(json.dumps(self.skip_policy.to_dict()))

    @classmethod
    def from_saved_directory(cls, config: Any, directory: Path) -> SkipNetwork:
        model = cls(config)
        path = Path(directory) / POLICY_FILE
        if path.is_file():
            model.skip_policy = SkipPolicy.from_dict(json.loads(path.read_text()))
        return model


@dataclass
class SkipCalibration:
    policy: SkipPolicy
    target_flops: float
    val_flops: float
    execute_rate: float


@torch.no_grad()
def mean_flops(model: SkipNetwork, x: torch.Tensor, policy: SkipPolicy, batch_size: int = 256) -> tuple:
    """(mean FLOPs per sample, execute rate) of `model` under `policy` on x, run dynamically."""
    model.eval()
    flops, runs = [], []
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i : i + batch_size], policy)
        flops.append(out.flops)
        runs.append(out.decisions["blocks_run"])
    run = torch.cat(runs).float()
    return float(torch.cat(flops).mean()), float(run.mean()) if run.numel() else 0.0


def calibrate_skip_threshold(
    model: SkipNetwork, val_x: torch.Tensor, budget: float, *, iters: int = 16, batch_size: int = 256
) -> SkipCalibration:
    """Bisect one gate threshold so mean FLOPs on `val_x` meet `budget` (a fraction of the static
    backbone's FLOPs, `model.full_cost()`); sets `model.skip_policy` and returns the fit.

    Mean FLOPs fall as the threshold rises (not strictly: a skip changes later gates' inputs), so
    the search runs on the logit of the threshold and keeps the closest setting it saw."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"budget: expected a fraction of the full FLOPs, got {budget!r}")
    full, lo_cost = model.full_cost(), model.min_cost()
    if not lo_cost / full <= budget:
        raise ValueError(
            f"budget: expected a fraction in [{lo_cost / full:.3f}, 1] of the full FLOPs "
            f"(everything gated skipped .. everything run), got {budget!r}"
        )
    if not isinstance(val_x, torch.Tensor) or val_x.shape[0] == 0:
        raise ValueError("val_x: expected a non-empty (N, ...) tensor of validation inputs")
    target = budget * full
    best: tuple[float, float, float, float] | None = None  # (|error|, threshold, flops, rate)
    lo, hi = -12.0, 12.0  # logit of the threshold; cost(lo) is high, cost(hi) is low
    for _ in range(iters):
        mid = (lo + hi) / 2
        t = 1.0 / (1.0 + math.exp(-mid))
        f, rate = mean_flops(model, val_x, SkipPolicy(t), batch_size)
        if best is None or abs(f - target) < best[0]:
            best = (abs(f - target), t, f, rate)
        if f > target:
            lo = mid
        else:
            hi = mid
    f0, rate0 = mean_flops(model, val_x, SkipPolicy(0.0), batch_size)
    if f0 <= target and abs(f0 - target) <= best[0]:  # the budget allows running everything
        best = (abs(f0 - target), 0.0, f0, rate0)
    model.skip_policy = SkipPolicy(best[1])
    return SkipCalibration(model.skip_policy, target, best[2], best[3])
