"""Temporal-wise dynamic networks: skip-update recurrent cells (Skip-RNN), adaptive computation time
(ACT), frame skipping with early classification. Plots live in `dynets.temporal.plots`."""

from dynets.temporal.act import ACTRNN, ACTRNNConfig
from dynets.temporal.frame_skip import FrameSkipConfig, FrameSkipRNN
from dynets.temporal.skip_rnn import SkipRNN, SkipRNNConfig, calibrate_update_threshold

__all__ = [
    "ACTRNN",
    "ACTRNNConfig",
    "FrameSkipConfig",
    "FrameSkipRNN",
    "SkipRNN",
    "SkipRNNConfig",
    "calibrate_update_threshold",
]
