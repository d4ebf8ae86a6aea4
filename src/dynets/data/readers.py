"""File-format readers behind ``load_dataset``: idx (MNIST), a tar of JPEGs (CIFAR-10), image folders.

Readers return raw numpy arrays (uint8, channels last) and know nothing about splits; ``datasets.py``
turns them into tensors. Decoding a JPEG tar is slow (tens of seconds), so its result is cached once
as ``.npz`` under ``cache_dir()``: written to a temporary file and moved into place with ``os.replace``,
so a crash or a concurrent reader never sees a half-written cache.

Class-sorted sources (the tar, image folders) are returned interleaved by class (one sample of each
class in turn), so that the first ``n`` samples of any split are class-balanced and ``limit`` works.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import lzma
import os
import re
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .paths import cache_dir

IDX_LABELS, IDX_IMAGES = 2049, 2051  # idx magic numbers: unsigned bytes, 1 and 3 dims
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
_TAR_MEMBER = re.compile(r"^(train|test)/([^/]+)/([^/]+\.jpe?g)$", re.IGNORECASE)
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_CACHE_VERSION = "v1"


def read_idx(path: Path, *, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    """Read one (optionally gzipped) idx file of unsigned bytes and check its magic number and shape."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: truncated or corrupt gzip stream ({e})") from e
    if len(data) < 4:
        raise ValueError(f"{path}: expected an idx header of at least 4 bytes, found {len(data)} bytes")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: expected idx magic number {magic}, found {found}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: expected a {header}-byte idx header, found {len(data)} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if dims != tuple(shape):
        raise ValueError(f"{path}: expected shape {tuple(shape)}, found {dims}")
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        found_bytes = len(data) - header
        raise ValueError(f"{path}: expected {expected} data bytes for shape {dims}, found {found_bytes}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def interleave_classes(y: np.ndarray) -> np.ndarray:
    """Order that takes one sample of each class in turn (stable within a class): class-balanced prefixes."""
    rank = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        where = np.flatnonzero(y == c)
        rank[where] = np.arange(len(where))
    return np.lexsort((y, rank))


def _decode(data: bytes | Path, what: str, gray: bool | None = None) -> np.ndarray:
    """Decode one image to uint8 (H, W, C); C=1 for grayscale, 3 otherwise (or as ``gray`` forces)."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            if gray is None:
                gray = im.mode in _GRAY_MODES
            arr = np.asarray(im.convert("L" if gray else "RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{what}: cannot decode image ({e})") from e
    return arr[:, :, None] if arr.ndim == 2 else arr


def _check_sizes(images: list[np.ndarray], names: list[str]) -> None:
    """Require one image size; name the first image (in the given order) whose size differs."""
    ref = images[0].shape
    for im, name in zip(images, names, strict=True):
        if im.shape[:2] != ref[:2]:
            raise ValueError(
                f"all images must have the same size: expected {ref[1]}x{ref[0]} (as {names[0]}), "
                f"found {im.shape[1]}x{im.shape[0]} in {name}"
            )


def decode_image_tar(path: Path) -> dict[str, np.ndarray]:
    """Stream a ``.tar.xz`` of ``{train,test}/<class>/*.jpg`` and decode every JPEG in memory.

    Returns ``x_train``/``x_test`` (N, H, W, 3) uint8, ``y_train``/``y_test`` int64 and ``classes``
    (sorted names), samples interleaved by class after sorting members by name.
    """
    found: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:xz") as tf:
            for member in tf:
                match = _TAR_MEMBER.match(member.name.removeprefix("./"))
                if not member.isfile() or match is None:
                    continue
                split, cls, _ = match.groups()
                data = tf.extractfile(member).read()
                found[split].append((member.name, cls, _decode(data, f"{path}:{member.name}", gray=False)))
    except (tarfile.TarError, lzma.LZMAError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: truncated or corrupt tar.xz archive ({e})") from e
    classes = sorted({cls for items in found.values() for _, cls, _ in items})
    out: dict[str, np.ndarray] = {"classes": np.array(classes)}
    for split, items in found.items():
        if not items:
            raise ValueError(f"{path}: expected members {split}/<class>/*.jpg, found none")
        items.sort(key=lambda t: t[0])
        _check_sizes([im for _, _, im in items], [f"{path}:{name}" for name, _, _ in items])
        y = np.array([classes.index(cls) for _, cls, _ in items], dtype=np.int64)
        order = interleave_classes(y)
        out[f"x_{split}"], out[f"y_{split}"] = np.stack([items[i][2] for i in order]), y[order]
    return out


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` as .npz via a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a cache is as readable as its source
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cache_path(source: Path, stem: str) -> Path:
    """Cache file for ``source``: one per source path, so a changed source overwrites its stale cache."""
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
    return cache_dir() / f"{stem}-{digest}.npz"


def _source_key(source: Path) -> str:
    st = source.stat()
    return f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_CACHE_VERSION}"


def _read_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays if ``path`` holds a complete cache for ``key``, else None (missing/stale/corrupt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if "key" not in z.files or str(z["key"]) != key:
                return None
            return {k: z[k] for k in z.files if k != "key"}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def cached_image_tar(source: Path, stem: str) -> dict[str, np.ndarray]:
    """``decode_image_tar(source)``, read from the .npz cache when its size and mtime still match."""
    key = _source_key(source)
    path = cache_path(source, stem)
    arrays = _read_cache(path, key)
    if arrays is None:
        arrays = decode_image_tar(source)
        try:
            atomic_savez(path, {**arrays, "key": np.array(key)})
        except OSError as e:  # a read-only or full cache folder costs speed, not correctness
            warnings.warn(f"could not write cache {path}: {e}", RuntimeWarning, stacklevel=2)
    return arrays


def _image_files(folder: Path) -> dict[str, list[Path]]:
    """``{class: sorted image files}`` for the non-hidden class folders of ``folder`` that hold images."""
    out = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            out[d.name] = files
    return out


def read_image_folder(root: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Read ``root/<class>/*`` (split ``"all"``) or ``root/{train,test[,val]}/<class>/*`` images.

    Returns ``{split: (x (N, H, W, C) uint8, y int64)}`` and the sorted class names. All images must
    share one size (no silent resizing); C is 1 if every image is grayscale, else 3.
    """
    if (root / "train").is_dir() and (root / "test").is_dir():
        folders = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    else:
        folders = {"all": root}
    listed = {s: _image_files(f) for s, f in folders.items()}
    for split, by_class in listed.items():
        if not by_class:
            exts = "|".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
            raise ValueError(f"no images found: expected {folders[split]}/<class>/*.{{{exts}}}")
    classes = sorted({c for by_class in listed.values() for c in by_class})
    gray = all(_is_gray(f) for by_class in listed.values() for files in by_class.values() for f in files)
    decoded = {
        split: [(f, classes.index(c), _decode(f, str(f), gray)) for c, fs in by_class.items() for f in fs]
        for split, by_class in listed.items()
    }
    everything = [t for items in decoded.values() for t in items]
    _check_sizes([im for _, _, im in everything], [str(f) for f, _, _ in everything])
    out = {}
    for split, items in decoded.items():
        y = np.array([c for _, c, _ in items], dtype=np.int64)
        order = interleave_classes(y)
        out[split] = (np.stack([items[i][2] for i in order]), y[order])
    return out, classes


def _is_gray(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.mode in _GRAY_MODES
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from e
