"""The early-exit benchmark: accuracy vs FLOPs, calibration, and realised wall-clock speed-up.

Trains a static ResNet and its multi-exit twin identically (same backbone, data, seed, schedule;
the multi-exit one adds exit heads and self-distillation), then on the test set reports:
  - accuracy vs mean FLOPs for every policy setting, against the static model;
  - the operating point calibrated on validation data to 50% of the static cost;
  - calibration error for budgets of 30/50/70% of the static cost;
  - images/s of dynamic vs static at batch 1 and 64, alternating in one process, and the
    realisation = wall-clock speed-up / FLOPs speed-up.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dynets.bench.common import cache_key as _key
from dynets.bench.common import log as _log
from dynets.bench.evaluate import collect, format_table, sweep
from dynets.bench.plots import plot_examples_by_exit, plot_pareto
from dynets.bench.wallclock import compare_wallclock, split_batches
from dynets.core.registry import create_model
from dynets.core.serialization import atomic_write_bytes, load, save
from dynets.data import DATASET_STATS, cache_dir, load_dataset
from dynets.depth.learned import fit_learned_exits
from dynets.policies.calibration import calibrate
from dynets.train import TrainConfig, train

# The fields the issue names; every run writes them at the top level of its JSON.
HEADLINE_KEYS = (
    "static_acc",
    "dynamic_acc",
    "flops_ratio",
    "speedup_b1",
    "speedup_b64",
    "realization_b1",
    "realization_b64",
    "calibration_error_max",
)


@dataclass
class EarlyExitBenchConfig:
    data: str = "cifar10"
    quick: bool = False
    epochs: int = 15
    train_limit: int | None = None
    test_limit: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    distill: float = 0.5
    # "joint": backbone and exits trained together from scratch; "frozen": exits trained on the
    # trained static backbone (SDN's IC-only training), so the final exit equals the static model.
    # "finetune": the frozen recipe, then the whole network (backbone included) fine-tuned for
    # `finetune_epochs` at a small learning rate with the deeper exits weighted up (SDN-style).
    recipe: str = "frozen"
    head_epochs: int = 8
    finetune_epochs: int = 5
    finetune_lr: float = 0.01
    # None: 1 for every exit and 2 for the last (1, 1, 1, 2 for the zoo's 4-exit ResNet)
    finetune_exit_weights: tuple[float, ...] | None = None
    budgets: tuple[float, ...] = (0.3, 0.5, 0.7)
    operating_budget: float = 0.5
    policies: tuple[str, ...] = ("confidence", "entropy", "learned")
    b1_samples: int = 500
    b64_samples: int = 4096
    rounds: int = 11
    seed: int = 0
    model_kw: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.quick:
            self.epochs = min(self.epochs, 3)
            self.train_limit = self.train_limit or 8000
            self.test_limit = self.test_limit or 2000
            self.b1_samples = min(self.b1_samples, 200)
            self.b64_samples = min(self.b64_samples, 1024)
            self.rounds = min(self.rounds, 5)


def _validated_static(model: torch.nn.Module):
    """The static model's plain path (every stage, final head only) behind the same input check
    that the dynamic model's forward makes, so the two are timed like for like."""

    def run(x: torch.Tensor) -> torch.Tensor:
        model.check_input(x)
        return model.forward_static(x)

    return run


def run(
    cfg: EarlyExitBenchConfig,
    *,
    json_path: str | None = None,
    out_dir: str | None = None,
    progress: bool = True,
) -> dict:
    torch.set_num_threads(2)
    out = Path(out_dir or (Path(json_path).parent if json_path else "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(json_path).stem if json_path else f"early_exit_{cfg.data}"
    t0 = time.time()
    train_set = load_dataset(cfg.data, "train", limit=cfg.train_limit)
    val_set = load_dataset(cfg.data, "val", limit=2000 if cfg.quick else None)
    test_set = load_dataset(cfg.data, "test", limit=cfg.test_limit)
    _log(f"data {cfg.data}: train {len(train_set)}, val {len(val_set)}, test {len(test_set)}")
    c, h, _ = train_set.input_shape
    mean, std = DATASET_STATS.get(cfg.data, ((0.5,), (0.25,)))
    kw = dict(
        in_channels=c, image_size=h, num_classes=train_set.num_classes, mean=tuple(mean), std=tuple(std)
    )
    kw.update(cfg.model_kw)
    augment = "crop_flip" if h == 32 else "none"
    tc = dict(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        augment=augment,
        progress=progress,
        channels_last=True,
    )

    # Trained models are cached by what decides them, so the timing can be re-run on a quiet machine.
    tc_key = {k: v for k, v in tc.items() if k != "progress"}
    base = [cfg.data, cfg.train_limit, cfg.seed, kw, tc_key]
    # The static model does not depend on the exits' settings, so runs that differ only there share it.
    static_kw = {k: v for k, v in kw.items() if k not in ("head", "exits", "learned_exits")}
    static_base = [cfg.data, cfg.train_limit, cfg.seed, static_kw, tc_key]
    cache = cache_dir() / "bench"
    name = f"early_exit_{cfg.data}"  # not the JSON name: runs writing elsewhere share trained models
    static = _trained(
        cache / f"{name}-static-{_key(static_base)}",
        "static_resnet",
        static_kw,
        train_set,
        TrainConfig(**tc),
        cfg.seed,
    )
    static_before = static
    if cfg.recipe == "joint":
        ee_path = cache / f"{name}-joint-{_key(base + [cfg.distill])}"
        dyn = _trained(ee_path, "ee_resnet", kw, train_set, TrainConfig(**tc, distill=cfg.distill), cfg.seed)
    elif cfg.recipe in ("frozen", "finetune"):
        ee_path = cache / f"{name}-frozen-{_key(base + [cfg.distill, cfg.head_epochs])}"
        head_tc = TrainConfig(**{**tc, "epochs": cfg.head_epochs}, distill=cfg.distill)
        dyn = _trained(ee_path, "ee_resnet", kw, train_set, head_tc, cfg.seed, backbone=static)
        if cfg.recipe == "finetune":
            weights = cfg.finetune_exit_weights or (1.0,) * (dyn.num_exits - 1) + (2.0,)
            ft = [cfg.finetune_epochs, cfg.finetune_lr, list(weights)]
            ft_path = cache / f"{name}-finetune-{_key(base + [cfg.distill, cfg.head_epochs] + ft)}"
            ft_tc = TrainConfig(
                **{**tc, "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr},
                distill=cfg.distill,
                exit_weights=list(weights),
            )
            dyn = _trained(ft_path, "ee_resnet", kw, train_set, ft_tc, cfg.seed, start=dyn)
            # Like for like: the static baseline gets the same extra training as the early-exit
            # backbone (the same epochs at the same lr), only without exits.
            sft = [cfg.finetune_epochs, cfg.finetune_lr]
            sft_path = cache / f"{name}-static_finetune-{_key(static_base + sft)}"
            sft_tc = TrainConfig(**{**tc, "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr})
            static = _trained(sft_path, "static_resnet", static_kw, train_set, sft_tc, cfg.seed, start=static)
    else:
        raise ValueError(f"recipe: expected 'joint', 'frozen' or 'finetune', got {cfg.recipe!r}")

    # Learned exits and calibration use the validation split only; everything reported is test.
    val = collect(dyn, val_set)
    fit_learned_exits(dyn, val.exit_logits, val.labels)  # deterministic (seeded), so reuse is safe
    val = collect(dyn, val_set)
    test = collect(dyn, test_set)
    full = static.full_cost()
    val.full_cost = test.full_cost = full
    static_acc = _accuracy(static, test_set)
    # The static model before the fine-tune the early-exit recipe adds (reported beside it).
    static_before_acc = _accuracy(static_before, test_set) if static_before is not static else None
    static_row = {"accuracy": static_acc, "mean_flops": full}
    rows = sweep(test)
    anytime = [
        {"exit": k, "accuracy": a, "mean_flops": float(test.exit_costs[k])}
        for k, a in enumerate(test.accuracy_per_exit())
    ]

    calib = {}
    lo, hi = float(val.exit_costs[0]) / full, float(val.exit_costs[-1]) / full
    for budget in sorted(set(cfg.budgets) | {cfg.operating_budget}):
        if not lo <= budget <= hi:
            _log(f"budget {budget:.0%} is outside what this model can spend ({lo:.0%} to {hi:.0%}); skipped")
            continue
        best = None
        for kind in cfg.policies:
            costs = val.exit_costs_learned if kind == "learned" else val.exit_costs
            cal = calibrate(
                kind, val.exit_logits, val.labels, costs, budget, full_cost=full, learned=val.learned
            )
            if best is None or cal.val_accuracy > best.val_accuracy:
                best = cal
        res = test.evaluate(best.policy)
        calib[budget] = {
            "budget": budget,
            "policy": best.policy.to_dict(),
            "strategy": best.strategy,
            "val_accuracy": best.val_accuracy,
            "accuracy": res["accuracy"],
            "mean_flops": res["mean_flops"],
            "flops_ratio": res["mean_flops"] / full,
            "relative_error": abs(res["mean_flops"] - budget * full) / (budget * full),
            "exit_fractions": res["exit_fractions"],
            "_policy": best.policy,
        }
        _log(
            f"budget {budget:.0%}: {best.policy} -> test acc {res['accuracy']:.4f}, "
            f"FLOPs ratio {res['mean_flops'] / full:.3f}"
        )
    if cfg.operating_budget not in calib:
        raise ValueError(
            f"operating budget {cfg.operating_budget} is outside what this model can spend "
            f"({lo:.2f} to {hi:.2f} of the static cost)"
        )
    op = calib[cfg.operating_budget]
    policy = op.pop("_policy")
    for v in calib.values():
        v.pop("_policy", None)
    dyn.policy = policy

    # Wall-clock: both models get the same inference treatment (BN folded, NHWC) for the headline
    # numbers; plain eager PyTorch is timed too and reported beside it. Both check their input
    # (shape, dtype, NaN/inf) as a call to the model does.
    fast_static, fast_dyn = static.optimize_for_inference(), dyn.optimize_for_inference()
    timing: dict[str, dict] = {}
    for mode, (s_model, d_model) in (("optimized", (fast_static, fast_dyn)), ("eager", (static, dyn))):
        for bs, n in ((1, cfg.b1_samples), (64, cfg.b64_samples)):
            batches = split_batches(test_set.x[:n], bs)
            with torch.inference_mode():
                flops_dyn = float(torch.cat([d_model(b).flops for b in batches]).mean())
            wc = compare_wallclock(
                _validated_static(s_model), d_model, batches, rounds=cfg.rounds, chunks=min(10, len(batches))
            )
            flops_speedup = full / flops_dyn
            timing[f"{mode}_b{bs}"] = {
                **wc,
                "flops_speedup": flops_speedup,
                "realization": wc["speedup"] / flops_speedup,
            }
            _log(
                f"{mode} batch {bs}: static {wc['static_per_s']:.0f}/s, dynamic {wc['dynamic_per_s']:.0f}/s, "
                f"speed-up {wc['speedup']:.2f}x vs FLOPs {flops_speedup:.2f}x"
            )
    # Throughput mode at batch 64: the survivors of consecutive batches are pooled before the later
    # stages (EarlyExitNetwork.run_pooled), so no stage runs on a shrunken batch. Both sides get
    # the same 64-image input batches.
    n = cfg.b64_samples
    x64 = test_set.x[:n]
    # Timed in chunks of 512 images (pooling within each chunk), alternating the two per chunk.
    static_call = _validated_static(fast_static)
    wc = compare_wallclock(
        lambda x: [static_call(b) for b in split_batches(x, 64)],
        lambda x: fast_dyn.run_pooled(x, 64),
        split_batches(x64, 512),
        rounds=cfg.rounds,
        chunks=len(split_batches(x64, 512)),
    )
    with torch.inference_mode():
        pooled_flops = torch.cat([fast_dyn.run_pooled(c, 64).flops for c in split_batches(x64, 512)])
        flops_speedup = full / float(pooled_flops.mean())
    realization = wc["speedup"] / flops_speedup
    timing["pooled_b64"] = {**wc, "flops_speedup": flops_speedup, "realization": realization}
    _log(
        f"pooled batch 64: static {wc['static_per_s']:.0f}/s, dynamic {wc['dynamic_per_s']:.0f}/s, "
        f"speed-up {wc['speedup']:.2f}x vs FLOPs {flops_speedup:.2f}x"
    )
    t1, t64 = timing["optimized_b1"], timing["pooled_b64"]

    result = {
        "benchmark": "early_exit",
        "data": cfg.data,
        "quick": cfg.quick,
        "config": asdict(cfg),
        "static_acc": static_acc,
        "static_training": (
            f"{cfg.epochs} epochs at lr {cfg.lr}"
            + ("" if static_before_acc is None else f", then {cfg.finetune_epochs} at lr {cfg.finetune_lr}")
        ),
        "static_acc_before_finetune": static_before_acc,
        "dynamic_acc": op["accuracy"],
        "flops_ratio": op["flops_ratio"],
        "speedup_b1": t1["speedup"],
        "speedup_b64": t64["speedup"],
        "realization_b1": t1["realization"],
        "realization_b64": t64["realization"],
        "calibration_error_max": max(
            (calib[b]["relative_error"] for b in cfg.budgets if b in calib), default=None
        ),
        "static_mflops": full / 1e6,
        "operating_point": op,
        "calibration": list(calib.values()),
        "anytime": anytime,
        "sweep": rows,
        "timing": timing,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": time.time() - t0,
    }
    payload = json.dumps(result, indent=2).encode()
    if json_path:
        atomic_write_bytes(json_path, payload)
    plot_pareto(
        rows,
        static_row,
        out / f"{stem}_pareto.png",
        anytime=anytime,
        calibrated=[calib[b] for b in cfg.budgets if b in calib],
        title=f"{cfg.data}: early-exit ResNet vs static ({'quick' if cfg.quick else 'full'})",
    )
    exit_idx = dyn(test_set.x[:512]).exit_index
    plot_examples_by_exit(test_set.x[:512], exit_idx, out / f"{stem}_examples_by_exit.png")
    md = _markdown(result, rows, static_row)
    atomic_write_bytes(out / f"{stem}.md", md.encode())
    return result


def _trained(
    path: Path, name: str, kw: dict, data, tc: TrainConfig, seed: int, backbone=None, start=None, teacher=None
):
    """Train `name` (or reuse the copy cached at `path` by an identical earlier run). With
    `backbone`, only the exits are trained, on that model's frozen stages and final classifier;
    with `start`, every weight starts from that trained model and the whole network trains; with
    `teacher` (and tc.kd > 0), it also learns from that model's predictions."""
    if (path / "config.json").exists():
        _log(f"reusing trained {name} from {path}")
        return load(path)
    torch.manual_seed(seed)
    model = create_model(name, **kw)
    if backbone is not None:
        model.freeze_backbone(backbone)
    if start is not None:
        model.load_state_dict(start.state_dict())
        model.unfreeze_backbone()
    _log(
        f"training {name} (exit costs {[round(v / 1e6, 1) for v in model.exit_costs().tolist()]} MFLOPs, "
        f"static path {model.full_cost() / 1e6:.1f}) for {tc.epochs} epochs"
    )
    start = time.time()
    train(model, data, tc, teacher=teacher)
    _log(f"trained {name} in {time.time() - start:.0f} s")
    model.eval()
    save(model, path)
    return model


def _accuracy(model, data) -> float:
    return float((_predict_static(model, data.x).argmax(-1) == data.y).double().mean())


@torch.inference_mode()
def _predict_static(model, x: torch.Tensor, bs: int = 512) -> torch.Tensor:
    return torch.cat([model.forward_static(x[i : i + bs]) for i in range(0, x.shape[0], bs)])


def _markdown(r: dict, rows: list[dict], static_row: dict) -> str:
    t1, t64 = r["timing"]["optimized_b1"], r["timing"]["pooled_b64"]
    e1, e64 = r["timing"]["eager_b1"], r["timing"]["eager_b64"]
    p64 = r["timing"]["optimized_b64"]
    lines = [
        f"# Early exit on {r['data']} ({'quick' if r['quick'] else 'full'} run)",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| static accuracy (trained {r['static_training']}, as the early-exit backbone) | "
        f"{100 * r['static_acc']:.2f}% |",
        f"| dynamic accuracy at the operating point | {100 * r['dynamic_acc']:.2f}% |",
        f"| dynamic - static | {100 * (r['dynamic_acc'] - r['static_acc']):+.2f} points |",
        f"| mean FLOPs vs static | {r['flops_ratio']:.3f} |",
        f"| images/s batch 1, static / dynamic (both BN-folded, NHWC) | {t1['static_per_s']:.0f} / "
        f"{t1['dynamic_per_s']:.0f} |",
        f"| speed-up batch 1 (wall / FLOPs) | {r['speedup_b1']:.2f}x / {t1['flops_speedup']:.2f}x |",
        f"| realization batch 1 | {r['realization_b1']:.2f} |",
        f"| images/s batch 64, static / dynamic (both BN-folded, NHWC; survivors pooled across batches) "
        f"| {t64['static_per_s']:.0f} / {t64['dynamic_per_s']:.0f} |",
        f"| speed-up batch 64 (wall / FLOPs) | {r['speedup_b64']:.2f}x / {t64['flops_speedup']:.2f}x |",
        f"| realization batch 64 | {r['realization_b64']:.2f} |",
        f"| batch 64 without pooling (each batch shrinks as samples exit): speed-up / realization | "
        f"{p64['speedup']:.2f}x / {p64['realization']:.2f} |",
        f"| eager PyTorch (no BN folding, NCHW): speed-up b1 / b64 | {e1['speedup']:.2f}x / "
        f"{e64['speedup']:.2f}x |",
        f"| eager PyTorch: realization b1 / b64 | {e1['realization']:.2f} / {e64['realization']:.2f} |",
        f"| calibration error, max over budgets | {100 * (r['calibration_error_max'] or 0):.2f}% |",
        "",
        "## Calibrated budgets (thresholds fit on validation, measured on test)",
        "",
        "| budget | policy | test accuracy | FLOPs ratio | error |",
        "|---:|---|---:|---:|---:|",
    ]
    for c in r["calibration"]:
        lines.append(
            f"| {c['budget']:.0%} | {c['policy']['kind']} ({c['strategy']}) | {100 * c['accuracy']:.2f}% "
            f"| {c['flops_ratio']:.3f} | {100 * c['relative_error']:.2f}% |"
        )
    if r.get("static_acc_before_finetune") is not None:
        lines += [
            "",
            f"The static model before the fine-tune (the starting point of both): "
            f"{100 * r['static_acc_before_finetune']:.2f}%.",
        ]
    lines += ["", "## Anytime accuracy per exit", "", "| exit | accuracy | MFLOPs |", "|---:|---:|---:|"]
    lines += [
        f"| {a['exit']} | {100 * a['accuracy']:.2f}% | {a['mean_flops'] / 1e6:.2f} |" for a in r["anytime"]
    ]
    lines += ["", "## Policy sweep (test)", "", format_table(rows, static_row), ""]
    return "\n".join(lines)
