"""Expert parallelism over torch.distributed: each rank holds num_experts / world of the experts.

The router (and the rest of the model) is replicated and trained data-parallel; each token travels
to the rank holding its expert and back. One call of `ExpertParallelMoE`, megablocks-style:

  1. route + permute: top-k, gates and capacity on this rank's own tokens (MoE steps 1-2), then
     gather the kept tokens sorted by expert, so each destination rank's rows are contiguous
  2. exchange counts: all_to_all_single of the (E,) per-expert counts tells every rank how many
     rows each source rank sends to each of its local experts
  3. all-to-all: the rows, with variable split sizes (`all_to_all`: an autograd Function whose
     backward is the reverse exchange, so gradients flow back to the sending rank)
  4. compute: received rows arrive ordered (source rank, local expert); sort them by local expert,
     run each local expert on its contiguous slice, restore the (source, expert) order
  5. all-to-all back with the split sizes swapped, then un-permute: scale by the gates and
     index_add into token order

Capacity is computed per rank from its own token count, as GShard does per group, so rank r's
output equals a single-process `MoE` (same weights) applied to rank r's tokens alone, drops
included, and `last_stats` reports this rank's tokens.

Data parallelism: expert parameters live on one rank each, so DDP must neither broadcast nor
all-reduce them. Mark and wrap like this:

    moe = ExpertParallelMoE.from_moe(full_moe)          # or ExpertParallelMoE(config)
    model = MyModel(..., ffn=moe)
    ddp_ignore_expert_parameters(model)                  # before wrapping
    ddp = torch.nn.parallel.DistributedDataParallel(model)

Under DDP the objective is the mean of the ranks' losses, so the non-expert gradients are
averaged over ranks. An expert's gradient arrives summed over every rank's tokens (through the
exchange), so by default (`grad_average=True`) a hook divides it by the world size to match.
With a plain sum of the ranks' losses (no DDP averaging) pass grad_average=False.
Every rank must call forward (and backward) the same number of times: the exchanges are
collective. Without `group`, each block makes its own process group over all ranks (a collective
call, so every rank must build its blocks in the same order); the exchange then never interleaves
with DDP's asynchronous gradient all-reduce on the default group, whose order relative to the
backward exchanges could differ between ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dynets.width.moe import (
    FeedForward,
    MoE,
    MoEConfig,
    MoEStats,
    Router,
    check_moe_input,
    make_stats,
    new_counters,
    plan_dispatch,
    run_experts,
)

__all__ = [
    "ExpertParallelMoE",
    "all_to_all",
    "ddp_ignore_expert_parameters",
    "expert_parameter_names",
    "is_expert_parameter",
    "non_expert_parameters",
]


class _AllToAll(torch.autograd.Function):
    """Rows of x (sum(in_splits), ...) -> (sum(out_splits), ...); backward swaps the splits."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
    ) -> torch.Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any = None
) -> torch.Tensor:
    """Differentiable all_to_all_single: send in_splits[r] rows of x to rank r, receive out_splits[r]."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def is_expert_parameter(p: torch.Tensor) -> bool:
    """True for parameters that live on one rank only (marked by ExpertParallelMoE)."""
    return bool(getattr(p, "expert_parallel", False))


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the expert-parallel parameters inside `model`."""
    return [n for n, p in model.named_parameters() if is_expert_parameter(p)]


def non_expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters to train data-parallel (everything except the experts)."""
    return [p for p in model.parameters() if not is_expert_parameter(p)]


def ddp_ignore_expert_parameters(model: nn.Module) -> list[str]:
    """Make DistributedDataParallel skip the expert parameters (call before wrapping); returns their names."""
    names = expert_parameter_names(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


class ExpertParallelMoE(nn.Module):
    """An MoE block whose experts are spread over the ranks of `group` (see the module docstring).

    Without an initialised process group it runs as a world of one (all experts local).
    """

    def __init__(self, config: MoEConfig, *, group: Any = None, grad_average: bool = True) -> None:
        super().__init__()
        initialised = dist.is_available() and dist.is_initialized()
        if initialised and group is None and dist.get_world_size() > 1:
            group = dist.new_group()  # collective: every rank builds its blocks in the same order
        self.group = group
        self.world_size = dist.get_world_size(group) if initialised else 1
        self.rank = dist.get_rank(group) if initialised else 0
        if config.num_experts % self.world_size:
            raise ValueError(
                f"num_experts: expected a multiple of the world size {self.world_size}, got "
                f"{config.num_experts}"
            )
        self.config = config
        self.num_local = config.num_experts // self.world_size
        self.first_expert = self.rank * self.num_local  # this rank holds experts [first, first + num_local)
        self.router = Router(config)
        self.experts = nn.ModuleList(
            FeedForward(config.d_model, config.d_ff, config.activation, config.bias)
            for _ in range(self.num_local)
        )
        for p in self.experts.parameters():
            p.expert_parallel = True  # type: ignore[attr-defined]
            if grad_average and self.world_size > 1:
                p.register_hook(lambda g, w=self.world_size: g / w)
        self.last_stats: MoEStats | None = None
        self.counters = new_counters()

    @classmethod
    def from_moe(cls, moe: MoE, *, group: Any = None, grad_average: bool = True) -> ExpertParallelMoE:
        """This rank's share of a full MoE: its router and the experts this rank holds (copied)."""
        ep = cls(moe.config, group=group, grad_average=grad_average)
        ref = next(moe.parameters())
        ep.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            ep.router.load_state_dict(moe.router.state_dict())
            for i, expert in enumerate(ep.experts):
                expert.load_state_dict(moe.experts[ep.first_expert + i].state_dict())
        return ep

    def forward(
        self, x: torch.Tensor, *, return_stats: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, MoEStats]:
        c, W, El = self.config, self.world_size, self.num_local
        check_moe_input(x, c.d_model)
        lead = x.shape[:-1]
        h = x.reshape(-1, c.d_model)  # (N, d)
        routed = self.router(h)  # 1. (logits, probs, expert_index, gates)
        plan = plan_dispatch(routed[2], routed[3], c.num_experts, c.capacity(h.shape[0], self.training))
        xs = h.index_select(0, plan.token)  # (M, d), expert-contiguous, hence rank-contiguous
        if W == 1:
            ys = run_experts(self.experts, xs, plan.counts.tolist())
        else:
            send_counts = plan.counts  # 2. (E,) rows for each global expert
            recv_counts = torch.empty_like(send_counts)  # (W * El,): source s's rows for my expert j
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            send_splits = send_counts.view(W, El).sum(1).tolist()
            recv_counts = recv_counts.view(W, El)
            recv_splits = recv_counts.sum(1).tolist()
            xr = all_to_all(xs, recv_splits, send_splits, self.group)  # 3. (R, d) by (source, expert)
            yr = self._run_local(xr, recv_counts)  # 4. (R, d)
            ys = all_to_all(yr, send_splits, recv_splits, self.group)  # 5. (M, d) back, my order
        ys = ys * plan.gate.to(ys.dtype).unsqueeze(1)
        out = h.new_zeros(h.shape).index_add(0, plan.token, ys)  # (N, d) in token order
        stats = make_stats(c, self.training, plan, routed, lead, self.counters)
        self.last_stats = stats
        out = out.view(*lead, c.d_model)
        return (out, stats) if return_stats else out

    def _run_local(self, xr: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
        """Run the local experts on rows ordered (source rank, local expert); same order back."""
        if self.num_local == 1:
            return run_experts(self.experts, xr, [xr.shape[0]])
        W, El = recv_counts.shape
        local_id = torch.arange(El, device=xr.device).repeat(W)  # (W * El,) expert of each block
        row_expert = torch.repeat_interleave(local_id, recv_counts.reshape(-1))  # (R,)
        order = torch.argsort(row_expert, stable=True)  # rows grouped by local expert
        ys = run_experts(self.experts, xr.index_select(0, order), recv_counts.sum(0).tolist())
        return ys.index_select(0, torch.argsort(order))  # inverse permutation: back to (source, expert)
