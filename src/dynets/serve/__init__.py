"""Serving dynamic models: an HTTP server with dynamic batching, budgets and a latency-SLO controller.

The HTTP layer needs the `serve` extra (fastapi, uvicorn); the engine below it (adapter, ladder,
controller, batcher, metrics) does not, and importing this package imports neither.
"""

from dynets.serve.adapter import InputError, ServedModel, load_served_model
from dynets.serve.controller import ControllerConfig, SLOController
from dynets.serve.ladder import Ladder, OperatingPoint, PerSampleThresholdPolicy, build_ladder
from dynets.serve.launch import build_server, serve
from dynets.serve.server import InferenceServer, ServeConfig

__all__ = [
    "ControllerConfig",
    "InferenceServer",
    "InputError",
    "Ladder",
    "OperatingPoint",
    "PerSampleThresholdPolicy",
    "SLOController",
    "ServeConfig",
    "ServedModel",
    "build_ladder",
    "build_server",
    "load_served_model",
    "serve",
]
