"""Whole-graph export of an early-exit network with `torch.cond`, where that works.

`torch.cond` takes one boolean for the whole batch and both branches must return tensors of the
same shapes, so rows cannot leave the batch inside one graph. What can be expressed: after each
exit, every row whose score clears its threshold takes that exit's logits (`torch.where`), and
`torch.cond(all rows done, stop, run the next stages)` skips the rest of the network once the
whole batch has exited. Outputs equal the eager model's; the compute saved is the eager model's
at batch size 1 (the serving case it is meant for) and only whole-batch savings above that. The
thresholds are a graph input (score scale, one per non-final exit), so the operating point stays
adjustable after export; the score function (confidence, entropy or learned) is fixed at export.

Where it does not work (documented, raised or reported, never silently wrong):
  - patience (per-row state across exits) and other non-threshold policies: not supported;
  - ONNX: the TorchScript exporter cannot express torch.cond; the dynamo exporter can, but needs
    onnxscript (not in the `export` extra), so the ONNX whole graph is reported unavailable
    without it;
  - compaction inside the graph (data-dependent shapes) is out of reach of torch.cond: the staged
    export (`staged.py`) is the fully dynamic one.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from dynets.policies.exit_policies import ThresholdPolicy
from dynets.serve.optional import available

KINDS = ("confidence", "entropy", "learned")


class WholeGraphEarlyExit(nn.Module):
    """forward(x (B, ...), score_thresholds (K-1,)) -> (logits (B, C), exit_index (B,))."""

    def __init__(self, model: nn.Module, kind: str = "confidence") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"whole-graph export: policy kind must be one of {list(KINDS)}, got {kind!r}")
        if kind == "learned" and not len(getattr(model, "exit_predictors", [])):
            raise ValueError("whole-graph export: kind 'learned' needs a model with learned exits")
        self.model, self.kind = model, kind
        self.K = model.num_exits
        self.specs: list[Any] = []  # the feature structure entering each exit's stages
        with torch.no_grad():
            h: Any = torch.zeros((1, *model.input_shape))
            s = 0
            for last in model.exit_stages:
                self.specs.append(tree_flatten(h)[1])
                while s <= last:
                    h = model.stages[s](h)
                    s += 1

    def _score(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        p = logits.float().softmax(-1)
        if self.kind == "confidence":
            return p.amax(-1)
        if self.kind == "entropy":
            return 1.0 - torch.special.entr(p).sum(-1) / math.log(max(logits.shape[-1], 2))
        return self.model.exit_predictors[k](logits)

    def forward(self, x: torch.Tensor, score_thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = x.shape[0]
        out = x.new_zeros(B, self.model.num_classes)
        ex = torch.full((B,), self.K - 1, dtype=torch.long, device=x.device)
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        return self._from(0, (x,), out, ex, done, score_thresholds)

    def _from(self, k: int, flat: tuple, out, ex, done, t) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        h = tree_unflatten(list(flat), self.specs[k])
        first = m.exit_stages[k - 1] + 1 if k else 0
        for s in range(first, m.exit_stages[k] + 1):
            h = m.stages[s](h)
        logits = m.heads[k](h)
        if k == self.K - 1:
            return torch.where(done[:, None], out, logits), ex
        stop = (self._score(k, logits) >= t[k]) & ~done
        out = torch.where(stop[:, None], logits, out)
        ex = torch.where(stop, torch.full_like(ex, k), ex)
        done = done | stop
        nflat = tuple(tree_flatten(h)[0])
        n = len(nflat)

        def finish(*ops):
            return ops[n].clone(), ops[n + 1].clone()

        def cont(*ops):
            return self._from(k + 1, ops[:n], ops[n], ops[n + 1], ops[n + 2], ops[n + 3])

        return torch.cond(done.all(), finish, cont, (*nflat, out, ex, done, t))


def score_thresholds(policy: ThresholdPolicy, num_exits: int) -> torch.Tensor:
    """A threshold policy's thresholds on the score scale, (K-1,) float32: the graph's second input."""
    return torch.tensor(
        [policy.score_threshold(policy.threshold_at(k)) for k in range(num_exits - 1)], dtype=torch.float32
    )


def export_whole_graph(model: nn.Module, directory: Path, *, format: str = "torch", opset: int = 18) -> dict:
    """Write `whole_graph.pt2` (or .onnx) into `directory`; returns the manifest entry (or why not)."""
    policy = getattr(model, "policy", None)
    kind = policy.kind if isinstance(policy, ThresholdPolicy) else "confidence"
    if kind == "learned" and not len(getattr(model, "exit_predictors", [])):
        kind = "confidence"
    wrapper = WholeGraphEarlyExit(model, kind).eval()
    t = (
        score_thresholds(policy, model.num_exits)
        if isinstance(policy, ThresholdPolicy)
        else torch.full((model.num_exits - 1,), 0.9)
    )
    x = torch.rand((2, *model.input_shape), generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    entry = {
        "kind": kind,
        "inputs": ["x", f"score_thresholds ({model.num_exits - 1},)"],
        "outputs": ["logits", "exit_index"],
        "default_score_thresholds": t.tolist(),
    }
    if format == "onnx":
        if not available("onnxscript"):
            return {
                **entry,
                "file": None,
                "unavailable": "ONNX export of torch.cond needs onnxscript (dynamo exporter)",
            }
        path = directory / "whole_graph.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (x, t),
                str(path),
                dynamic_shapes=({0: batch}, None),
                dynamo=True,
                opset_version=opset,
            )
        return {**entry, "file": path.name}
    with torch.no_grad():
        ep = torch.export.export(wrapper, (x, t), dynamic_shapes=({0: batch}, None))
    torch.export.save(ep, str(directory / "whole_graph.pt2"))
    return {**entry, "file": "whole_graph.pt2"}
