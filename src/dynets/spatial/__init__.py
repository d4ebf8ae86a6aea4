"""Spatial-wise dynamic networks: token pruning, halting and merging for vision transformers, and
glance-and-focus for CNNs. Import the submodules directly."""
