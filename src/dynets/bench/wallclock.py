"""Wall-clock realisation: dynamic vs static, measured in one process, alternating, medians.

Machines are noisy, so absolute times mean little; what counts is the ratio of the two measured
side by side. Each round times one full pass of the static model over the batches and one of the
dynamic model (the order flips every round), and the median per-pass time of each is compared.
With `chunks` > 1 a round alternates the two over consecutive groups of batches (static on group
1, dynamic on group 1, dynamic on group 2, static on group 2, ...) and sums each side's groups, so
a burst of load from elsewhere on the machine (they come and go over tens of milliseconds on a
shared VM) falls on both sides alike instead of on whichever pass it happened to hit.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def _timed_pass(fn: Callable[[torch.Tensor], object], batches: Sequence[torch.Tensor]) -> float:
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return time.perf_counter() - start


@torch.inference_mode()
def compare_wallclock(
    static_fn: Callable[[torch.Tensor], object],
    dynamic_fn: Callable[[torch.Tensor], object],
    batches: Sequence[torch.Tensor],
    *,
    rounds: int = 7,
    warmup: int = 1,
    chunks: int = 1,
) -> dict[str, float]:
    """Median seconds per pass of each, samples/s of each, and speedup = static / dynamic time."""
    if not batches:
        raise ValueError("compare_wallclock: expected at least one batch, got none")
    if rounds < 1:
        raise ValueError(f"rounds: expected >= 1, got {rounds}")
    if chunks < 1:
        raise ValueError(f"chunks: expected >= 1, got {chunks}")
    n = sum(int(b.shape[0]) for b in batches)
    for _ in range(warmup):
        _timed_pass(static_fn, batches[:2])
        _timed_pass(dynamic_fn, batches[:2])
    k = min(chunks, len(batches))
    bounds = [round(i * len(batches) / k) for i in range(k + 1)]
    groups = [batches[a:b] for a, b in zip(bounds, bounds[1:])]
    ts, td = [], []
    for r in range(rounds):
        s_total = d_total = 0.0
        for g, group in enumerate(groups):
            if (r + g) % 2 == 0:
                s_total += _timed_pass(static_fn, group)
                d_total += _timed_pass(dynamic_fn, group)
            else:
                d_total += _timed_pass(dynamic_fn, group)
                s_total += _timed_pass(static_fn, group)
        ts.append(s_total)
        td.append(d_total)
    s, d = statistics.median(ts), statistics.median(td)
    return {
        "static_s": s,
        "dynamic_s": d,
        "static_per_s": n / s,
        "dynamic_per_s": n / d,
        "speedup": s / d,
        "samples": n,
        "rounds": rounds,
        "chunks": k,
    }


def split_batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """x cut into consecutive batches of `batch_size` (the last one may be smaller)."""
    return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]
