"""Cost accounting: FLOPs of each unit, measured once with PyTorch's own counter.

Costs are measured, not hand-derived: `measure_flops` runs a unit on a reference input of batch
size 1 under `torch.utils.flop_counter.FlopCounterMode` and returns FLOPs per sample. A dynamic
model's per-sample cost is then the sum of the costs of the units that sample ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def measure_flops(fn: Callable[..., object] | nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one call `fn(*inputs)` (inputs should have batch size 1), counted by PyTorch."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*inputs)
    return int(counter.get_total_flops())


def cumulative_exit_costs(
    stage_costs: Sequence[int], head_costs: Sequence[int], exit_stages: Sequence[int]
) -> list[int]:
    """Cost of a sample that leaves at exit k: all stages up to k's stage plus heads 0..k.

    stage_costs[i] is stage i's FLOPs, head_costs[k] exit k's head, exit_stages[k] the stage the
    k-th exit follows (strictly increasing).
    """
    totals, spent_stages, spent_heads, s = [], 0, 0, 0
    for k, stage in enumerate(exit_stages):
        while s <= stage:
            spent_stages += stage_costs[s]
            s += 1
        spent_heads += head_costs[k]
        totals.append(spent_stages + spent_heads)
    return totals
