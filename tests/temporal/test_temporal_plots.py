"""The step-usage plot: a PNG for univariate series, feature frames, and ACT pass counts."""

from __future__ import annotations

import pytest
import torch

from dynets.temporal.plots import plot_step_usage


def test_plot_step_usage_writes_pngs(tmp_path):
    g = torch.Generator().manual_seed(0)
    series, frames = torch.randn(3, 20, 1, generator=g), torch.randn(2, 12, 5, generator=g)
    used = torch.rand(3, 20, generator=g) > 0.5
    p1 = plot_step_usage(series, used, tmp_path / "series.png", labels=["a", "b", "c"], max_examples=2)
    p2 = plot_step_usage(frames, used[:2, :12], tmp_path / "frames.png", lengths=torch.tensor([12, 7]))
    ponder = torch.randint(0, 4, (3, 20), generator=g)
    p3 = plot_step_usage(series, ponder, tmp_path / "act.png", what="pondered", max_examples=1)
    for p in (p1, p2, p3):
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"expected shapes \(N, T, F\) and \(N, T\)"):
        plot_step_usage(series, used[:, :5], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="at least one sequence"):
        plot_step_usage(series[:0], used[:0], tmp_path / "empty.png")
