"""Small tensor helpers shared by the dynamic executors."""

from __future__ import annotations

import math

import torch


def take_rows(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """h.index_select(0, idx), keeping NHWC (channels_last) tensors NHWC.

    index_select returns NCHW-contiguous rows, which the next convolution of an NHWC model would
    convert back (a copy per stage); selecting on the NHWC view is one copy and keeps the layout
    (and is several times faster than advanced indexing, which also keeps it)."""
    if h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last):
        return h.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    return h.index_select(0, idx)


def take_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), idx (B, k) token indices per sample -> (B, k, D), x[b, idx[b]].

    One index_select of whole rows of the flattened tokens: on CPU a gather with the index
    expanded over D walks every element (2-20x slower at batch 64 in the ViT benchmark's shapes)."""
    B, T, D = x.shape
    flat = idx + T * torch.arange(B, device=idx.device)[:, None]
    return x.reshape(B * T, D).index_select(0, flat.reshape(-1)).view(B, idx.shape[1], D)


def all_finite(x: torch.Tensor) -> bool:
    """True if x has no NaN or inf. One reduction on the common path: NaN and inf propagate into
    the sum; only a non-finite sum (an overflow of finite values, or a real NaN/inf) pays for the
    exact element-wise check."""
    if x.numel() == 0:
        return True
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def pop_groups(queue: list, batch_size: int, rows: int) -> tuple[list, int]:
    """Throughput-mode scheduling (run_pooled): take whole pending groups from the front of `queue`
    until they hold at least `batch_size` samples or the queue is empty. Each group's sample count
    is the length of its tensor at position `rows`. Returns (groups, samples taken)."""
    parts, n = [], 0
    while queue and n < batch_size:
        parts.append(queue.pop(0))
        n += int(parts[-1][rows].shape[0])
    return parts, n


def write_exits(
    out: torch.Tensor,
    exit_index: torch.Tensor,
    idx: torch.Tensor,
    logits: torch.Tensor,
    stop: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """The rows of an active batch that stop at exit k (`stop` (b,) bool) write their logits and k
    to their input positions `idx` in `out` (N, C) and `exit_index` (N,); returns the (b',) indices
    of the rows that go on, to compact the batch with."""
    gone, keep = stop.nonzero().squeeze(1), (~stop).nonzero().squeeze(1)
    if gone.numel():
        out.index_copy_(0, idx[gone], logits.index_select(0, gone))
        exit_index.index_fill_(0, idx[gone], k)
    return keep


def check_batch_size(batch_size: object) -> int:
    """A batch size (an int >= 1, not a bool), or ValueError naming what was given."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    return batch_size
