"""Which steps a sequence model used: one panel per example, the input with its used steps marked.

A univariate series (F = 1) is drawn as a line with a tick and a dot at every step that updated
(Skip-RNN), was read (frame skipping) or pondered (ACT: dot size = passes). Multi-feature frames
(MFCC, log-mel) are drawn as an image, features by time, with the unused frames shaded grey.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["plot_step_usage"]


def plot_step_usage(
    x: torch.Tensor,
    used: torch.Tensor,
    path: str | os.PathLike,
    *,
    lengths: torch.Tensor | None = None,
    labels: Sequence[str] | None = None,
    preds: Sequence[str] | None = None,
    title: str = "",
    max_examples: int = 6,
    what: str = "updated",
) -> Path:
    """Write a PNG of up to `max_examples` sequences x (N, T, F) and the steps they used.

    used: (N, T) bool (steps run) or int (passes per step, e.g. ACT's decisions["ponder"]).
    labels / preds: per-example strings shown in each panel's title.
    """
    if x.dim() != 3 or used.shape != x.shape[:2]:
        raise ValueError(
            f"x and used: expected shapes (N, T, F) and (N, T), got {tuple(x.shape)} and {tuple(used.shape)}"
        )
    n = min(int(x.shape[0]), max_examples)
    if n == 0:
        raise ValueError("x: expected at least one sequence to plot, got none")
    xs, us = x[:n].detach().float().cpu().numpy(), used[:n].detach().cpu().numpy().astype(np.float64)
    T, F = xs.shape[1], xs.shape[2]
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.7 * n + 0.6), squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        steps = T if lengths is None else int(lengths[i])
        u = us[i, :steps]
        on = np.flatnonzero(u > 0)
        if F == 1:
            ax.plot(np.arange(steps), xs[i, :steps, 0], color="0.35", lw=1)
            ymin, ymax = ax.get_ylim()
            ax.vlines(on, ymin, ymin + 0.12 * (ymax - ymin), color="tab:red", lw=1)
            size = 6 if u.max(initial=0) <= 1 else 4 * u[on]
            ax.scatter(on, xs[i, on, 0], s=size, color="tab:red", zorder=3, label=what)
            ax.set_ylim(ymin, ymax)
        else:
            ax.imshow(xs[i, :steps].T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
            for t in np.flatnonzero(u == 0):
                ax.axvspan(t - 0.5, t + 0.5, color="white", alpha=0.6, lw=0)
            ax.set_ylabel("feature")
        share = len(on) / max(steps, 1)
        parts = [f"{what} {len(on)}/{steps} steps ({share:.0%})"]
        if u.max(initial=0) > 1:
            parts.append(f"{int(u.sum())} passes")
        if labels is not None:
            parts.append(f"label {labels[i]}")
        if preds is not None:
            parts.append(f"pred {preds[i]}")
        ax.set_title(", ".join(parts), fontsize=8, loc="left")
        ax.set_xlim(-0.5, steps - 0.5)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("time step" + ("" if F == 1 else " (shaded: skipped)"))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
