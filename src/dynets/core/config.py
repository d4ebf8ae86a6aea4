"""Nested dataclass configs that round-trip through JSON.

`config_to_dict` turns a (nested) dataclass into plain JSON types; `config_from_dict` rebuilds it,
following the dataclass field types, and rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass (possibly nested) as a JSON-ready dict; tuples become lists."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"expected a dataclass config, got {type(cfg).__name__}")
    return dataclasses.asdict(cfg)


def _coerce(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return config_from_dict(tp, value)
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return config_from_dict(arg, value)
            if typing.get_origin(arg) is tuple and isinstance(value, list):
                return tuple(value)
    return value


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild dataclass `cls` from `data`; unknown keys fail with the list of valid ones."""
    if not isinstance(data, dict):
        raise TypeError(f"config for {cls.__name__}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"config for {cls.__name__}: unknown keys {unknown}; expected some of {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(hints[k], v) for k, v in data.items()})
