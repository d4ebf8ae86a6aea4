"""Small helpers that let one `train(...)` call run unchanged in 1 process or N (torchrun, gloo).

Everything here is a no-op when WORLD_SIZE is unset or 1, so the training loop never branches on
"am I distributed?" beyond asking `DistInfo`. Data parallelism is plain DDP: every rank sees the
same global batch split `[rank::world]`, gradients are averaged, so N ranks with per-rank batch
B / N step exactly like one process with batch B (up to float summation order).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "distributed_context",
    "gather_rng_states",
    "launched_distributed",
    "restore_rng_state",
    "shard",
    "unwrap",
    "wrap_model",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank in [0, world_size)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 owns progress bars, logs and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_distributed() -> bool:
    """True when a launcher such as torchrun started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@contextmanager
def distributed_context(backend: str = "gloo") -> Iterator[DistInfo]:
    """Yield this process's `DistInfo`, initialising the process group if needed.

    A group that already exists (set up by the caller) is used and left alone; one created here is
    destroyed on exit, so a script can call `train` and then exit cleanly.
    """
    created = False
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size())
    elif launched_distributed():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
        _init_process_group(backend)
        created = True
        info = DistInfo(dist.get_rank(), dist.get_world_size())
    else:
        info = DistInfo()
    try:
        yield info
    finally:
        if created:
            dist.destroy_process_group()


_N_GROUPS = 0  # process groups this process has created, for fresh store keys on each one


def _init_process_group(backend: str) -> None:
    """init_process_group from the torchrun env, under a store prefix unique to this init.

    A second plain init after destroy_process_group (say, a script that calls `train` twice) reuses
    the store keys of the first group and hangs; a fresh prefix per init avoids that.
    """
    global _N_GROUPS
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"dynets/{_N_GROUPS}", store)
    _N_GROUPS += 1
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (e.g. while rank 0 writes a checkpoint)."""
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `t` over ranks in place and return it (identity in one process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, indexed by rank (picklable objects, e.g. RNG states or counts)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_rng_states(info: DistInfo) -> list[dict]:
    """Every rank's global RNG state (CPU, and CUDA if present), indexed by rank, for a checkpoint."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return all_gather_objects({"cpu": torch.get_rng_state(), "cuda": cuda}, info)


def restore_rng_state(states: list[dict], info: DistInfo, seed: int) -> None:
    """Put back this rank's RNG state; with a different world size there is no exact match, so reseed."""
    if len(states) != info.world_size:
        warnings.warn(
            f"checkpoint holds RNG states for {len(states)} ranks, this run has {info.world_size}; "
            "reseeding (dropout masks will differ from an uninterrupted run)",
            stacklevel=3,
        )
        torch.manual_seed(seed + 7919 * len(states) + info.rank)
        return
    torch.set_rng_state(states[info.rank]["cpu"])
    if states[info.rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states[info.rank]["cuda"])


def shard(indices: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's strided share `indices[rank::world]`, after trimming to a multiple of world_size.

    The trim keeps every rank's share the same length, so all ranks take the same number of steps
    (an uneven count would deadlock DDP) and every global batch splits evenly.
    """
    n = indices.shape[0] - indices.shape[0] % info.world_size
    return indices[:n][info.rank :: info.world_size]


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP-wrap `model` when distributed; otherwise return it as is.

    DDP only hooks parameters with requires_grad=True, so frozen parts stay frozen and are not
    all-reduced. find_unused_parameters stays off: every trainable parameter of a multi-exit model
    is used in its training forward, and the check would cost a graph walk per step.
    """
    if not info.enabled:
        return model
    device_ids = None
    params = list(model.parameters())
    if params and params[0].device.type == "cuda":
        device_ids = [params[0].device.index]
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
