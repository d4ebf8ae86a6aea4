"""Dynamic routing: each sample goes along ONE of several branches, or down one path of a tree.

`BranchRouter(branches, gate=...)`: a cheap gate maps the input to logits over the branches.

- Training (router in train mode): a Gumbel-softmax sample (hard one-hot forward, soft gradient,
  i.e. straight-through) weights the outputs of every branch, so the gate learns from the task loss;
  `aux_loss` adds a compute-budget term (expected cost fraction vs `budget`) and optionally a
  Switch-style balance term that keeps every branch in use.
- Inference (eval mode): argmax route; each branch runs on ITS sub-batch only:

    1. branch = argmax(gate(x) + route_bias)                     (B,)
    2. for each branch k: idx_k = positions routed to k; y_k = branch_k(x[idx_k])
    3. out.index_copy_(0, idx_k, y_k)                            results back in input order

`RoutingTree`: a depth-d binary tree (heap order: node i has children 2i+1, 2i+2). Node 0 runs on
every sample; the gate of internal node i sends each of its samples to one child; the leaves'
outputs are merged back in input order. Inference executes per node sub-batch, level by level.

Run-time knob: `route_bias`, a logit bias per branch (per child for the tree) set from one cost
penalty lambda: bias_k = -lambda * cost_k / max_cost. Larger lambda routes more samples to cheaper
branches; `calibrate_route_bias(model, val_x, budget)` finds the lambda meeting a FLOPs budget. The
bias is a buffer, so it is saved with the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynets.core.cost import measure_flops
from dynets.train.estimators import BUDGET_KINDS, budget_loss, gumbel_softmax

__all__ = [
    "BranchRouter",
    "PoolGate",
    "RouteOutput",
    "RoutingTree",
    "calibrate_route_bias",
    "set_cost_penalty",
]


class PoolGate(nn.Module):
    """The default cheap gate: mean over spatial (or token) dims, then a small MLP -> (B, n) logits."""

    def __init__(self, in_channels: int, num_outputs: int, hidden: int = 16) -> None:
        super().__init__()
        if hidden > 0:
            self.net = nn.Sequential(
                nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs)
            )
        else:
            self.net = nn.Sequential(nn.Linear(in_channels, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, *spatial) -> (B, n)
        if x.dim() > 2:
            x = x.flatten(2).mean(-1)
        return self.net(x)


@dataclass
class RouteOutput:
    """output: (B, ...) in input order; branch: (B,) int64 branch (tree: leaf) taken; probs: (B, n)
    routing probabilities (tree: of each leaf); flops: (B,) float64 gate + branch FLOPs of the route
    taken; aux_loss: scalar budget/balance loss (zero in eval); path: (B, depth) int64 (tree only);
    branch_outputs: (B, n, ...) every branch's output on every sample (BranchRouter training only, for
    supervising each branch directly)."""

    output: torch.Tensor
    branch: torch.Tensor
    probs: torch.Tensor
    flops: torch.Tensor
    aux_loss: torch.Tensor
    path: torch.Tensor | None = None
    branch_outputs: torch.Tensor | None = None


def _check_number(name: str, value: object, lo: float, hi: float, *, open_lo: bool = True) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if open_lo else value >= lo) and value <= hi
    if not ok:
        left = "(" if open_lo else "["
        raise ValueError(f"{name}: expected a number in {left}{lo}, {hi}], got {value!r}")
    return float(value)


def _measure(module: nn.Module, x1: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(FLOPs, output) of module on a batch-1 input, in eval mode (BatchNorm stats untouched)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        flops = measure_flops(module, x1)
        with torch.no_grad():
            out = module(x1)
    finally:
        for m, t in flags:
            m.training = t
    return flops, out


class _RouterBase(nn.Module):
    """Shared settings and the auxiliary loss of BranchRouter and RoutingTree."""

    def _init_common(
        self,
        tau: float,
        hard: bool,
        budget: float | None,
        budget_kind: str,
        budget_weight: float,
        balance_weight: float,
    ) -> None:
        self.tau = _check_number("tau (gate temperature)", tau, 0.0, math.inf)
        self.hard = bool(hard)
        if budget is not None:
            budget = _check_number("budget (target cost fraction)", budget, 0.0, 1.0)
        if budget_kind not in BUDGET_KINDS:
            raise ValueError(f"budget_kind: expected one of {BUDGET_KINDS}, got {budget_kind!r}")
        self.budget, self.budget_kind = budget, budget_kind
        self.budget_weight = _check_number("budget_weight", budget_weight, 0.0, math.inf, open_lo=False)
        self.balance_weight = _check_number("balance_weight", balance_weight, 0.0, math.inf, open_lo=False)
        self.generator: torch.Generator | None = None  # optional, for reproducible Gumbel noise
        self.register_buffer("cost_penalty", torch.zeros(()))
        self._costs: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
        self._ref_shape: tuple[int, ...] | None = None

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Training weights over the last dim: a Gumbel-softmax sample (one-hot forward with the soft
        sample's gradient when `hard`)."""
        return gumbel_softmax(logits, tau=self.tau, hard=self.hard, generator=self.generator)

    def _aux_loss(self, probs: torch.Tensor, chosen: torch.Tensor, rel_costs: torch.Tensor) -> torch.Tensor:
        """probs (B, n) over routes, chosen (B,) route taken, rel_costs (n,) cost / max cost."""
        loss = probs.new_zeros(())
        if self.budget is not None and self.budget_weight > 0:
            frac = probs @ rel_costs.to(probs)  # (B,) expected cost fraction
            loss = loss + self.budget_weight * budget_loss(frac, self.budget, self.budget_kind)
        if self.balance_weight > 0:
            n = probs.shape[1]
            f = F.one_hot(chosen, n).to(probs).mean(0)  # fraction routed to each
            loss = loss + self.balance_weight * n * (f * probs.mean(0)).sum()
        return loss

    def _shape(self, sample_shape: Sequence[int] | None) -> tuple[int, ...]:
        if sample_shape is not None:
            return tuple(int(d) for d in sample_shape)
        if self._ref_shape is None:
            raise ValueError(
                "sample_shape: the router's costs are not measured yet; expected a per-sample input "
                "shape (or call the model once first), got None"
            )
        return self._ref_shape

    def _device(self) -> torch.device:
        return self.cost_penalty.device


def _scatter_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], B: int) -> torch.Tensor:
    """Rows of each (idx, y) part written at positions idx of one (B, ...) tensor, input order."""
    first = parts[0][1]
    out = first.new_empty((B, *first.shape[1:]))
    for idx, y in parts:
        out.index_copy_(0, idx, y)
    return out


class BranchRouter(_RouterBase):
    """Sends each sample to one of `branches` (modules with equal output shapes) chosen by `gate`.

    gate: module mapping the input to (B, n) logits; default `PoolGate(in_channels, n, gate_hidden)`.
    tau / hard: Gumbel-softmax temperature and straight-through hard sampling in training.
    budget: target expected cost fraction (branch FLOPs / the dearest branch's) for the budget loss
    (`budget_kind` "hinge" = at most, "square" = exactly), weighted by `budget_weight`.
    balance_weight: weight of the balance term n * sum_k f_k P_k (0 = off).
    sample_shape: per-sample input shape; given, the costs are measured now, else at the first call.
    """

    def __init__(
        self,
        branches: Sequence[nn.Module],
        *,
        gate: nn.Module | None = None,
        in_channels: int | None = None,
        gate_hidden: int = 16,
        tau: float = 1.0,
        hard: bool = True,
        budget: float | None = None,
        budget_kind: str = "hinge",
        budget_weight: float = 1.0,
        balance_weight: float = 0.0,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(branches) < 2:
            raise ValueError(f"branches: expected at least 2 modules, got {len(branches)}")
        if gate is None:
            if in_channels is None:
                raise ValueError(
                    "in_channels: expected the input's channel count (to build the default gate) or a "
                    "`gate` module, got neither"
                )
            gate = PoolGate(in_channels, len(branches), gate_hidden)
        self.gate = gate
        self.branches = nn.ModuleList(branches)
        self._init_common(tau, hard, budget, budget_kind, budget_weight, balance_weight)
        self.register_buffer("route_bias", torch.zeros(len(branches)))
        if sample_shape is not None:
            self.costs(sample_shape)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def costs(self, sample_shape: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """{"gate": () FLOPs of the gate, "branches": (n,) FLOPs of each branch}, per sample, float64,
        measured once per input shape."""
        shape = self._shape(sample_shape)
        if shape not in self._costs:
            x1 = torch.zeros(1, *shape, device=self._device())
            gate = _measure(self.gate, x1)[0]
            branches = [_measure(b, x1)[0] for b in self.branches]
            self._costs[shape] = {
                "gate": torch.tensor(float(gate), dtype=torch.float64),
                "branches": torch.tensor(branches, dtype=torch.float64),
            }
            self._ref_shape = self._ref_shape or shape
        return self._costs[shape]

    def max_cost(self, sample_shape: Sequence[int] | None = None) -> float:
        """FLOPs per sample of the dearest route (gate included)."""
        c = self.costs(sample_shape)
        return float(c["gate"] + c["branches"].max())

    def set_cost_penalty(self, penalty: float, sample_shape: Sequence[int] | None = None) -> None:
        """route_bias_k = -penalty * cost_k / max_k cost_k (penalty 0: the gate alone decides)."""
        b = self.costs(sample_shape)["branches"]
        self.route_bias.copy_((-float(penalty) * b / b.max()).to(self.route_bias))
        self.cost_penalty.fill_(float(penalty))

    def forward(self, x: torch.Tensor) -> RouteOutput:
        B = x.shape[0]
        c = self.costs(tuple(x.shape[1:]))
        logits = self.gate(x)  # (B, n)
        if logits.shape != (B, self.num_branches):
            raise ValueError(
                f"gate: expected logits of shape ({B}, {self.num_branches}), got {tuple(logits.shape)}"
            )
        logits = logits + self.route_bias
        if self.training:
            return self._mixture(x, logits, c)
        branch = logits.argmax(-1)  # (B,)
        flops = c["gate"].to(x.device) + c["branches"].to(x.device)[branch]
        return RouteOutput(self.dispatch(x, branch), branch, logits.softmax(-1), flops, logits.new_zeros(()))

    def dispatch(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """Run branch k on exactly the rows routed to it; outputs merged back in input order."""
        B = x.shape[0]
        if B == 1:  # no bookkeeping at batch 1
            return self.branches[int(branch[0])](x)
        if B == 0:
            return self.branches[0](x)
        parts = []
        for k, module in enumerate(self.branches):
            idx = (branch == k).nonzero().squeeze(1)  # 1. positions routed to k
            if idx.numel() == B:
                return module(x)
            if idx.numel():
                parts.append((idx, module(x.index_select(0, idx))))  # 2. k's sub-batch only
        return _scatter_rows(parts, B)  # 3. back in input order

    def _mixture(self, x: torch.Tensor, logits: torch.Tensor, c: dict[str, torch.Tensor]) -> RouteOutput:
        B, n = logits.shape
        w = self._sample(logits)  # (B, n): one-hot forward, soft gradient
        ys = torch.stack([b(x) for b in self.branches], 1)  # (B, n, ...)
        out = (w.to(ys.dtype).view(B, n, *([1] * (ys.dim() - 2))) * ys).sum(1)
        branch = w.detach().argmax(-1)
        probs = logits.softmax(-1)
        rel = c["branches"] / c["branches"].max()
        flops = c["gate"].to(x.device) + c["branches"].to(x.device)[branch]
        return RouteOutput(out, branch, probs, flops, self._aux_loss(probs, branch, rel), branch_outputs=ys)


class RoutingTree(_RouterBase):
    """A depth-d binary tree of routers over heap-ordered `nodes` (2^(d+1) - 1 modules; node 0 runs
    on every sample) with `gates` (2^d - 1 modules, gate i: node i's output -> (B, 2) logits).
    Each sample runs the nodes of one root-to-leaf path; the leaves' outputs must share one shape.
    Settings as for BranchRouter; the budget and balance terms act on the leaf (path) distribution.
    """

    def __init__(
        self,
        nodes: Sequence[nn.Module],
        gates: Sequence[nn.Module],
        *,
        tau: float = 1.0,
        hard: bool = True,
        budget: float | None = None,
        budget_kind: str = "hinge",
        budget_weight: float = 1.0,
        balance_weight: float = 0.0,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        depth = int(round(math.log2(len(nodes) + 1))) - 1
        if depth < 1 or len(nodes) != 2 ** (depth + 1) - 1:
            raise ValueError(
                f"nodes: expected 2^(depth+1) - 1 modules (3, 7, 15, ...) for depth >= 1, got {len(nodes)}"
            )
        if len(gates) != 2**depth - 1:
            raise ValueError(f"gates: expected {2**depth - 1} modules for depth {depth}, got {len(gates)}")
        self.depth = depth
        self.nodes = nn.ModuleList(nodes)
        self.gates = nn.ModuleList(gates)
        self._init_common(tau, hard, budget, budget_kind, budget_weight, balance_weight)
        self.register_buffer("route_bias", torch.zeros(len(gates), 2))
        if sample_shape is not None:
            self.costs(sample_shape)

    @classmethod
    def build(
        cls,
        depth: int,
        make_node: Callable[[int, int], nn.Module],
        make_gate: Callable[[int, int], nn.Module],
        **kw: object,
    ) -> RoutingTree:
        """make_node(level, position) for level 0..depth, make_gate(level, position) for 0..depth-1."""
        nodes = [make_node(lvl, p) for lvl in range(depth + 1) for p in range(2**lvl)]
        gates = [make_gate(lvl, p) for lvl in range(depth) for p in range(2**lvl)]
        return cls(nodes, gates, **kw)

    @property
    def num_leaves(self) -> int:
        return 2**self.depth

    def _leaf_nodes(self, leaf: int) -> list[int]:
        """Heap indices of the nodes on leaf's path (bits of `leaf`, most significant first)."""
        n, out = 0, [0]
        for level in range(self.depth):
            n = 2 * n + 1 + ((leaf >> (self.depth - 1 - level)) & 1)
            out.append(n)
        return out

    def costs(self, sample_shape: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """{"nodes": (n_nodes,), "gates": (n_gates,), "paths": (n_leaves,) FLOPs of each whole
        root-to-leaf path, gates included}, per sample, float64, measured once per input shape."""
        shape = self._shape(sample_shape)
        if shape not in self._costs:
            outs: list[torch.Tensor] = []
            node_costs, gate_costs = [], []
            for i, node in enumerate(self.nodes):
                h = torch.zeros(1, *shape, device=self._device()) if i == 0 else outs[(i - 1) // 2]
                f, o = _measure(node, h)
                node_costs.append(f)
                outs.append(o)
            gate_costs = [_measure(g, outs[i])[0] for i, g in enumerate(self.gates)]
            paths = []
            for leaf in range(self.num_leaves):
                ns = self._leaf_nodes(leaf)
                paths.append(sum(node_costs[n] for n in ns) + sum(gate_costs[n] for n in ns[:-1]))
            self._costs[shape] = {
                "nodes": torch.tensor(node_costs, dtype=torch.float64),
                "gates": torch.tensor(gate_costs, dtype=torch.float64),
                "paths": torch.tensor(paths, dtype=torch.float64),
            }
            self._ref_shape = self._ref_shape or shape
        return self._costs[shape]

    def max_cost(self, sample_shape: Sequence[int] | None = None) -> float:
        return float(self.costs(sample_shape)["paths"].max())

    def set_cost_penalty(self, penalty: float, sample_shape: Sequence[int] | None = None) -> None:
        """At internal node i, child c gets bias -penalty * (mean cost of the leaf paths under c) /
        (the dearest path's cost)."""
        paths = self.costs(sample_shape)["paths"]
        bias = torch.zeros(len(self.gates), 2, dtype=torch.float64)
        for leaf in range(self.num_leaves):
            ns = self._leaf_nodes(leaf)
            for level in range(self.depth):  # node ns[level] chose child ns[level + 1]
                child = ns[level + 1] - (2 * ns[level] + 1)
                span = 2 ** (self.depth - 1 - level)  # leaves under that child
                bias[ns[level], child] += paths[leaf] / span
        self.route_bias.copy_((-float(penalty) * bias / paths.max()).to(self.route_bias))
        self.cost_penalty.fill_(float(penalty))

    def forward(self, x: torch.Tensor) -> RouteOutput:
        c = self.costs(tuple(x.shape[1:]))
        if self.training:
            return self._mixture(x, c)
        B, d = x.shape[0], self.depth
        if B == 0:  # an empty batch: the leftmost path on the empty input, for the output's shape
            h = x
            for n in self._leaf_nodes(0):
                h = self.nodes[n](h)
            empty = torch.zeros(0, dtype=torch.long, device=x.device)
            no_flops = torch.zeros(0, dtype=torch.float64)
            return RouteOutput(
                h, empty, x.new_zeros(0, self.num_leaves), no_flops, x.new_zeros(()), empty.view(0, d)
            )
        path = torch.zeros(B, d, dtype=torch.long, device=x.device)
        groups = [(0, torch.arange(B, device=x.device), self.nodes[0](x))]  # (node, input positions, h)
        for level in range(d):
            nxt = []
            for node, idx, h in groups:
                logits = self.gates[node](h) + self.route_bias[node]  # (b, 2)
                choice = logits.argmax(-1)
                path[:, level].index_copy_(0, idx, choice)
                for bit in (0, 1):
                    sel = (choice == bit).nonzero().squeeze(1)
                    if sel.numel() == 0:
                        continue
                    child = 2 * node + 1 + bit
                    if sel.numel() == idx.numel():  # the whole group goes one way: no copy
                        nxt.append((child, idx, self.nodes[child](h)))
                    else:
                        nxt.append(
                            (child, idx.index_select(0, sel), self.nodes[child](h.index_select(0, sel)))
                        )
            groups = nxt
        leaf = path @ (2 ** torch.arange(d - 1, -1, -1, device=x.device))  # (B,)
        if len(groups) == 1:
            out = groups[0][2]
        else:
            out = _scatter_rows([(idx, y) for _, idx, y in groups], B)
        flops = c["paths"].to(x.device)[leaf]
        probs = x.new_zeros(B, self.num_leaves)  # leaf probabilities are reported in training only
        return RouteOutput(out, leaf, probs, flops, x.new_zeros(()), path)

    def _mixture(self, x: torch.Tensor, c: dict[str, torch.Tensor]) -> RouteOutput:
        """Every node on every sample; leaf output weighted by the product of hard (straight-through)
        weights along its path, so exactly one leaf counts per sample in the forward pass."""
        B = x.shape[0]
        h = [self.nodes[0](x)]
        w = [x.new_ones(B)]  # path weight of each node
        p = [x.new_ones(B)]  # path probability of each node
        for i, gate in enumerate(self.gates):
            logits = gate(h[i]) + self.route_bias[i]
            g, prob = self._sample(logits), logits.softmax(-1)
            for bit in (0, 1):
                h.append(self.nodes[2 * i + 1 + bit](h[i]))
                w.append(w[i] * g[:, bit])
                p.append(p[i] * prob[:, bit])
        first = 2**self.depth - 1
        leaf_w = torch.stack(w[first:], 1)  # (B, L)
        ys = torch.stack(h[first:], 1)  # (B, L, ...)
        out = (leaf_w.to(ys.dtype).view(*leaf_w.shape, *([1] * (ys.dim() - 2))) * ys).sum(1)
        probs = torch.stack(p[first:], 1)
        leaf = leaf_w.detach().argmax(-1)
        bits = torch.arange(self.depth - 1, -1, -1, device=x.device)
        path = (leaf[:, None] >> bits) & 1
        rel = c["paths"] / c["paths"].max()
        flops = c["paths"].to(x.device)[leaf]
        return RouteOutput(out, leaf, probs, flops, self._aux_loss(probs, leaf, rel), path)


# ------------------------------------------------------------------------------ budget calibration
def _routers(model: nn.Module) -> list[_RouterBase]:
    found = [m for m in model.modules() if isinstance(m, _RouterBase)]
    if not found:
        raise ValueError(
            f"model: expected a module containing a BranchRouter or RoutingTree, got {type(model).__name__}"
        )
    return found


def set_cost_penalty(model: nn.Module, penalty: float) -> None:
    """Set one cost penalty on every router inside `model` (see BranchRouter.set_cost_penalty)."""
    for r in _routers(model):
        r.set_cost_penalty(penalty)


@torch.no_grad()
def _replay(model: nn.Module, routers: list[_RouterBase], xs: list[torch.Tensor]):
    """For a model with a single BranchRouter that sees every sample: one pass records its gate
    logits, after which the mean FLOPs at any penalty are computed without running the model.
    Returns None when that does not apply."""
    if len(routers) != 1 or not isinstance(routers[0], BranchRouter):
        return None
    r = routers[0]
    logits: list[torch.Tensor] = []
    hook = r.gate.register_forward_hook(lambda m, i, o: logits.append(o.detach()))
    try:
        set_cost_penalty(model, 0.0)
        flops = torch.cat([model(b).flops for b in xs]).cpu()
    finally:
        hook.remove()
    if sum(lg.shape[0] for lg in logits) != flops.shape[0]:
        return None
    gate_logits = torch.cat(logits).cpu()  # (N, n), before the route bias
    bc = r.costs()["branches"]
    base = flops - bc[(gate_logits + r.route_bias.cpu()).argmax(-1)]  # everything but the branch

    def flops_at(lam: float) -> float:
        bias = (-float(lam) * bc / bc.max()).to(r.route_bias.dtype)  # exactly as set_cost_penalty
        return float((base + bc[(gate_logits + bias).argmax(-1)]).mean())

    return flops_at


@torch.no_grad()
def calibrate_route_bias(
    model: nn.Module,
    val_x: torch.Tensor,
    budget: float,
    *,
    batch_size: int = 256,
    iters: int = 40,
    max_penalty: float = 1e4,
) -> dict[str, float]:
    """Find the cost penalty (shared by every router in `model`) whose mean per-sample FLOPs on
    `val_x` is at most `budget` x the FLOPs of routing every sample along its dearest path, and
    as close to it as the data allow; set it on the model and return what was found.

    `model(x)` must return an object with per-sample `.flops` in eval mode (a DynamicOutput).
    Bisection on the penalty (mean FLOPs fall as it grows); with a single BranchRouter the gate
    logits are recorded once and replayed, otherwise every step runs the model on `val_x`.
    """
    _check_number("budget", budget, 0.0, 1.0)
    if not isinstance(val_x, torch.Tensor) or val_x.dim() == 0 or val_x.shape[0] == 0:
        raise ValueError("val_x: expected a non-empty tensor of validation inputs")
    routers = _routers(model)
    was_training = model.training
    model.eval()
    xs = [val_x[i : i + batch_size] for i in range(0, val_x.shape[0], batch_size)]
    try:
        if any(r._ref_shape is None for r in routers):  # lazily measured routers see one input first
            model(xs[0][:1])
        replay = _replay(model, routers, xs)

        def run(lam: float) -> float:
            set_cost_penalty(model, lam)
            return float(torch.cat([model(b).flops for b in xs]).mean())

        flops_at = replay or run
        most = flops_at(-max_penalty)  # every router on its dearest route
        target = budget * most
        # invariant: flops(lo) > target, flops(hi) <= target
        if flops_at(0.0) > target:
            lo, hi, step = 0.0, 1.0, 1.0
            while flops_at(hi) > target and hi < max_penalty:
                lo, step = hi, step * 4
                hi = min(hi + step, max_penalty)
        elif most <= target:
            lo = hi = -max_penalty
        else:
            lo, hi, step = -1.0, 0.0, 1.0
            while flops_at(lo) <= target and lo > -max_penalty:
                hi, step = lo, step * 4
                lo = max(lo - step, -max_penalty)
        for _ in range(iters if lo < hi else 0):
            mid = 0.5 * (lo + hi)
            if flops_at(mid) > target:
                lo = mid
            else:
                hi = mid
        reached = run(hi)  # set on the model, measured for real
    finally:
        model.train(was_training)
    return {
        "penalty": hi,
        "mean_flops": reached,
        "target_flops": target,
        "max_flops": most,
        "fraction": reached / most,
        "met": reached <= target * (1 + 1e-9),
    }
