"""dynets: dynamic neural networks that spend compute per input, with real wall-clock savings."""

from dynets.core.outputs import DynamicOutput, MultiExitOutput
from dynets.core.registry import create_model, list_models, register_model
from dynets.core.serialization import load, save
from dynets.depth import EarlyExitNetwork
from dynets.policies import (
    ConfidencePolicy,
    EntropyPolicy,
    LearnedPolicy,
    NeverExitPolicy,
    PatiencePolicy,
    make_policy,
)
from dynets.policies.calibration import calibrate

__version__ = "0.1.0"

__all__ = [
    "ConfidencePolicy",
    "DynamicOutput",
    "EarlyExitNetwork",
    "EntropyPolicy",
    "LearnedPolicy",
    "MultiExitOutput",
    "NeverExitPolicy",
    "PatiencePolicy",
    "calibrate",
    "create_model",
    "list_models",
    "load",
    "make_policy",
    "register_model",
    "save",
]
