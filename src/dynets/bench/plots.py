"""Plots: accuracy-vs-cost (Pareto) curves with the static baseline, and inputs grouped by exit."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_pareto(
    rows: list[dict],
    static: dict,
    path: str | os.PathLike,
    *,
    title: str = "",
    anytime: list[dict] | None = None,
    calibrated: list[dict] | None = None,
) -> Path:
    """Accuracy vs mean MFLOPs per policy (one line each), the static model as a star."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for kind in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["mean_flops"] / 1e6, 100 * r["accuracy"]) for r in rows if r["policy"] == kind)
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"early exit: {kind}")
    if anytime:
        ax.plot(
            [a["mean_flops"] / 1e6 for a in anytime],
            [100 * a["accuracy"] for a in anytime],
            "k:",
            marker="x",
            label="single exit k (anytime)",
        )
    if calibrated:
        ax.scatter(
            [c["mean_flops"] / 1e6 for c in calibrated],
            [100 * c["accuracy"] for c in calibrated],
            marker="D",
            color="tab:red",
            zorder=5,
            label="calibrated budgets (test)",
        )
    ax.scatter(
        [static["mean_flops"] / 1e6],
        [100 * static["accuracy"]],
        marker="*",
        s=200,
        color="gold",
        edgecolor="k",
        zorder=6,
        label="static baseline",
    )
    ax.set_xlabel("mean MFLOPs per sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_examples_by_exit(
    x: torch.Tensor,
    exit_index: torch.Tensor,
    path: str | os.PathLike,
    *,
    per_exit: int = 8,
    title: str = "",
    labels: list[str] | None = None,
    preds: torch.Tensor | None = None,
) -> Path:
    """A grid: one row per exit, showing inputs that left there (easy inputs on top)."""
    K = int(exit_index.max()) + 1 if exit_index.numel() else 1
    fig, axes = plt.subplots(K, per_exit, figsize=(per_exit * 1.1, K * 1.25), squeeze=False)
    for k in range(K):
        ids = (exit_index == k).nonzero().squeeze(1)[:per_exit]
        share = float((exit_index == k).double().mean()) if exit_index.numel() else 0.0
        for j in range(per_exit):
            ax = axes[k][j]
            ax.axis("off")
            if j < ids.numel():
                img = x[ids[j]].detach().float().cpu()
                img = img.permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
                if labels is not None and preds is not None:
                    ax.set_title(labels[int(preds[ids[j]])], fontsize=6)
        axes[k][0].text(
            -0.15,
            0.5,
            f"exit {k}\n{100 * share:.0f}%",
            transform=axes[k][0].transAxes,
            ha="right",
            va="center",
            fontsize=8,
        )
    fig.suptitle(title or "inputs grouped by the exit they took (top: easiest)", fontsize=9)
    return _save(fig, path)
