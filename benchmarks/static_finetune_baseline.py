"""The fair baseline for the early-exit "finetune" recipe: the static ResNet given the same extra
training as the early-exit model's backbone (10 more epochs at lr 0.01, same augmentation, seed
and schedule), then its test accuracy. Writes benchmarks/results/static_finetune_baseline.json.

    .venv/bin/python benchmarks/static_finetune_baseline.py
"""

import glob
import json
import sys
import time

import torch

from dynets import load
from dynets.core.serialization import atomic_write_bytes
from dynets.data import load_dataset
from dynets.train import TrainConfig, train

torch.set_num_threads(2)
epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
static = load(
    sorted(
        glob.glob(str(__import__("pathlib").Path.home() / ".cache/dynets/bench/early_exit_cifar10-static-*"))
    )[0]
)
train_set, test_set = load_dataset("cifar10", "train"), load_dataset("cifar10", "test")


@torch.no_grad()
def accuracy(model) -> float:
    model.eval()
    preds = torch.cat(
        [model.forward_static(test_set.x[i : i + 512]).argmax(-1) for i in range(0, len(test_set), 512)]
    )
    return float((preds == test_set.y).double().mean())


before = accuracy(static)
cfg = TrainConfig(
    epochs=epochs, batch_size=128, lr=0.01, seed=0, augment="crop_flip", channels_last=True, progress=False
)
t0 = time.time()
train(static, train_set, cfg)
after = accuracy(static)
result = {
    "static_acc_12_epochs": before,
    f"static_acc_12_plus_{epochs}_epochs": after,
    "finetune_epochs": epochs,
    "finetune_lr": 0.01,
    "train_seconds": time.time() - t0,
}
print(result)
atomic_write_bytes("benchmarks/results/static_finetune_baseline.json", json.dumps(result, indent=2).encode())
