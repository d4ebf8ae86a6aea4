"""Training: multi-exit losses, discrete-decision estimators and budget losses, and a deterministic,
resumable, optionally distributed loop."""

from dynets.train.distributed import DistInfo, distributed_context, unwrap
from dynets.train.estimators import (
    BUDGET_KINDS,
    ScoreFunctionEstimator,
    budget_loss,
    gumbel_softmax,
    sample_gumbel,
    straight_through_bernoulli,
    straight_through_threshold,
)
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
    "BUDGET_KINDS",
    "EXIT_WEIGHT_SCHEMES",
    "DistInfo",
    "ScoreFunctionEstimator",
    "TrainConfig",
    "TrainResult",
    "budget_loss",
    "distributed_context",
    "exit_weights",
    "gumbel_softmax",
    "load_checkpoint",
    "multi_exit_loss",
    "random_crop_flip",
    "sample_gumbel",
    "save_checkpoint",
    "straight_through_bernoulli",
    "straight_through_threshold",
    "train",
    "unwrap",
]
