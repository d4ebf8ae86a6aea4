"""Early-exit networks over any list of stages, with dynamic execution that saves real time.

`EarlyExitNetwork(stages, heads, exit_stages)` puts exit head k after stage exit_stages[k]; the
last stage always carries the final classifier. In training mode `forward` returns every exit's
logits (MultiExitOutput); in eval mode it runs dynamically under a policy:

  1. run the next stages on the samples still active            h: (B_active, ...)
  2. compute exit k's logits and ask the policy who stops       stop: (B_active,)
  3. scatter the stopped samples' logits into the output at their input positions
  4. compact: index_select the survivors' features and policy state, drop the rest

so a sample that exits costs nothing afterwards (no masking). Batch size 1 takes a separate loop
with no index bookkeeping at all. Per-sample FLOPs are the measured cumulative cost of the exit
each sample took.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dynets.core.cost import cumulative_exit_costs, measure_flops
from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.tensors import all_finite, check_batch_size, pop_groups, take_rows, write_exits
from dynets.policies.exit_policies import ConfidencePolicy, ExitPolicy, ThresholdPolicy

Features = Any  # a Tensor, or a (nested) list/tuple of Tensors for multi-scale backbones


def index_select_tree(h: Features, index: torch.Tensor) -> Features:
    """index_select along dim 0 through tensors nested in lists / tuples / dicts (NHWC stays NHWC)."""
    if isinstance(h, torch.Tensor):
        return take_rows(h, index)
    if isinstance(h, (list, tuple)):
        return type(h)(index_select_tree(v, index) for v in h)
    if isinstance(h, dict):
        return {k: index_select_tree(v, index) for k, v in h.items()}
    raise TypeError(
        f"cannot compact features of type {type(h).__name__}; expected Tensor, list, tuple or dict"
    )


def cat_tree(parts: Sequence[Features]) -> Features:
    """torch.cat along dim 0 through tensors nested in lists / tuples / dicts (same structure)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return parts[0] if len(parts) == 1 else torch.cat(list(parts))
    if isinstance(first, (list, tuple)):
        return type(first)(cat_tree([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: cat_tree([p[k] for p in parts]) for k in first}
    raise TypeError(f"cannot concatenate features of type {type(first).__name__}")


def _first_tensor(h: Features) -> torch.Tensor:
    while not isinstance(h, torch.Tensor):
        h = h[0] if isinstance(h, (list, tuple)) else next(iter(h.values()))
    return h


class ExitPredictor(nn.Module):
    """Learned exit: from an exit's logits, predict P(this exit's prediction is right)."""

    def __init__(self, num_classes: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_classes + 2, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B,)
        p = logits.float().softmax(-1)
        top2 = p.topk(2, dim=-1).values
        feats = torch.cat(
            [p.sort(-1, descending=True).values, top2[:, :1] - top2[:, 1:], (p * p).sum(-1, True)], -1
        )
        return torch.sigmoid(self.net(feats)).squeeze(-1)


class EarlyExitNetwork(nn.Module):
    """A backbone given as a list of stages, with exit heads after chosen stages.

    stages:      modules applied in sequence (the user's own, or the zoo's).
    heads:       one head per exit, mapping that stage's features to (B, C) logits.
    exit_stages: for each head, the index of the stage it follows; strictly increasing, and the
                 last must be the last stage (the final classifier).
    input_shape: (C, H, W) (or any per-sample shape) for input checks and FLOP measurement.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        exit_stages: Sequence[int],
        *,
        input_shape: Sequence[int],
        num_classes: int,
        policy: ExitPolicy | None = None,
        learned_exits: bool = True,
    ) -> None:
        super().__init__()
        exit_stages = [int(s) for s in exit_stages]
        if len(heads) != len(exit_stages):
            raise ValueError(
                f"heads and exit_stages must have equal length, got {len(heads)} and {len(exit_stages)}"
            )
        if not exit_stages or exit_stages[-1] != len(stages) - 1:
            raise ValueError(
                f"the last exit must follow the last stage ({len(stages) - 1}), got exit_stages={exit_stages}"
            )
        if any(b <= a for a, b in zip(exit_stages, exit_stages[1:])) or exit_stages[0] < 0:
            raise ValueError(f"exit_stages must be strictly increasing and >= 0, got {exit_stages}")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.exit_stages = exit_stages
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.policy: ExitPolicy = policy if policy is not None else ConfidencePolicy(0.9)
        n_pred = len(heads) - 1 if learned_exits else 0
        self.exit_predictors = nn.ModuleList(ExitPredictor(num_classes) for _ in range(n_pred))
        for p in self.exit_predictors.parameters():  # trained separately, after the network
            p.requires_grad_(False)
        self._costs: dict[bool, torch.Tensor] = {}

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    # ---------------------------------------------------------------- cost accounting
    def unit_costs(self) -> dict[str, list[int]]:
        """FLOPs per sample of every unit, measured with FlopCounterMode at batch size 1."""
        if "units" not in self.__dict__:
            was_training = self.training
            self.eval()
            x = torch.zeros(1, *self.input_shape, device=self._device())
            stage_costs, head_costs, pred_costs = [], [], []
            h = x
            with torch.no_grad():
                for i, stage in enumerate(self.stages):
                    stage_costs.append(measure_flops(stage, h))
                    h = stage(h)
                    if i in self.exit_stages:
                        k = self.exit_stages.index(i)
                        head_costs.append(measure_flops(self.heads[k], h))
                        if k < len(self.exit_predictors):
                            pred_costs.append(measure_flops(self.exit_predictors[k], self.heads[k](h)))
            self.train(was_training)
            self.__dict__["units"] = {"stages": stage_costs, "heads": head_costs, "predictors": pred_costs}
        return self.__dict__["units"]

    def exit_costs(self, learned: bool = False) -> torch.Tensor:
        """(K,) float64: FLOPs per sample for a sample that leaves at exit k (cumulative)."""
        if learned not in self._costs:
            u = self.unit_costs()
            heads = list(u["heads"])
            if learned:
                heads = [
                    c + (u["predictors"][k] if k < len(u["predictors"]) else 0) for k, c in enumerate(heads)
                ]
            self._costs[learned] = torch.tensor(
                cumulative_exit_costs(u["stages"], heads, self.exit_stages), dtype=torch.float64
            )
        return self._costs[learned]

    def full_cost(self) -> float:
        """FLOPs per sample of the static path: every stage plus the final head only."""
        u = self.unit_costs()
        return float(sum(u["stages"]) + u["heads"][-1])

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ---------------------------------------------------------------- input checks
    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"input: expected a torch.Tensor of shape (B, {', '.join(map(str, self.input_shape))}), "
                f"got {type(x).__name__}"
            )
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"input: expected shape (B, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"input: expected a floating-point tensor, got dtype {x.dtype}")
        if not all_finite(x):
            raise ValueError("input: expected finite values, got NaN or inf")

    # ---------------------------------------------------------------- backbone freezing
    frozen_backbone: bool = False

    def freeze_backbone(self, source: EarlyExitNetwork | None = None) -> EarlyExitNetwork:
        """Train only the internal exits on a fixed, already trained backbone (SDN's "IC-only"
        training, DeeBERT's second stage): copy the stages and final classifier from `source` (a
        trained model with the same backbone, e.g. the static baseline) if given, then freeze them;
        their BatchNorm stays in eval mode while the exits train. The final exit then equals the
        source model's prediction exactly."""
        if source is not None:
            self.stages.load_state_dict(source.stages.state_dict())
            self.heads[-1].load_state_dict(source.heads[-1].state_dict())
        for p in [*self.stages.parameters(), *self.heads[-1].parameters()]:
            p.requires_grad_(False)
        self.frozen_backbone = True
        return self.train(self.training)

    def unfreeze_backbone(self) -> EarlyExitNetwork:
        """Undo `freeze_backbone`: every parameter trains again (SDN-style fine-tuning of the whole
        network once its exits have been trained on the frozen backbone)."""
        for p in self.parameters():
            p.requires_grad_(True)
        for p in self.exit_predictors.parameters():  # learned exits are fitted afterwards
            p.requires_grad_(False)
        self.frozen_backbone = False
        return self.train(self.training)

    # ---------------------------------------------------------------- inference optimisation
    inference_only: bool = False

    def optimize_for_inference(self) -> EarlyExitNetwork:
        """An inference-only copy: BatchNorm folded into the preceding convs and the common layers
        called as functions (torch.fx, `dynets.core.inference.fold_and_lower`), and NHWC
        (channels_last) tensors, which run small convolutions much faster on CPU. Outputs and
        per-sample FLOPs are those of the original (up to float rounding). Apply it to the static
        baseline too when comparing speed, so both sides get the same treatment."""
        from dynets.core.inference import fold_and_lower

        self.unit_costs()  # measured on the original modules, kept by the copy
        fast = copy.deepcopy(self).eval()
        fast.stages = nn.ModuleList(fold_and_lower(s) for s in fast.stages)
        fast.heads = nn.ModuleList(fold_and_lower(h) for h in fast.heads)
        fast.to(memory_format=torch.channels_last)
        fast.inference_only = True
        return fast

    def train(self, mode: bool = True) -> EarlyExitNetwork:
        if mode and self.inference_only:
            raise RuntimeError(
                "this copy was made by optimize_for_inference (BatchNorm folded); train the original"
            )
        super().train(mode)
        if self.frozen_backbone:  # frozen units keep their BatchNorm statistics
            self.stages.eval()
            self.heads[-1].eval()
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_only and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # ---------------------------------------------------------------- forward paths
    def forward(
        self, x: torch.Tensor, policy: ExitPolicy | None = None, *, record: bool = False
    ) -> DynamicOutput | MultiExitOutput:
        self.check_input(x)
        if self.training:
            return MultiExitOutput(self.all_exit_logits(x))
        with torch.no_grad():
            return self.run_dynamic(x, policy if policy is not None else self.policy, record=record)

    def all_exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits for every sample (anytime mode and the reference for tests)."""
        outs, h = [], self._prepare(x)
        k = 0
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if k < len(self.exit_stages) and i == self.exit_stages[k]:
                outs.append(self.heads[k](h))
                k += 1
        return outs

    def learned_scores(self, exit_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, K-1) learned-exit scores from the non-final exits' logits."""
        if not len(self.exit_predictors):
            raise ValueError("this model was built without learned exits (learned_exits=False)")
        return torch.stack([p(lg) for p, lg in zip(self.exit_predictors, exit_logits)], dim=1)

    def run_dynamic(self, x: torch.Tensor, policy: ExitPolicy, *, record: bool = False) -> DynamicOutput:
        """Dynamic execution: exited samples leave the batch; results return in input order."""
        if policy.needs_learned and not len(self.exit_predictors):
            raise ValueError(f"policy {policy.kind!r} needs learned exits, but this model has none")
        B = x.shape[0]
        costs = self.exit_costs(learned=policy.needs_learned)
        if B == 0:
            return DynamicOutput(
                x.new_zeros(0, self.num_classes),
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.float64),
            )
        if B == 1 and not record:
            return self._run_single(x, policy, costs)
        K = self.num_exits
        scores = torch.full((B, K), float("nan")) if record else None
        exit_index = torch.empty(B, dtype=torch.long, device=x.device)
        out: torch.Tensor | None = None
        idx = torch.arange(B, device=x.device)  # input positions of the active rows
        state = policy.init_state(B, x.device)
        h: Features = self._prepare(x)
        s = 0
        for k, last_stage in enumerate(self.exit_stages):
            while s <= last_stage:  # 1. the next stages, active samples only
                h = self.stages[s](h)
                s += 1
            logits = self.heads[k](h)  # 2. (B_active, C)
            if out is None:
                out = logits.new_empty(B, logits.shape[-1])
            if k == K - 1:
                stop = None
            else:
                learned = self.exit_predictors[k](logits) if policy.needs_learned else None
                stop, state = policy.step(k, logits, state, learned)
                if scores is not None and isinstance(policy, ThresholdPolicy):
                    scores[idx.cpu(), k] = policy.score(logits, learned).float().cpu()
            n_stop = B if stop is None else int(stop.sum())
            if n_stop == 0:
                continue
            if stop is None or n_stop == idx.numel():  # everyone left: write and finish
                out.index_copy_(0, idx, logits)
                exit_index.index_fill_(0, idx, k)
                break
            keep = write_exits(out, exit_index, idx, logits, stop, k)  # 3. finished rows, in order
            idx = idx.index_select(0, keep)  # 4. compact features and policy state
            h = index_select_tree(h, keep)
            state = {name: v.index_select(0, keep) for name, v in state.items()}
        flops = costs.to(exit_index.device)[exit_index]
        rec = {"scores": scores, "exit_costs": costs} if record else None
        return DynamicOutput(out, exit_index, flops, rec)

    @torch.no_grad()
    def run_pooled(self, x: torch.Tensor, batch_size: int, policy: ExitPolicy | None = None) -> DynamicOutput:
        """Throughput mode over many batches: `x` is fed in batches of `batch_size`, and the
        survivors of consecutive batches are pooled before each later stage, so every stage runs on
        full batches (whole pending chunks are taken, so a batch may run somewhat over `batch_size`)
        instead of ever smaller ones (the remainders are flushed at the end). Same
        decisions, logits (up to float rounding), exits and FLOPs as `run_dynamic` on each batch;
        results in input order. A sample may wait for others before its later stages run, so use
        this for offline / server-side throughput, and `forward` for the latency of one batch."""
        self.check_input(x)
        check_batch_size(batch_size)
        policy = policy if policy is not None else self.policy
        if policy.needs_learned and not len(self.exit_predictors):
            raise ValueError(f"policy {policy.kind!r} needs learned exits, but this model has none")
        N, K = x.shape[0], self.num_exits
        costs = self.exit_costs(learned=policy.needs_learned)
        exit_index = torch.empty(N, dtype=torch.long, device=x.device)
        out = x.new_empty(N, self.num_classes)
        # queues[k]: pending (features, input positions, policy state) waiting for exit k's stages
        queues: list[list[tuple[Features, torch.Tensor, dict]]] = [[] for _ in range(K)]
        counts = [0] * K
        slices = self._stage_slices()

        def run_level(k: int, flush: bool) -> None:
            while counts[k] >= batch_size or (flush and counts[k] > 0):
                parts, n = pop_groups(queues[k], batch_size, rows=1)
                h = cat_tree([p[0] for p in parts])
                idx = torch.cat([p[1] for p in parts])
                state = {name: torch.cat([p[2][name] for p in parts]) for name in parts[0][2]}
                counts[k] -= n
                for s in range(*slices[k]):
                    h = self.stages[s](h)
                logits = self.heads[k](h)
                if k == K - 1:
                    out.index_copy_(0, idx, logits)
                    exit_index.index_fill_(0, idx, k)
                    continue
                learned = self.exit_predictors[k](logits) if policy.needs_learned else None
                stop, state = policy.step(k, logits, state, learned)
                keep = write_exits(out, exit_index, idx, logits, stop, k)
                if keep.numel():
                    queues[k + 1].append(
                        (
                            index_select_tree(h, keep),
                            idx.index_select(0, keep),
                            {name: v.index_select(0, keep) for name, v in state.items()},
                        )
                    )
                    counts[k + 1] += int(keep.numel())

        positions = torch.arange(N, device=x.device)
        for start in range(0, N, batch_size):
            xb = self._prepare(x[start : start + batch_size])
            queues[0].append(
                (xb, positions[start : start + batch_size], policy.init_state(xb.shape[0], x.device))
            )
            counts[0] += xb.shape[0]
            for k in range(K):
                run_level(k, flush=False)
        for k in range(K):
            run_level(k, flush=True)
        return DynamicOutput(out, exit_index, costs.to(exit_index.device)[exit_index])

    def _run_single(self, x: torch.Tensor, policy: ExitPolicy, costs: torch.Tensor) -> DynamicOutput:
        """Batch size 1: stop at the first exit the policy accepts, with no compaction at all.
        Kept to as few Python operations as possible between the layers (see `_scalar_logits` in
        dynets.policies.exit_policies): the stages run from a tuple in slices per exit."""
        state = policy.init_state(1, x.device)
        h: Features = self._prepare(x)
        stages, heads = tuple(self.stages), tuple(self.heads)
        last = len(heads) - 1
        learned = None
        for k, (first, end) in enumerate(self._stage_slices()):
            for stage in stages[first:end]:
                h = stage(h)
            logits = heads[k](h)
            if k < last:
                if policy.needs_learned:
                    learned = self.exit_predictors[k](logits)
                stop, state = policy.step_single(k, logits, state, learned)
                if not stop:
                    continue
            exit_index = torch.full((1,), k, dtype=torch.long, device=logits.device)
            return DynamicOutput(logits, exit_index, costs[k : k + 1].clone())
        raise RuntimeError("unreachable: the last exit always stops")

    def _stage_slices(self) -> list[tuple[int, int]]:
        """[(first, end)] stage indices run before each exit (from `exit_stages`, which is fixed)."""
        slices = self.__dict__.get("_slices")
        if slices is None:
            starts = [0] + [s + 1 for s in self.exit_stages[:-1]]
            slices = self.__dict__["_slices"] = [(a, s + 1) for a, s in zip(starts, self.exit_stages)]
        return slices

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """The plain static path: every stage, final head only (no exit heads run)."""
        h: Features = self._prepare(x)
        for stage in self.stages:
            h = stage(h)
        return self.heads[-1](h)
