"""The training loop: one `train(model, data, config)` call for 1 process or N (torchrun).

Determinism is by construction, not by luck: each epoch's shuffle and augmentation come from
`torch.Generator`s seeded from (seed, epoch), and the global RNG (dropout) is seeded at the start and
saved in every checkpoint. So an interrupted run resumed from `last.pt` ends bitwise equal to an
uninterrupted one. Random augmentation parameters are drawn for the whole global batch and each
rank takes its slice, so N ranks see exactly the inputs one process would.

Validation accuracy per exit: the model is put in eval mode (no dropout, batchnorm running stats)
but the root module's `training` flag is set back to True, which asks a dynamic model for every
exit's logits instead of running dynamically. A model that ignores that flag and returns a
`DynamicOutput` gets only its overall `val_acc` recorded.
"""

from __future__ import annotations

import math
import os
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dynets.core.outputs import MultiExitOutput
from dynets.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    distributed_context,
    gather_rng_states,
    restore_rng_state,
    shard,
    wrap_model,
)
from dynets.train.losses import EXIT_WEIGHT_SCHEMES, exit_weights, multi_exit_loss

__all__ = ["TrainConfig", "TrainResult", "load_checkpoint", "random_crop_flip", "save_checkpoint", "train"]

CHECKPOINT_NAME = "last.pt"
_CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "constant"),
    "augment": ("none", "crop_flip"),
}


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved in each checkpoint."""

    epochs: int = 10
    batch_size: int = 128  # global batch; each of N ranks takes batch_size // N
    lr: float = 0.05
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adamw"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # per-step cosine decay to 0, or "constant"
    warmup_epochs: float = 0.0  # linear warmup, may be fractional
    seed: int = 0
    augment: str = "none"  # or "crop_flip": pad-4 random crop + horizontal flip (CIFAR style)
    exit_weights: str | list[float] = "uniform"
    distill: float = 0.0
    # knowledge distillation from an external teacher (`train(..., teacher=...)`) into every exit;
    # its weight in [0, 1] (0: none), at `temperature`
    kd: float = 0.0
    temperature: float = 3.0
    label_smoothing: float = 0.0
    checkpoint_dir: str | None = None
    progress: bool = True
    grad_clip: float | None = None
    channels_last: bool = False  # NHWC tensors for 4-D inputs: faster convolutions on CPU

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("epochs", "batch_size"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an int >= 1")
        if not is_int(self.seed) or self.seed < 0:
            raise bad("seed", "an int >= 0")
        for name in ("lr", "temperature"):
            if not is_num(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "a finite float > 0")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise bad(name, f"one of {choices}")
        if not is_num(self.momentum) or not 0 <= self.momentum < 1:
            raise bad("momentum", "a float in [0, 1)")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a float >= 0")
        if not is_num(self.warmup_epochs) or not 0 <= self.warmup_epochs <= self.epochs:
            raise bad("warmup_epochs", f"a float in [0, epochs={self.epochs}]")
        for name in ("distill", "kd"):
            if not is_num(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                raise bad(name, "a float in [0, 1]")
        if not is_num(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "a float in [0, 1)")
        if self.grad_clip is not None and (not is_num(self.grad_clip) or self.grad_clip <= 0):
            raise bad("grad_clip", "None or a float > 0")
        for name in ("progress", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        if isinstance(self.exit_weights, str):
            if self.exit_weights not in EXIT_WEIGHT_SCHEMES:
                raise bad("exit_weights", f"one of {EXIT_WEIGHT_SCHEMES} or a list of floats")
        else:
            try:
                self.exit_weights = [float(v) for v in self.exit_weights]
                exit_weights(len(self.exit_weights), self.exit_weights)
            except (TypeError, ValueError) as e:
                raise bad("exit_weights", "a scheme name or a list of floats >= 0, not all zero") from e
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)):
                raise bad("checkpoint_dir", "None or a path")
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)  # keep the config JSON-friendly


@dataclass
class TrainResult:
    """Per-epoch records (epoch, loss, train_acc, lr, seconds, [val_acc, val_acc_per_exit]).

    `model` is the trained module, never the DDP wrapper.
    """

    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = None
    checkpoint: str | None = None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


# ---------------------------------------------------------------------------- data and augmentation
def _check_data(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = getattr(data, "x", None), getattr(data, "y", None)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(
            f"{name}: expected an object with tensor attributes .x and .y, got {type(data).__name__}"
        )
    if y.dim() != 1 or y.dtype != torch.int64 or x.shape[0] != y.shape[0] or y.shape[0] == 0:
        raise ValueError(
            f"{name}: expected .x (N, ...) and .y (N,) int64 with N > 0, got x {tuple(x.shape)} and "
            f"y {tuple(y.shape)} {y.dtype}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected .x to be floating point, got {x.dtype}")
    return x, y


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A generator for (seed, epoch, stream), well mixed so nearby seeds give unrelated streams."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def _draw_crop_flip(n: int, generator: torch.Generator, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)  # (n, 2) top-left in padded image
    flips = torch.randint(0, 2, (n,), generator=generator).bool()  # (n,)
    return offsets, flips


def _apply_crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    b, _, h, w = x.shape
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zero padding
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # flip = read the columns backwards
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # (B, H, W, C) -> (B, C, H, W)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Pad-`pad` random crop + random horizontal flip of a (B, C, H, W) batch, per sample."""
    if x.dim() != 4:
        raise ValueError(f"augment='crop_flip': expected images (B, C, H, W), got shape {tuple(x.shape)}")
    offsets, flips = _draw_crop_flip(x.shape[0], generator, pad)
    return _apply_crop_flip(x, offsets, flips, pad)


# ------------------------------------------------------------------------- model outputs and losses
def _exit_logits(out: Any) -> list[torch.Tensor]:
    """Every exit's (B, C) logits from a model output; a plain tensor is a single exit."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, MultiExitOutput) or hasattr(out, "exit_logits"):
        return list(out.exit_logits)
    raise TypeError(
        "model output: expected MultiExitOutput or a (B, C) Tensor in training mode, "
        f"got {type(out).__name__}"
    )


def _default_loss(
    config: TrainConfig, out: Any, target: torch.Tensor, teacher_logits: torch.Tensor | None = None
) -> torch.Tensor:
    loss = multi_exit_loss(
        _exit_logits(out),
        target,
        weights=config.exit_weights,
        distill=config.distill,
        temperature=config.temperature,
        label_smoothing=config.label_smoothing,
        teacher_logits=teacher_logits,
        kd=config.kd if teacher_logits is not None else 0.0,
    )
    extra = getattr(out, "aux", {}).get("loss") if not isinstance(out, torch.Tensor) else None
    return loss if extra is None else loss + extra


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The teacher's (B, C) prediction for a training batch: `forward_static` where the model has one
    (a dynamic model's every-layer path), else its plain output, last exit or `.logits`."""
    out = teacher.forward_static(x) if hasattr(teacher, "forward_static") else teacher(x)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, MultiExitOutput) or hasattr(out, "exit_logits"):
        return out.exit_logits[-1]
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    raise TypeError(
        f"teacher output: expected a (B, C) Tensor or an output with logits, got {type(out).__name__}"
    )


# -------------------------------------------------------------------- optimiser, schedule, checkpoint
def _param_groups(model: nn.Module, params: list[nn.Parameter], lr: float) -> list[dict]:
    """One optimiser group per learning-rate scale. A model may define `lr_scales()` -> {parameter:
    scale} (e.g. DynamicViT's keep predictors learning faster than the backbone they are fine-tuned
    with); every other parameter has scale 1 and sits in the first group."""
    scales = model.lr_scales() if hasattr(model, "lr_scales") else {}
    for s in scales.values():
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0 or math.isinf(s):
            raise ValueError(f"{type(model).__name__}.lr_scales(): expected scales > 0, got {s!r}")
    groups: dict[float, list[nn.Parameter]] = {1.0: []}
    for p in params:
        groups.setdefault(float(scales.get(p, 1.0)), []).append(p)
    return [{"params": ps, "lr": lr * s} for s, ps in groups.items() if ps]


def _make_optimizer(
    params: list[nn.Parameter], config: TrainConfig, model: nn.Module
) -> torch.optim.Optimizer:
    groups = _param_groups(model, params, config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _lr_factor(step: int, *, total: int, warmup: int, cosine: bool) -> float:
    """Multiplier on the base lr after `step` optimiser steps: linear warmup, then cosine or flat."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temp file in the same directory, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode honours the umask, unlike mkstemp
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by `train`; missing -> FileNotFoundError, unreadable -> ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated and cannot be loaded ({e})") from e
    required = {"model", "optimizer", "scheduler", "epoch", "rng", "config"}
    missing = required - set(state) if isinstance(state, dict) else required
    if missing:
        raise ValueError(f"checkpoint {path} is not a dynets training checkpoint (missing {sorted(missing)})")
    return state


# ------------------------------------------------------------------------------------------ the loop
def train(
    model: nn.Module,
    data: Any,
    config: TrainConfig,
    *,
    resume: bool = False,
    eval_data: Any = None,
    stop_after_epoch: int | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Train `model` in place on `data` (any object with tensors .x (N, ...) and .y (N,) int64).

    Works unchanged under torchrun (WORLD_SIZE > 1): gloo process group, DDP, sharded batches,
    rank 0 alone shows progress and writes `checkpoint_dir/last.pt` after every epoch.
    resume: continue from that checkpoint. stop_after_epoch: return after that (1-based) epoch as if
    interrupted. loss_fn(output, target): replaces the default `multi_exit_loss` built from config;
    it receives the raw model output (so it can read `aux`).
    teacher: a trained model whose predictions on each (augmented) batch every exit also learns from,
    weighted by config.kd (knowledge distillation; run in eval mode without gradients, never updated).
    """
    x, y = _check_data(data, "data")
    eval_xy = _check_data(eval_data, "eval_data") if eval_data is not None else None
    if stop_after_epoch is not None and (not isinstance(stop_after_epoch, int) or stop_after_epoch < 1):
        raise ValueError(f"stop_after_epoch: expected None or an int >= 1, got {stop_after_epoch!r}")
    if resume and config.checkpoint_dir is None:
        raise ValueError("resume=True: expected config.checkpoint_dir to be set, got None")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected None or an nn.Module, got {type(teacher).__name__}")
    if (teacher is None) != (config.kd == 0):
        raise ValueError(
            "teacher and TrainConfig.kd: expected both (a teacher model and kd in (0, 1]) or neither, got "
            f"teacher={'None' if teacher is None else type(teacher).__name__} and kd={config.kd!r}"
        )
    if teacher is not None and loss_fn is not None:
        raise ValueError(
            "teacher: distillation from a teacher is part of the default loss; expected no loss_fn with it, "
            "got both"
        )
    if teacher is not None:
        student = {id(p) for p in model.parameters()}
        if teacher is model or any(id(p) in student for p in teacher.parameters()):
            raise ValueError(
                "teacher: expected a model that shares no parameters with the one being trained, got "
                + ("the same module" if teacher is model else "one that shares some")
            )
        devices = {p.device for p in teacher.parameters()} | {p.device for p in model.parameters()}
        if len(devices) > 1:
            raise ValueError(
                f"teacher: expected it on the student's device, got parameters on {sorted(map(str, devices))}"
            )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: expected at least one parameter with requires_grad=True, got none")
    modes = [(m, m.training) for m in teacher.modules()] if teacher is not None else []
    try:
        if teacher is not None:
            teacher.eval()
            loss_fn = _KDLoss(config, teacher)
        with distributed_context() as info:
            return _run(model, params, x, y, eval_xy, config, info, resume, stop_after_epoch, loss_fn)
    finally:
        for m, was in modes:  # every submodule's own mode back, as it came
            m.training = was


class _KDLoss:
    """The default loss with the teacher's predictions on the batch's inputs as a KD target."""

    needs_input = True

    def __init__(self, config: TrainConfig, teacher: nn.Module) -> None:
        self.config, self.teacher = config, teacher

    def __call__(self, out: Any, target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _default_loss(self.config, out, target, _teacher_logits(self.teacher, x))


def _run(model, params, x, y, eval_xy, config, info, resume, stop_after_epoch, loss_fn) -> TrainResult:
    if config.batch_size % info.world_size:
        raise ValueError(
            f"TrainConfig.batch_size: expected a multiple of the world size {info.world_size}, "
            f"got {config.batch_size}"
        )
    if config.augment == "crop_flip" and x.dim() != 4:
        raise ValueError(
            f"TrainConfig.augment='crop_flip': expected images (N, C, H, W), got x {tuple(x.shape)}"
        )
    n_used = x.shape[0] - x.shape[0] % info.world_size  # every rank gets the same number of samples
    if n_used == 0:
        raise ValueError(f"data: expected at least world_size={info.world_size} samples, got {x.shape[0]}")
    steps_per_epoch = math.ceil(n_used / config.batch_size)
    optimizer = _make_optimizer(params, config, model)
    factor = partial(
        _lr_factor,
        total=config.epochs * steps_per_epoch,
        cosine=config.schedule == "cosine",
        warmup=round(config.warmup_epochs * steps_per_epoch),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    ckpt = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir is not None else None

    start, history = 0, []
    if resume:
        state = load_checkpoint(ckpt)
        defaults = asdict(TrainConfig())  # fields a checkpoint from an older version lacks
        changed = [
            k
            for k, v in asdict(config).items()
            if k not in ("epochs", "progress", "checkpoint_dir") and state["config"].get(k, defaults[k]) != v
        ]
        if changed:
            warnings.warn(f"resuming {ckpt} with changed config fields {changed}", stacklevel=3)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = int(state["epoch"]), list(state.get("history", []))
        restore_rng_state(state["rng"], info, config.seed)
    else:
        torch.manual_seed(config.seed + info.rank)  # dropout etc.; ranks draw different masks

    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    net = wrap_model(model, info)
    loss_fn = loss_fn if loss_fn is not None else partial(_default_loss, config)
    end = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    for epoch in range(start, end):
        t0 = time.perf_counter()
        record = {"epoch": epoch + 1}
        record.update(_train_epoch(net, optimizer, scheduler, params, x, y, config, info, epoch, loss_fn))
        if eval_xy is not None:
            record.update(_evaluate(model, *eval_xy, config.batch_size // info.world_size, info))
        record["lr"] = optimizer.param_groups[0]["lr"]
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        if ckpt is not None:
            rng = gather_rng_states(info)  # collective: every rank takes part
            if info.is_main:
                save_checkpoint(
                    ckpt,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch + 1,
                        "step": scheduler.last_epoch,
                        "rng": rng,
                        "config": asdict(config),
                        "history": history,
                        "world_size": info.world_size,
                        "format_version": 1,
                    },
                )
            barrier(info)
    model.train()
    return TrainResult(history=history, model=model, checkpoint=str(ckpt) if ckpt is not None else None)


def _train_epoch(net, optimizer, scheduler, params, x, y, config, info, epoch, loss_fn) -> dict:
    net.train()
    device = params[0].device
    world, b_local = info.world_size, config.batch_size // info.world_size
    # 1. this epoch's permutation, identical on every rank; each rank keeps perm[rank::world]
    perm = torch.randperm(x.shape[0], generator=_epoch_generator(config.seed, epoch, 0))
    local = shard(perm, info)
    n_global = local.shape[0] * world
    aug_gen = _epoch_generator(config.seed, epoch, 1)
    stats = torch.zeros(3, dtype=torch.float64)  # loss sum, correct (last exit), count
    steps = math.ceil(local.shape[0] / b_local)
    bar = tqdm(
        range(steps),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        leave=False,
        disable=not (config.progress and info.is_main),
        dynamic_ncols=True,
    )
    for i in bar:
        # 2. local batch i = global batch i [rank::world]
        idx = local[i * b_local : (i + 1) * b_local]
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        if config.augment == "crop_flip":
            # 3. draw for the whole global batch so N ranks see what one process would, then slice
            n_batch = min(config.batch_size, n_global - i * config.batch_size)
            offsets, flips = _draw_crop_flip(n_batch, aug_gen, pad=4)
            xb = _apply_crop_flip(xb, offsets[info.rank :: world], flips[info.rank :: world], pad=4)
        if config.channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        # 4. forward, joint loss, backward (DDP averages gradients), step
        out = net(xb)
        loss = loss_fn(out, yb, xb) if getattr(loss_fn, "needs_input", False) else loss_fn(out, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            correct = (_exit_logits(out)[-1].argmax(-1) == yb).sum().item()
            stats += torch.tensor([loss.item() * len(yb), correct, len(yb)], dtype=torch.float64)
        if not bar.disable:
            bar.set_postfix(loss=f"{stats[0] / stats[2]:.4f}", acc=f"{stats[1] / stats[2]:.3f}")
    bar.close()
    loss_sum, correct, count = all_reduce_sum(stats, info).tolist()
    return {"loss": loss_sum / count, "train_acc": correct / count}


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, info: DistInfo) -> dict:
    """Accuracy of every exit on this rank's share of the eval set, summed over ranks."""
    device = next(model.parameters()).device
    model.eval()
    model.training = True  # root flag only: ask for every exit, submodules stay in eval mode
    correct: list[int] = []
    n, dynamic = 0, False
    try:
        for idx in torch.arange(x.shape[0])[info.rank :: info.world_size].split(batch):
            out = model(x[idx].to(device))
            yb = y[idx].to(device)
            if isinstance(out, torch.Tensor) or hasattr(out, "exit_logits"):
                logits = _exit_logits(out)
            else:  # a DynamicOutput: the model ran dynamically anyway, one prediction per sample
                logits, dynamic = [out.logits], True
            hits = [int((z.argmax(-1) == yb).sum()) for z in logits]
            correct = hits if not correct else [a + b for a, b in zip(correct, hits)]
            n += len(yb)
    finally:
        model.train()
    parts = all_gather_objects((correct, n, dynamic), info)
    total = sum(p[1] for p in parts)
    per_exit = [sum(p[0][k] for p in parts if p[0]) / total for k in range(max(len(p[0]) for p in parts))]
    record: dict[str, Any] = {"val_acc": per_exit[-1]}
    if not any(p[2] for p in parts):
        record["val_acc_per_exit"] = per_exit
    return record
