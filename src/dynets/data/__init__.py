"""Local datasets as in-memory tensors: ``load_dataset("mnist", "val")``, ``load_dataset("npz:my.npz")``.

Shared data is found through ``DYNETS_DATA`` (see ``data_root``); decoded caches live in ``cache_dir()``.
"""

from .datasets import DATASET_STATS, SPLITS, ArrayDataset, list_datasets, load_dataset
from .paths import cache_dir, data_root

__all__ = [
    "DATASET_STATS",
    "SPLITS",
    "ArrayDataset",
    "cache_dir",
    "data_root",
    "list_datasets",
    "load_dataset",
]
