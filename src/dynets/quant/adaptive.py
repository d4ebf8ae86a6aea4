"""Input-adaptive quantization: the early part of an early-exit network in int8, and the policy
decides per input whether the int8 prediction is good enough or the input is re-run in fp32.

  1. int8 blocks: the stages up to exit k and exit head k, quantized statically with torch.ao FX
     graph mode (x86 / fbgemm kernels, per-channel weights, activation scales observed on
     calibration data); BatchNorm is folded into the convolutions on the way.
  2. `forward(x)`: run the int8 blocks with compaction, as the eager executor does; at each int8
     exit the policy (a threshold policy, one threshold or one per int8 exit) accepts the rows
     it is sure about. At the last int8 exit the rows still undecided leave int8.
  3. those rows are re-run from the input in fp32 with the model's own policy (early exits
     included), so hard inputs get full precision and easy ones never pay for it.

Per-sample FLOPs are what ran, in either precision (int8 ones counted like fp32 ones);
`decisions["precision"]` says which (0 = int8, 1 = fp32) and `decisions["int8_flops"]` the int8
part. torch.ao.quantization is deprecated in favour of torchao but works in torch 2.13 on CPU;
its warnings are silenced here.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dynets.core.outputs import DynamicOutput
from dynets.depth.early_exit import index_select_tree
from dynets.policies.exit_policies import ConfidencePolicy, ExitPolicy, ThresholdPolicy


def quantize_blocks(
    model: nn.Module,
    calib_x: torch.Tensor,
    *,
    num_exits: int | None = None,
    batch_size: int = 64,
    backend: str = "x86",
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """int8 copies of the first `num_exits` exit blocks (stages, head): (stage blocks, heads)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    n = model.num_exits if num_exits is None else int(num_exits)
    if not 1 <= n <= model.num_exits:
        raise ValueError(f"num_exits: expected 1..{model.num_exits} int8 exits, got {num_exits}")
    if calib_x.shape[0] == 0:
        raise ValueError("calib_x: expected calibration inputs, got an empty batch")
    if backend not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"backend: expected one of {torch.backends.quantized.supported_engines}, got {backend!r}"
        )
    torch.backends.quantized.engine = backend
    qconfig = get_default_qconfig_mapping(backend)
    model.eval()
    q_stages, q_heads = nn.ModuleList(), nn.ModuleList()
    batches = [calib_x[i : i + batch_size] for i in range(0, calib_x.shape[0], batch_size)]
    feats: list[Any] = batches  # fp32 features entering the current block, per calibration batch
    s = 0
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        for k in range(n):
            last = model.exit_stages[k]
            block = nn.Sequential(*[copy.deepcopy(model.stages[i]) for i in range(s, last + 1)]).eval()
            s = last + 1
            head = copy.deepcopy(model.heads[k]).eval()
            pb = prepare_fx(block, qconfig, (feats[0],))
            outs = [pb(f) for f in feats]  # observers see the fp32 activations
            ph = prepare_fx(head, qconfig, (outs[0],))
            for o in outs:
                ph(o)
            q_stages.append(convert_fx(pb))
            q_heads.append(convert_fx(ph))
            feats = outs
    return q_stages, q_heads


class AdaptivePrecisionNetwork(nn.Module):
    """An early-exit model whose first exits run in int8, with a per-input fall-back to fp32.

    policy: threshold policy deciding at each int8 exit whether its int8 prediction is accepted
    (one threshold, or one per int8 exit). fp32_policy: the model's policy for the fp32 re-run
    (None: `model.policy`).
    """

    def __init__(
        self,
        model: nn.Module,
        q_stages: nn.ModuleList,
        q_heads: nn.ModuleList,
        *,
        policy: ThresholdPolicy | None = None,
        fp32_policy: ExitPolicy | None = None,
    ) -> None:
        super().__init__()
        if len(q_stages) != len(q_heads) or not 1 <= len(q_heads) <= model.num_exits:
            raise ValueError(
                f"q_stages / q_heads: expected equal lengths in 1..{model.num_exits}, got {len(q_stages)} / "
                f"{len(q_heads)}"
            )
        self.model, self.q_stages, self.q_heads = model.eval(), q_stages, q_heads
        self.policy = self._check_policy(policy if policy is not None else ConfidencePolicy(0.9))
        self.fp32_policy = fp32_policy

    @property
    def num_int8_exits(self) -> int:
        return len(self.q_heads)

    def _check_policy(self, policy: ExitPolicy) -> ThresholdPolicy:
        if not isinstance(policy, ThresholdPolicy):
            raise TypeError(
                f"policy: expected a threshold policy (confidence, entropy, learned), got {policy!r}"
            )
        if len(policy.thresholds) not in (1, self.num_int8_exits):
            raise ValueError(
                f"policy: expected 1 or {self.num_int8_exits} thresholds (one per int8 exit), got "
                f"{len(policy.thresholds)}"
            )
        if policy.needs_learned and len(self.model.exit_predictors) < self.num_int8_exits:
            raise ValueError("policy 'learned' needs a learned-exit predictor at every int8 exit")
        return policy

    def _cost(self, k: int, decide_at: set[int], learned: bool) -> float:
        """FLOPs of the int8 blocks through exit k, counting the heads (and learned-exit
        predictors) of the exits that decided on the way, plus head k itself."""
        u = self.model.unit_costs()
        cost = sum(u["stages"][: self.model.exit_stages[k] + 1])
        for j in range(k + 1):
            if j in decide_at or j == k:
                cost += u["heads"][j]
                if learned and j < len(u["predictors"]) and j in decide_at:
                    cost += u["predictors"][j]
        return float(cost)

    def _learned(self, k: int, logits: torch.Tensor, policy: ExitPolicy) -> torch.Tensor | None:
        return self.model.exit_predictors[k](logits) if policy.needs_learned else None

    @torch.no_grad()
    def int8_exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every int8 exit's logits for every row (no compaction): the reference for tests."""
        outs, h = [], x
        for stages, head in zip(self.q_stages, self.q_heads):
            h = stages(h)
            outs.append(head(h))
        return outs

    def forward(
        self,
        x: torch.Tensor,
        policy: ThresholdPolicy | None = None,
        *,
        fp32_policy: ExitPolicy | None = None,
        fp32_static: bool = False,
        decide_at: Sequence[int] | None = None,
    ) -> DynamicOutput:
        """Adaptive precision. decide_at: the int8 exits where the policy is asked (default all;
        the others' heads do not run); fp32_static: re-run on the static fp32 path (final head
        only) instead of the fp32 early-exit model under `fp32_policy` (default the model's)."""
        self.model.check_input(x)
        policy = self.policy if policy is None else self._check_policy(policy)
        fallback = "static" if fp32_static else (fp32_policy or self.fp32_policy or self.model.policy)
        with torch.inference_mode():
            return self._run(x, policy, fallback, self._decide_at(decide_at))

    def forward_int8(self, x: torch.Tensor, policy: ExitPolicy | None = None) -> DynamicOutput:
        """int8 only: the int8 blocks as an early-exit network whose last int8 exit takes every row
        left. Without a policy: the static int8 path (no intermediate heads run)."""
        self.model.check_input(x)
        from dynets.policies.exit_policies import NeverExitPolicy

        decide = set(range(self.num_int8_exits - 1)) if policy is not None else set()
        with torch.inference_mode():
            return self._run(x, policy or NeverExitPolicy(), None, decide)

    def _decide_at(self, decide_at: Sequence[int] | None) -> set[int]:
        n = self.num_int8_exits
        if decide_at is None:
            return set(range(n))
        bad = [k for k in decide_at if not 0 <= k < n]
        if bad:
            raise ValueError(f"decide_at: expected int8 exit indices in [0, {n}), got {list(decide_at)}")
        return set(decide_at)

    def _run(self, x: torch.Tensor, policy: ExitPolicy, fallback: Any, decide_at: set[int]) -> DynamicOutput:
        """fallback: None (int8 only: the last int8 exit takes every row left), "static", or an
        ExitPolicy for the fp32 re-run."""
        B, n = x.shape[0], self.num_int8_exits
        out = x.new_zeros(B, self.model.num_classes)
        exit_index = torch.full((B,), -1, dtype=torch.long)
        int8_flops = torch.zeros(B, dtype=torch.float64)
        precision = torch.zeros(B, dtype=torch.long)
        if B == 0:
            return DynamicOutput(out, exit_index, int8_flops.clone(), decisions={"precision": precision})
        idx = torch.arange(B)
        state = policy.init_state(B, x.device)
        h: Any = x
        learned = policy.needs_learned
        last = n - 1 if fallback is None else max(decide_at, default=-1)  # no int8 work after it
        for k in range(last + 1):
            h = self.q_stages[k](h)  # 1. int8 stages, active rows only
            final = fallback is None and k == n - 1
            if k not in decide_at and not final:
                continue
            logits = self.q_heads[k](h)
            if final:
                stop = torch.ones(idx.numel(), dtype=torch.bool)
            else:
                stop, state = policy.step(k, logits, state, self._learned(k, logits, policy))
            int8_flops.index_fill_(0, idx, self._cost(k, decide_at, learned))
            if stop.any():  # 2. accepted rows: their int8 logits, in input order
                gone = stop.nonzero().squeeze(1)
                out.index_copy_(0, idx[gone], logits.index_select(0, gone).float())
                exit_index.index_fill_(0, idx[gone], k)
            if bool(stop.all()):
                idx = idx[:0]
                break
            keep = (~stop).nonzero().squeeze(1)  # 3. compaction
            idx = idx.index_select(0, keep)
            h = index_select_tree(h, keep)
            state = {name: v.index_select(0, keep) for name, v in state.items()}
        flops = int8_flops.clone()
        if idx.numel():  # 4. the rest: from the input again, in fp32
            xr = x.index_select(0, idx)
            if fallback == "static":
                logits_r = self.model.forward_static(xr)
                exits_r = torch.full((idx.numel(),), self.model.num_exits - 1, dtype=torch.long)
                flops_r = torch.full((idx.numel(),), self.model.full_cost(), dtype=torch.float64)
            else:
                fp32 = self.model.run_dynamic(xr, fallback)
                logits_r, exits_r, flops_r = fp32.logits, fp32.exit_index, fp32.flops.double()
            out.index_copy_(0, idx, logits_r.float())
            exit_index.index_copy_(0, idx, exits_r)
            flops.index_add_(0, idx, flops_r)
            precision.index_fill_(0, idx, 1)
        return DynamicOutput(
            out, exit_index, flops, decisions={"precision": precision, "int8_flops": int8_flops}
        )


def quantize_early_exit(
    model: nn.Module,
    calib_x: torch.Tensor,
    *,
    num_exits: int | None = None,
    policy: ThresholdPolicy | None = None,
    fp32_policy: ExitPolicy | None = None,
    backend: str = "x86",
) -> AdaptivePrecisionNetwork:
    """Quantize the first `num_exits` exit blocks of an early-exit `model` (all by default) on
    calibration inputs `calib_x`, and wrap them with the fp32 model for per-input fall-back."""
    if not all(hasattr(model, a) for a in ("stages", "heads", "exit_stages", "run_dynamic")):
        raise TypeError(f"quantize_early_exit: expected an EarlyExitNetwork, got {type(model).__name__}")
    q_stages, q_heads = quantize_blocks(model, calib_x, num_exits=num_exits, backend=backend)
    return AdaptivePrecisionNetwork(model, q_stages, q_heads, policy=policy, fp32_policy=fp32_policy)


def replay_int8_acceptance(
    policy: ExitPolicy, int8_logits: Sequence[torch.Tensor], learned: torch.Tensor | None = None
) -> torch.Tensor:
    """(N,) the int8 exit each row is accepted at, or -1 for rows re-run in fp32 (no compaction)."""
    N = int8_logits[0].shape[0]
    accepted = torch.full((N,), -1, dtype=torch.long)
    state = policy.init_state(N, int8_logits[0].device)
    for k, lg in enumerate(int8_logits):
        stop, state = policy.step(k, lg, state, learned[:, k] if learned is not None else None)
        accepted[(accepted < 0) & stop.cpu()] = k
    return accepted
