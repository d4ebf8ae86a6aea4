"""dynets: dynamic neural networks that spend compute per input."""

__version__ = "0.1.0"
