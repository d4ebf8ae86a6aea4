"""Training: multi-exit losses and a deterministic, resumable, optionally distributed loop."""

from dynets.train.distributed import DistInfo, distributed_context, unwrap
from dynets.train.loop import (
    TrainConfig,
    TrainResult,
    load_checkpoint,
    random_crop_flip,
    save_checkpoint,
    train,
)
from dynets.train.losses import EXIT_WEIGHT_SCHEMES, exit_weights, multi_exit_loss

__all__ = [
    "EXIT_WEIGHT_SCHEMES",
    "DistInfo",
    "TrainConfig",
    "TrainResult",
    "distributed_context",
    "exit_weights",
    "load_checkpoint",
    "multi_exit_loss",
    "random_crop_flip",
    "save_checkpoint",
    "train",
    "unwrap",
]
