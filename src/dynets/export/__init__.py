"""Export of dynamic models that stay dynamic: one graph per stage block and exit head (ONNX or
torch.export) run by a small runtime that applies the policy between them, and a whole-graph
torch.export with torch.cond where that works; block skipping, routing, dynamic-parameter,
mixture-of-experts, token-halting and recurrent models are cut at their decisions the same way
(`export_model` picks the exporter, `load_runtime` the runtime)."""

from dynets.export.families import export_model
from dynets.export.runtime import (
    ACTRuntime,
    FrameSkipRuntime,
    GlanceRuntime,
    HaltingViTRuntime,
    MoERuntime,
    NumpyPolicy,
    RouteRuntime,
    SingleRuntime,
    SkipRNNRuntime,
    SkipRuntime,
    StagedRuntime,
    TextRuntime,
    WidthRuntime,
    load_runtime,
)
from dynets.export.staged import export_model_dir, export_staged
from dynets.export.whole_graph import WholeGraphEarlyExit, export_whole_graph, score_thresholds

__all__ = [
    "ACTRuntime",
    "FrameSkipRuntime",
    "GlanceRuntime",
    "HaltingViTRuntime",
    "MoERuntime",
    "NumpyPolicy",
    "RouteRuntime",
    "SingleRuntime",
    "SkipRNNRuntime",
    "SkipRuntime",
    "StagedRuntime",
    "TextRuntime",
    "WidthRuntime",
    "WholeGraphEarlyExit",
    "export_model",
    "export_model_dir",
    "export_staged",
    "export_whole_graph",
    "load_runtime",
    "score_thresholds",
]
