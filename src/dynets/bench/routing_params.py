"""Routing and dynamic-parameter benchmark: dyconv_resnet and routed_resnet vs static ResNets.

All models are trained identically (data, seed, schedule, augmentation) and measured on the test
split; everything calibrated uses the validation split only. Reported:
  - dyconv_resnet vs static_resnet (its static twin, within 5% of its FLOPs): accuracy, FLOPs,
    wall-clock at batch 1 and 64;
  - routed_resnet: accuracy vs mean FLOPs as the cost bias is calibrated to a sweep of budgets;
    at the operating budget, against a static ResNet of equal FLOPs (the same layout with a
    narrower last group, width picked to match the operating point's FLOPs) and the full static
    ResNet, with wall-clock at batch 1 and 64;
  - micro-benchmark: DynamicConv2d as one grouped convolution vs a per-sample loop of convolutions
    (and vs a static Conv2d) at batch 64.
JSON + Markdown + a Pareto PNG. Trained models are cached in ~/.cache/dynets/bench; the static
ResNet shares its cache entry with the early-exit benchmark when the recipe is the same.

    python -m dynets.bench.routing_params --quick --json /tmp/rp.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from dynets.bench.common import cache_key as _key
from dynets.bench.common import log as _log
from dynets.bench.plots import plot_pareto
from dynets.bench.wallclock import compare_wallclock, split_batches
from dynets.core.registry import create_model
from dynets.core.serialization import atomic_write_bytes, load, save
from dynets.data import DATASET_STATS, cache_dir, load_dataset
from dynets.params.dynamic_conv import DynamicConv2d
from dynets.routing.router import calibrate_route_bias
from dynets.train import TrainConfig, train

PARTS = ("dyconv", "routed")
# the result fields each part produces (a part not re-run is copied from the previous JSON)
PART_FIELDS = {
    "dyconv": (
        "dyconv_acc",
        "dyconv_flops_ratio",
        "dyconv_speedup_b1",
        "dyconv_speedup_b64",
        "grouped_vs_loop_speedup",
        "dyconv",
        "micro",
    ),
    "routed": (
        "routed_acc",
        "routed_flops_ratio",
        "matched_static_acc",
        "matched_static_flops_ratio",
        "routed_speedup_b1",
        "routed_speedup_b64",
        "routed_branch_mflops",
        "routed_operating_point",
        "routed_sweep",
        "matched_static",
    ),
}
PART_TIMING = {"dyconv": ("dyconv_vs_static",), "routed": ("routed_vs_matched", "routed_vs_full")}

HEADLINE_KEYS = (
    "static_acc",
    "dyconv_acc",
    "dyconv_flops_ratio",
    "dyconv_speedup_b1",
    "dyconv_speedup_b64",
    "routed_acc",
    "routed_flops_ratio",
    "matched_static_acc",
    "routed_speedup_b1",
    "routed_speedup_b64",
    "grouped_vs_loop_speedup",
)


@dataclass
class RoutingParamsBenchConfig:
    data: str = "cifar10"
    quick: bool = False
    epochs: int = 12  # the early-exit benchmark's schedule, so the static ResNet is shared
    train_limit: int | None = None
    val_limit: int | None = None
    test_limit: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    seed: int = 0
    threads: int = 2
    route_budget: float = 0.8  # operating point: fraction of the routed model's dearest path
    route_sweep: tuple[float, ...] = (0.72, 0.76, 0.8, 0.85, 0.9, 0.95, 1.0)
    b1_samples: int = 500
    b64_samples: int = 4096
    rounds: int = 7
    micro_channels: int = 64
    micro_size: int = 16
    micro_batch: int = 64
    micro_experts: int = 4
    model_kw: dict = field(default_factory=dict)  # overrides for every model (e.g. widths)
    dyconv_kw: dict = field(default_factory=dict)
    routed_kw: dict = field(default_factory=dict)
    # which parts to (re)run; a part left out is carried over from the JSON already at --json (its
    # fields are copied unchanged and the result says so in "carried_over")
    parts: tuple[str, ...] = ("dyconv", "routed")

    def __post_init__(self) -> None:
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise ValueError(f"parts: expected a non-empty subset of {PARTS}, got {self.parts}")
        if self.quick:
            self.epochs = min(self.epochs, 2)
            self.train_limit = self.train_limit or 2000
            self.val_limit = self.val_limit or 500
            self.test_limit = self.test_limit or 500
            self.b1_samples = min(self.b1_samples, 64)
            self.b64_samples = min(self.b64_samples, 256)
            self.rounds = min(self.rounds, 3)
            self.route_sweep = (0.75, 0.9, 1.0)
        if not 0 < self.route_budget <= 1:
            raise ValueError(f"route_budget: expected a fraction in (0, 1], got {self.route_budget}")


def _trained(path: Path, name: str, kw: dict, data, tc: TrainConfig, seed: int):
    if (path / "config.json").exists():
        _log(f"reusing trained {name} from {path}")
        return load(path)
    torch.manual_seed(seed)
    model = create_model(name, **kw)
    # hours of training: checkpoint every epoch beside the cache entry, and resume an interrupted
    # run from there (the loop's resume ends bitwise equal to an uninterrupted run)
    ckpt = path.parent / f"{path.name}.partial"
    resume = (ckpt / "last.pt").exists()
    tc = replace(tc, checkpoint_dir=str(ckpt))
    how = "resuming" if resume else "training"
    _log(f"{how} {name} ({model.full_cost() / 1e6:.1f} MFLOPs at most) for {tc.epochs} epochs")
    start = time.time()
    train(model, data, tc, resume=resume)
    _log(f"trained {name} in {time.time() - start:.0f} s")
    model.eval()
    save(model, path)
    shutil.rmtree(ckpt, ignore_errors=True)
    return model


@torch.inference_mode()
def _evaluate(fn, x: torch.Tensor, y: torch.Tensor, bs: int = 256) -> dict:
    """Accuracy and mean FLOPs of `fn` (a dynamic model, or (static_fn, flops))."""
    logits, flops = [], []
    for i in range(0, x.shape[0], bs):
        if isinstance(fn, tuple):
            logits.append(fn[0](x[i : i + bs]))
        else:
            out = fn(x[i : i + bs])
            logits.append(out.logits)
            flops.append(out.flops)
    acc = float((torch.cat(logits).argmax(-1) == y).double().mean())
    mean_flops = float(fn[1]) if isinstance(fn, tuple) else float(torch.cat(flops).mean())
    return {"accuracy": acc, "mean_flops": mean_flops}


FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _in_format(model: torch.nn.Module, fmt: torch.memory_format) -> torch.nn.Module:
    return copy.deepcopy(model).eval().to(memory_format=fmt)


def _timing(static, dynamic, x: torch.Tensor, cfg: RoutingParamsBenchConfig, static_flops: float) -> dict:
    """Static (`static.forward_static`) vs dynamic (`dynamic(x)`) at batch 1 and 64, with weights and
    inputs in NCHW and in NHWC (channels_last, often faster on CPU); "best" compares each model
    in its own faster layout."""
    out: dict = {}
    for bs, n in ((1, cfg.b1_samples), (64, cfg.b64_samples)):
        with torch.inference_mode():
            flops = float(torch.cat([dynamic(b).flops for b in split_batches(x[:n], bs)]).mean())
        per = {}
        for name, fmt in FORMATS.items():
            batches = split_batches(x[:n].contiguous(memory_format=fmt), bs)
            s, d = _in_format(static, fmt), _in_format(dynamic, fmt)
            per[name] = wc = compare_wallclock(s.forward_static, d, batches, rounds=cfg.rounds)
            _log(
                f"  batch {bs} {name}: static {wc['static_per_s']:.0f}/s, "
                f"dynamic {wc['dynamic_per_s']:.0f}/s, speed-up {wc['speedup']:.2f}x "
                f"(FLOPs {static_flops / flops:.2f}x)"
            )
        st, dt = min(w["static_s"] for w in per.values()), min(w["dynamic_s"] for w in per.values())
        samples = per["nchw"]["samples"]
        best = {
            "static_s": st,
            "dynamic_s": dt,
            "static_per_s": samples / st,
            "dynamic_per_s": samples / dt,
            "speedup": st / dt,
            "static_format": min(per, key=lambda k: per[k]["static_s"]),
            "dynamic_format": min(per, key=lambda k: per[k]["dynamic_s"]),
        }
        out[f"b{bs}"] = {
            **best,
            "flops_speedup": static_flops / flops,
            "realization": best["speedup"] * flops / static_flops,
            "formats": per,
        }
    return out


def _matched_width(kw: dict, target_flops: float) -> tuple[int, float]:
    """The last-group width of static_resnet whose FLOPs are closest to target_flops."""
    widths = tuple(kw.get("widths", (32, 64, 128)))
    best = None
    for w in range(4, 2 * widths[-1] + 1, 4):
        cost = create_model("static_resnet", **{**kw, "widths": (*widths[:-1], w)}).full_cost()
        if best is None or abs(cost - target_flops) < abs(best[1] - target_flops):
            best = (w, cost)
    return best


def micro_benchmark(cfg: RoutingParamsBenchConfig) -> dict:
    """DynamicConv2d at batch B: one grouped convolution vs a per-sample loop vs a static Conv2d."""
    torch.manual_seed(cfg.seed)
    C, S, B = cfg.micro_channels, cfg.micro_size, cfg.micro_batch
    conv = DynamicConv2d(C, C, 3, padding=1, bias=False, num_experts=cfg.micro_experts).eval()
    static = torch.nn.Conv2d(C, C, 3, padding=1, bias=False).eval()
    x = torch.randn(B, C, S, S)

    def loop(xb: torch.Tensor) -> torch.Tensor:
        w, _ = conv.aggregate(conv.attention(xb))
        return torch.cat([F.conv2d(xb[i : i + 1], w[i], None, 1, 1) for i in range(xb.shape[0])])

    with torch.inference_mode():
        err = float((loop(x) - conv(x)).abs().max())
    vs_loop = compare_wallclock(loop, conv, [x], rounds=max(cfg.rounds, 5))
    vs_static = compare_wallclock(static, conv, [x], rounds=max(cfg.rounds, 5))
    res = {
        "channels": C,
        "size": S,
        "batch": B,
        "experts": cfg.micro_experts,
        "max_abs_diff": err,
        "loop_s": vs_loop["static_s"],
        "grouped_s": vs_loop["dynamic_s"],
        "static_conv_s": vs_static["static_s"],
        "grouped_vs_loop_speedup": vs_loop["speedup"],
        "grouped_vs_static_time_ratio": 1 / vs_static["speedup"],
    }
    _log(
        f"micro: DynamicConv2d batch {B}: grouped {res['grouped_s'] * 1e3:.2f} ms, loop "
        f"{res['loop_s'] * 1e3:.2f} ms ({res['grouped_vs_loop_speedup']:.1f}x), static conv "
        f"{res['static_conv_s'] * 1e3:.2f} ms"
    )
    return res


def _dyconv_part(cfg, trained, static, kw: dict, x, y, full: float) -> dict:
    """dyconv_resnet vs its static twin, and the grouped-vs-loop micro-benchmark."""
    micro = micro_benchmark(cfg)
    dyconv = trained(f"routing_params_{cfg.data}-dyconv", "dyconv_resnet", {**kw, **cfg.dyconv_kw}, [])
    dyconv.eval()
    dy_row = {"model": "dyconv_resnet", **_evaluate(dyconv, x, y)}
    _log(f"dyconv {dy_row['accuracy']:.4f} at {dy_row['mean_flops'] / 1e6:.1f} MFLOPs")
    _log("wall-clock dyconv_resnet vs static_resnet")
    dy_time = _timing(static, dyconv, x, cfg, full)
    return {
        "dyconv_acc": dy_row["accuracy"],
        "dyconv_flops_ratio": dy_row["mean_flops"] / full,
        "dyconv_speedup_b1": dy_time["b1"]["speedup"],
        "dyconv_speedup_b64": dy_time["b64"]["speedup"],
        "grouped_vs_loop_speedup": micro["grouped_vs_loop_speedup"],
        "dyconv": dy_row,
        "micro": micro,
        "timing": {"dyconv_vs_static": dy_time},
    }


def _routed_part(cfg, trained, static, kw: dict, val_set, x, y, full: float) -> dict:
    """routed_resnet: the cost bias calibrated on validation for each budget, measured on test; at
    the operating budget, against the static ResNet of equal FLOPs and the full one."""
    routed = trained(f"routing_params_{cfg.data}-routed", "routed_resnet", {**kw, **cfg.routed_kw}, [])
    routed.eval()
    sweep = []
    for b in sorted(set(cfg.route_sweep) | {cfg.route_budget}):
        cal = calibrate_route_bias(routed, val_set.x, b)
        res = _evaluate(routed, x, y)
        with torch.inference_mode():
            share = float(
                torch.cat([routed(x[i : i + 512]).decisions["branch"] for i in range(0, len(x), 512)])
                .double()
                .mean()
            )
        row = {
            "policy": "routed_resnet (cost bias)",
            "value": b,
            "penalty": cal["penalty"],
            **res,
            "flops_ratio": res["mean_flops"] / full,
            "expensive_share": share,
        }
        sweep.append(row)
        _log(
            f"routed budget {b:.2f}: penalty {cal['penalty']:.3f}, test acc {res['accuracy']:.4f}, "
            f"FLOPs ratio {row['flops_ratio']:.3f}, expensive branch {share:.2%}"
        )
    op = next(r for r in sweep if r["value"] == cfg.route_budget)
    calibrate_route_bias(routed, val_set.x, cfg.route_budget)  # leave the operating point set
    with torch.inference_mode():  # each branch alone on every test sample (the anytime view)
        branch_acc = [
            float(
                (
                    torch.cat(
                        [routed.forward_branch(x[i : i + 512], k) for i in range(0, len(x), 512)]
                    ).argmax(-1)
                    == y
                )
                .double()
                .mean()
            )
            for k in range(2)
        ]
    _log(f"routed branches alone: cheap {branch_acc[0]:.4f}, expensive {branch_acc[1]:.4f}")

    # the static ResNet of equal FLOPs: a narrower last group
    width, matched_flops = _matched_width(kw, op["mean_flops"])
    m_kw = {**kw, "widths": (*tuple(kw.get("widths", (32, 64, 128)))[:-1], width)}
    matched = trained(f"routing_params_{cfg.data}-matched", "static_resnet", m_kw, [])
    matched.eval()
    matched_row = {
        "model": f"static_resnet (last group width {width})",
        **_evaluate((matched.forward_static, matched_flops), x, y),
    }
    _log(f"matched static (width {width}): {matched_row['accuracy']:.4f} at {matched_flops / 1e6:.1f} MFLOPs")
    _log("wall-clock routed_resnet vs the static ResNet of equal FLOPs")
    rt_time = _timing(matched, routed, x, cfg, matched_flops)
    _log("wall-clock routed_resnet vs the full static ResNet")
    rt_full_time = _timing(static, routed, x, cfg, full)
    return {
        "routed_acc": op["accuracy"],
        "routed_flops_ratio": op["flops_ratio"],
        "matched_static_acc": matched_row["accuracy"],
        "matched_static_flops_ratio": matched_flops / full,
        "routed_speedup_b1": rt_time["b1"]["speedup"],
        "routed_speedup_b64": rt_time["b64"]["speedup"],
        "routed_branch_mflops": (routed.branch_costs() / 1e6).tolist(),
        "routed_branch_alone_acc": branch_acc,
        "routed_operating_point": op,
        "routed_sweep": sweep,
        "matched_static": {**matched_row, "width": width},
        "timing": {"routed_vs_matched": rt_time, "routed_vs_full": rt_full_time},
    }


def run(
    cfg: RoutingParamsBenchConfig,
    *,
    json_path: str | None = None,
    out_dir: str | None = None,
    progress: bool = True,
) -> dict:
    torch.set_num_threads(cfg.threads)
    out = Path(out_dir or (Path(json_path).parent if json_path else "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(json_path).stem if json_path else f"routing_params_{cfg.data}"
    t0 = time.time()
    previous: dict = {}
    if set(cfg.parts) != set(PARTS):
        if not (json_path and Path(json_path).exists()):
            raise ValueError(
                f"parts={cfg.parts}: the parts not re-run are carried over from the previous result, "
                f"expected an existing --json file, got {json_path!r}"
            )
        previous = json.loads(Path(json_path).read_text())
    train_set = load_dataset(cfg.data, "train", limit=cfg.train_limit)
    val_set = load_dataset(cfg.data, "val", limit=cfg.val_limit)
    test_set = load_dataset(cfg.data, "test", limit=cfg.test_limit)
    _log(f"data {cfg.data}: train {len(train_set)}, val {len(val_set)}, test {len(test_set)}")
    c, h, _ = train_set.input_shape
    mean, std = DATASET_STATS.get(cfg.data, ((0.5,), (0.25,)))
    kw = dict(
        in_channels=c, image_size=h, num_classes=train_set.num_classes, mean=tuple(mean), std=tuple(std)
    )
    kw.update(cfg.model_kw)
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
    tcfg = TrainConfig(**tc)

    def trained(tag: str, name: str, model_kw: dict, extra: list):
        return _trained(
            cache / f"{tag}-{_key(base[:3] + [model_kw, tc_key] + extra)}",
            name,
            model_kw,
            train_set,
            tcfg,
            cfg.seed,
        )

    static = _trained(
        cache / f"early_exit_{cfg.data}-static-{_key(base)}", "static_resnet", kw, train_set, tcfg, cfg.seed
    )
    static.eval()
    full = static.full_cost()
    x, y = test_set.x, test_set.y
    static_row = {"model": "static_resnet", **_evaluate((static.forward_static, full), x, y)}
    _log(f"static {static_row['accuracy']:.4f} at {full / 1e6:.1f} MFLOPs")
    result: dict = {
        "benchmark": "routing_params",
        "data": cfg.data,
        "quick": cfg.quick,
        "config": asdict(cfg),
        "static_acc": static_row["accuracy"],
        "static_mflops": full / 1e6,
        "static": static_row,
        "timing": {},
    }
    for part in cfg.parts:
        if part == "dyconv":
            fields = _dyconv_part(cfg, trained, static, kw, x, y, full)
        else:
            fields = _routed_part(cfg, trained, static, kw, val_set, x, y, full)
        result["timing"].update(fields.pop("timing"))
        result.update(fields)
    carried = [p for p in PARTS if p not in cfg.parts]
    for part in carried:
        for k in PART_FIELDS[part]:
            result[k] = previous[k]
        for k in PART_TIMING[part]:
            result["timing"][k] = previous["timing"][k]
    if carried:
        result["carried_over"] = {
            "parts": carried,
            "from": "the previous result at this path (its models were trained with the same recipe)",
            "previous_static_acc": previous.get("static_acc"),
        }
    result.update(torch=torch.__version__, threads=torch.get_num_threads(), seconds=time.time() - t0)
    dy_row = result["dyconv"]
    op, width = result["routed_operating_point"], result["matched_static"]["width"]
    matched_row = result["matched_static"]
    sweep = result["routed_sweep"]
    if json_path:
        atomic_write_bytes(json_path, json.dumps(result, indent=2).encode())
    rows = sweep + [
        {"policy": "dyconv_resnet", "value": None, **dy_row},
        {
            "policy": f"static, last group width {width}",
            "value": None,
            "accuracy": matched_row["accuracy"],
            "mean_flops": matched_row["mean_flops"],
        },
    ]
    plot_pareto(
        rows,
        {"accuracy": static_row["accuracy"], "mean_flops": full},
        out / f"{stem}_pareto.png",
        calibrated=[op],
        title=f"{cfg.data}: routing, dynamic conv, static ResNets ({'quick' if cfg.quick else 'full'})",
    )
    atomic_write_bytes(out / f"{stem}.md", _markdown(result).encode())
    return result


def _carried(r: dict, part: str) -> str:
    """A label suffix for a row carried over from the previous run (with that run's static)."""
    co = r.get("carried_over")
    if not co or part not in co["parts"]:
        return ""
    return f" (previous run; its static_resnet: {100 * co['previous_static_acc']:.2f}%)"


def _markdown(r: dict) -> str:
    t, m, op = r["timing"], r["micro"], r["routed_operating_point"]
    lines = [
        f"# Dynamic routing and dynamic convolution on {r['data']} ({'quick' if r['quick'] else 'full'} run)",
        "",
        f"{r['threads']} threads, torch {r['torch']}. Wall-clock: median of {r['config']['rounds']} "
        "alternating rounds in one process, eager PyTorch; each model timed with NCHW and with NHWC "
        "(channels_last) weights and inputs, and compared in its faster layout.",
        "",
        "| model | test accuracy | mean MFLOPs | FLOPs vs static |",
        "|---|---:|---:|---:|",
        f"| static_resnet | {100 * r['static_acc']:.2f}% | {r['static_mflops']:.2f} | 1.000 |",
        f"| dyconv_resnet{_carried(r, 'dyconv')} | {100 * r['dyconv_acc']:.2f}% "
        f"| {r['dyconv']['mean_flops'] / 1e6:.2f} "
        f"| {r['dyconv_flops_ratio']:.3f} |",
        f"| routed_resnet at budget {op['value']:.2f} | {100 * r['routed_acc']:.2f}% "
        f"| {op['mean_flops'] / 1e6:.2f} | {r['routed_flops_ratio']:.3f} |",
        f"| {r['matched_static']['model']} (equal FLOPs) | {100 * r['matched_static_acc']:.2f}% "
        f"| {r['matched_static']['mean_flops'] / 1e6:.2f} | {r['matched_static_flops_ratio']:.3f} |",
        "",
        "## Wall-clock (dynamic vs static, speed-up = static time / dynamic time)",
        "",
        "| comparison | batch | static /s | dynamic /s | speed-up | FLOPs speed-up | layouts |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    names = {
        "dyconv_vs_static": "dyconv_resnet vs static_resnet",
        "routed_vs_matched": "routed_resnet vs static of equal FLOPs",
        "routed_vs_full": "routed_resnet vs full static_resnet",
    }
    for key, label in names.items():
        part = next(p for p, keys in PART_TIMING.items() if key in keys)
        label += " (previous run)" if _carried(r, part) else ""
        for bs in ("b1", "b64"):
            w = t[key][bs]
            lines.append(
                f"| {label} | {bs[1:]} | {w['static_per_s']:.0f} | {w['dynamic_per_s']:.0f} "
                f"| {w['speedup']:.2f}x | {w['flops_speedup']:.2f}x "
                f"| {w['static_format']} / {w['dynamic_format']} |"
            )
    lines += [
        "",
        f"## Routed ResNet: cost bias calibrated on validation (branch MFLOPs: "
        f"{', '.join(f'{v:.1f}' for v in r['routed_branch_mflops'])})",
        "",
        "| budget | penalty | test accuracy | mean MFLOPs | FLOPs vs static | expensive branch |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r["routed_sweep"]:
        lines.append(
            f"| {s['value']:.2f} | {s['penalty']:.3f} | {100 * s['accuracy']:.2f}% "
            f"| {s['mean_flops'] / 1e6:.2f} | {s['flops_ratio']:.3f} | {100 * s['expensive_share']:.1f}% |"
        )
    if "routed_branch_alone_acc" in r:
        a = r["routed_branch_alone_acc"]
        lines += [
            "",
            f"Each branch alone on every test sample: cheap {100 * a[0]:.2f}%, expensive {100 * a[1]:.2f}%.",
        ]
    if "carried_over" in r:
        co = r["carried_over"]
        lines += [
            "",
            f"Parts carried over unchanged from the previous run (not re-run here): {', '.join(co['parts'])} "
            f"(that run's static ResNet: {100 * co['previous_static_acc']:.2f}%).",
        ]
    lines += [
        "",
        f"## Micro-benchmark: DynamicConv2d ({m['channels']} -> {m['channels']}, 3x3, "
        f"{m['size']}x{m['size']}, {m['experts']} experts, batch {m['batch']})",
        "",
        "| implementation | ms per batch |",
        "|---|---:|",
        f"| one grouped convolution (groups = batch) | {m['grouped_s'] * 1e3:.2f} |",
        f"| per-sample loop of convolutions | {m['loop_s'] * 1e3:.2f} |",
        f"| static Conv2d (one kernel, for scale) | {m['static_conv_s'] * 1e3:.2f} |",
        "",
        f"Grouped vs loop: {m['grouped_vs_loop_speedup']:.2f}x faster; grouped vs static conv: "
        f"{m['grouped_vs_static_time_ratio']:.2f}x the time "
        f"(max |difference| to the loop {m['max_abs_diff']:.1e}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="cifar10")
    p.add_argument("--quick", action="store_true", help="a small run (< 5 minutes) that proves the pipeline")
    p.add_argument("--epochs", type=int)
    p.add_argument("--limit", type=int, help="at most this many train / val / test samples")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, help="routed operating point (fraction of its dearest path)")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)}; the others are carried over from --json",
    )
    p.add_argument("--json", help="where to write the JSON (Markdown and PNG go beside it)")
    p.add_argument("--out", help="folder for Markdown and PNG (default: beside --json)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    extra: dict = {"threads": a.threads}
    if a.epochs:
        extra["epochs"] = a.epochs
    if a.limit:
        extra.update(train_limit=a.limit, val_limit=a.limit, test_limit=a.limit)
    if a.budget:
        extra["route_budget"] = a.budget
    extra["parts"] = tuple(p.strip() for p in a.parts.split(",") if p.strip())
    cfg = RoutingParamsBenchConfig(data=a.data, quick=a.quick, **extra)
    r = run(cfg, json_path=a.json, out_dir=a.out, progress=not a.no_progress)
    print(json.dumps({k: round(r[k], 4) for k in HEADLINE_KEYS}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
