"""Export of dynamic models that stay dynamic: one graph per stage block and exit head (ONNX or
torch.export) run by a small runtime that applies the policy between them, and a whole-graph
torch.export with torch.cond where that works."""

from dynets.export.runtime import NumpyPolicy, StagedRuntime
from dynets.export.staged import export_model_dir, export_staged
from dynets.export.whole_graph import WholeGraphEarlyExit, export_whole_graph, score_thresholds

__all__ = [
    "NumpyPolicy",
    "StagedRuntime",
    "WholeGraphEarlyExit",
    "export_model_dir",
    "export_staged",
    "export_whole_graph",
    "score_thresholds",
]
