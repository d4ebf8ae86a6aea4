"""Dynamic depth: early-exit networks over stages, exit heads, learned exits."""

from dynets.depth.early_exit import EarlyExitNetwork, ExitPredictor, index_select_tree

__all__ = ["EarlyExitNetwork", "ExitPredictor", "index_select_tree"]
