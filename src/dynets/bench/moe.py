"""MoE capacity benchmark (issue 4): 8x the FFN parameters at about the dense layer's cost.

(a) Layer timing: a top-1 MoE with 8 experts against the dense FFN of one expert's size, at
    4,096 tokens x d=384 (d_ff = 4d), forward (no grad) and forward+backward (training mode, the
    MoE's auxiliary loss included), timed alternately in one process with the thread count fixed;
    medians and their ratios (target <= 1.15).
(b) Real task: moe_transformer against dense_transformer, equal FLOPs per token (k=1, each expert
    the dense FFN's size), trained identically (same seed, data order, schedule) on SST-2 with a
    word-level vocabulary built from the training split; held-out accuracy and cross-entropy on
    the GLUE dev split (the labelled held-out set), plus measured FLOPs and dropped tokens.
(c) Language modelling (dynets.bench.moe_lm): the same two block types as causal character
    models of SST-2's sentences, held-out bits per character on the dev sentences.

    python -m dynets.bench.moe [--quick] [--json PATH] [--threads 2]

writes JSON (+ Markdown beside it). `run()` is the programmatic entry (e.g. for `dynets bench moe`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynets.core.registry import create_model
from dynets.core.serialization import atomic_write_bytes
from dynets.data import cache_dir
from dynets.train import TrainConfig, train
from dynets.width.moe import FeedForward, MoE, MoEConfig

__all__ = ["SST2", "encode_words", "load_sst2", "run", "time_layers", "train_and_eval"]

PAD, UNK = 0, 1


# ------------------------------------------------------------------------------ (a) layer timing
def _seconds(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_layers(
    *,
    tokens: int = 4096,
    d_model: int = 384,
    num_experts: int = 8,
    capacity_factor: float = 1.25,
    rounds: int = 15,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Median seconds of the dense FFN and the top-1 MoE, forward and forward+backward, alternating."""
    torch.manual_seed(seed)
    d_ff = 4 * d_model
    dense = FeedForward(d_model, d_ff)
    moe = MoE(MoEConfig(d_model, d_ff, num_experts=num_experts, k=1, capacity_factor=capacity_factor))
    x = torch.randn(tokens, d_model)
    xg = x.clone().requires_grad_(True)

    def fwd(m: nn.Module) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return m(x)

        return call

    def fwdbwd(m: nn.Module) -> Callable[[], object]:
        def call() -> None:
            y = m(xg)
            loss = y.square().mean()
            if isinstance(m, MoE):
                loss = loss + m.last_stats.aux_loss
            loss.backward()

        return call

    def clear() -> None:
        for p in [*dense.parameters(), *moe.parameters(), xg]:
            p.grad = None

    out: dict[str, Any] = {}
    for name, make in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        dense.train(name == "fwdbwd")
        moe.train(name == "fwdbwd")
        td, tm = [], []
        for _ in range(warmup):
            make(dense)()
            make(moe)()
            clear()
        for r in range(rounds):
            order = ((dense, td), (moe, tm)) if r % 2 == 0 else ((moe, tm), (dense, td))
            for m, acc in order:
                clear()
                acc.append(_seconds(make(m)))
        out[f"dense_{name}_s"] = statistics.median(td)
        out[f"moe_{name}_s"] = statistics.median(tm)
        out[f"moe_vs_dense_{name}"] = statistics.median(tm) / statistics.median(td)
    moe.eval()
    with torch.no_grad():
        moe(x)
    stats = moe.last_stats
    moe.train()
    with torch.no_grad():
        moe(x)
    train_stats = moe.last_stats
    n_dense = sum(p.numel() for p in dense.parameters())
    n_moe = sum(p.numel() for p in moe.parameters())
    out.update(
        tokens=tokens,
        d_model=d_model,
        d_ff=d_ff,
        num_experts=num_experts,
        capacity_factor=capacity_factor,
        rounds=rounds,
        dense_params=n_dense,
        moe_params=n_moe,
        params_ratio=n_moe / n_dense,
        tokens_per_expert=train_stats.tokens_per_expert.tolist(),
        dropped_tokens_train=train_stats.dropped_tokens,
        dropped_tokens_eval=stats.dropped_tokens,
    )
    return out


# --------------------------------------------------------------------------- (b) SST-2 task
@dataclass
class SST2:
    """Word-level encoded SST-2: ids (N, max_len) int64 right-padded with 0, labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor


def load_sst2(root: Path, max_len: int = 64, min_freq: int = 1) -> tuple[SST2, SST2, dict[str, int]]:
    """Train and dev splits encoded with a vocabulary of the training words (0 pad, 1 unknown)."""
    from dynets.text.data import load_text_table

    train_t = load_text_table(root / "train.tsv")
    dev_t = load_text_table(root / "dev.tsv", labels=train_t.classes)
    counts = Counter(w for t in train_t.texts for w in t.lower().split())
    words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
    vocab = {"<pad>": PAD, "<unk>": UNK, **{w: i + 2 for i, w in enumerate(words)}}
    return (
        SST2(encode_words(train_t.texts, vocab, max_len), train_t.label_ids),
        SST2(encode_words(dev_t.texts, vocab, max_len), dev_t.label_ids),
        vocab,
    )


def encode_words(texts: list[str], vocab: dict[str, int], max_len: int) -> torch.Tensor:
    """(N, max_len) int64 ids of lower-cased whitespace words, truncated, right-padded with PAD."""
    out = torch.full((len(texts), max_len), PAD, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [vocab.get(w, UNK) for w in t.lower().split()[:max_len]]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


@dataclass
class _Float:
    x: torch.Tensor
    y: torch.Tensor


def train_and_eval(
    name: str, model_kw: dict[str, Any], train_set: SST2, dev: SST2, tc: TrainConfig, seed: int
) -> dict[str, Any]:
    """Train `name` on train_set with the ordinary loop, then evaluate on dev in eval mode."""
    torch.manual_seed(seed)
    model = create_model(name, **model_kw)
    start = time.perf_counter()
    result = train(model, _Float(train_set.x.float(), train_set.y), tc)  # the loop takes float x
    seconds = time.perf_counter() - start
    model.eval()
    logits, flops, dropped = [], [], 0
    for i in range(0, len(dev.y), 256):
        o = model(dev.x[i : i + 256])
        logits.append(o.logits)
        flops.append(o.flops)
        if "dropped" in o.decisions:
            dropped += int(o.decisions["dropped"].sum())
    lg, fl = torch.cat(logits), torch.cat(flops)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "params": n_params,
        "accuracy": float((lg.argmax(1) == dev.y).float().mean()),
        "loss": float(F.cross_entropy(lg, dev.y)),
        "mean_flops": float(fl.mean()),
        "dropped_assignments": dropped,
        "train_seconds": seconds,
        "train_loss_last_epoch": result.final.get("loss"),
        "history": [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in result.history],
    }


# ------------------------------------------------------------------------------------- driver
def run(
    *,
    quick: bool = False,
    json_path: str | Path | None = None,
    threads: int = 2,
    data_root: str | Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Both parts; writes JSON (+ Markdown with the same stem) when json_path is given."""
    from dynets.data import data_root as shared_root

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        log(f"[moe] layer timing ({'quick' if quick else 'full'}, {threads} threads)")
        layers = time_layers(rounds=5 if quick else 15, warmup=1 if quick else 2, seed=seed)
        log(f"[moe] fwd x{layers['moe_vs_dense_fwd']:.3f}, fwd+bwd x{layers['moe_vs_dense_fwdbwd']:.3f}")
        root = Path(data_root) if data_root is not None else shared_root() / "data" / "sst2"
        train_set, dev, vocab = load_sst2(root)
        if quick:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(len(train_set.y), generator=g)[:QUICK_SENTENCES]
            train_set = SST2(train_set.x[idx], train_set.y[idx])
        model_kw = dict(TASK_MODEL, vocab_size=len(vocab))
        tc = TrainConfig(**{**TASK_TRAIN, "epochs": 1 if quick else TASK_TRAIN["epochs"], "seed": seed})
        task = {}
        for name in ("dense_transformer", "moe_transformer"):
            # results are cached by everything that decides them, so a re-run repeats only the timing
            key = json.dumps([name, model_kw, {k: v for k, v in asdict(tc).items()}, len(train_set.y), seed])
            cached = (
                cache_dir() / "bench" / f"moe-task-{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"
            )
            if cached.is_file():
                log(f"[moe] reusing the trained {name}'s results from {cached}")
                task[name] = json.loads(cached.read_text())
            else:
                log(f"[moe] training {name} on SST-2 ({len(train_set.y)} sentences, {tc.epochs} epochs)")
                task[name] = train_and_eval(name, model_kw, train_set, dev, tc, seed)
                atomic_write_bytes(cached, json.dumps(task[name]).encode())
            r = task[name]
            log(
                f"[moe]   dev accuracy {r['accuracy']:.4f}, loss {r['loss']:.4f} ({r['train_seconds']:.0f} s)"
            )
        from dynets.bench.moe_lm import CharLMConfig, compare
        from dynets.text.data import load_text_table

        lm_cfg = CharLMConfig(steps=150 if quick else CharLMConfig.steps)
        lm = compare(
            load_text_table(root / "train.tsv").texts,
            load_text_table(root / "dev.tsv").texts,
            lm_cfg,
            seed,
            log,
        )
    finally:
        torch.set_num_threads(old_threads)
    dense, moe = task["dense_transformer"], task["moe_transformer"]
    result = {
        "benchmark": "moe_capacity",
        "quick": quick,
        "threads": threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        # headline fields named in the issue
        "dense_time": layers["dense_fwdbwd_s"],
        "moe_time": layers["moe_fwdbwd_s"],
        "time_ratio": layers["moe_vs_dense_fwdbwd"],
        "dense_metric": dense["accuracy"],
        "moe_metric": moe["accuracy"],
        "dropped_tokens": moe["dropped_assignments"],
        # the layer comparison
        "moe_vs_dense_fwd": layers["moe_vs_dense_fwd"],
        "moe_vs_dense_fwdbwd": layers["moe_vs_dense_fwdbwd"],
        "params_ratio": layers["params_ratio"],
        "layer_timing": layers,
        # the real task
        "task": {
            "dataset": "SST-2 (GLUE), train / dev",
            "train_size": len(train_set.y),
            "dev_size": len(dev.y),
            "vocab_size": len(vocab),
            "model": model_kw,
            "train": {**TASK_TRAIN, "epochs": tc.epochs},
            "dense": dense,
            "moe": moe,
            "moe_beats_dense_accuracy": moe["accuracy"] > dense["accuracy"],
            "moe_beats_dense_loss": moe["loss"] < dense["loss"],
            "flops_ratio": moe["mean_flops"] / dense["mean_flops"],
        },
        # the language-modelling task (held-out loss), where capacity rather than over-fitting decides
        "lm": lm,
        "lm_dense_bits_per_char": lm["dense"]["dev_bits_per_char"],
        "lm_moe_bits_per_char": lm["moe"]["dev_bits_per_char"],
        "moe_beats_dense_lm_loss": lm["moe_beats_dense_loss"],
    }
    if json_path is not None:
        path = Path(json_path)
        atomic_write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
        atomic_write_bytes(path.with_suffix(".md"), markdown(result).encode())
        log(f"[moe] wrote {path} and {path.with_suffix('.md')}")
    return result


# Model and schedule of the task comparison (kept here so the JSON records exactly what ran). On 2
# quiet cores a training step takes about 0.75x one dense forward of the timed layer, so the 4 epochs
# of both models (2 x 4 x 1,053 steps) take about 7 minutes.
QUICK_SENTENCES = 12000
TASK_MODEL: dict[str, Any] = dict(
    num_classes=2, d_model=128, n_heads=4, n_layers=2, d_ff=512, num_experts=8, k=1, dropout=0.1
)
TASK_TRAIN: dict[str, Any] = dict(
    epochs=4,
    batch_size=64,
    lr=1e-3,
    optimizer="adamw",
    weight_decay=0.01,
    schedule="cosine",
    warmup_epochs=0.1,
    progress=False,
)


def markdown(r: dict[str, Any]) -> str:
    lt, t = r["layer_timing"], r["task"]
    d, m = t["dense"], t["moe"]
    lines = [
        f"# MoE capacity{' (quick run)' if r['quick'] else ''}",
        "",
        f"torch {r['torch']}, {r['threads']} threads, {r['machine']}.",
        "",
        f"## Layer: top-1 MoE, {lt['num_experts']} experts vs the dense FFN of one expert's size",
        "",
        f"{lt['tokens']} tokens x d={lt['d_model']} (d_ff={lt['d_ff']}), capacity factor "
        f"{lt['capacity_factor']}, medians of {lt['rounds']} alternating rounds.",
        "",
        "| pass | dense (ms) | MoE (ms) | MoE / dense |",
        "|---|---|---|---|",
        f"| forward | {lt['dense_fwd_s'] * 1e3:.1f} | {lt['moe_fwd_s'] * 1e3:.1f} | "
        f"{lt['moe_vs_dense_fwd']:.3f} |",
        f"| forward + backward | {lt['dense_fwdbwd_s'] * 1e3:.1f} | {lt['moe_fwdbwd_s'] * 1e3:.1f} | "
        f"{lt['moe_vs_dense_fwdbwd']:.3f} |",
        "",
        f"Parameters: dense {lt['dense_params']:,}, MoE {lt['moe_params']:,} ({lt['params_ratio']:.2f}x). "
        f"Tokens per expert (training pass): {lt['tokens_per_expert']}; dropped tokens: "
        f"{lt['dropped_tokens_train']} (training capacity), {lt['dropped_tokens_eval']} (eval).",
        "",
        f"## Task: {t['dataset']}",
        "",
        f"{t['train_size']} training sentences, {t['dev_size']} held-out (dev), word vocabulary of "
        f"{t['vocab_size']}; both models trained identically for {t['train']['epochs']} epochs.",
        "",
        "| model | params | dev accuracy | dev loss | mean FLOPs / sample | dropped assignments | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in (d, m):
        lines.append(
            f"| {row['model']} | {row['params']:,} | {row['accuracy']:.4f} | {row['loss']:.4f} | "
            f"{row['mean_flops']:,.0f} | {row['dropped_assignments']} | {row['train_seconds']:.0f} |"
        )
    lines += [
        "",
        f"MoE / dense FLOPs per sample: {t['flops_ratio']:.3f}. MoE beats dense on accuracy: "
        f"{t['moe_beats_dense_accuracy']}; on loss: {t['moe_beats_dense_loss']}.",
        "",
    ]
    lm = r.get("lm")
    if lm:
        c = lm["config"]
        lines += [
            "## Task: character-level language modelling (SST-2 text)",
            "",
            f"{lm['task']}: {lm['train_chars']:,} training characters, {lm['dev_chars']:,} held-out, "
            f"{lm['vocab']} symbols. {c['n_layers']} causal blocks, d={c['d_model']}, expert / FFN size "
            f"{c['d_ff']}, {c['num_experts']} experts top-1; {c['steps']} AdamW steps of {c['batch_size']} "
            f"x {c['seq_len']} characters, same seed and crops for both.",
            "",
            "| model | params | dev bits/char | train bits/char (last 100 steps) | train s |",
            "|---|---|---|---|---|",
        ]
        for row in (lm["dense"], lm["moe"]):
            lines.append(
                f"| {row['model']} | {row['params']:,} | {row['dev_bits_per_char']:.4f} | "
                f"{row['train_bits_per_char_last_100']:.4f} | {row['train_seconds']:.0f} |"
            )
        lines += ["", f"MoE beats dense on held-out loss: {lm['moe_beats_dense_loss']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer timing rounds, 12k sentences, 1 epoch")
    p.add_argument("--json", default=None, help="write the results here (and a .md beside it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    run(quick=a.quick, json_path=a.json, threads=a.threads, seed=a.seed)


if __name__ == "__main__":
    main()
