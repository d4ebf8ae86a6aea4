"""Training recipes for Dynamic BERT, each a few calls of the ordinary train loop.

- "two_stage" (DeeBERT): fine-tune the encoder with the final classifier only; then freeze the
  encoder and the final classifier and train the early exits (the "highways") on the labels.
- "joint" (PABEE-style): one run, every exit at once, deeper exits weighted more ("linear").
- "distill" (FastBERT-style): fine-tune the encoder with the final classifier only; then freeze
  both and train the early exits by self-distillation from the final layer (distill = 1.0).
- "joint_distill": "distill", then a third stage that unfreezes everything and trains the encoder
  and every exit together at a lower learning rate (JOINT_DISTILL: every exit weighted alike, each
  learning half from the labels and half from the stage-1 model's softened prediction, DynaBERT-
  style). The encoder learns features the early exits can use, while the teacher keeps the last
  exit close to the static model.

Stages differ only in TrainConfig.exit_weights / distill and in which parameters are frozen, so
the loop, its checkpoints and its determinism are reused unchanged. Requires-grad flags are put
back as they were once training ends.

Token ids are integers but the train loop takes floating-point `.x`; the loop is fed float ids
(exact up to 2**24) and a thin wrapper turns them back into int64 before the model sees them.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from dynets.train.loop import TrainConfig, TrainResult, train

RECIPES = ("two_stage", "joint", "distill", "joint_distill")
# Stage 3 of "joint_distill": weight of each early exit (the final one has 1), the share of
# distillation in every exit's loss, the learning rate as a fraction of the TrainConfig's, and the
# teacher (a frozen copy of the model after stage 1).
JOINT_DISTILL = {"exit_weight": 1.0, "distill": 0.5, "lr_scale": 0.4, "teacher": "stage 1"}


class _FloatIds(nn.Module):
    """Adapter for the train loop: float token ids in, int64 ids to the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        self.model.training = self.training  # the loop's eval asks for every exit via the root flag
        return self.model(x.long())


@dataclasses.dataclass
class _Data:
    x: torch.Tensor
    y: torch.Tensor


def _as_float(data: Any, name: str) -> _Data | None:
    if data is None:
        return None
    x, y = getattr(data, "x", None), getattr(data, "y", None)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(
            f"{name}: expected an object with tensors .x (N, L) token ids and .y (N,), got {type(data)}"
        )
    if x.is_floating_point():
        return _Data(x, y)
    if x.numel() and int(x.max()) >= 2**24:
        raise ValueError(f"{name}: token ids up to {int(x.max())} do not fit exactly in float32 (max 2**24)")
    return _Data(x.float(), y)


def _stage(
    model: nn.Module,
    data: _Data,
    eval_data: _Data | None,
    config: TrainConfig,
    trainable: list[nn.Module],
    stage: int,
    **overrides: Any,
) -> TrainResult:
    """One train() call with only `trainable` modules' parameters updated."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in trainable:
        for p in m.parameters():
            p.requires_grad_(True)
    if config.checkpoint_dir is not None:
        overrides["checkpoint_dir"] = f"{config.checkpoint_dir}/stage{stage}"
    cfg = dataclasses.replace(config, **overrides)
    result = train(_FloatIds(model), data, cfg, eval_data=eval_data)
    for rec in result.history:
        rec["stage"] = stage
    return result


def joint_distill_stage(
    model: nn.Module,
    data: _Data,
    eval_data: _Data | None,
    config: TrainConfig,
    stage: int,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """The last stage of "joint_distill": encoder and every exit trained together (JOINT_DISTILL).

    teacher: the model as fine-tuned by stage 1 (frozen). Every exit, the last one included, then
    learns half from the labels and half from the teacher's final prediction, which anchors the
    last exit to the static model's while the encoder adapts to the early exits (DynaBERT's
    distillation, `train_dynabert` at width and depth 1). Without a teacher the early exits
    distil from the live last exit and the last one learns from the labels only."""
    K = model.num_exits
    over = {
        "exit_weights": [JOINT_DISTILL["exit_weight"]] * (K - 1) + [1.0],
        "lr": config.lr * JOINT_DISTILL["lr_scale"],
    }
    trainable = [model.embeddings, model.layers, model.heads]
    if teacher is None:
        return _stage(
            model, data, eval_data, config, trainable, stage, distill=JOINT_DISTILL["distill"], **over
        )
    from dynets.text.dynabert import train_dynabert

    for p in model.parameters():
        p.requires_grad_(False)
    for m in trainable:
        m.requires_grad_(True)
    if config.checkpoint_dir is not None:
        over["checkpoint_dir"] = f"{config.checkpoint_dir}/stage{stage}"
    result = train_dynabert(
        model,
        data,
        dataclasses.replace(config, **over),
        widths=[1.0],
        depths=[1.0],
        random_subnets=0,
        eval_data=eval_data,
        distill=JOINT_DISTILL["distill"],
        hidden_weight=0.0,
        teacher=teacher,
    )
    for rec in result.history:
        rec["stage"] = stage
    return result


def train_text(
    model: nn.Module, data: Any, recipe: str, config: TrainConfig, *, eval_data: Any = None
) -> TrainResult:
    """Train a DynamicBert on `data` (.x token ids, .y labels, e.g. from `encode_table`) by `recipe`.

    config: the TrainConfig of each stage; the recipe overrides its exit_weights and distill.
    Returns one TrainResult whose history runs over all stages (each record has a "stage").
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {list(RECIPES)}")
    K = model.num_exits
    final_only = [0.0] * (K - 1) + [1.0]
    early_only = [1.0] * (K - 1) + [0.0]
    encoder = [model.embeddings, model.layers]
    xy, eval_xy = _as_float(data, "data"), _as_float(eval_data, "eval_data")
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    results = []
    try:
        if recipe == "joint":
            results.append(
                _stage(
                    model, xy, eval_xy, config, [*encoder, model.heads], 1, exit_weights="linear", distill=0.0
                )
            )
        else:
            # stage 1: encoder + final classifier, as plain fine-tuning
            results.append(
                _stage(
                    model,
                    xy,
                    eval_xy,
                    config,
                    [*encoder, model.heads[-1]],
                    1,
                    exit_weights=final_only,
                    distill=0.0,
                )
            )
            teacher = None
            if recipe == "joint_distill":  # the stage-1 model, frozen, teaches stage 3
                teacher = copy.deepcopy(model, memo={id(getattr(model, "tokenizer", None)): None}).eval()
                teacher.requires_grad_(False)
            # stage 2: encoder and final classifier frozen; the early exits learn from the labels
            # (two_stage) or from the final layer's softened prediction (distill)
            distill = 1.0 if recipe in ("distill", "joint_distill") else 0.0
            early = list(model.heads)[:-1]
            results.append(
                _stage(model, xy, eval_xy, config, early, 2, exit_weights=early_only, distill=distill)
            )
            if recipe == "joint_distill":
                results.append(joint_distill_stage(model, xy, eval_xy, config, 3, teacher=teacher))
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
        model.train()
    history = [rec for r in results for rec in r.history]
    return TrainResult(history=history, model=model, checkpoint=results[-1].checkpoint if results else None)
