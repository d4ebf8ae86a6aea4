"""Block skipping and dynamic width on CIFAR-10: accuracy vs measured FLOPs and wall-clock.

Models (trained once, cached in ~/.cache/dynets/bench by what decides them):
  - static_resnet: the static backbone, trained exactly as the early-exit benchmark trains it, so a
    model that benchmark already trained is reused;
  - static baselines of lower cost (narrower widths, fewer blocks), trained the same way;
  - then every static model trained the skip model's extra epochs at its lr (`baseline_finetune`),
    so no model has trained longer than the static ones it is compared with;
  - skip_resnet: gates before every non-downsampling block, fine-tuned from the static model with
    the budget loss ("finetune"), or trained from scratch ("scratch");
  - slimmable_resnet: one set of weights at widths 0.25-1.0, sandwich rule, started from the static
    model ("finetune") or from scratch; BN recalibrated per width after training.
Reported on the test split: accuracy vs mean FLOPs (threshold sweep for skipping; fixed widths and
the width chooser at many budgets), thresholds calibrated on validation to the budgets, images/s of
each dynamic model against the static one at batch 1 and 64 (alternating, medians, 2 threads), and
the static baselines' accuracy and speed. Each calibrated budget is timed and compared with the
best static model, or mix of two, that runs in at most its time (`static_at_time`), at batch 1 and
64. `backbone` ({"blocks": [5, 5, 5]}: a deeper ResNet behind the gates) and `parts` (skip, slim)
select other experiments. Writes JSON + Markdown + a Pareto PNG.

`python -m dynets.bench.skip_width --quick --json /tmp/sw.json` runs a reduced version (minutes).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dynets.bench.common import cache_key as _key  # noqa: E402  (shared cache of static models)
from dynets.bench.common import log as _log  # noqa: E402
from dynets.bench.early_exit import _trained  # noqa: E402
from dynets.bench.wallclock import compare_wallclock, split_batches  # noqa: E402
from dynets.core.registry import create_model  # noqa: E402
from dynets.core.serialization import atomic_write_bytes, load, save  # noqa: E402
from dynets.data import DATASET_STATS, cache_dir, load_dataset  # noqa: E402
from dynets.depth.skipping import SkipPolicy, calibrate_skip_threshold  # noqa: E402
from dynets.train import TrainConfig, train  # noqa: E402
from dynets.width.slimmable import WidthPolicy, fit_width_policy, train_slimmable  # noqa: E402


@dataclass
class SkipWidthBenchConfig:
    data: str = "cifar10"
    quick: bool = False
    epochs: int = 12  # static backbone (12 = the early-exit benchmark's, whose model is then reused)
    batch_size: int = 128
    lr: float = 0.1
    skip_recipe: str = "finetune"  # or "scratch"
    skip_epochs: int = 6
    skip_lr: float = 0.02
    skip_target: float = 0.5  # budget loss: fraction of the gated blocks' FLOPs to run
    skip_weight: float = 2.0
    slim_recipe: str = "finetune"  # or "scratch"
    slim_epochs: int = 6
    # the sandwich rule's loss of the narrower widths: "distill" (in-place distillation from the full
    # width; the better one for the fine-tune: chooser at 60% 79.81% vs 79.19% with "label") or "label"
    slim_loss: str = "distill"
    slim_lr: float = 0.02  # the static models' fine-tune lr (skip_lr): like for like
    baseline_epochs: int = 12
    # knowledge distillation (weight in [0, 1]; 0 = none) from the fine-tuned static backbone into
    # every model trained after it: the cheaper static baselines' fine-tunes as well as the skip and
    # the slimmable model, so the dynamic models get no teacher the static ones lack. (With
    # slim_loss "distill" only the slimmable net's full width learns from it; its narrower widths
    # learn from the full width in place. With "label" every width learns from the teacher.)
    kd: float = 0.0
    # Like for like: every static model (the backbone and the cheaper baselines) is then trained for
    # the skip model's extra epochs at its lr, so each has seen as many epochs as the dynamic models
    # (False: the static models keep their first training only, as in runs before session 12)
    baseline_finetune: bool = True
    # model settings of the backbone, the skip and the slimmable model (e.g. {"blocks": [5, 5, 5]});
    # empty: the zoo's default ResNet. The baselines' settings apply to the default ResNet.
    backbone: dict = field(default_factory=dict)
    parts: tuple[str, ...] = ("skip", "slim")
    baselines: dict = field(
        default_factory=lambda: {
            "narrow": {"widths": [24, 48, 96]},
            "shallow": {"blocks": [2, 2, 2]},
        }
    )
    budgets: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)  # fractions of the static model's FLOPs
    operating_budget: float = 0.6
    # threshold sweep: None = quantiles of the gate probabilities seen on validation (adapts to
    # however the gates were trained); or explicit thresholds in [0, 1]
    skip_thresholds: tuple[float, ...] | None = None
    skip_sweep_points: int = 9
    train_limit: int | None = None
    val_limit: int | None = None
    test_limit: int | None = None
    calib_iters: int = 12  # bisection steps of the skip threshold (one validation pass each)
    b1_samples: int = 500
    b64_samples: int = 4096
    rounds: int = 7
    channels_last: bool = True  # time every model on NHWC tensors (False: plain NCHW)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quick:
            self.epochs = min(self.epochs, 2)
            self.skip_epochs = min(self.skip_epochs, 1)
            self.slim_epochs = min(self.slim_epochs, 1)
            self.baseline_epochs = min(self.baseline_epochs, 2)
            self.train_limit = self.train_limit or 5000
            self.val_limit = self.val_limit or 1000
            self.test_limit = self.test_limit or 1000
            self.b1_samples = min(self.b1_samples, 100)
            self.b64_samples = min(self.b64_samples, 512)
            self.rounds = min(self.rounds, 3)
            self.calib_iters = min(self.calib_iters, 8)
            self.skip_sweep_points = min(self.skip_sweep_points, 5)
        bad = [p for p in self.parts if p not in ("skip", "slim")]
        if bad or not self.parts:
            raise ValueError(f"parts: expected a non-empty subset of ('skip', 'slim'), got {self.parts!r}")
        for name in ("skip_recipe", "slim_recipe"):
            if getattr(self, name) not in ("finetune", "scratch"):
                raise ValueError(f"{name}: expected 'finetune' or 'scratch', got {getattr(self, name)!r}")
        if isinstance(self.kd, bool) or not isinstance(self.kd, (int, float)) or not 0 <= self.kd <= 1:
            raise ValueError(f"kd: expected a float in [0, 1], got {self.kd!r}")
        if self.kd and not self.baseline_finetune:
            raise ValueError(
                "kd > 0: expected baseline_finetune=True (the baselines learn from the teacher then)"
            )
        if self.slim_loss not in ("label", "distill"):
            raise ValueError(f"slim_loss: expected 'label' or 'distill', got {self.slim_loss!r}")


def _cached(path: Path, build, fit):
    """Load the model saved at `path`, or build, fit and save it."""
    if (path / "config.json").exists():
        _log(f"reusing {path.name}")
        return load(path)
    model = build()
    _log(f"training {path.name}")
    start = time.time()
    fit(model)
    _log(f"trained {path.name} in {time.time() - start:.0f} s")
    model.eval()
    save(model, path)
    return model


@torch.inference_mode()
def _static_logits(model, x: torch.Tensor, bs: int = 500) -> torch.Tensor:
    return torch.cat([model.forward_static(x[i : i + bs]) for i in range(0, x.shape[0], bs)])


@torch.inference_mode()
def _dynamic(model, x: torch.Tensor, policy, bs: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    outs = [model(x[i : i + bs], policy) for i in range(0, x.shape[0], bs)]
    return torch.cat([o.logits for o in outs]), torch.cat([o.flops for o in outs])


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).double().mean())


def static_at_time(statics: list[tuple[float, float]], speedup: float) -> float | None:
    """The best accuracy the static models reach in at most the time of a model with `speedup`.

    `statics`: (speed-up, accuracy) of each static model, speed-ups against the same reference.
    Any static model at least as fast counts, and so does any mix of two of them (a share of the
    inputs sent to each: time and accuracy are then the shares' averages, linear in time per
    input = 1 / speed-up), so the answer is the upper hull of the static points in (time,
    accuracy), taken at time 1 / speedup. None when every static model is slower."""
    if speedup <= 0:
        raise ValueError(f"speedup: expected a positive number, got {speedup!r}")
    pts = [(1.0 / s, a) for s, a in statics]
    tau = 1.0 / speedup
    best = None
    for t0, a0 in pts:
        if t0 > tau * (1 + 1e-12):
            continue
        best = a0 if best is None else max(best, a0)
        for t1, a1 in pts:  # mix a faster model (t0 <= tau) with a slower one (t1 > tau)
            if t1 > tau:
                best = max(best, a0 + (a1 - a0) * (tau - t0) / (t1 - t0))
    return best


def run(
    cfg: SkipWidthBenchConfig,
    *,
    json_path: str | None = None,
    out_dir: str | None = None,
    progress: bool = True,
) -> dict:
    torch.set_num_threads(2)
    out = Path(out_dir or (Path(json_path).parent if json_path else "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(json_path).stem if json_path else f"skip_width_{cfg.data}"
    t0 = time.time()
    train_set = load_dataset(cfg.data, "train", limit=cfg.train_limit)
    val_set = load_dataset(cfg.data, "val", limit=cfg.val_limit)
    test_set = load_dataset(cfg.data, "test", limit=cfg.test_limit)
    _log(f"data {cfg.data}: train {len(train_set)}, val {len(val_set)}, test {len(test_set)}")
    c, h, _ = train_set.input_shape
    mean, std = DATASET_STATS.get(cfg.data, ((0.5,), (0.25,)))
    kw = dict(
        in_channels=c, image_size=h, num_classes=train_set.num_classes, mean=tuple(mean), std=tuple(std)
    )
    tc = dict(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        augment="crop_flip" if h == 32 else "none",
        progress=progress,
        channels_last=True,
    )
    tc_key = {k: v for k, v in tc.items() if k != "progress"}
    base = [cfg.data, cfg.train_limit, cfg.seed, kw, tc_key]
    cache = cache_dir() / "bench"

    # 1. models. A static model is trained `epochs`, then (baseline_finetune) the skip model's extra
    #    epochs; the default layout shares the early-exit benchmark's cache entry.
    ft_tc = TrainConfig(**{**tc, "epochs": cfg.skip_epochs, "lr": cfg.skip_lr})
    ft = [cfg.skip_epochs, cfg.skip_lr]
    # the teacher is the backbone: its settings join the key (none for the default, as before)
    kd = (["kd", cfg.kd] + ([cfg.backbone] if cfg.backbone else [])) if cfg.kd else []
    kd_tc = TrainConfig(**{**asdict(ft_tc), "kd": cfg.kd})
    first_acc: dict[str, float] = {}

    def static_pair(model: str, label: str, mkw: dict, epochs: int, teacher=None):
        """(first training, model after the fine-tune) of the static model reported as `model` and
        cached as `label`; the default layout (mkw empty) is cached under the same names whether it
        is the backbone or a baseline. With `teacher`, the fine-tune distils from it (cfg.kd)."""
        mk = {**kw, **mkw}
        tkey = kd if teacher is not None else []
        if mkw:
            stem = f"skip_width_{cfg.data}-static_{label}"
            first_path = cache / f"{stem}-{_key(base + [mk, epochs])}"
            ft_path = cache / f"{stem}_finetune-{_key(base + [mk, epochs] + ft + tkey)}"
        else:  # the zoo's default ResNet
            first_path = cache / f"early_exit_{cfg.data}-static-{_key(base)}"
            ft_path = cache / f"skip_width_{cfg.data}-static_finetune-{_key(base + ft + tkey)}"
        first = _trained(
            first_path, "static_resnet", mk, train_set, TrainConfig(**{**tc, "epochs": epochs}), cfg.seed
        )
        if not cfg.baseline_finetune:
            return first, first
        first_acc[model] = _acc(_static_logits(first.eval(), test_set.x), test_set.y)
        if teacher is not None:
            return first, _trained(
                ft_path, "static_resnet", mk, train_set, kd_tc, cfg.seed, start=first, teacher=teacher
            )
        return first, _trained(ft_path, "static_resnet", mk, train_set, ft_tc, cfg.seed, start=first)

    static_first, static = static_pair("static", "backbone", cfg.backbone, cfg.epochs)
    baselines = {}
    for name, mkw in cfg.baselines.items():
        _, baselines[name] = static_pair(
            f"static_{name}", name, mkw, cfg.baseline_epochs, teacher=static if cfg.kd else None
        )
    teacher = static.eval() if cfg.kd else None
    bk = {**kw, **cfg.backbone}
    bbase = [cfg.data, cfg.train_limit, cfg.seed, bk, tc_key] if cfg.backbone else base

    def build_skip():
        torch.manual_seed(cfg.seed)
        m = create_model("skip_resnet", **bk, budget_target=cfg.skip_target, budget_weight=cfg.skip_weight)
        return m.init_from_static(static_first) if cfg.skip_recipe == "finetune" else m

    skip = slim = None
    if "skip" in cfg.parts:
        skip_key = _key(
            bbase + [cfg.skip_recipe, cfg.skip_epochs, cfg.skip_lr, cfg.skip_target, cfg.skip_weight] + kd
        )
        skip = _cached(
            cache / f"skip_width_{cfg.data}-skip-{skip_key}",
            build_skip,
            # the statics' extra epochs, with gates
            lambda m: train(m, train_set, kd_tc if teacher else ft_tc, teacher=teacher),
        )

    def build_slim():
        torch.manual_seed(cfg.seed)
        m = create_model("slimmable_resnet", **bk, sandwich_loss=cfg.slim_loss)
        return m.init_from_static(static_first) if cfg.slim_recipe == "finetune" else m

    if "slim" in cfg.parts:
        slim_tc = TrainConfig(**{**tc, "epochs": cfg.slim_epochs, "lr": cfg.slim_lr, "kd": cfg.kd})
        loss = (
            [] if cfg.slim_loss == "distill" else [cfg.slim_loss]
        )  # the key of the models before the option
        slim_key = _key(bbase + [cfg.slim_recipe, cfg.slim_epochs, cfg.slim_lr] + loss + kd)
        slim = _cached(
            cache / f"skip_width_{cfg.data}-slim-{slim_key}",
            build_slim,
            lambda m: train_slimmable(m, train_set, slim_tc, teacher=teacher),
        )
    for m in (static, static_first, skip, slim, *baselines.values()):
        if m is not None:
            m.eval()

    # 2. static models: accuracy and cost
    full = static.full_cost()
    statics = [
        {
            "model": "static",
            "accuracy": _acc(_static_logits(static, test_set.x), test_set.y),
            "mean_flops": full,
            "flops_ratio": 1.0,
        }
    ]
    for name, m in baselines.items():
        f = m.full_cost()
        statics.append(
            {
                "model": f"static_{name}",
                "config": cfg.baselines[name],
                "accuracy": _acc(_static_logits(m, test_set.x), test_set.y),
                "mean_flops": f,
                "flops_ratio": f / full,
            }
        )
    for st in statics:
        if st["model"] in first_acc:
            st["accuracy_before_finetune"] = first_acc[st["model"]]
    _log(
        "static: " + ", ".join(f"{s['model']} {s['accuracy']:.4f} @ {s['flops_ratio']:.2f}" for s in statics)
    )

    rows: list[dict] = []
    skip_cal: dict = {}
    slim_cal: dict = {}
    # 3. block skipping: threshold sweep (test) and budgets calibrated on validation
    if skip is not None:
        thresholds = cfg.skip_thresholds
        if thresholds is None:
            with torch.inference_mode():
                probs = torch.cat(
                    [skip(b, 0.0, record=True).record["gate_probs"] for b in split_batches(val_set.x, 500)]
                )
            qs = torch.linspace(0, 1, cfg.skip_sweep_points + 1, dtype=torch.float64)[:-1]
            thresholds = sorted({0.0, *torch.quantile(probs.flatten().double(), qs).clamp(0, 1).tolist()})
        for t in thresholds:
            logits, flops = _dynamic(skip, test_set.x, SkipPolicy(t))
            rows.append(
                {
                    "policy": "skip_resnet: threshold",
                    "value": t,
                    "accuracy": _acc(logits, test_set.y),
                    "mean_flops": float(flops.mean()),
                    "flops_ratio": float(flops.mean()) / full,
                }
            )
        lo = skip.min_cost() / full
        for b in cfg.budgets:
            if b < lo:
                _log(f"skip: budget {b} below the minimum {lo:.2f}; skipped")
                continue
            cal = calibrate_skip_threshold(skip, val_set.x, b, iters=cfg.calib_iters)
            logits, flops = _dynamic(skip, test_set.x, cal.policy)
            skip_cal[b] = {
                "budget": b,
                "threshold": cal.policy.thresholds[0],
                "val_flops_ratio": cal.val_flops / full,
                "accuracy": _acc(logits, test_set.y),
                "mean_flops": float(flops.mean()),
                "flops_ratio": float(flops.mean()) / full,
                "execute_rate_val": cal.execute_rate,
            }
            _log(
                f"skip budget {b:.0%}: threshold {cal.policy.thresholds[0]:.3f} -> test acc "
                f"{skip_cal[b]['accuracy']:.4f} at {skip_cal[b]['flops_ratio']:.3f}"
            )

    # 4. dynamic width: fixed widths, and the chooser calibrated on validation (replayed on stored
    if slim is not None:
        #    all-width logits, which is exact: decisions depend only on the smallest width's confidence)
        with torch.inference_mode():
            val_logits = [
                torch.cat(z) for z in zip(*(slim.all_width_logits(b) for b in split_batches(val_set.x, 500)))
            ]
            test_logits = [
                torch.cat(z) for z in zip(*(slim.all_width_logits(b) for b in split_batches(test_set.x, 500)))
            ]
        wc = slim.width_costs()
        per_width = wc.clone()
        per_width[1:] += wc[0]
        conf = test_logits[0].float().softmax(-1).amax(-1)
        for k, w in enumerate(slim.width_mults):
            rows.append(
                {
                    "policy": "slimmable: fixed width",
                    "value": w,
                    "accuracy": _acc(test_logits[k], test_set.y),
                    "mean_flops": float(wc[k]),
                    "flops_ratio": float(wc[k]) / full,
                }
            )

        def replay(policy: WidthPolicy) -> dict:
            index = policy.choose(conf, slim.num_widths)
            pred = torch.stack(test_logits, 1)[torch.arange(len(index)), index]
            f = float(per_width[index].mean())
            fr = (torch.bincount(index, minlength=slim.num_widths).double() / len(index)).tolist()
            return {
                "accuracy": _acc(pred, test_set.y),
                "mean_flops": f,
                "flops_ratio": f / full,
                "width_fractions": fr,
            }

        lo_w, hi_w = float(per_width.min()) / full, float(per_width.max()) / full
        sweep_budgets = sorted(
            set(cfg.budgets) | {round(v, 3) for v in torch.linspace(lo_w, 1.0, 8).tolist()}
        )
        for b in sweep_budgets:
            if not lo_w <= b <= hi_w:
                continue
            cal = fit_width_policy(val_logits, wc, b, labels=val_set.y)
            res = replay(cal.policy)
            entry = {
                "budget": b,
                "thresholds": cal.policy.thresholds,
                "strategy": cal.strategy,
                "val_accuracy": cal.val_accuracy,
                **res,
            }
            rows.append(
                {
                    "policy": "slimmable: width chooser",
                    "value": b,
                    **{k: res[k] for k in ("accuracy", "mean_flops", "flops_ratio")},
                }
            )
            if b in cfg.budgets:
                slim_cal[b] = entry
                _log(
                    f"slim budget {b:.0%}: {cal.policy} -> test acc {res['accuracy']:.4f} "
                    f"at {res['flops_ratio']:.3f}"
                )

    # 5. wall-clock of every calibrated budget and of the static baselines; every model gets the
    #    same treatment (NHWC tensors by default: faster convolutions on CPU for all of them)
    op = cfg.operating_budget
    timing: dict[str, dict] = {}
    checks = {}
    x_time = test_set.x
    if cfg.channels_last:
        for m in (static, skip, slim, *baselines.values()):
            if m is not None:
                m.to(memory_format=torch.channels_last)
        x_time = x_time.contiguous(memory_format=torch.channels_last)
    for name, m in baselines.items():
        _log(f"timing static_{name}")
        timing[f"static_{name}"] = _time(static, m.forward_static, x_time, cfg, full, flops=m.full_cost())
    for s in statics:
        key = s["model"]
        s["speedup_b64"] = 1.0 if key == "static" else timing[key]["b64"]["speedup"]
        s["speedup_b1"] = 1.0 if key == "static" else timing[key]["b1"]["speedup"]
    curve = {bs: [(s[f"speedup_{bs}"], s["accuracy"]) for s in statics] for bs in ("b1", "b64")}
    for name, model, cal in (("skip", skip, skip_cal), ("slim", slim, slim_cal)):
        if model is None:
            continue
        for b, entry in cal.items():
            if name == "skip":
                model.skip_policy = SkipPolicy(entry["threshold"])
            else:
                model.width_policy = WidthPolicy(entry["thresholds"])
                logits, flops = _dynamic(model, test_set.x, None)  # the real dynamic run matches the replay
                checks[f"slim_replay_matches_dynamic_{b}"] = bool(
                    abs(_acc(logits, test_set.y) - entry["accuracy"]) < 1e-9
                    and abs(float(flops.mean()) - entry["mean_flops"]) < 1e-3 * full
                )
            _log(f"timing {name} at budget {b:.0%}")
            t = entry["timing"] = _time(static, model, x_time, cfg, full)
            for bs in ("b1", "b64", "b64_pooled"):
                if bs not in t:
                    continue
                ref = static_at_time(curve[bs[:3]], t[bs]["speedup"])
                entry[f"speedup_{bs}"] = t[bs]["speedup"]
                entry[f"static_acc_at_equal_time_{bs}"] = ref
                entry[f"beats_static_at_equal_time_{bs}"] = None if ref is None else entry["accuracy"] > ref
        if op in cal:
            timing[name] = cal[op]["timing"]
    if f"slim_replay_matches_dynamic_{op}" in checks:
        checks["slim_replay_matches_dynamic"] = checks[f"slim_replay_matches_dynamic_{op}"]

    def headline(name: str, cal: dict) -> dict:
        e = cal.get(op)
        if e is None or "timing" not in e:
            return {}
        t = e["timing"]
        return {
            f"{name}_acc": e["accuracy"],
            f"{name}_flops_ratio": e["flops_ratio"],
            f"{name}_speedup_b1": t["b1"]["speedup"],
            f"{name}_speedup_b64": t["b64"]["speedup"],
            f"{name}_realization_b64": t["b64"]["realization"],
            f"{name}_speedup_b64_pooled": t.get("b64_pooled", {}).get("speedup"),
            f"{name}_beats_static_at_equal_time_b64_pooled": e.get("beats_static_at_equal_time_b64_pooled"),
            f"{name}_static_acc_at_equal_time_b1": e["static_acc_at_equal_time_b1"],
            f"{name}_static_acc_at_equal_time_b64": e["static_acc_at_equal_time_b64"],
            f"{name}_beats_static_at_equal_time_b1": e["beats_static_at_equal_time_b1"],
            f"{name}_beats_static_at_equal_time_b64": e["beats_static_at_equal_time_b64"],
            # the budgets at which the dynamic model beats every static model (and mix of two) that
            # runs in at most its time, at both batch sizes
            f"{name}_budgets_beating_static": [
                c["budget"]
                for c in cal.values()
                if c.get("beats_static_at_equal_time_b1") and c.get("beats_static_at_equal_time_b64")
            ],
        }

    result = {
        "benchmark": "skip_width",
        "data": cfg.data,
        "quick": cfg.quick,
        "config": asdict(cfg),
        "static_acc": statics[0]["accuracy"],
        "static_mflops": full / 1e6,
        **headline("skip", skip_cal),
        **headline("slim", slim_cal),
        "statics": statics,
        "skip_calibration": list(skip_cal.values()),
        "slim_calibration": list(slim_cal.values()),
        "slim_width_costs": None if slim is None else slim.width_costs().tolist(),
        "sweep": rows,
        "timing": timing,
        "checks": checks,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": time.time() - t0,
    }
    if json_path:
        atomic_write_bytes(json_path, json.dumps(result, indent=2).encode())
    _plot(
        rows,
        statics,
        skip_cal,
        slim_cal,
        out / f"{stem}_pareto.png",
        f"{cfg.data}: block skipping and dynamic width ({'quick' if cfg.quick else 'full'})",
    )
    atomic_write_bytes(out / f"{stem}.md", _markdown(result).encode())
    _log(f"done in {time.time() - t0:.0f} s")
    return result


def _time(static, dyn, x, cfg, full, flops=None) -> dict:
    """Images/s of `dyn` against the static model at batch 1 and 64, alternating in one process."""
    res = {}
    for bs, n in ((1, cfg.b1_samples), (64, cfg.b64_samples)):
        batches = split_batches(x[:n], bs)
        if flops is None:
            with torch.inference_mode():
                f = float(torch.cat([dyn(b).flops for b in batches]).mean())
        else:
            f = flops
        wc = compare_wallclock(static.forward_static, dyn, batches, rounds=cfg.rounds)
        res[f"b{bs}"] = {**wc, "flops_speedup": full / f, "realization": wc["speedup"] / (full / f)}
        _log(
            f"  batch {bs}: static {wc['static_per_s']:.0f}/s, other {wc['dynamic_per_s']:.0f}/s, "
            f"speed-up {wc['speedup']:.2f}x vs FLOPs {full / f:.2f}x"
        )
    if hasattr(dyn, "run_pooled"):
        # Throughput mode at batch 64 (the early-exit benchmark's pooled_b64): the dynamic model's
        # sub-batches are pooled across consecutive 64-image batches (run_pooled), timed in chunks of
        # 512 images against the static model on the same chunks in batches of 64.
        chunks = split_batches(x[: cfg.b64_samples], 512)
        with torch.inference_mode():
            f = float(torch.cat([dyn.run_pooled(c, 64).flops for c in chunks]).mean())
        wc = compare_wallclock(
            lambda c: [static.forward_static(b) for b in split_batches(c, 64)],
            lambda c: dyn.run_pooled(c, 64),
            chunks,
            rounds=cfg.rounds,
            chunks=len(chunks),
        )
        res["b64_pooled"] = {**wc, "flops_speedup": full / f, "realization": wc["speedup"] / (full / f)}
        _log(f"  pooled batch 64: speed-up {wc['speedup']:.2f}x vs FLOPs {full / f:.2f}x")
    return res


def _plot(rows, statics, skip_cal, slim_cal, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    for kind in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["mean_flops"] / 1e6, 100 * r["accuracy"]) for r in rows if r["policy"] == kind)
        ax.plot(*zip(*pts), marker="o", ms=3, label=kind)
    for cal, marker, label in (
        (skip_cal, "D", "skip: calibrated (test)"),
        (slim_cal, "s", "slim: calibrated (test)"),
    ):
        if cal:
            ax.scatter(
                [c["mean_flops"] / 1e6 for c in cal.values()],
                [100 * c["accuracy"] for c in cal.values()],
                marker=marker,
                color="tab:red" if marker == "D" else "tab:purple",
                zorder=5,
                label=label,
            )
    for s in statics:
        star = s["model"] == "static"
        ax.scatter(
            [s["mean_flops"] / 1e6],
            [100 * s["accuracy"]],
            marker="*" if star else "^",
            s=200 if star else 70,
            color="gold" if star else "grey",
            edgecolor="k",
            zorder=6,
            label=s["model"],
        )
    ax.set_xlabel("mean MFLOPs per sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def _training_line(c: dict) -> str:
    parts = c.get("parts", ("skip", "slim"))
    bb = c.get("backbone") or {}
    out = f"Backbone: {'the default ResNet' if not bb else 'the default ResNet with ' + json.dumps(bb)}. "
    out += "Training: static models " + (
        f"{c['epochs']} epochs, then {c['skip_epochs']} more at lr {c['skip_lr']} (the skip model's "
        "fine-tune, without gates)"
        if c.get("baseline_finetune")
        else f"{c['epochs']} epochs"
    )
    if "skip" in parts:
        out += (
            f"; skip_resnet {c['epochs']} + {c['skip_epochs']} at lr {c['skip_lr']} (budget target "
            f"{c['skip_target']}, weight {c['skip_weight']})"
        )
    if "slim" in parts:
        lr = c.get("slim_lr", 0.05)
        if c.get("slim_recipe") == "scratch":
            out += f"; slimmable {c['slim_epochs']} epochs from scratch at lr {lr} (sandwich rule"
            out += f", {c.get('slim_loss', 'distill')} loss)"
        else:
            out += f"; slimmable {c['epochs']} + {c['slim_epochs']} at lr {lr} (sandwich rule"
            out += f", {c.get('slim_loss', 'distill')} loss)"
    if c.get("kd"):
        out += (
            f". Every fine-tune after the backbone's (the cheaper static models', the skip and the slimmable"
            f" model's) also distils from the fine-tuned static backbone (weight {c['kd']}, temperature 3)"
        )
        if "slim" in parts and c.get("slim_loss", "distill") == "distill":
            out += (
                " (the slimmable net's full width; its narrower widths distil from the full width in place)"
            )
    return out + "."


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _markdown(r: dict) -> str:
    op = r["config"]["operating_budget"]
    lines = [
        f"# Block skipping and dynamic width on {r['data']} ({'quick' if r['quick'] else 'full'} run)",
        "",
        f"Static backbone: {100 * r['static_acc']:.2f}% at {r['static_mflops']:.1f} MFLOPs. Budgets are "
        f"fractions of its FLOPs, thresholds calibrated on validation, everything reported on test; "
        f"speed-ups are wall-clock vs the static model (eager PyTorch, "
        f"{'NHWC' if r['config']['channels_last'] else 'NCHW'}, {r['threads']} threads, alternating, "
        "medians).",
        "",
        _training_line(r["config"]),
        "",
        "'Best static at equal time': the most accurate static model, or mix of two (a share of the "
        "inputs to each), that runs in at most the dynamic model's time at that batch size.",
        "",
        "| static model | accuracy | first training only | FLOPs vs static | speed-up b1 | speed-up b64 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in r["statics"]:
        lines.append(
            f"| {s['model']} | {100 * s['accuracy']:.2f}% | {_pct(s.get('accuracy_before_finetune'))} | "
            f"{s['flops_ratio']:.3f} | {s['speedup_b1']:.2f}x | {s['speedup_b64']:.2f}x |"
        )
    lines += [
        "",
        "## Dynamic models at each calibrated budget (validation -> test)",
        "",
        "| model | budget | accuracy | FLOPs ratio | speed-up b1 | best static at equal time b1 "
        "| speed-up b64 | best static at equal time b64 | speed-up b64 pooled | best static at equal time "
        "b64 pooled | beats static (b1 / b64 / pooled) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    yn = {True: "yes", False: "no", None: "-"}
    for name in ("skip", "slim"):
        for c in r[f"{name}_calibration"]:
            if "speedup_b1" not in c:
                lines.append(
                    f"| {name} | {c['budget']:.0%} | {100 * c['accuracy']:.2f}% | {c['flops_ratio']:.3f} "
                    "| - | - | - | - | - | - | - |"
                )
                continue
            star = " (operating point)" if c["budget"] == op else ""
            pooled = f"{c['speedup_b64_pooled']:.2f}x" if "speedup_b64_pooled" in c else "-"
            lines.append(
                f"| {name} | {c['budget']:.0%}{star} | {100 * c['accuracy']:.2f}% | {c['flops_ratio']:.3f} | "
                f"{c['speedup_b1']:.2f}x | {_pct(c['static_acc_at_equal_time_b1'])} | "
                f"{c['speedup_b64']:.2f}x | {_pct(c['static_acc_at_equal_time_b64'])} | {pooled} | "
                f"{_pct(c.get('static_acc_at_equal_time_b64_pooled'))} | "
                f"{yn[c['beats_static_at_equal_time_b1']]} / {yn[c['beats_static_at_equal_time_b64']]} / "
                f"{yn[c.get('beats_static_at_equal_time_b64_pooled')]} |"
            )
    lines += [
        "",
        "## Sweep (test)",
        "",
        "| model / policy | setting | accuracy | mean MFLOPs | FLOPs vs static |",
        "|---|---|---:|---:|---:|",
    ]
    for row in r["sweep"]:
        lines.append(
            f"| {row['policy']} | {row['value']:.4g} | {100 * row['accuracy']:.2f}% | "
            f"{row['mean_flops'] / 1e6:.2f} | {row['flops_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="cifar10")
    p.add_argument("--quick", action="store_true", help="reduced run (minutes), for checking the pipeline")
    p.add_argument("--epochs", type=int, default=None, help="static backbone epochs")
    p.add_argument("--skip-epochs", type=int, default=None)
    p.add_argument("--skip-lr", type=float, default=None)
    p.add_argument(
        "--skip-target", type=float, default=None, help="budget loss target (share of gated FLOPs)"
    )
    p.add_argument("--skip-weight", type=float, default=None, help="budget loss weight")
    p.add_argument("--slim-epochs", type=int, default=None)
    p.add_argument("--slim-lr", type=float, default=None)
    p.add_argument(
        "--slim-loss", choices=("label", "distill"), default=None, help="sandwich rule: narrower widths' loss"
    )
    p.add_argument(
        "--slim-recipe",
        choices=("finetune", "scratch"),
        default=None,
        help="slimmable: from the static model or not",
    )
    p.add_argument("--baseline-epochs", type=int, default=None)
    p.add_argument(
        "--backbone",
        type=json.loads,
        default=None,
        help="JSON settings of the backbone, skip and slimmable models, e.g. '{\"blocks\": [5, 5, 5]}'",
    )
    p.add_argument(
        "--baselines",
        type=json.loads,
        default=None,
        help="JSON {name: settings} of the static baselines ({} settings: the default ResNet)",
    )
    p.add_argument("--parts", default=None, help="comma-separated: skip, slim (default both)")
    p.add_argument(
        "--no-baseline-finetune",
        action="store_true",
        help="static models keep their first training only (default: they also get the skip model's "
        "extra epochs, so every model has trained as long)",
    )
    p.add_argument(
        "--kd",
        type=float,
        default=None,
        help="knowledge distillation weight in [0, 1] from the fine-tuned static backbone into every later "
        "fine-tune: the cheaper static models' as well as the dynamic models' (default 0: none)",
    )
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--val-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--operating-budget", type=float, default=None)
    p.add_argument(
        "--budgets", default=None, help="comma-separated FLOPs budgets (fractions of the backbone's)"
    )
    p.add_argument("--b1-samples", type=int, default=None, help="images timed at batch 1")
    p.add_argument("--b64-samples", type=int, default=None, help="images timed at batch 64")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (medians)")
    p.add_argument("--json", default=None, help="where to write the JSON (its folder gets the .md and .png)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    kw = {
        k: v
        for k, v in dict(
            epochs=a.epochs,
            skip_epochs=a.skip_epochs,
            skip_lr=a.skip_lr,
            skip_target=a.skip_target,
            skip_weight=a.skip_weight,
            slim_epochs=a.slim_epochs,
            slim_lr=a.slim_lr,
            slim_recipe=a.slim_recipe,
            slim_loss=a.slim_loss,
            baseline_epochs=a.baseline_epochs,
            kd=a.kd,
            train_limit=a.train_limit,
            val_limit=a.val_limit,
            test_limit=a.test_limit,
            operating_budget=a.operating_budget,
            b1_samples=a.b1_samples,
            b64_samples=a.b64_samples,
            rounds=a.rounds,
        ).items()
        if v is not None
    }
    if a.no_baseline_finetune:
        kw["baseline_finetune"] = False
    if a.backbone is not None:
        kw["backbone"] = a.backbone
    if a.baselines is not None:
        kw["baselines"] = a.baselines
    if a.budgets is not None:
        kw["budgets"] = tuple(float(v) for v in a.budgets.split(",") if v.strip())
    if a.parts is not None:
        kw["parts"] = tuple(v.strip() for v in a.parts.split(",") if v.strip())
    cfg = SkipWidthBenchConfig(data=a.data, quick=a.quick, **kw)
    r = run(cfg, json_path=a.json, progress=not a.no_progress)
    keys = [
        k for k in r if k.startswith(("static_acc", "skip_", "slim_")) and not isinstance(r[k], (list, dict))
    ]
    print(json.dumps({k: r[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
