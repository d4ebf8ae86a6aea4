"""The Dynamic BERT benchmark on SST-2 (issue 3): early exit and DynaBERT against the static encoder.

Models (2 CPU threads, everything seeded):
  static   the pretrained encoder (MiniLM-L6) fine-tuned with its final classifier only, every
           layer run: what a transformers user gets. Timed through its plain static path.
  dynamic  an exit after every layer, by one of three recipes: "two_stage" (DeeBERT: the exits
           trained on the labels on top of the fine-tuned static model, encoder and final
           classifier frozen), "distill" (FastBERT: the same, by self-distillation from the final
           layer) and "joint" (PABEE: encoder and every exit fine-tuned together from the pretrained
           encoder, deeper exits weighted more, the same schedule as the static model). The first
           two share the static model's fine-tuning, so their last exit *is* the static model. The
           recipe with the cheapest operating point on validation is kept.
  dynabert the chosen dynamic model rewired by importance and trained over widths x depths
           (DynaBERT sandwich rule, distilled from its full-width self): the grid of sub-networks.

Data: SST-2's dev set (872 full sentences) is the test set. Validation (calibration, learned
exits, recipe choice) is carved from train: SST-2's training rows are the phrases of its
sentences, so validation takes complete sentences (rows that no other row contains; their
lengths are distributed as dev's; `val_rows="long"`: any row of >= `val_min_words` words, as
before session 9), and every training row that occurs inside a validation row, or contains one,
is left out of training. Training uses a seeded random subset (`train_limit`) to fit a CPU budget.

Operating point, chosen on validation only: the cheapest setting (thresholds calibrated to budgets
for confidence / entropy / learned, patience 1..K-1) whose validation accuracy drop against the
static model, plus `val_sigmas` standard errors of that paired difference, is within `max_drop`
(the margin guards against picking a setting that passed by luck among the many tried).
Everything reported is measured on dev; speed-ups alternate static and dynamic passes in one
process (`compare_wallclock`, medians), on the same length-sorted batches (batch 32, one batch at
a time and in throughput mode, `DynamicBert.run_pooled`) or single sentences (batch 1).
"""

from __future__ import annotations

import bisect
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dynets.bench.common import cache_key as _key
from dynets.bench.common import log
from dynets.bench.evaluate import DEFAULT_SWEEPS
from dynets.bench.plots import plot_pareto
from dynets.bench.text_eval import (
    TextExits,
    collect_text,
    format_grid_table,
    format_text_table,
    plot_grid,
    plot_speed_curves,
    run_text,
    static_logits,
    subnet_grid,
    sweep_text,
    text_batches,
    time_rows,
)
from dynets.bench.wallclock import compare_wallclock
from dynets.core.serialization import atomic_write_bytes, load, save
from dynets.data import cache_dir, data_root
from dynets.depth.learned import fit_learned_exits
from dynets.policies.calibration import calibrate
from dynets.policies.exit_policies import ExitPolicy, NeverExitPolicy, PatiencePolicy, make_policy
from dynets.text.data import TextDataset, TextTable, encode_table, load_text_table
from dynets.text.recipes import JOINT_DISTILL
from dynets.train.loop import TrainConfig

HEADLINE_KEYS = (
    "static_acc",
    "static_sps_b1",
    "static_sps_b32",
    "dynamic_acc",
    "acc_drop",
    "speedup_b1",
    "speedup_b32",
    "mean_layers",
    "flops_ratio",
)
BENCH_RECIPES = ("two_stage", "distill", "joint", "joint_distill")
BUDGETS = tuple(round(0.15 + 0.025 * i, 3) for i in range(35))  # 15% .. 100% of the static cost


@dataclass
class BertBenchConfig:
    encoder: str | None = None  # default: <DYNETS_DATA>/models/all-MiniLM-L6-v2
    data: str | None = None  # a folder with train.tsv and dev.tsv; default: <DYNETS_DATA>/data/sst2
    quick: bool = False
    train_limit: int | None = 12000
    val_size: int = 2000
    # validation rows: "sentences" = complete training sentences (rows no other row contains, as
    # dev's are), "long" = any training row of >= val_min_words words (the rule before session 9)
    val_rows: str = "sentences"
    val_min_words: int = 10
    dev_limit: int | None = None
    max_length: int = 64
    exit_pooling: str = "mean"  # early exits pool the valid tokens (MiniLM is a mean-pooling encoder)
    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-5
    warmup_epochs: float = 0.1
    exit_epochs: int = 1
    exit_lr: float = 1e-3
    joint_epochs: int = 1  # joint_distill's last stage (encoder + every exit); the other stages: epochs
    recipes: tuple[str, ...] = ("two_stage", "distill", "joint", "joint_distill")
    select_policies: tuple[str, ...] = ("confidence", "entropy", "learned", "patience")
    curve_policies: tuple[str, ...] = ("entropy", "patience", "learned")
    max_drop: float = 0.01
    val_sigmas: float = 1.0  # margin: standard errors of the paired validation accuracy difference
    dynabert: bool = True
    dynabert_limit: int = 3000
    dynabert_epochs: int = 1
    dynabert_lr: float = 5e-5
    widths: tuple[float, ...] | None = None  # default: dynabert.WIDTHS
    depths: tuple[float, ...] | None = None  # default: dynabert.DEPTHS
    b1_samples: int | None = None  # default: all of dev (as for the accuracy and FLOPs reported)
    b32_samples: int | None = None  # default: all of dev
    curve_samples: int = 320
    grid_samples: int = 256
    rounds: int = 5
    curve_rounds: int = 1
    learned_steps: int = 300  # optimiser steps of each learned-exit predictor (fit on validation)
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quick:  # a few minutes on 2 cores: enough to run every step, not to reach full accuracy
            self.train_limit = min(self.train_limit or 1000, 1000)
            self.lr = max(self.lr, 1e-4)  # few steps: a larger step size
            self.val_size = min(self.val_size, 150)
            self.dev_limit = min(self.dev_limit or 200, 200)
            self.max_length = min(self.max_length, 48)
            self.epochs = min(self.epochs, 1)
            self.dynabert_limit = min(self.dynabert_limit, 128)
            self.b1_samples = min(self.b1_samples or 32, 32)
            self.curve_samples = min(self.curve_samples, 32)
            self.grid_samples = min(self.grid_samples, 64)
            self.rounds = min(self.rounds, 3)
        je = self.joint_epochs
        if isinstance(je, bool) or not isinstance(je, int) or je < 1:
            raise ValueError(f"BertBenchConfig.joint_epochs: expected an int >= 1, got {self.joint_epochs!r}")
        for name in ("train_limit", "dev_limit", "b1_samples", "b32_samples"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"BertBenchConfig.{name}: expected None or an int >= 1, got {v!r}")
        if self.val_rows not in ("sentences", "long"):
            raise ValueError(
                f"BertBenchConfig.val_rows: expected 'sentences' or 'long', got {self.val_rows!r}"
            )
        bad = set(self.recipes) - set(BENCH_RECIPES)
        if bad or not self.recipes:
            raise ValueError(
                f"BertBenchConfig.recipes: expected some of {list(BENCH_RECIPES)}, got {self.recipes}"
            )


def _log(msg: str) -> None:
    log(msg, tag="bench bert")


# ------------------------------------------------------------------------------------------ data
def complete_sentences(texts: list[str]) -> list[bool]:
    """For a phrase-level table (SST-2's train: every sentence and the phrases of its parse tree),
    True where the row is a complete sentence: no other row contains it as a run of whole words."""
    norm = [" ".join(t.split()) for t in texts]
    rows, inside = set(norm), set()
    for t in norm:
        w = t.split()
        n = len(w)
        for i in range(n):
            for j in range(i + 1, n + 1 if i else n):  # every proper run of words
                sub = " ".join(w[i:j])
                if sub in rows:
                    inside.add(sub)
    return [t not in inside for t in norm]


def split_validation(
    texts: list[str], val_size: int, min_words: int, seed: int, *, sentences: bool = False
) -> tuple[list[int], list[int]]:
    """(validation rows, remaining training rows in seeded random order) of a phrase-level table.

    Validation: random rows with >= min_words words; with `sentences`, random complete sentences
    (rows no other row contains, `complete_sentences`) of any length, which are distributed like
    SST-2's dev set (full sentences). Left out of training: every row that occurs inside a
    validation row (its phrases) or contains one (the sentence it came from).
    """
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(texts), generator=gen).tolist()
    if sentences:
        complete = complete_sentences(texts)
        val = [i for i in perm if complete[i]][:val_size]
        if not val:
            raise ValueError("no training row is a complete sentence (every row lies inside another)")
    else:
        val = [i for i in perm if len(texts[i].split()) >= min_words][:val_size]
        if not val:
            raise ValueError(f"no training row has >= {min_words} words to serve as validation")
    norm = [" ".join(t.split()) for t in texts]  # words compared, whatever the spacing
    val_set = set(val)
    val_blob = "\n".join(f" {norm[i]} " for i in val)
    excluded = {i for i, t in enumerate(norm) if i not in val_set and f" {t} " in val_blob}
    blob, starts, pos = [], [], 0  # all rows, to find the ones that contain a validation row
    for t in norm:
        starts.append(pos)
        blob.append(f" {t} ")
        pos += len(t) + 3
    all_rows = "\n".join(blob)
    for i in val:
        needle, at = f" {norm[i]} ", 0
        while (at := all_rows.find(needle, at)) != -1:
            excluded.add(bisect.bisect_right(starts, at) - 1)
            at += 1
    train = [i for i in perm if i not in val_set and i not in excluded]
    return val, train


def _subset(table: TextTable, idx: list[int]) -> TextTable:
    return TextTable(
        texts=[table.texts[i] for i in idx],
        labels=[table.labels[i] for i in idx],
        label_ids=table.label_ids[idx],
        classes=table.classes,
    )


# -------------------------------------------------------------------------------------- training
def _train_stage(
    model: Any,
    data: TextDataset,
    tc: TrainConfig,
    trainable: list,
    stage: int,
    *,
    teacher: Any = None,
    **kw: Any,
) -> dict:
    """One stage of the text recipes (dynets.text.recipes) with only `trainable` updated; flags restored.
    With `teacher`: joint_distill's last stage (encoder and every exit, distilled from `teacher`).

    The recipes' first stage (encoder + final classifier) is shared by two_stage and distill, so the
    benchmark runs the stages itself: stage 1 once (the static model), stage 2 once per recipe.
    """
    from dynets.text.recipes import _as_float, _stage, joint_distill_stage

    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    xy = _as_float(data, "data")
    try:
        if teacher is not None:
            result = joint_distill_stage(model, xy, None, tc, stage, teacher=teacher)
        else:
            result = _stage(model, xy, None, tc, trainable, stage, **kw)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
        model.eval()
    return result.history[-1] if result.history else {}


def _cached(path: Path, what: str, build: Any) -> Any:
    if (path / "config.json").exists():
        _log(f"reusing trained {what} from {path}")
        return load(path)
    start = time.time()
    model = build()
    model.eval()
    save(model, path)
    _log(f"trained {what} in {time.time() - start:.0f} s -> {path}")
    return model


# ------------------------------------------------------------------------------------- selection
def candidates(val: TextExits, kinds: tuple[str, ...]) -> list[dict]:
    """Policy settings evaluated on validation: calibrated thresholds per budget, the default sweep
    values, and patience 1..K-1."""
    out = []
    for kind in kinds:
        if kind == "patience":
            policies: list[ExitPolicy] = [PatiencePolicy(p) for p in range(1, val.num_exits)]
        elif kind == "learned" and val.learned is None:
            continue
        else:
            policies = [make_policy(kind, v) for v in DEFAULT_SWEEPS[kind]]
            costs = val.mean_costs(kind == "learned")
            for b in BUDGETS:
                try:
                    cal = calibrate(
                        kind,
                        val.exit_logits,
                        val.labels,
                        costs,
                        b,
                        full_cost=val.static_mean,
                        learned=val.learned,
                    )
                except ValueError:  # a budget below the first exit's cost
                    continue
                policies.append(cal.policy)
        out += [{"policy": p, **val.evaluate(p)} for p in policies]
    return out


def select(
    cands: list[dict], val: TextExits, reference_correct: torch.Tensor, max_drop: float, sigmas: float
) -> dict | None:
    """The cheapest candidate (mean FLOPs) whose accuracy drop against the reference on `val`, plus
    `sigmas` standard errors of that paired difference, is at most max_drop; None if none is.

    reference_correct: (N,) bool, the reference (static) model right on each validation sentence.
    The chosen dict gains `val_drop` and `val_drop_se`."""
    ref = reference_correct.double()
    n = ref.numel()
    for c in sorted(cands, key=lambda c: (c["mean_flops"], -c["accuracy"])):
        diff = ref - val.correct(c["policy"]).double()  # (N,) in {-1, 0, 1}
        drop = float(diff.mean())
        se = float(diff.std()) / n**0.5 if n > 1 else 0.0
        if drop + sigmas * se <= max_drop + 1e-12:
            return {**c, "val_drop": drop, "val_drop_se": se}
    return None


# ------------------------------------------------------------------------------------------ run
def run(
    cfg: BertBenchConfig, *, json_path: str | None = None, out_dir: str | None = None, progress: bool = True
) -> dict:
    """Train (or reuse cached) models, select on validation, measure on dev; write JSON, Markdown, PNGs."""
    from dynets.text.bert import DynamicBert

    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    out = Path(out_dir or (Path(json_path).parent if json_path else "benchmarks/results"))
    stem = Path(json_path).stem if json_path else "dynamic_bert_sst2"
    encoder = Path(cfg.encoder) if cfg.encoder else data_root() / "models" / "all-MiniLM-L6-v2"
    folder = Path(cfg.data) if cfg.data else data_root() / "data" / "sst2"

    # 1. data: validation carved from train, a seeded training subset, dev as the test set
    full = load_text_table(folder / "train.tsv")
    dev_t = load_text_table(folder / "dev.tsv", labels=full.classes)
    val_idx, train_idx = split_validation(
        full.texts, cfg.val_size, cfg.val_min_words, cfg.seed, sentences=cfg.val_rows == "sentences"
    )
    train_idx = train_idx[: cfg.train_limit] if cfg.train_limit else train_idx
    if cfg.dev_limit:
        dev_t = _subset(dev_t, list(range(min(cfg.dev_limit, len(dev_t)))))
    _log(
        f"SST-2: train {len(train_idx)} of {len(full)} rows, validation {len(val_idx)}, "
        f"dev (test) {len(dev_t)}"
    )

    tc = dict(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        optimizer="adamw",
        weight_decay=0.01,
        warmup_epochs=min(cfg.warmup_epochs, float(cfg.epochs)),
        seed=cfg.seed,
        progress=progress,
    )
    if not (encoder / "config.json").is_file():
        raise FileNotFoundError(
            f"encoder: expected a Hugging Face model directory with config.json, got {encoder}"
        )
    positions = json.loads((encoder / "config.json").read_text()).get("max_position_embeddings", 512)
    max_length = min(cfg.max_length, int(positions))
    enc_id = [str(encoder.resolve()), (encoder / "config.json").stat().st_size]
    data_id = [str(folder.resolve()), len(full), (folder / "train.tsv").stat().st_size]
    base = [
        enc_id,
        data_id,
        cfg.train_limit,
        cfg.val_size,
        cfg.val_min_words if cfg.val_rows == "long" else "sentences",
        cfg.seed,
        max_length,
        cfg.exit_pooling,
        {k: v for k, v in tc.items() if k != "progress"},
    ]
    cache = cache_dir() / "bench"

    # 2. the static model = stage 1 (encoder + final classifier), shared by two_stage and distill
    fresh: dict[str, Any] = {}

    def build_static() -> Any:
        torch.manual_seed(cfg.seed)
        model = DynamicBert.from_pretrained_encoder(
            encoder, full.classes, max_length=max_length, exit_pooling=cfg.exit_pooling
        )
        fresh["train"] = encode_table(model, _subset(full, train_idx))
        K = model.num_exits
        _log(f"fine-tuning the static model on {len(train_idx)} sentences for {cfg.epochs} epoch(s)")
        _train_stage(
            model,
            fresh["train"],
            TrainConfig(**tc),
            [model.embeddings, model.layers, model.heads[-1]],
            1,
            exit_weights=[0.0] * (K - 1) + [1.0],
            distill=0.0,
        )
        return model

    static = _cached(cache / f"bert-sst2-static-{_key(base)}", "static model", build_static)
    train = fresh["train"] if "train" in fresh else encode_table(static, _subset(full, train_idx))
    val = encode_table(static, _subset(full, val_idx))
    dev = encode_table(static, dev_t)
    K = static.num_exits
    val_correct = static_logits(static, val.x).argmax(-1) == val.y  # (N_val,) bool
    val_static = float(val_correct.double().mean())
    static_acc = float((static_logits(static, dev.x).argmax(-1) == dev.y).double().mean())
    _log(f"static: validation accuracy {val_static:.4f}, dev accuracy {static_acc:.4f}")

    # 3. exits per recipe (encoder frozen, or joint), learned exits fitted on validation, operating
    #    point on validation
    recipes: dict[str, dict] = {}
    best = None

    def exit_path(recipe: str) -> Path:
        rkey = [recipe] if recipe == "joint" else [recipe, cfg.exit_epochs, cfg.exit_lr]
        if recipe == "joint_distill":
            rkey.append(JOINT_DISTILL)
            if cfg.joint_epochs != 1:  # (one epoch: the key of the models cached before this option)
                rkey.append({"joint_epochs": cfg.joint_epochs})
        return cache / f"bert-sst2-{recipe}-{_key(base + rkey)}"

    def build_exits(recipe: str) -> Any:
        if recipe == "joint":  # PABEE-style: from the pretrained encoder, every exit at once
            torch.manual_seed(cfg.seed)
            model = DynamicBert.from_pretrained_encoder(
                encoder, full.classes, max_length=max_length, exit_pooling=cfg.exit_pooling
            )
            _log(f"training encoder and all exits jointly ({recipe}) for {cfg.epochs} epoch(s)")
            _train_stage(
                model,
                train,
                TrainConfig(**tc),
                [model.embeddings, model.layers, model.heads],
                1,
                exit_weights="linear",
                distill=0.0,
            )
            return model
        if recipe == "joint_distill":  # the distill model, then encoder and every exit together
            _cached(exit_path("distill"), "exits (distill)", lambda: build_exits("distill"))
            model = load(exit_path("distill"))
            torch.manual_seed(cfg.seed)
            jtc = TrainConfig(**{**tc, "epochs": cfg.joint_epochs})
            _log(f"training encoder and every exit together ({recipe}) for {cfg.joint_epochs} epoch(s)")
            teacher = load(cache / f"bert-sst2-static-{_key(base)}").eval()  # the stage-1 model
            _train_stage(model, train, jtc, [], 3, teacher=teacher)
            return model
        model = load(cache / f"bert-sst2-static-{_key(base)}")
        etc = TrainConfig(**{**tc, "epochs": cfg.exit_epochs, "lr": cfg.exit_lr, "warmup_epochs": 0.0})
        _log(f"training exits ({recipe}) for {cfg.exit_epochs} epoch(s)")
        _train_stage(
            model,
            train,
            etc,
            list(model.heads)[:-1],
            2,
            exit_weights=[1.0] * (K - 1) + [0.0],
            distill=1.0 if recipe == "distill" else 0.0,
        )
        return model

    for recipe in cfg.recipes:
        path = exit_path(recipe)
        dyn = _cached(path, f"exits ({recipe})", lambda recipe=recipe: build_exits(recipe))
        v = collect_text(dyn, val.x, val.y)
        fit_learned_exits(dyn, v.exit_logits, v.labels, steps=cfg.learned_steps, seed=cfg.seed)
        v = collect_text(dyn, val.x, val.y)
        choice = select(candidates(v, cfg.select_policies), v, val_correct, cfg.max_drop, cfg.val_sigmas)
        if choice is None:  # cannot happen while a policy may run every layer; kept for safety
            choice = {"policy": NeverExitPolicy(), **v.evaluate(NeverExitPolicy())}
        recipes[recipe] = {
            "val_anytime": v.accuracy_per_exit(),
            "val_choice": {
                **{k: c for k, c in choice.items() if k != "policy"},
                "policy": choice["policy"].to_dict(),
            },
        }
        _log(
            f"{recipe}: validation anytime {[round(a, 3) for a in v.accuracy_per_exit()]}; cheapest with "
            f"drop + {cfg.val_sigmas:g} SE <= {cfg.max_drop:.3f}: {choice['policy']} at FLOPs "
            f"{choice['flops_ratio']:.3f}, accuracy {choice['accuracy']:.4f}"
        )
        if best is None or (choice["mean_flops"], -choice["accuracy"]) < (
            best[2]["mean_flops"],
            -best[2]["accuracy"],
        ):
            best = (recipe, dyn, choice, path)
    recipe, dyn, choice, dyn_path = best
    policy = choice["policy"]
    dyn.policy = policy

    # 4. dev: replayed sweeps and the real dynamic run at the operating point
    dev_outs = collect_text(dyn, dev.x, dev.y)
    real = run_text(dyn, dev.x, policy, batch_size=32)
    replayed = dev_outs.exits(policy)
    dynamic_acc = float((real["logits"].argmax(-1) == dev.y).double().mean())
    flops_ratio = float(real["flops"].mean()) / dev_outs.static_mean
    mean_layers = float((real["exit_index"] + 1).double().mean())
    _log(
        f"dev at {policy}: accuracy {dynamic_acc:.4f} (static {static_acc:.4f}), FLOPs {flops_ratio:.3f}, "
        f"mean layers {mean_layers:.2f}"
    )

    # 5. wall-clock: static and dynamic alternating on the same batches
    n32 = min(cfg.b32_samples or len(dev), len(dev))
    n1 = min(cfg.b1_samples or len(dev), len(dev))
    timing = {}
    for name, batches in (
        ("b32", text_batches(dyn, dev.x[:n32], 32)),
        ("b32_unsorted", text_batches(dyn, dev.x[:n32], 32, sort=False)),
        ("b1", text_batches(dyn, dev.x[:n1], 1, sort=False)),
    ):
        timing[name] = compare_wallclock(static.forward_static, dyn, batches, rounds=cfg.rounds)
        _log(
            f"{name}: static {timing[name]['static_per_s']:.1f}/s, "
            f"dynamic {timing[name]['dynamic_per_s']:.1f}/s, "
            f"speed-up {timing[name]['speedup']:.2f}x (FLOPs {1 / flops_ratio:.2f}x)"
        )
    # Throughput mode at batch 32: the survivors of consecutive batches are pooled before each later
    # layer (DynamicBert.run_pooled), so no layer runs on a shrunken batch. Both sides get the same
    # length-sorted 32-sentence batches, timed in chunks of 8 batches alternating the two per chunk.
    chunks = text_batches(dyn, dev.x[:n32], 256)
    wc = compare_wallclock(
        lambda c: [static.forward_static(b) for b in c.split(32)],
        lambda c: dyn.run_pooled(c, 32, policy),
        chunks,
        rounds=cfg.rounds,
        chunks=len(chunks),
    )
    with torch.inference_mode():
        pooled = [dyn.run_pooled(c, 32, policy) for c in chunks]
    pooled_flops = float(torch.cat([o.flops for o in pooled]).mean()) / dev_outs.static_mean
    wc["flops_ratio"] = pooled_flops
    timing["b32_pooled"] = wc
    _log(
        f"b32 pooled: static {wc['static_per_s']:.1f}/s, dynamic {wc['dynamic_per_s']:.1f}/s, "
        f"speed-up {wc['speedup']:.2f}x (FLOPs {1 / pooled_flops:.2f}x)"
    )
    hf_fn = _transformers_static(static)
    if hf_fn is not None:  # our static path against plain transformers, same weights and batches
        wc = compare_wallclock(
            hf_fn, static.forward_static, text_batches(dyn, dev.x[: min(n32, 256)], 32), rounds=3
        )
        timing["static_vs_transformers_b32"] = wc
        _log(f"static path vs transformers' BertModel at batch 32: {wc['speedup']:.2f}x")

    # 6. accuracy-vs-speed curves (dev, batch 32): every sweep setting timed against static
    rows = sweep_text(dev_outs, cfg.curve_policies)
    time_rows(
        dyn,
        rows,
        text_batches(dyn, dev.x[: cfg.curve_samples], 32),
        static_fn=static.forward_static,
        rounds=cfg.curve_rounds,
        progress=progress,
    )
    curves = {k: [r for r in rows if r["policy"] == k] for k in cfg.curve_policies}
    anytime = [
        {"exit": k, "accuracy": a, "mean_flops": float(dev_outs.costs[:, k].mean())}
        for k, a in enumerate(dev_outs.accuracy_per_exit())
    ]

    # 7. DynaBERT width x depth grid
    grid, dyna_info = _dynabert(
        cfg, dyn_path, train, val, dev, static, policy, tc, base + [recipe, Path(dyn_path).name], progress
    )

    static_row = {
        "accuracy": static_acc,
        "mean_flops": dev_outs.static_mean,
        "sps": timing["b32"]["static_per_s"],
        "layers": K,
    }
    operating = {"speedup": timing["b32"]["speedup"], "accuracy": dynamic_acc}
    val_what = (
        "complete training sentences (rows no other row contains, as dev's sentences)"
        if cfg.val_rows == "sentences"
        else f"training rows of >= {cfg.val_min_words} words"
    )
    result = {
        "benchmark": "dynamic_bert_sst2",
        "quick": cfg.quick,
        "config": asdict(cfg),
        "data": {
            "train_sentences": len(train),
            "train_rows_total": len(full),
            "val_sentences": len(val),
            "dev_sentences": len(dev),
            "max_length": max_length,
            "note": (
                f"trained on a seeded random subset of {len(train)} of SST-2's {len(full)} training rows "
                f"({cfg.epochs} epoch(s), max_length {max_length}) to fit a 2-core CPU budget; "
                f"validation = {len(val)} {val_what} (their phrases left out of training); "
                f"test = SST-2 dev ({len(dev)} sentences)"
            ),
        },
        "static_acc": static_acc,
        "static_sps_b1": timing["b1"]["static_per_s"],
        "static_sps_b32": timing["b32"]["static_per_s"],
        "dynamic_acc": dynamic_acc,
        "acc_drop": static_acc - dynamic_acc,
        "speedup_b1": timing["b1"]["speedup"],
        "speedup_b32": timing["b32_pooled"]["speedup"],
        "speedup_b32_per_batch": timing["b32"]["speedup"],
        "speedup_b32_unsorted": timing["b32_unsorted"]["speedup"],
        "mean_layers": mean_layers,
        "flops_ratio": flops_ratio,
        "policy": policy.to_dict(),
        "recipe": recipe,
        "operating_point": {
            "val_accuracy": choice["accuracy"],
            "val_static_accuracy": val_static,
            "val_flops_ratio": choice["flops_ratio"],
            "dev_exit_fractions": (
                torch.bincount(real["exit_index"], minlength=K).double() / len(dev)
            ).tolist(),
            "replay_agreement": float((replayed == real["exit_index"]).double().mean()),
            "dynamic_sps_b1": timing["b1"]["dynamic_per_s"],
            "dynamic_sps_b32": timing["b32"]["dynamic_per_s"],
        },
        "recipes": recipes,
        "anytime": anytime,
        "curves": curves,
        "dynabert_grid": grid,
        "dynabert": dyna_info,
        "timing": timing,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": time.time() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    if json_path:
        atomic_write_bytes(json_path, json.dumps(result, indent=2).encode())
    title = f"SST-2 dev: Dynamic BERT ({recipe}) vs static ({'quick' if cfg.quick else 'full'})"
    plot_speed_curves(rows, static_acc, out / f"{stem}_curves.png", operating=operating, title=title)
    plot_pareto(rows, static_row, out / f"{stem}_pareto.png", anytime=anytime, title=title)
    if grid:
        plot_grid(grid, out / f"{stem}_dynabert.png", title="DynaBERT sub-networks: SST-2 dev accuracy (%)")
    atomic_write_bytes(out / f"{stem}.md", _markdown(result, rows, static_row).encode())
    _log(f"done in {result['seconds']:.0f} s")
    return result


def _transformers_static(static: Any) -> Any:
    """The static model's weights in a plain transformers BertModel + the same classifier, or None."""
    try:
        from dynets.text.hf import encoder_from_config

        hf = encoder_from_config(static.config.encoder).eval()
        hf.embeddings.load_state_dict(static.embeddings.state_dict())
        hf.encoder.layer.load_state_dict(static.layers.state_dict())
    except Exception as e:  # a reference only: never fail the benchmark over it
        _log(f"transformers reference skipped ({e})")
        return None
    head, pad = static.heads[-1], static.config.pad_token_id

    def fn(b: torch.Tensor) -> torch.Tensor:
        return head(hf(input_ids=b, attention_mask=(b != pad).long()).last_hidden_state)

    return fn


def _dynabert(cfg, dyn_path, train, val, dev, static, policy, tc, base, progress) -> tuple[list | None, dict]:
    if not cfg.dynabert:
        return None, {"skipped": "dynabert=False"}
    try:
        from dynets.text.dynabert import DEPTHS, WIDTHS, rewire, train_dynabert
    except ImportError as e:
        _log(f"DynaBERT grid skipped: dynets.text.dynabert is not available ({e})")
        return None, {"skipped": f"dynets.text.dynabert unavailable: {e}"}
    widths, depths = tuple(cfg.widths or WIDTHS), tuple(cfg.depths or DEPTHS)
    n = min(cfg.dynabert_limit, len(train))
    small = TextDataset(train.x[:n], train.y[:n], train.classes)
    dtc = dict(tc, epochs=cfg.dynabert_epochs, lr=cfg.dynabert_lr, warmup_epochs=0.0)
    key = _key(base + [n, widths, depths, {k: v for k, v in dtc.items() if k != "progress"}])

    def build() -> Any:
        model = load(dyn_path)
        model.train()
        _log(f"DynaBERT: rewiring, then training widths {widths} x depths {depths} on {n} sentences")
        rewire(model, small, seed=cfg.seed)
        train_dynabert(model, small, TrainConfig(**dtc), widths=widths, depths=depths)
        return model

    dyna = _cached(cache_dir() / "bench" / f"bert-sst2-dynabert-{key}", "DynaBERT model", build)
    dyna.set_subnet(1.0, 1.0)
    v = collect_text(dyna, val.x, val.y)
    fit_learned_exits(dyna, v.exit_logits, v.labels, steps=cfg.learned_steps, seed=cfg.seed)
    grid = subnet_grid(
        dyna,
        dev.x,
        dev.y,
        widths,
        depths,
        policy=policy,
        static_fn=static.forward_static,
        timing_batches=text_batches(dyna, dev.x[: cfg.grid_samples], 32),
        rounds=1,
        progress=progress,
    )
    for g in grid:
        _log(
            f"width {g['width']:g} depth {g['depth']:g}: accuracy {g['accuracy']:.4f}, "
            f"FLOPs {g['flops_ratio']:.2f}, "
            f"speed-up {g.get('speedup', float('nan')):.2f}x"
        )
    info = {
        "train_sentences": n,
        "epochs": cfg.dynabert_epochs,
        "lr": cfg.dynabert_lr,
        "widths": widths,
        "depths": depths,
        "start": "the chosen early-exit model, rewired by importance",
    }
    return grid, info


def _policy_str(p: dict) -> str:
    """{'kind': 'entropy', 'threshold': [0.1, 0.2]} -> 'entropy (threshold 0.1, 0.2)'."""
    args = []
    for k, v in p.items():
        if k != "kind":
            vals = v if isinstance(v, list) else [v]
            args.append(f"{k} " + ", ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in vals))
    return f"{p['kind']} ({'; '.join(args)})" if args else p["kind"]


def _markdown(r: dict, rows: list[dict], static_row: dict) -> str:
    t = r["timing"]
    op = r["operating_point"]
    lines = [
        f"# Dynamic BERT on SST-2 ({'quick' if r['quick'] else 'full'} run)",
        "",
        r["data"]["note"] + ".",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| static accuracy (dev) | {100 * r['static_acc']:.2f}% |",
        f"| dynamic accuracy (dev, {r['recipe']}, {_policy_str(r['policy'])}) | "
        f"{100 * r['dynamic_acc']:.2f}% |",
        f"| accuracy drop | {100 * r['acc_drop']:.2f} points |",
        f"| mean layers run (of {static_row['layers']}) | {r['mean_layers']:.2f} |",
        f"| mean FLOPs vs static | {r['flops_ratio']:.3f} |",
        f"| sentences/s batch 1, static / dynamic | {t['b1']['static_per_s']:.1f} / "
        f"{t['b1']['dynamic_per_s']:.1f} |",
        f"| speed-up batch 1 | {r['speedup_b1']:.2f}x |",
        f"| sentences/s batch 32 throughput mode, static / dynamic | {t['b32_pooled']['static_per_s']:.1f} / "
        f"{t['b32_pooled']['dynamic_per_s']:.1f} |",
        f"| speed-up batch 32, throughput mode (survivors of consecutive length-sorted batches pooled) | "
        f"{r['speedup_b32']:.2f}x |",
        f"| sentences/s batch 32 one batch at a time, static / dynamic | {t['b32']['static_per_s']:.1f} / "
        f"{t['b32']['dynamic_per_s']:.1f} |",
        f"| speed-up batch 32, one batch at a time (length-sorted batches) | "
        f"{r['speedup_b32_per_batch']:.2f}x |",
        f"| speed-up batch 32, one batch at a time (batches in dev order) | "
        f"{r['speedup_b32_unsorted']:.2f}x |",
        f"| validation: static / chosen accuracy, FLOPs ratio | {100 * op['val_static_accuracy']:.2f}% / "
        f"{100 * op['val_accuracy']:.2f}%, {op['val_flops_ratio']:.3f} |",
    ]
    if "static_vs_transformers_b32" in t:
        lines.append(
            f"| static path vs transformers BertModel, batch 32 | "
            f"{t['static_vs_transformers_b32']['speedup']:.2f}x |"
        )
    lines += [
        "",
        "## Recipes (validation)",
        "",
        "| recipe | anytime accuracy per exit | chosen policy | FLOPs |",
        "|---|---|---|---:|",
    ]
    for name, rec in r["recipes"].items():
        anytime = ", ".join(f"{100 * a:.1f}" for a in rec["val_anytime"])
        c = rec["val_choice"]
        lines.append(
            f"| {name} | {anytime} | {_policy_str(c['policy'])}: {100 * c['accuracy']:.2f}% | "
            f"{c['flops_ratio']:.3f} |"
        )
    lines += [
        "",
        "## Policy sweep on dev (speed-up measured at batch 32)",
        "",
        format_text_table(rows, static_row),
    ]
    if r["dynabert_grid"]:
        lines += [
            "",
            "## DynaBERT width x depth (dev)",
            "",
            "Sentences/s and speed-up: the sub-network itself, every layer it keeps, against the full",
            "network at batch 32 (one timing round, so about +-10%). Then the same sub-network with",
            "early exit under the operating policy (its thresholds not recalibrated per sub-network).",
            "",
            format_grid_table(r["dynabert_grid"]),
        ]
    return "\n".join(lines) + "\n"
