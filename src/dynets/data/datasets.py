"""Image classification datasets as in-memory tensors: ``load_dataset(spec, split)`` -> ``ArrayDataset``.

Specs: ``digits`` (scikit-learn's bundled 8x8 digits), ``mnist`` and ``cifar10`` (read from the shared
data root, see ``paths.data_root``), ``npz:PATH`` (a user's arrays) and ``folder:PATH`` (a user's image
folder). Sequence specs give a ``SequenceDataset`` (x: (N, T, F)): ``ucr:NAME`` (a set of the UCR
time-series archive, see ``ucr.py``) and ``fsdd`` / ``fsdd:mfcc`` / ``fsdd:logmel`` (spoken digits as
feature frames, see ``audio.py``).

Every source yields ``train``/``val``/``test`` splits that are deterministic (seed 0), so results are
comparable across runs and machines; ``val`` is the held-out set for calibrating policies to a budget.
Carved splits keep their seed-0 permutation order and official test sets their source order (class-sorted
sources interleaved by class), so ``limit=n`` always yields a class-mixed prefix.

The datasets here are small enough to sit in memory as one float tensor, which makes batching a slice
rather than a worker pool: simpler, and faster on a CPU than a ``DataLoader`` with per-sample decoding.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import readers
from .paths import data_root

__all__ = ["DATASET_STATS", "SPLITS", "ArrayDataset", "SequenceDataset", "list_datasets", "load_dataset"]

SPLITS = ("train", "val", "test")

# Per-channel (mean, std) of each named dataset's train split as load_dataset returns it (values in [0, 1]).
# CIFAR-10 differs slightly from the usual figures because the shared copy is JPEG (quality 75).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3050,), (0.3759,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4916, 0.4825, 0.4472), (0.2454, 0.2429, 0.2608)),
}

_VAL_HOLDOUT = 5000  # mnist / cifar10: samples held out of the official train set for "val"


@dataclass(eq=False, repr=False)
class ArrayDataset(Dataset):
    """A labelled image set held as tensors: ``x`` (N, C, H, W) float32 in [0, 1], ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    name: str
    split: str = ""

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        for arg, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{arg} must be a torch.Tensor; got {type(t).__name__}")
        if x.ndim != 4:
            raise ValueError(f"x must have 4 dims (N, C, H, W); got shape {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise ValueError(f"x must be float32; got {x.dtype}")
        if y.ndim != 1 or y.dtype != torch.int64:
            raise ValueError(f"y must be (N,) int64; got shape {tuple(y.shape)} {y.dtype}")
        if len(x) != len(y):
            raise ValueError(
                f"x and y must have the same length; got x: {len(x)} samples, y: {len(y)} labels"
            )
        if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():  # the sum is a fast first check
            raise ValueError(f"x must be finite; got {int((~torch.isfinite(x)).sum())} NaN or inf values")
        self.classes = [str(c) for c in self.classes]
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
            raise ValueError(
                f"y must hold class indices in [0, {len(self.classes)}) for {len(self.classes)} classes; "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one sample, (C, H, W)."""
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices_or_n: int | Sequence[int] | np.ndarray | torch.Tensor) -> ArrayDataset:
        """The first ``n`` samples (an int; all if fewer), or the samples at the given indices, in order."""
        if isinstance(indices_or_n, (int, np.integer)) and not isinstance(indices_or_n, bool):
            if indices_or_n < 0:
                raise ValueError(f"subset size must be >= 0; got {indices_or_n}")
            idx = torch.arange(min(int(indices_or_n), len(self)))
        else:
            idx = torch.as_tensor(np.asarray(indices_or_n), dtype=torch.int64).reshape(-1)
            if len(idx) and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
                raise ValueError(
                    f"subset indices must lie in [0, {len(self)}); got [{int(idx.min())}, {int(idx.max())}]"
                )
        return ArrayDataset(self.x[idx], self.y[idx], list(self.classes), self.name, self.split)


@dataclass(eq=False, repr=False)
class SequenceDataset(Dataset):
    """A labelled set of sequences padded to one length: ``x`` (N, T, F) float32, ``y`` (N,) int64.

    ``lengths`` (N,) int64 holds each sample's number of valid steps (the rest is padding), or None
    when every sample fills all T steps. ``info`` carries loader facts worth keeping (feature settings,
    normalisation statistics, the split rule).
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    name: str
    split: str = ""
    lengths: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        x, y, lengths = self.x, self.y, self.lengths
        for arg, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{arg} must be a torch.Tensor; got {type(t).__name__}")
        if x.ndim != 3 or x.dtype != torch.float32:
            raise ValueError(f"x must be (N, T, F) float32; got shape {tuple(x.shape)} {x.dtype}")
        if x.shape[1] < 1:
            raise ValueError(f"x must hold sequences of at least one step; got T = {x.shape[1]}")
        if y.ndim != 1 or y.dtype != torch.int64 or len(y) != len(x):
            raise ValueError(
                f"y must be (N,) int64 with N = {len(x)} (as x); got shape {tuple(y.shape)} {y.dtype}"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"x must be finite; got {int((~torch.isfinite(x)).sum())} NaN or inf values")
        if lengths is not None:
            ok = isinstance(lengths, torch.Tensor) and lengths.dtype == torch.int64
            if not ok or lengths.shape != (len(x),):
                got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
                raise ValueError(f"lengths must be None or (N,) = ({len(x)},) int64; got {got}")
            if len(lengths) and (int(lengths.min()) < 1 or int(lengths.max()) > x.shape[1]):
                raise ValueError(
                    f"lengths must lie in [1, T = {x.shape[1]}]; "
                    f"got [{int(lengths.min())}, {int(lengths.max())}]"
                )
        self.classes = [str(c) for c in self.classes]
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
            raise ValueError(
                f"y must hold class indices in [0, {len(self.classes)}); "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __repr__(self) -> str:
        return (
            f"SequenceDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )

    @property
    def input_shape(self) -> tuple[int, int]:
        """Shape of one sample, (T, F)."""
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices_or_n: int | Sequence[int] | np.ndarray | torch.Tensor) -> SequenceDataset:
        """The first ``n`` samples (an int; all if fewer), or the samples at the given indices, in order."""
        if isinstance(indices_or_n, (int, np.integer)) and not isinstance(indices_or_n, bool):
            if indices_or_n < 0:
                raise ValueError(f"subset size must be >= 0; got {indices_or_n}")
            idx = torch.arange(min(int(indices_or_n), len(self)))
        else:
            idx = torch.as_tensor(np.asarray(indices_or_n), dtype=torch.int64).reshape(-1)
            if len(idx) and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
                raise ValueError(
                    f"subset indices must lie in [0, {len(self)}); got [{int(idx.min())}, {int(idx.max())}]"
                )
        lengths = None if self.lengths is None else self.lengths[idx]
        return SequenceDataset(
            self.x[idx], self.y[idx], list(self.classes), self.name, self.split, lengths, dict(self.info)
        )


def list_datasets() -> list[str]:
    """Names of the built-in datasets (``npz:PATH`` and ``folder:PATH`` load a user's own data)."""
    return sorted(_NAMED)


def load_dataset(
    spec: str, split: str = "train", *, root: str | Path | None = None, limit: int | None = None
) -> ArrayDataset | SequenceDataset:
    """Load one split of a dataset named by ``spec``; see the module docstring for the spec grammar.

    ``root`` replaces the shared data root for named datasets and is the base of relative paths in
    ``npz:``/``folder:`` specs. ``limit`` keeps the first ``limit`` samples of the split, for quick runs.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None; got {limit!r}")
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str; got {type(spec).__name__}")
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.lower()
    if kind in _SEQUENCE_LOADERS:  # "ucr:NAME", "fsdd[:FEATURES]"
        return _SEQUENCE_LOADERS[kind](arg.strip(), split, None if root is None else Path(root), limit)
    if sep and kind in _PATH_LOADERS:
        if not arg.strip():
            raise ValueError(f"spec {spec!r} needs a path: expected '{kind}:PATH'")
        path = Path(arg.strip()).expanduser()
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        return _PATH_LOADERS[kind](path, split, limit)
    if not sep and kind in _NAMED:
        return _NAMED[kind](split, None if root is None else Path(root), limit)
    known = [*list_datasets(), *(f"{k}:PATH" for k in _PATH_LOADERS), *_SEQUENCE_SPECS]
    raise ValueError(f"unknown dataset spec {spec!r}; expected one of {', '.join(map(repr, known))}")


# ----------------------------------------------------------------------------------------- helpers


def _split_indices(n: int, n_val: int, n_test: int) -> dict[str, np.ndarray]:
    """Deterministic (seed 0) disjoint index sets: test first, then val, then the rest is train."""
    perm = np.random.default_rng(0).permutation(n)
    return {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}


def _make(
    x: np.ndarray,
    y: np.ndarray,
    idx: np.ndarray | None,
    limit: int | None,
    classes: Sequence[str],
    name: str,
    split: str,
) -> ArrayDataset:
    """Select ``idx`` (then the first ``limit``) from channels-last ``x`` and build the float tensors."""
    if idx is None:
        idx = np.arange(len(y))
    if limit is not None:
        idx = idx[:limit]
    xs = torch.from_numpy(np.ascontiguousarray(x[idx])).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    xs = xs.to(torch.float32).div_(255) if xs.dtype == torch.uint8 else xs.to(torch.float32)
    return ArrayDataset(xs, torch.from_numpy(np.asarray(y[idx], dtype=np.int64)), list(classes), name, split)


def _shared_file(rel: str, root: Path | None) -> Path:
    """``<data root>/data/<rel>`` (or ``<root>/<rel>``), else FileNotFoundError naming it and DYNETS_DATA."""
    base = root if root is not None else data_root()
    for candidate in (base / "data" / rel, base / rel):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{base / 'data' / rel} not found; set DYNETS_DATA (or pass root=) to the folder that holds "
        f"data/{rel}"
    )


# ----------------------------------------------------------------------------------------- sources


def _load_digits(split: str, root: Path | None, limit: int | None) -> ArrayDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]  # (N, 8, 8, 1), 0..16 -> [0, 1]
    y = bunch.target.astype(np.int64)
    rest, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    train, val = train_test_split(rest, test_size=0.2, random_state=0, stratify=y[rest])
    idx = {"train": train, "val": val, "test": test}[split]
    return _make(x, y, idx, limit, [str(i) for i in range(10)], "digits", split)


def _load_mnist(split: str, root: Path | None, limit: int | None) -> ArrayDataset:
    folder = _shared_file("mnist", root)
    prefix, n = ("t10k", 10_000) if split == "test" else ("train", 60_000)

    def idx_file(stem: str) -> Path:
        for p in (folder / f"{stem}.gz", folder / stem):
            if p.is_file():
                return p
        raise FileNotFoundError(
            f"{folder / stem}.gz not found; set DYNETS_DATA to the folder that holds data/mnist"
        )

    x = readers.read_idx(idx_file(f"{prefix}-images-idx3-ubyte"), magic=readers.IDX_IMAGES, shape=(n, 28, 28))
    y = readers.read_idx(idx_file(f"{prefix}-labels-idx1-ubyte"), magic=readers.IDX_LABELS, shape=(n,))
    idx = None if split == "test" else _split_indices(n, _VAL_HOLDOUT, 0)[split]
    return _make(x[..., None], y, idx, limit, [str(i) for i in range(10)], "mnist", split)


def _load_cifar10(split: str, root: Path | None, limit: int | None) -> ArrayDataset:
    arrays = readers.cached_image_tar(_shared_file("cifar10-jpg.tar.xz", root), "cifar10")
    official = "test" if split == "test" else "train"
    x, y = arrays[f"x_{official}"], arrays[f"y_{official}"]
    idx = None if split == "test" else _split_indices(len(y), _VAL_HOLDOUT, 0)[split]
    return _make(x, y, idx, limit, arrays["classes"].tolist(), "cifar10", split)


def _load_folder(path: Path, split: str, limit: int | None) -> ArrayDataset:
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path} (expected {path}/<class>/*.png)")
    by_split, classes = readers.read_image_folder(path)
    x, y, idx = _carve(by_split, split)
    return _make(x, y, idx, limit, classes, f"folder:{path}", split)


def _carve(
    by_split: dict[str, tuple[np.ndarray, np.ndarray]], split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pick ``split`` from ``{"all"}`` (70/10/20) or ``{"train", "test"[, "val"]}`` (val: 10% of train)."""
    if "all" in by_split:
        x, y = by_split["all"]
        n = len(y)
        return x, y, _split_indices(n, round(0.1 * n), round(0.2 * n))[split]
    if split == "test" or "val" in by_split:
        x, y = by_split[split]
        return x, y, None
    x, y = by_split["train"]
    return x, y, _split_indices(len(y), round(0.1 * len(y)), 0)[split]


def _load_npz(path: Path, split: str, limit: int | None) -> ArrayDataset:
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle, which we refuse for safety
        raise ValueError(
            f"{path}: cannot load without pickle ({e}); store labels as ints or fixed-width "
            "strings (np.array(labels, dtype=str))"
        ) from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e
    keys = set(arrays)
    if {"x", "y"} <= keys:
        pairs = {"all": ("x", "y")}
    elif {"x_train", "y_train", "x_test", "y_test"} <= keys:
        if ("x_val" in keys) != ("y_val" in keys):
            raise ValueError(
                f"{path}: expected x_val and y_val together; found only "
                f"{'x_val' if 'x_val' in keys else 'y_val'}"
            )
        pairs = {s: (f"x_{s}", f"y_{s}") for s in SPLITS if f"x_{s}" in keys}
    else:
        raise ValueError(
            f"{path}: expected keys x, y or x_train, y_train, x_test, y_test (+ optional x_val, "
            f"y_val); found {sorted(keys)}"
        )
    xs = {s: _channels_last(arrays[xk], xk) for s, (xk, _) in pairs.items()}
    ys = {s: _labels_1d(arrays[yk], yk) for s, (_, yk) in pairs.items()}
    first = next(iter(pairs.values()))[0]
    for s, (xk, yk) in pairs.items():
        if len(xs[s]) != len(ys[s]):
            raise ValueError(
                f"{xk} and {yk} must have the same length; got {len(xs[s])} images, {len(ys[s])} labels"
            )
        if xs[s].shape[1:] != xs[next(iter(xs))].shape[1:]:
            raise ValueError(
                f"{xk} must have the sample shape of {first} (H, W, C) = "
                f"{xs[next(iter(xs))].shape[1:]}; got {xs[s].shape[1:]}"
            )
    classes, ys = _encode_labels(ys, arrays.get("classes"), {s: yk for s, (_, yk) in pairs.items()})
    x, y, idx = _carve({s: (xs[s], ys[s]) for s in pairs}, split)
    return _make(x, y, idx, limit, classes, f"npz:{path}", split)


def _channels_last(x: np.ndarray, arg: str) -> np.ndarray:
    """View ``x`` as (N, H, W, C): accepts (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}.

    A 4-d array whose axes 1 and 3 both could be channels is read as (N, C, H, W), PyTorch's layout.
    """
    if x.dtype == np.bool_:
        x = x.astype(np.float32)
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise ValueError(f"{arg} must be uint8 (0..255) or floating point; got dtype {x.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError(f"{arg} must be finite; got {int((~np.isfinite(x)).sum())} NaN or inf values")
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x.transpose(0, 2, 3, 1)
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return x
    raise ValueError(
        f"{arg} must have shape (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {{1, 3}}; "
        f"got shape {x.shape}"
    )


def _labels_1d(y: np.ndarray, arg: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # (N, 1) column, as Keras-style datasets store labels
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{arg} must have shape (N,); got shape {y.shape}")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise ValueError(f"{arg} must hold integer or string labels; got non-integer floats")
    if y.dtype.kind not in "biufSU":
        raise ValueError(f"{arg} must hold integer or string labels; got dtype {y.dtype}")
    return y.astype(str) if y.dtype.kind == "S" else y


def _encode_labels(
    ys: dict[str, np.ndarray], names: np.ndarray | None, keys: dict[str, str]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Class names and int64 label indices: strings map to sorted names, ints are kept as indices."""
    kinds = {y.dtype.kind == "U" for y in ys.values()}
    if len(kinds) > 1:
        raise ValueError(
            f"labels must be all strings or all integers; got a mix across {', '.join(keys.values())}"
        )
    given = None if names is None else [str(c) for c in np.asarray(names).reshape(-1).tolist()]
    if kinds == {True}:
        classes = given or sorted({str(v) for y in ys.values() for v in y.tolist()})
        lookup = {c: i for i, c in enumerate(classes)}
        for s, y in ys.items():
            unknown = sorted(set(y.tolist()) - set(lookup))
            if unknown:
                raise ValueError(f"{keys[s]} holds labels missing from classes {classes}: {unknown[:5]}")
        return classes, {s: np.array([lookup[v] for v in y.tolist()], dtype=np.int64) for s, y in ys.items()}
    out = {s: y.astype(np.int64) for s, y in ys.items()}
    for s, y in out.items():
        if len(y) and int(y.min()) < 0:
            raise ValueError(f"{keys[s]} must hold class indices >= 0; got {int(y.min())}")
    hi = max((int(y.max()) for y in out.values() if len(y)), default=-1)
    if given is not None and hi >= len(given):
        raise ValueError(f"labels must be < len(classes) = {len(given)}; got label {hi}")
    return given or [str(i) for i in range(hi + 1)], out


def _load_ucr(name: str, split: str, root: Path | None, limit: int | None) -> SequenceDataset:
    from .ucr import UCR_ARCHIVE, load_ucr

    if not name:
        raise ValueError("spec 'ucr' needs a data set name: expected 'ucr:NAME', e.g. 'ucr:ECG200'")
    return load_ucr(_shared_file(UCR_ARCHIVE, root), name, split, limit=limit)


def _load_fsdd(features: str, split: str, root: Path | None, limit: int | None) -> SequenceDataset:
    from .audio import FSDD_ARCHIVE, load_fsdd

    return load_fsdd(_shared_file(FSDD_ARCHIVE, root), split, features=features or "mfcc", limit=limit)


_NAMED = {"cifar10": _load_cifar10, "digits": _load_digits, "mnist": _load_mnist}
# Sequence sets are kept apart from _NAMED: list_datasets() and DATASET_STATS describe image sets.
_SEQUENCE_LOADERS = {"ucr": _load_ucr, "fsdd": _load_fsdd}
_SEQUENCE_SPECS = ("ucr:NAME", "fsdd[:mfcc|logmel]")
_PATH_LOADERS = {"npz": _load_npz, "folder": _load_folder}
