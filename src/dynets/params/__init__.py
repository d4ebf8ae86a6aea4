"""Dynamic parameters: conditional (per-sample mixture) convolution and hypernetwork layers.
Import the submodules directly."""
