"""Where dynets finds its read-only shared data and where it keeps decoded caches.

One setting decides the data root: the ``DYNETS_DATA`` environment variable. Without it, the
``shared`` folder beside the repository is used (the layout of a fresh clone next to ``../shared``),
then ``../shared`` relative to the working directory (an installed package run from a checkout).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "data_root"]

_REPO_ROOT = Path(__file__).resolve().parents[3]  # src/dynets/data/paths.py -> repository root


def _candidates() -> list[Path]:
    """The default data roots, in the order they are tried when DYNETS_DATA is unset."""
    return [(_REPO_ROOT / ".." / "shared").resolve(), (Path.cwd() / ".." / "shared").resolve()]


def data_root(required: bool = True) -> Path | None:
    """Return the folder holding the shared data (``DYNETS_DATA`` or a ``../shared`` default).

    With ``required=False`` a missing root gives ``None`` so callers can skip optional data; with
    ``required=True`` it raises ``FileNotFoundError`` naming ``DYNETS_DATA`` and every path tried.
    """
    env = os.environ.get("DYNETS_DATA", "").strip()
    if env:
        root = Path(env).expanduser()
        if root.is_dir():
            return root.resolve()
        if required:
            raise FileNotFoundError(
                f"DYNETS_DATA={env!r} is not a directory; set DYNETS_DATA to the folder that holds data/"
            )
        return None
    tried = _candidates()
    for root in tried:
        if root.is_dir():
            return root
    if required:
        raise FileNotFoundError(
            "no shared data folder found: set DYNETS_DATA to the folder that holds data/ "
            f"(tried {', '.join(str(p) for p in tried)})"
        )
    return None


def cache_dir() -> Path:
    """Return the folder for decoded-data caches (``DYNETS_CACHE`` or ``~/.cache/dynets``), creating it."""
    env = os.environ.get("DYNETS_CACHE", "").strip()
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "dynets"
    path.mkdir(parents=True, exist_ok=True)
    return path
