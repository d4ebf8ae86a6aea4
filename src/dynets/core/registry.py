"""A timm-style model registry: builder functions registered by name.

`create_model(name, **kw)` builds a model; `list_models(pattern)` lists names (fnmatch pattern).
Builders accept keyword-only overrides of their config's fields.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a builder under its function name."""
    name = fn.__name__
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"model name {name!r} is already registered")
    _REGISTRY[name] = fn
    _DESCRIPTIONS[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
    return fn


def _ensure_zoo() -> None:
    import dynets.models  # noqa: F401  (registers the zoo on import)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching an fnmatch pattern, sorted."""
    _ensure_zoo()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def describe_model(name: str) -> str:
    _ensure_zoo()
    return _DESCRIPTIONS.get(name, "")


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model; unknown names fail with the list of known ones."""
    _ensure_zoo()
    if name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name}*")
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(f"unknown model name {name!r}; expected one of {sorted(_REGISTRY)}.{hint}")
    return _REGISTRY[name](**kwargs)
