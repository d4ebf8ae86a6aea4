"""Optional dependencies: import them on use, and fail with the pip command that installs them.

The server needs the `serve` extra (fastapi, uvicorn, httpx for the load generator) and export to
ONNX the `export` extra (onnx, onnxruntime); `import dynets` never needs either.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS: dict[str, str] = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "httpx": "serve",
    "onnx": "export",
    "onnxruntime": "export",
}


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message says which extra provides it."""


def require(module: str, what: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming `what` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module.split(".")[0])
        hint = f"pip install 'dynets[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise MissingDependencyError(
            f"{what} needs the optional package {module!r} ({e}); install it with: {hint}"
        ) from e


def available(module: str) -> bool:
    """True when `module` can be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
