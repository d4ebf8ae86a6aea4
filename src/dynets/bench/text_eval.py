"""Dynamic BERT evaluation on encoded text: every exit once, policy sweeps with measured
sentences/s, the DynaBERT width x depth grid, per-sentence predictions, and their plots.

Shared by `dynets eval` / `dynets predict` (text models) and the SST-2 benchmark (bench/bert.py).
Every pass cuts length-sorted batches (`length_batches`): a batch pads only to sentences of
similar length and results go back to input order; static and dynamic models always get the same
batches, so the sorting helps both equally. A sample's FLOPs are the model's measured costs at its
own unpadded length (`DynamicBert.exit_costs` / `full_cost`), as in dynamic execution itself.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dynets.bench.evaluate import DEFAULT_SWEEPS
from dynets.bench.wallclock import compare_wallclock
from dynets.policies.exit_policies import ExitPolicy, make_policy
from dynets.policies.replay import replay_exits
from dynets.text.data import length_batches


@dataclass
class TextExits:
    """Every exit's outputs on a text set, in input order, with per-sample costs."""

    exit_logits: list[torch.Tensor]  # K tensors (N, C)
    labels: torch.Tensor  # (N,)
    learned: torch.Tensor | None  # (N, K-1) learned-exit scores, if the model has predictors
    costs: torch.Tensor  # (N, K) float64 FLOPs of leaving at exit k (no learned predictors)
    costs_learned: torch.Tensor  # (N, K) with the predictors consulted on the way
    static_flops: torch.Tensor  # (N,) float64 FLOPs of the static path (every layer, final head)

    @property
    def num_exits(self) -> int:
        return len(self.exit_logits)

    def accuracy_per_exit(self) -> list[float]:
        return [float((lg.argmax(-1) == self.labels).double().mean()) for lg in self.exit_logits]

    def mean_costs(self, learned: bool = False) -> torch.Tensor:
        """(K,) mean FLOPs of leaving at each exit (what budget calibration takes)."""
        return (self.costs_learned if learned else self.costs).mean(0)

    @property
    def static_mean(self) -> float:
        return float(self.static_flops.mean())

    def exits(self, policy: ExitPolicy) -> torch.Tensor:
        """(N,) exit each sentence takes under `policy` (replayed on the stored logits)."""
        return replay_exits(policy, self.exit_logits, self.learned)

    def correct(self, policy: ExitPolicy) -> torch.Tensor:
        """(N,) bool: whether each sentence's prediction under `policy` is right."""
        idx = self.exits(policy)
        preds = torch.stack([lg.argmax(-1) for lg in self.exit_logits], 1).gather(1, idx[:, None]).squeeze(1)
        return preds == self.labels

    def evaluate(self, policy: ExitPolicy) -> dict[str, Any]:
        idx = self.exits(policy)
        preds = torch.stack([lg.argmax(-1) for lg in self.exit_logits], 1).gather(1, idx[:, None]).squeeze(1)
        costs = self.costs_learned if policy.needs_learned else self.costs
        flops = float(costs.gather(1, idx[:, None]).mean())
        return {
            "accuracy": float((preds == self.labels).double().mean()),
            "mean_flops": flops,
            "flops_ratio": flops / self.static_mean,
            "mean_layers": float((idx + 1).double().mean()),
            "exit_fractions": (torch.bincount(idx, minlength=self.num_exits).double() / idx.numel()).tolist(),
        }


def _check_text_set(x: torch.Tensor, y: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"expected token ids (N, L) with N >= 1 sentences, got {tuple(x.shape)}")
    if y is not None and tuple(y.shape) != (x.shape[0],):
        raise ValueError(f"labels: expected shape ({x.shape[0]},), got {tuple(y.shape)}")


@torch.no_grad()
def collect_text(
    model: Any, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 64, progress: bool = False
) -> TextExits:
    """Run every exit of a DynamicBert once over token ids x (N, L) with labels y (N,)."""
    _check_text_set(x, y)
    model.eval()
    K, C, N = model.num_exits, model.config.num_labels, x.shape[0]
    has_learned = len(model.exit_predictors) > 0
    logits = [torch.empty(N, C) for _ in range(K)]
    learned = torch.empty(N, K - 1) if has_learned and K > 1 else None
    batches = length_batches(x, batch_size, pad_token_id=model.config.pad_token_id)
    for idx, xb in tqdm(batches, desc="all exits", disable=not progress, leave=False):
        lg = model.all_exit_logits(xb)
        for k in range(K):
            logits[k][idx] = lg[k].float()
        if learned is not None:
            learned[idx] = model.learned_scores(lg).float()
    lengths = model.lengths(x)
    return TextExits(
        logits,
        y.clone(),
        learned,
        model.exit_costs(lengths, False),
        model.exit_costs(lengths, has_learned),
        model.full_cost(lengths),
    )


@torch.no_grad()
def run_text(model: Any, x: torch.Tensor, policy: ExitPolicy | None = None, *, batch_size: int = 32) -> dict:
    """Dynamic execution over x (N, L) in length-sorted batches: logits (N, C), exit_index (N,) (among
    the current sub-network's exits), exit_layer (N,) (0-based encoder layer), flops (N,); input order."""
    _check_text_set(x, None)
    model.eval()
    N = x.shape[0]
    logits = torch.empty(N, model.config.num_labels)
    exit_index = torch.empty(N, dtype=torch.long)
    exit_layer = torch.empty(N, dtype=torch.long)
    flops = torch.empty(N, dtype=torch.float64)
    for idx, xb in length_batches(x, batch_size, pad_token_id=model.config.pad_token_id):
        out = model(xb, policy=policy)
        logits[idx], exit_index[idx], flops[idx] = out.logits.float(), out.exit_index, out.flops
        exit_layer[idx] = out.decisions.get("exit_layer", out.exit_index)  # the encoder layer left after
    return {"logits": logits, "exit_index": exit_index, "exit_layer": exit_layer, "flops": flops}


@torch.no_grad()
def static_logits(model: Any, x: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """(N, C) logits of the static path (every layer, final head) in input order."""
    _check_text_set(x, None)
    model.eval()
    out = torch.empty(x.shape[0], model.config.num_labels)
    for idx, xb in length_batches(x, batch_size, pad_token_id=model.config.pad_token_id):
        out[idx] = model.forward_static(xb).float()
    return out


def sweep_text(
    outs: TextExits,
    kinds: Iterable[str] = ("confidence", "entropy", "patience", "learned"),
    values: dict[str, list[float]] | None = None,
) -> list[dict]:
    """Accuracy, mean layers and mean FLOPs for each policy setting (replayed on stored logits)."""
    values = values or DEFAULT_SWEEPS
    rows = []
    for kind in kinds:
        if kind not in values:
            raise ValueError(f"unknown policy kind {kind!r}; expected some of {sorted(values)}")
        if kind == "learned" and outs.learned is None:
            continue
        for v in values[kind]:
            if kind == "patience" and v > outs.num_exits - 1:
                continue
            rows.append({"policy": kind, "value": v, **outs.evaluate(make_policy(kind, v))})
    return rows


def text_batches(model: Any, x: torch.Tensor, batch_size: int, *, sort: bool = True) -> list[torch.Tensor]:
    """The timing batches: token-id tensors, each trimmed to its longest sentence."""
    return [xb for _, xb in length_batches(x, batch_size, pad_token_id=model.config.pad_token_id, sort=sort)]


def time_rows(
    model: Any,
    rows: list[dict],
    batches: Sequence[torch.Tensor],
    *,
    static_fn: Callable[[torch.Tensor], object] | None = None,
    rounds: int = 1,
    progress: bool = False,
) -> list[dict]:
    """Add measured sentences/s (`sps`) and, against `static_fn` timed alternately, `speedup` to
    each sweep row (dynamic execution under that row's policy). Without static_fn, the model's own
    static path is the reference."""
    static_fn = static_fn or model.forward_static
    for r in tqdm(rows, desc="timing", disable=not progress, leave=False):
        policy = make_policy(r["policy"], r["value"])
        wc = compare_wallclock(static_fn, lambda b, p=policy: model(b, policy=p), batches, rounds=rounds)
        r.update(sps=wc["dynamic_per_s"], static_sps=wc["static_per_s"], speedup=wc["speedup"])
    return rows


def subnet_grid(
    model: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    widths: Sequence[float],
    depths: Sequence[float],
    *,
    batch_size: int = 32,
    policy: ExitPolicy | None = None,
    timing_batches: Sequence[torch.Tensor] | None = None,
    static_fn: Callable[[torch.Tensor], object] | None = None,
    rounds: int = 1,
    progress: bool = False,
) -> list[dict]:
    """Accuracy and FLOPs of every DynaBERT width x depth sub-network (static path: its last layer's
    classifier), optionally with early exit under `policy` and with sentences/s measured on
    `timing_batches` (against `static_fn`, default the full model's static path, timed alternately).
    The model is put back to width 1.0, depth 1.0 afterwards."""
    if not callable(getattr(model, "set_subnet", None)):
        raise ValueError(
            "width x depth grid: expected a DynamicBert with set_subnet (DynaBERT), got a "
            f"{type(model).__name__} without it"
        )
    _check_text_set(x, y)
    lengths = model.lengths(x)
    model.set_subnet(width=1.0, depth=1.0)
    full = float(model.full_cost(lengths).mean())
    if timing_batches is not None and static_fn is None:
        reference = copy.deepcopy(model)  # the full network, timed beside each sub-network
        static_fn = reference.forward_static
    grid = []
    try:
        cells = [(w, d) for d in depths for w in widths]
        for w, d in tqdm(cells, desc="width x depth", disable=not progress, leave=False):
            model.set_subnet(width=w, depth=d)
            pred = static_logits(model, x, batch_size=batch_size).argmax(-1)
            flops = float(model.full_cost(lengths).mean())
            row: dict[str, Any] = {
                "width": float(w),
                "depth": float(d),
                "accuracy": float((pred == y).double().mean()),
                "mean_flops": flops,
                "flops_ratio": flops / full,
            }
            if policy is not None:
                dyn = run_text(model, x, policy, batch_size=batch_size)
                row.update(
                    exit_accuracy=float((dyn["logits"].argmax(-1) == y).double().mean()),
                    exit_flops_ratio=float(dyn["flops"].mean()) / full,
                    exit_mean_layers=float((dyn["exit_index"] + 1).double().mean()),
                )
            if timing_batches is not None:
                wc = compare_wallclock(static_fn, model.forward_static, timing_batches, rounds=rounds)
                row.update(sps=wc["dynamic_per_s"], static_sps=wc["static_per_s"], speedup=wc["speedup"])
            grid.append(row)
    finally:
        model.set_subnet(width=1.0, depth=1.0)
    return grid


@torch.no_grad()
def predict_text(
    model: Any, texts: Sequence[str], policy: ExitPolicy | None = None, *, batch_size: int = 32
) -> list[dict]:
    """Per sentence: label, confidence (max softmax), exit layer (1-based encoder layer whose exit
    answered; at depth 1 the number of layers run) and FLOPs."""
    x = model.encode(list(texts))
    out = run_text(model, x, policy, batch_size=batch_size)
    probs = out["logits"].softmax(-1)
    conf, pred = probs.max(-1)
    labels = model.config.labels
    return [
        {
            "label": labels[int(pred[i])],
            "confidence": float(conf[i]),
            "exit_layer": int(out["exit_layer"][i]) + 1,
            "flops": float(out["flops"][i]),
        }
        for i in range(len(texts))
    ]


# ------------------------------------------------------------------------------------------ tables
def format_text_table(rows: list[dict], static: dict | None = None) -> str:
    """Markdown: policy setting -> accuracy, mean layers, MFLOPs, FLOPs ratio (+ sentences/s)."""
    timed = any("sps" in r for r in rows)
    head = "| model / policy | setting | accuracy | mean layers | mean MFLOPs | FLOPs vs static |"
    sep = "|---|---|---:|---:|---:|---:|"
    if timed:
        head, sep = head + " sentences/s | speed-up |", sep + "---:|---:|"
    lines = [head, sep]
    if static:
        s = (
            f"| static | - | {100 * static['accuracy']:.2f}% | {static.get('layers', '-')} | "
            f"{static['mean_flops'] / 1e6:.1f} | 1.00 |"
        )
        if timed:
            s += f" {static['sps']:.1f} | 1.00x |" if "sps" in static else " - | 1.00x |"
        lines.append(s)
    for r in rows:
        s = (
            f"| {r['policy']} | {r['value']} | {100 * r['accuracy']:.2f}% | {r['mean_layers']:.2f} | "
            f"{r['mean_flops'] / 1e6:.1f} | {r['flops_ratio']:.2f} |"
        )
        if timed:
            s += f" {r['sps']:.1f} | {r['speedup']:.2f}x |" if "sps" in r else " - | - |"
        lines.append(s)
    return "\n".join(lines)


def format_grid_table(grid: list[dict]) -> str:
    """Markdown: one row per width x depth sub-network."""
    timed = any("sps" in g for g in grid)
    exits = any("exit_accuracy" in g for g in grid)
    head = "| width | depth | accuracy | FLOPs vs full |"
    sep = "|---:|---:|---:|---:|"
    if timed:  # the timing is of the sub-network itself (every layer it keeps), against the full one
        head, sep = head + " sentences/s | speed-up |", sep + "---:|---:|"
    if exits:
        head, sep = head + " with early exit: accuracy | FLOPs | layers |", sep + "---:|---:|---:|"
    lines = [head, sep]
    for g in grid:
        s = f"| {g['width']:g} | {g['depth']:g} | {100 * g['accuracy']:.2f}% | {g['flops_ratio']:.2f} |"
        if timed:
            s += f" {g['sps']:.1f} | {g['speedup']:.2f}x |"
        if exits:
            s += (
                f" {100 * g['exit_accuracy']:.2f}% | {g['exit_flops_ratio']:.2f} | "
                f"{g['exit_mean_layers']:.2f} |"
            )
        lines.append(s)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    """matplotlib, imported on first plot only (predict and eval --json never pay for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_speed_curves(
    rows: list[dict],
    static_acc: float,
    path: str | os.PathLike,
    *,
    operating: dict | None = None,
    title: str = "",
    xkey: str = "speedup",
) -> Path:
    """Accuracy vs measured wall-clock speed-up (xkey="speedup") or sentences/s (xkey="sps") per
    policy, the static model as a star at speed-up 1."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 4.4))
    for kind in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r[xkey], 100 * r["accuracy"]) for r in rows if r["policy"] == kind and xkey in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"early exit: {kind}")
    static_x = 1.0 if xkey == "speedup" else next((r["static_sps"] for r in rows if "static_sps" in r), None)
    if static_x is not None:
        ax.scatter(
            [static_x],
            [100 * static_acc],
            marker="*",
            s=200,
            color="gold",
            edgecolor="k",
            zorder=6,
            label="static baseline",
        )
        ax.axhline(100 * static_acc - 1.0, color="grey", ls="--", lw=0.8, label="static - 1 point")
    if operating is not None and xkey in operating:
        ax.scatter(
            [operating[xkey]],
            [100 * operating["accuracy"]],
            marker="D",
            color="tab:red",
            zorder=7,
            label="operating point",
        )
    ax.set_xlabel("wall-clock speed-up vs static (batch 32)" if xkey == "speedup" else "sentences/s")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def plot_grid(grid: list[dict], path: str | os.PathLike, *, key: str = "accuracy", title: str = "") -> Path:
    """Heat map over widths (columns) x depths (rows) of `key`, each cell annotated."""
    widths = sorted({g["width"] for g in grid})
    depths = sorted({g["depth"] for g in grid})
    val = torch.full((len(depths), len(widths)), float("nan"))
    for g in grid:
        v = g.get(key)
        if v is not None:
            val[depths.index(g["depth"]), widths.index(g["width"])] = (
                100 * v if key.endswith("accuracy") else v
            )
    fig, ax = _pyplot().subplots(figsize=(1.2 * len(widths) + 2, 0.9 * len(depths) + 1.6))
    im = ax.imshow(val.numpy(), cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(widths)), [f"{w:g}" for w in widths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("width multiplier")
    ax.set_ylabel("depth multiplier")
    for i in range(len(depths)):
        for j in range(len(widths)):
            if not torch.isnan(val[i, j]):
                ax.text(
                    j,
                    i,
                    f"{float(val[i, j]):.1f}" if key.endswith("accuracy") else f"{float(val[i, j]):.2f}",
                    ha="center",
                    va="center",
                    color="w",
                    fontsize=8,
                )
    fig.colorbar(im, ax=ax, label=("accuracy (%)" if key.endswith("accuracy") else key))
    ax.set_title(title)
    return _save(fig, path)
