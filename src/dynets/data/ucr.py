"""UCR time-series archive (2018 format): ``load_dataset("ucr:ECG200", split)`` -> ``SequenceDataset``.

Each set is a pair ``<Name>_TRAIN.tsv`` / ``<Name>_TEST.tsv``: one series per row, the class label in
the first column, then the values (tab-separated). Variable-length sets pad the end of a row with NaN;
those trailing NaNs become zero padding and ``lengths`` records the valid steps. A NaN inside a series
(a missing value) is an error rather than a silent fill.

Splits: ``test`` is the archive's test file (rows interleaved by class so a ``limit`` prefix mixes
classes); ``train`` / ``val`` split the archive's training file with a seed-0 permutation, ``VAL_FRACTION``
of it (at least one row) held out for calibration. Values are kept as the archive gives them: most
sets are z-normalised per series there (ECG200, ECG5000, FordA, ElectricDevices), Crop is not (values
around 0.45 +- 0.2). x is (N, T, 1): one feature per step.

Parsing the xz archive takes seconds, so each set's arrays are cached once under ``cache_dir()``
(keyed by the archive's path, size and mtime, written atomically).
"""

from __future__ import annotations

import io
import lzma
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from . import readers
from .datasets import SequenceDataset

__all__ = ["UCR_ARCHIVE", "VAL_FRACTION", "list_ucr", "load_ucr", "parse_ucr_tsv", "read_ucr"]

UCR_ARCHIVE = "ucr-subset.tar.xz"
VAL_FRACTION = 0.2
_SPLIT_FILES = {"train": "_TRAIN.tsv", "test": "_TEST.tsv"}


def parse_ucr_tsv(text: str, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse one UCR .tsv: labels (N,) float64, series (N, T) float32 (zero-padded), lengths (N,) int64."""
    if not text.strip():
        raise ValueError(f"{what}: expected rows of '<label>\\t<values...>', found an empty file")
    try:
        arr = np.loadtxt(io.StringIO(text), delimiter="\t", dtype=np.float64, ndmin=2)  # (N, 1 + T)
    except ValueError as e:
        raise ValueError(f"{what}: expected rows of tab-separated numbers of equal width ({e})") from e
    if arr.shape[1] < 2:
        raise ValueError(f"{what}: expected a label and at least one value per row, found only a label")
    labels, values = arr[:, 0], arr[:, 1:]
    if not np.isfinite(labels).all():
        raise ValueError(f"{what}: expected a numeric label in the first column of every row")
    valid = np.isfinite(values)
    lengths = valid.sum(1).astype(np.int64)
    prefix = np.arange(values.shape[1])[None, :] < lengths[:, None]  # valid steps must be a prefix
    bad = np.flatnonzero((prefix != valid).any(1) | (lengths == 0))
    if len(bad):
        raise ValueError(
            f"{what}: row {int(bad[0]) + 1} has missing values inside the series (or none at all); "
            "expected finite values with NaN only as trailing padding"
        )
    return labels, np.where(valid, values, 0.0).astype(np.float32), lengths


def _open(archive: Path) -> tarfile.TarFile:
    if not archive.is_file():
        raise FileNotFoundError(f"UCR archive not found: {archive}")
    return tarfile.open(archive, "r:xz")


def list_ucr(archive: Path) -> list[str]:
    """Names of the sets in ``archive`` that have both a _TRAIN.tsv and a _TEST.tsv file."""
    try:
        with _open(archive) as tf:
            names = [Path(m.name).name for m in tf if m.isfile()]
    except (tarfile.TarError, lzma.LZMAError, EOFError, zlib.error) as e:
        raise ValueError(f"{archive}: truncated or corrupt tar.xz archive ({e})") from e
    train = {n[: -len("_TRAIN.tsv")] for n in names if n.endswith("_TRAIN.tsv")}
    test = {n[: -len("_TEST.tsv")] for n in names if n.endswith("_TEST.tsv")}
    return sorted(train & test)


def _decode(archive: Path, name: str) -> dict[str, np.ndarray]:
    texts: dict[str, str] = {}
    try:
        with _open(archive) as tf:
            for member in tf:
                base = Path(member.name).name
                for split, suffix in _SPLIT_FILES.items():
                    if member.isfile() and base.lower() == f"{name}{suffix}".lower():
                        texts[split] = tf.extractfile(member).read().decode()
    except (tarfile.TarError, lzma.LZMAError, EOFError, zlib.error) as e:
        raise ValueError(f"{archive}: truncated or corrupt tar.xz archive ({e})") from e
    if len(texts) < 2:
        known = list_ucr(archive)
        raise ValueError(f"UCR set {name!r} not found in {archive}; expected one of {known}")
    parsed = {s: parse_ucr_tsv(t, f"{archive}:{name}{_SPLIT_FILES[s]}") for s, t in texts.items()}
    t_max = max(p[1].shape[1] for p in parsed.values())
    out: dict[str, np.ndarray] = {}
    for s, (labels, values, lengths) in parsed.items():
        out[f"labels_{s}"] = labels
        out[f"x_{s}"] = np.pad(values, ((0, 0), (0, t_max - values.shape[1])))
        out[f"lengths_{s}"] = lengths
    return out


def read_ucr(archive: Path, name: str) -> dict[str, np.ndarray]:
    """Raw arrays of one set (labels_*, x_*, lengths_* for train and test), from the cache if current."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(
            f"UCR archive not found: {archive}; set DYNETS_DATA to the folder that holds data/{UCR_ARCHIVE}"
        )
    key = readers._source_key(archive) + f"|{name.lower()}"
    path = readers.cache_path(archive, f"ucr-{name.lower()}")
    arrays = readers._read_cache(path, key)
    if arrays is None:
        arrays = _decode(archive, name)
        try:
            readers.atomic_savez(path, {**arrays, "key": np.array(key)})
        except OSError as e:  # a read-only cache folder costs speed, not correctness
            warnings.warn(f"could not write cache {path}: {e}", RuntimeWarning, stacklevel=2)
    return arrays


def _class_names(labels: np.ndarray) -> list[str]:
    values = sorted(set(labels.tolist()))
    return [str(int(v)) if float(v).is_integer() else str(v) for v in values]


def load_ucr(archive: Path, name: str, split: str, *, limit: int | None = None) -> SequenceDataset:
    """One split of UCR set ``name`` as a SequenceDataset: x (N, T, 1) float32, y (N,) int64, lengths."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be one of 'train', 'val', 'test'; got {split!r}")
    arrays = read_ucr(Path(archive), name)
    all_labels = np.concatenate([arrays["labels_train"], arrays["labels_test"]])
    classes = _class_names(all_labels)
    lookup = {v: i for i, v in enumerate(sorted(set(all_labels.tolist())))}
    official = "test" if split == "test" else "train"
    labels = arrays[f"labels_{official}"]
    y = np.array([lookup[v] for v in labels.tolist()], dtype=np.int64)
    if split == "test":
        idx = readers.interleave_classes(y)
    else:
        n = len(y)
        n_val = max(1, round(VAL_FRACTION * n)) if n > 1 else 0
        perm = np.random.default_rng(0).permutation(n)
        idx = perm[:n_val] if split == "val" else perm[n_val:]
    if limit is not None:
        idx = idx[:limit]
    x = torch.from_numpy(np.ascontiguousarray(arrays[f"x_{official}"][idx], dtype=np.float32))[..., None]
    lengths = torch.from_numpy(arrays[f"lengths_{official}"][idx].astype(np.int64))
    info = {"source": "UCR 2018", "set": name, "val_fraction": VAL_FRACTION}
    return SequenceDataset(x, torch.from_numpy(y[idx]), classes, f"ucr:{name}", split, lengths, info)
