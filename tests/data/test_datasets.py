"""Tests for dynets.data: built-in and user datasets, deterministic splits, caching, and bad input."""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dynets.data import (
    DATASET_STATS,
    SPLITS,
    ArrayDataset,
    cache_dir,
    data_root,
    datasets,
    list_datasets,
    load_dataset,
    paths,
    readers,
)

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _ids(ds: ArrayDataset) -> list[int]:
    """Sample ids of data built by ``_tagged``: every pixel of sample i holds i."""
    return [round(float(v) * 255) for v in ds.x[:, 0, 0, 0]]


def _tagged(n: int, shape: tuple[int, ...] = (4, 5)) -> np.ndarray:
    return np.broadcast_to(np.arange(n, dtype=np.uint8).reshape(n, *[1] * len(shape)), (n, *shape)).copy()


def _write_npz(tmp_path, name: str = "d.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return f"npz:{path}"


# ----------------------------------------------------------------------------------------- digits


def test_digits_shapes_ranges_and_sizes():
    sizes = {}
    for split in SPLITS:
        ds = load_dataset("digits", split)
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10 and ds.name == "digits"
        assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
        x0, y0 = ds[0]
        assert x0.shape == (1, 8, 8) and y0.ndim == 0
        sizes[split] = len(ds)
    assert sizes == {"train": 1149, "val": 288, "test": 360}


def test_digits_deterministic_disjoint_covering_and_stratified():
    from sklearn.datasets import load_digits

    a, b = load_dataset("digits", "val"), load_dataset("digits", "val")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)

    def rows(ds: ArrayDataset) -> list[tuple]:
        return list(map(tuple, torch.cat([ds.x.flatten(1) * 16, ds.y[:, None]], 1).round().tolist()))

    got = sorted(r for s in SPLITS for r in rows(load_dataset("digits", s)))
    bunch = load_digits()
    want = sorted(map(tuple, np.concatenate([bunch.data, bunch.target[:, None]], 1).tolist()))
    assert got == want  # the three splits are the whole set, each sample exactly once
    test_counts = torch.bincount(load_dataset("digits", "test").y, minlength=10)
    assert int(test_counts.min()) >= 35 and int(test_counts.max()) <= 37  # stratified: ~36 per class
    mean = load_dataset("digits", "train").x.mean().item()
    assert mean == pytest.approx(DATASET_STATS["digits"][0][0], abs=1e-3)


def test_registry_stats_and_limit():
    assert list_datasets() == ["cifar10", "digits", "mnist"]
    assert set(DATASET_STATS) == set(list_datasets())
    full, head = load_dataset("digits", "train"), load_dataset("DIGITS", "train", limit=7)
    assert len(head) == 7 and torch.equal(head.x, full.x[:7])
    assert len(load_dataset("digits", "test", limit=10_000)) == 360


def test_array_dataset_subset_and_repr():
    ds = load_dataset("digits", "test")
    assert torch.equal(ds.subset(5).x, ds.x[:5])
    picked = ds.subset([3, 1])
    assert torch.equal(picked.y, ds.y[[3, 1]]) and picked.classes == ds.classes
    assert "n=360" in repr(ds) and "input_shape=(1, 8, 8)" in repr(ds)
    with pytest.raises(ValueError, match=r"subset indices must lie in \[0, 360\); got \[0, 400\]"):
        ds.subset([0, 400])


# ----------------------------------------------------------------------------------------- npz


def test_npz_xy_split_70_10_20_disjoint_and_covering(tmp_path):
    spec = _write_npz(tmp_path, x=_tagged(50), y=np.arange(50) % 4)
    parts = {s: load_dataset(spec, s) for s in SPLITS}
    assert {s: len(d) for s, d in parts.items()} == {"train": 35, "val": 5, "test": 10}
    ids = [i for d in parts.values() for i in _ids(d)]
    assert sorted(ids) == list(range(50))
    assert parts["train"].classes == ["0", "1", "2", "3"] and parts["train"].input_shape == (1, 4, 5)
    assert _ids(load_dataset(spec, "train")) == _ids(parts["train"])  # deterministic
    assert all(int(y) == i % 4 for i, y in zip(_ids(parts["test"]), parts["test"].y, strict=True))


@pytest.mark.parametrize("layout", ["NHW", "NHW1", "NHW3", "N1HW", "N3HW"])
def test_npz_axis_layouts(tmp_path, layout):
    c = 3 if "3" in layout else 1
    ref = np.random.default_rng(1).integers(0, 256, size=(6, c, 5, 7), dtype=np.uint8)  # (N, C, H, W)
    given = {
        "NHW": ref[:, 0],
        "NHW1": ref.transpose(0, 2, 3, 1),
        "NHW3": ref.transpose(0, 2, 3, 1),
        "N1HW": ref,
        "N3HW": ref,
    }[layout]
    spec = _write_npz(tmp_path, x_train=given, y_train=np.zeros(6, int), x_test=given, y_test=np.ones(6, int))
    ds = load_dataset(spec, "test")
    assert ds.input_shape == (c, 5, 7)
    torch.testing.assert_close(ds.x, torch.from_numpy(ref).float() / 255)


def test_npz_train_test_keys_val_carved_or_given_and_floats_kept(tmp_path):
    x = np.linspace(-1, 2, 40 * 9).reshape(40, 3, 3)  # float64, outside [0, 1]: kept, as float32
    spec = _write_npz(tmp_path, x_train=x, y_train=np.arange(40) % 2, x_test=x[:5], y_test=np.zeros(5, int))
    train, val, test = (load_dataset(spec, s) for s in SPLITS)
    assert (len(train), len(val), len(test)) == (36, 4, 5)
    torch.testing.assert_close(test.x[:, 0], torch.from_numpy(x[:5]).float())
    assert test.x.dtype == torch.float32 and float(train.x.min()) >= -1 and float(train.x.max()) <= 2
    spec = _write_npz(
        tmp_path,
        "v.npz",
        x_train=_tagged(8),
        y_train=np.zeros(8, int),
        x_test=_tagged(2),
        y_test=np.zeros(2, int),
        x_val=_tagged(3),
        y_val=np.zeros(3, int),
    )
    assert _ids(load_dataset(spec, "val")) == [0, 1, 2] and len(load_dataset(spec, "train")) == 8


def test_npz_string_labels_map_to_sorted_classes(tmp_path):
    labels = np.array(["dog", "cat", "emu", "cat", "dog", "ant"])
    spec = _write_npz(tmp_path, x_train=_tagged(6), y_train=labels, x_test=_tagged(6), y_test=labels)
    ds = load_dataset(spec, "test")
    assert ds.classes == ["ant", "cat", "dog", "emu"]
    assert [ds.classes[i] for i in ds.y] == labels.tolist()


# ----------------------------------------------------------------------------------------- folder


def _png(path, value: int, size=(6, 5), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def test_folder_class_layout_grayscale(tmp_path):
    for i in range(10):
        _png(tmp_path / "imgs" / ("b" if i % 2 else "a") / f"{i:02d}.png", i)
    parts = {s: load_dataset("folder:imgs", s, root=tmp_path) for s in SPLITS}
    assert {s: len(d) for s, d in parts.items()} == {"train": 7, "val": 1, "test": 2}
    assert sorted(i for d in parts.values() for i in _ids(d)) == list(range(10))
    ds = parts["train"]
    assert ds.classes == ["a", "b"] and ds.input_shape == (1, 5, 6)  # (C, H, W) from a 6x5 (W x H) image
    assert all(int(y) == i % 2 for i, y in zip(_ids(ds), ds.y, strict=True))


def test_folder_train_test_layout_rgb(tmp_path):
    for split, n in (("train", 10), ("test", 4)):
        for i in range(n):
            _png(tmp_path / split / ("cat" if i % 2 else "ant") / f"{i}.jpg", 10 * i, mode="RGB")
    test = load_dataset(f"folder:{tmp_path}", "test")
    assert test.input_shape == (3, 5, 6) and test.classes == ["ant", "cat"]
    assert test.y.tolist() == [0, 1, 0, 1]  # interleaved by class
    assert len(load_dataset(f"folder:{tmp_path}", "val")) == 1
    assert len(load_dataset(f"folder:{tmp_path}")) == 9


def test_folder_size_mismatch_names_file_and_sizes(tmp_path):
    _png(tmp_path / "a" / "0.png", 1)
    _png(tmp_path / "a" / "1.png", 1, size=(7, 5))
    with pytest.raises(ValueError, match=r"expected 6x5 .*0\.png.*found 7x5 in .*1\.png"):
        load_dataset(f"folder:{tmp_path}")


# ----------------------------------------------------------------------------------------- shared data


def test_mnist_shapes_and_splits(require_shared):
    require_shared("data/mnist")
    parts = {s: load_dataset("mnist", s) for s in SPLITS}
    assert {s: len(d) for s, d in parts.items()} == {"train": 55_000, "val": 5_000, "test": 10_000}
    for ds in parts.values():
        assert ds.input_shape == (1, 28, 28) and ds.x.dtype == torch.float32 and ds.num_classes == 10
    assert float(parts["train"].x.max()) == 1.0 and float(parts["train"].x.min()) == 0.0
    counts = sum(torch.bincount(parts[s].y, minlength=10) for s in ("train", "val"))
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # official train
    assert parts["train"].x.mean().item() == pytest.approx(DATASET_STATS["mnist"][0][0], abs=1e-3)


def test_cifar10_shapes_splits_and_cache_hit(require_shared, monkeypatch):
    source = require_shared("data/cifar10-jpg.tar.xz")
    test = load_dataset("cifar10", "test")  # the first call may decode the JPEGs (~20 s), then it is cached
    assert readers.cache_path(source, "cifar10").is_file()
    monkeypatch.setattr(readers, "decode_image_tar", lambda *a: pytest.fail("cache miss: decoded again"))
    parts = {"test": test, **{s: load_dataset("cifar10", s) for s in ("train", "val")}}
    assert {s: len(d) for s, d in parts.items()} == {"test": 10_000, "train": 45_000, "val": 5_000}
    for ds in parts.values():
        assert ds.input_shape == (3, 32, 32) and ds.x.dtype == torch.float32 and ds.classes == CIFAR_CLASSES
    assert torch.bincount(test.y).tolist() == [1000] * 10 and test.y[:10].tolist() == list(range(10))
    mean = parts["train"].x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor(DATASET_STATS["cifar10"][0]), atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------------------- cache


def _fake_cifar(root, sizes={"train": 3, "test": 2}):  # noqa: B006
    """root/data/cifar10-jpg.tar.xz with 3 classes of 4x4 JPEGs, members in shuffled order."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    path = root / "data" / "cifar10-jpg.tar.xz"
    with tarfile.open(path, "w:xz") as tf:
        for split, n in sizes.items():
            for cls in ("frog", "cat", "ship"):
                for i in reversed(range(n)):
                    buf = io.BytesIO()
                    Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tf.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def test_cache_atomic_hit_and_invalidation(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNETS_CACHE", str(tmp_path / "cache"))
    source = _fake_cifar(tmp_path)
    calls = []
    decode = readers.decode_image_tar
    monkeypatch.setattr(readers, "decode_image_tar", lambda p: calls.append(p) or decode(p))
    ds = load_dataset("cifar10", "test", root=tmp_path)
    assert ds.classes == ["cat", "frog", "ship"] and ds.y.tolist() == [0, 1, 2, 0, 1, 2]
    assert ds.input_shape == (3, 4, 4) and len(calls) == 1
    assert [p.name for p in cache_dir().iterdir()] == [readers.cache_path(source, "cifar10").name]
    assert torch.equal(load_dataset("cifar10", "test", root=tmp_path).x, ds.x) and len(calls) == 1  # hit
    os.utime(source, ns=(0, source.stat().st_mtime_ns + 10**9))  # a changed source invalidates the cache
    load_dataset("cifar10", "test", root=tmp_path)
    assert len(calls) == 2 and len(list(cache_dir().iterdir())) == 1


def test_cache_write_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNETS_CACHE", str(tmp_path / "cache"))
    _fake_cifar(tmp_path)

    def broken_savez(f, **arrays):
        f.write(b"PK half-written")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.warns(RuntimeWarning, match="could not write cache"):
        assert len(load_dataset("cifar10", "test", root=tmp_path)) == 6
    assert list(cache_dir().iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("DYNETS_CACHE", str(tmp_path / "cache"))
    readers.cache_path(tmp_path / "data" / "cifar10-jpg.tar.xz", "cifar10").write_bytes(b"garbage")
    assert len(load_dataset("cifar10", "test", root=tmp_path)) == 6  # a corrupt cache is rebuilt


def test_paths_env_and_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNETS_CACHE", str(tmp_path / "c" / "d"))
    assert cache_dir() == tmp_path / "c" / "d" and cache_dir().is_dir()
    monkeypatch.setenv("DYNETS_DATA", str(tmp_path))
    assert data_root() == tmp_path.resolve()
    monkeypatch.setenv("DYNETS_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"DYNETS_DATA=.*missing.* is not a directory"):
        data_root()
    assert data_root(required=False) is None
    monkeypatch.delenv("DYNETS_DATA")
    monkeypatch.setattr(paths, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"set DYNETS_DATA.*tried .*shared"):
        data_root()
    (tmp_path / "shared").mkdir()
    assert data_root() == (tmp_path / "shared").resolve()


# ----------------------------------------------------------------------------------------- bad input


def _idx_gz(path, magic: int, dims: tuple[int, ...], payload: bytes, cut: int | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = gzip.compress(struct.pack(f">I{len(dims)}I", magic, *dims) + payload)
    path.write_bytes(data[:cut])


@pytest.mark.parametrize(
    "case, match",
    [
        ("magic", r"t10k-images-idx3-ubyte\.gz: expected idx magic number 2051, found 2049"),
        ("shape", r"expected shape \(10000, 28, 28\), found \(5, 28, 28\)"),
        ("short", r"expected 7840000 data bytes for shape \(10000, 28, 28\), found 10"),
        ("gzip", r"t10k-images-idx3-ubyte\.gz: truncated or corrupt gzip"),
    ],
)
def test_mnist_corrupt_files(tmp_path, case, match):
    path = tmp_path / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
    magic, dims, payload, cut = 2051, (10000, 28, 28), bytes(10), None
    if case == "magic":
        magic = 2049
    elif case == "shape":
        dims, payload = (5, 28, 28), bytes(5 * 784)
    elif case == "gzip":
        payload, cut = bytes(10000 * 784), 100
    _idx_gz(path, magic, dims, payload, cut)
    with pytest.raises(ValueError, match=match):
        load_dataset("mnist", "test", root=tmp_path)


def test_bad_specs_splits_and_paths(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"unknown dataset spec 'imagenet'; expected one of 'cifar10', "
        r"'digits', 'mnist', 'npz:PATH', 'folder:PATH'",
    ):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'val', 'test'; got 'valid'"):
        load_dataset("digits", "valid")
    with pytest.raises(ValueError, match=r"limit must be a positive int or None; got 0"):
        load_dataset("digits", limit=0)
    with pytest.raises(FileNotFoundError, match=r"npz file not found: .*nope\.npz"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*nodir"):
        load_dataset("folder:nodir", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data/mnist not found; set DYNETS_DATA"):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cifar10-jpg\.tar\.xz not found; set DYNETS_DATA"):
        load_dataset("cifar10", root=tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar10-jpg.tar.xz").write_bytes(b"not xz")
    with pytest.raises(ValueError, match=r"cifar10-jpg\.tar\.xz: truncated or corrupt tar\.xz"):
        load_dataset("cifar10", "test", root=tmp_path)


@pytest.mark.parametrize(
    "arrays, match",
    [
        (
            {"x": np.zeros((10, 4, 4), np.uint8), "y": np.zeros(9, int)},
            r"x and y must have the same length; got 10 images, 9 labels",
        ),
        (
            {"x": np.full((3, 4, 4), np.nan), "y": np.zeros(3, int)},
            r"x must be finite; got 48 NaN or inf values",
        ),
        (
            {"x": np.zeros((10, 16), np.uint8), "y": np.zeros(10, int)},
            (
                r"x must have shape \(N, H, W\), \(N, H, W, C\) or \(N, C, H, W\) with C in \{1, 3\}; "
                r"got shape \(10, 16\)"
            ),
        ),
        ({"x": np.zeros((2, 5, 4, 4), np.uint8), "y": np.zeros(2, int)}, r"got shape \(2, 5, 4, 4\)"),
        ({"x": np.zeros((2, 4, 4), np.int32), "y": np.zeros(2, int)}, r"x must be uint8 .* got dtype int32"),
        (
            {"x": np.zeros((2, 4, 4)), "y": np.array([0.5, 1.0])},
            r"y must hold integer or string labels; got non-integer floats",
        ),
        ({"x": np.zeros((2, 4, 4)), "y": np.array([0, -1])}, r"y must hold class indices >= 0; got -1"),
        ({"x": np.zeros((2, 4, 4)), "y": np.zeros((2, 2))}, r"y must have shape \(N,\); got shape \(2, 2\)"),
        ({"images": np.zeros((2, 4, 4))}, r"expected keys x, y or x_train, .*; found \['images'\]"),
        ({"x": np.zeros((2, 4, 4)), "y": np.array(["a", None], dtype=object)}, r"cannot load without pickle"),
    ],
)
def test_npz_bad_input(tmp_path, arrays, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(_write_npz(tmp_path, **arrays))


def test_array_dataset_validates():
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x must have 4 dims \(N, C, H, W\); got shape \(4, 2, 2\)"):
        ArrayDataset(x[:, 0], y, ["a"], "t")
    with pytest.raises(ValueError, match=r"x and y must have the same length; got x: 4 samples, y: 3 labels"):
        ArrayDataset(x, y[:3], ["a"], "t")
    with pytest.raises(ValueError, match=r"x must be finite; got 1 NaN or inf"):
        ArrayDataset(torch.where(torch.arange(16).view(4, 1, 2, 2) == 5, float("nan"), x), y, ["a"], "t")
    with pytest.raises(
        ValueError,
        match=r"y must hold class indices in \[0, 1\) for 1 classes; got values "
        r"in \[0, 3\]",
    ):
        ArrayDataset(x, torch.arange(4), ["a"], "t")
    with pytest.raises(ValueError, match=r"x must be float32; got torch.float64"):
        ArrayDataset(x.double(), y, ["a"], "t")
    assert datasets.ArrayDataset is ArrayDataset
