"""Temporal-wise dynamic networks: skip-update recurrent cells, adaptive computation time, frame
skipping. Import the submodules directly."""
