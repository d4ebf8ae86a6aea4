"""Shared helpers for the server tests: a tiny early-exit model on 1x8x8 inputs, its ladder, a server."""

from __future__ import annotations

import torch

import dynets
from dynets.serve import InferenceServer, ServeConfig, ServedModel, build_ladder

SHAPE = (1, 8, 8)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A random ee_resnet with loud exit heads, so confidences spread and exits differ per input."""
    torch.manual_seed(seed)
    m = dynets.create_model(
        "ee_resnet",
        in_channels=1,
        image_size=8,
        num_classes=10,
        widths=(8, 16, 32),
        blocks=(1, 1, 1),
        exits=(0, 1),
        stem_stride=1,
    ).eval()
    with torch.no_grad():
        for head in m.heads:
            head[-1].weight.mul_(30.0)
    return m


def calibration_data(n: int = 200, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, *SHAPE), generator=gen), torch.randint(0, 10, (n,), generator=gen)


def make_server(model: torch.nn.Module | None = None, ladder=None, **config) -> InferenceServer:
    model = model if model is not None else tiny_model()
    if ladder is None:
        x, y = calibration_data()
        ladder = build_ladder(model, x, y, levels=5)
    config.setdefault("warmup", False)
    return InferenceServer(ServedModel(model), ladder, ServeConfig(**config))
