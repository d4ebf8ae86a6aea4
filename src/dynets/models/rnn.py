"""Recurrent sequence classifiers (temporal-wise dynamic networks) for (B, T, F) inputs.

skip_lstm / skip_gru: Skip-RNN cells that learn to skip state updates (dynets.temporal.skip_rnn);
static_lstm / static_gru: the same cells updating at every step, the baseline (fused kernel);
act_rnn: adaptive computation time, a variable number of passes per step (dynets.temporal.act);
frameskip_rnn: a policy that skips frames, with optional early classification
(dynets.temporal.frame_skip).

Every builder takes keyword overrides of its config: input_size (features per step), num_classes,
hidden, layers, cell, seq_len (the reference length for input_shape and cost figures) and the
family's own knobs. Outputs: DynamicOutput in eval mode, MultiExitOutput (+ aux["loss"]) in training.
"""

from __future__ import annotations

from dynets.core.config import config_from_dict
from dynets.core.registry import register_model
from dynets.temporal.act import ACTRNN, ACTRNNConfig
from dynets.temporal.frame_skip import FrameSkipConfig, FrameSkipRNN
from dynets.temporal.skip_rnn import SkipRNN, SkipRNNConfig


def _config(cls: type, kw: dict, **defaults: object) -> object:
    cfg = kw.pop("config", None)
    if cfg is not None:
        return cfg
    return config_from_dict(cls, {**defaults, **kw})


@register_model
def skip_lstm(**kw: object) -> SkipRNN:
    """Skip-LSTM (Campos et al. 2018): a learned binary update gate; skipped steps cost nothing."""
    return SkipRNN(_config(SkipRNNConfig, kw, cell="lstm", skip=True))


@register_model
def skip_gru(**kw: object) -> SkipRNN:
    """Skip-GRU (Campos et al. 2018): a learned binary update gate; skipped steps cost nothing."""
    return SkipRNN(_config(SkipRNNConfig, kw, cell="gru", skip=True))


@register_model
def static_lstm(**kw: object) -> SkipRNN:
    """The Skip-LSTM's cell updating at every step (no gate, fused kernel): the static baseline."""
    return SkipRNN(_config(SkipRNNConfig, kw, cell="lstm", skip=False))


@register_model
def static_gru(**kw: object) -> SkipRNN:
    """The Skip-GRU's cell updating at every step (no gate, fused kernel): the static baseline."""
    return SkipRNN(_config(SkipRNNConfig, kw, cell="gru", skip=False))


@register_model
def act_rnn(**kw: object) -> ACTRNN:
    """Adaptive computation time RNN (Graves 2016): a variable number of cell passes per step."""
    return ACTRNN(_config(ACTRNNConfig, kw))


@register_model
def frameskip_rnn(**kw: object) -> FrameSkipRNN:
    """Frame-skipping RNN: after each read a policy skips 0..max_skip frames; optional early stop."""
    return FrameSkipRNN(_config(FrameSkipConfig, kw))
