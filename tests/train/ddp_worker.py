"""Worker for test_ddp.py: trains a tiny multi-exit model, in 1 process or under torchrun.

    torchrun --nproc_per_node=2 tests/train/ddp_worker.py OUT_DIR [--interrupt-after K]

Rank 0 writes OUT_DIR/final.pt (weights, history, world size); checkpoints go to OUT_DIR/ckpt.
--interrupt-after K stops after epoch K, records the checkpoint's epoch, then resumes from it with a
freshly built model (two `train` calls, so the process group is also set up and torn down twice).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dynets.core.outputs import MultiExitOutput
from dynets.train import TrainConfig, train


@dataclass
class Data:
    x: torch.Tensor
    y: torch.Tensor


def make_data(n: int, seed: int) -> Data:
    g = torch.Generator().manual_seed(seed)
    colours = torch.randn(3, 3, 1, 1, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 3, (n,), generator=g)
    return Data(colours[y] + 0.5 * torch.randn(n, 3, 8, 8, generator=g), y)


class TwoExitNet(nn.Module):
    """No batchnorm, no dropout: DDP and one process must take the same steps. `frozen` stays fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
        self.block1 = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.ReLU())
        self.exit1 = nn.Linear(16, 3)
        self.block2 = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.exit2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        h = self.block1(self.frozen(x))  # (B, 16)
        return MultiExitOutput([self.exit1(h), self.exit2(self.block2(h))])


def config(out_dir: str) -> TrainConfig:
    return TrainConfig(
        epochs=3,
        batch_size=16,
        lr=0.05,
        augment="crop_flip",
        distill=0.5,
        warmup_epochs=0.5,
        checkpoint_dir=os.path.join(out_dir, "ckpt"),
        progress=True,
    )


def run(out_dir: str, stop_after: int | None = None, resume: bool = False) -> dict:
    """Train from a fixed init; return (and on rank 0 save) the final weights and history."""
    torch.manual_seed(0)
    model = TwoExitNet()
    res = train(
        model,
        make_data(88, 0),
        config(out_dir),
        eval_data=make_data(30, 1),
        stop_after_epoch=stop_after,
        resume=resume,
    )
    assert res.model is model, "train must hand back the unwrapped model"
    out = {
        "state": model.state_dict(),
        "history": res.history,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "group_left": dist.is_initialized(),
    }
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(out, os.path.join(out_dir, "final.pt"))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--interrupt-after", type=int, default=None)
    a = p.parse_args()
    if a.interrupt_after is None:
        run(a.out_dir)
    else:
        first = run(a.out_dir, stop_after=a.interrupt_after)
        done = [h["epoch"] for h in first["history"]]
        second = run(a.out_dir, resume=True)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save({**second, "interrupted_history": done}, os.path.join(a.out_dir, "final.pt"))
