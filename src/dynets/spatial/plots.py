"""Pictures of spatial decisions: which patches were kept, how deep each patch ran, which patches
were merged together, and where glance-and-focus looked. Each function writes one PNG and
returns its path; inputs are raw images (B, C, H, W) in [0, 1] and the model's decisions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from dynets.bench.plots import _save, plt


def _rgb(img: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (H, W, 3) float in [0, 1] for imshow (grey images are repeated)."""
    img = img.detach().float().cpu().clamp(0, 1)
    return (img.repeat(3, 1, 1) if img.shape[0] == 1 else img[:3]).permute(1, 2, 0)


def _patch_grid(values: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N,) per-patch values -> (H, W) image, patches in raster order."""
    g = int(round(values.numel() ** 0.5))
    return (
        values.float().view(g, g).repeat_interleave(image_size // g, 0).repeat_interleave(image_size // g, 1)
    )


def plot_kept_patches(
    images: torch.Tensor,
    kept: torch.Tensor,
    path: str | os.PathLike,
    *,
    max_images: int = 8,
    title: str = "",
    stage_names: Sequence[str] | None = None,
) -> Path:
    """Token pruning: one row per image: the image, then each stage with dropped patches greyed.

    kept: (B, S, N) bool, decisions["kept"] of a DynamicViT.
    """
    n, S = min(max_images, images.shape[0]), kept.shape[1]
    fig, axes = plt.subplots(n, S + 1, figsize=(1.6 * (S + 1), 1.6 * n), squeeze=False)
    H = images.shape[-1]
    for i in range(n):
        img = _rgb(images[i])
        axes[i, 0].imshow(img.numpy())
        for s in range(S):
            m = _patch_grid(kept[i, s].cpu(), H)[..., None]  # (H, W, 1)
            axes[i, s + 1].imshow((img * m + 0.85 * (1 - m)).numpy())
        if i == 0:
            axes[0, 0].set_title("input", fontsize=8)
            for s in range(S):
                name = stage_names[s] if stage_names else f"stage {s + 1}"
                axes[0, s + 1].set_title(f"{name}: {int(kept[0, s].sum())}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title or "kept patches per stage (grey = dropped)", fontsize=9)
    return _save(fig, path)


def plot_halting_depth(
    images: torch.Tensor,
    depth: torch.Tensor,
    path: str | os.PathLike,
    *,
    max_images: int = 8,
    title: str = "",
) -> Path:
    """Halting: each image beside a map of how many blocks each patch ran (decisions["depth"])."""
    n = min(max_images, images.shape[0])
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    H, top = images.shape[-1], int(depth.max())
    for i in range(n):
        axes[0, i].imshow(_rgb(images[i]).numpy())
        im = axes[1, i].imshow(_patch_grid(depth[i, 1:].cpu(), H).numpy(), vmin=0, vmax=top, cmap="viridis")
        axes[1, i].set_title(f"cls {int(depth[i, 0])}, mean {depth[i, 1:].float().mean():.1f}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.colorbar(im, ax=axes[1].tolist(), fraction=0.02, label="blocks run")
    fig.suptitle(title or "blocks run per patch before halting", fontsize=9)
    return _save(fig, path)


def plot_merged_groups(
    images: torch.Tensor,
    owner: torch.Tensor,
    path: str | os.PathLike,
    *,
    max_images: int = 8,
    title: str = "",
) -> Path:
    """Merging: each image beside the same image with every merged group painted in its mean colour.

    owner: (B, 1 + N) decisions["owner"] of a ToMeViT (the class token first).
    """
    n = min(max_images, images.shape[0])
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    H = images.shape[-1]
    for i in range(n):
        img = _rgb(images[i])  # (H, W, 3)
        g = int(round((owner.shape[1] - 1) ** 0.5))
        p = H // g
        patches = img.view(g, p, g, p, 3).permute(0, 2, 1, 3, 4).reshape(g * g, p * p, 3).mean(1)  # (N, 3)
        groups = owner[i, 1:].cpu()
        sums = torch.zeros(int(owner.max()) + 1, 3).index_add_(0, groups, patches)
        counts = torch.bincount(groups, minlength=sums.shape[0]).clamp_min(1)[:, None]
        colours = (sums / counts)[groups]  # (N, 3)
        painted = colours.view(g, g, 3).repeat_interleave(p, 0).repeat_interleave(p, 1)
        axes[0, i].imshow(img.numpy())
        axes[1, i].imshow(painted.numpy())
        axes[1, i].set_title(f"{int(torch.unique(groups).numel())} groups", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title or "patches merged into the same final token", fontsize=9)
    return _save(fig, path)


def plot_glance_focus(
    images: torch.Tensor,
    focused: torch.Tensor,
    patch: torch.Tensor,
    patch_size: int,
    path: str | os.PathLike,
    *,
    max_images: int = 16,
    title: str = "",
) -> Path:
    """Glance and focus: each image with a red box where the focus looked ("glance" if it stopped)."""
    n = min(max_images, images.shape[0])
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    for i in range(n):
        ax = axes[i // cols, i % cols]
        ax.imshow(_rgb(images[i]).numpy())
        if bool(focused[i]):
            r, c = (int(v) for v in patch[i])
            ax.add_patch(
                plt.Rectangle((c - 0.5, r - 0.5), patch_size, patch_size, fill=False, ec="red", lw=1.5)
            )
            ax.set_title("focus", fontsize=7)
        else:
            ax.set_title("glance only", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title or "where glance-and-focus looked", fontsize=9)
    return _save(fig, path)
