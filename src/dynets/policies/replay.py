"""Replay a policy on precomputed all-exit outputs: which exit would each sample take?

Running every exit once and replaying policies on the stored logits makes sweeps and budget
calibration cheap, and gives the independent reference that dynamic execution is tested against
(no compaction: every sample's state is updated at every exit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dynets.policies.exit_policies import ExitPolicy


def replay_exits(
    policy: ExitPolicy, exit_logits: Sequence[torch.Tensor], learned: torch.Tensor | None = None
) -> torch.Tensor:
    """(N,) exit index each sample takes under `policy`, given every exit's logits (each (N, C))."""
    K = len(exit_logits)
    if K == 0:
        raise ValueError("replay_exits: expected at least one exit's logits, got none")
    N = exit_logits[0].shape[0]
    if policy.needs_learned and learned is None:
        raise ValueError(f"policy {policy.kind!r} needs learned-exit scores (N, K-1), got None")
    exit_index = torch.full((N,), K - 1, dtype=torch.long)
    done = torch.zeros(N, dtype=torch.bool)
    state = policy.init_state(N, exit_logits[0].device)
    for k in range(K - 1):
        stop, state = policy.step(k, exit_logits[k], state, learned[:, k] if learned is not None else None)
        newly = stop.cpu() & ~done
        exit_index[newly] = k
        done |= stop.cpu()
    return exit_index
