"""The `dynets` command: train, eval, calibrate, bench, demo, models.

Every command has --help; long work shows tqdm progress. Models are directories written by
`dynets.save` (config.json + model.safetensors); `train --out RUN` writes RUN/model and keeps
per-epoch checkpoints in RUN/checkpoints (so `--resume` continues an interrupted run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def _parse_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _model_kwargs(pairs: list[str]) -> dict:
    kw = {}
    for p in pairs or []:
        if "=" not in p:
            raise SystemExit(f"--set: expected KEY=VALUE (e.g. widths=[16,32,64]), got {p!r}")
        k, v = p.split("=", 1)
        kw[k.strip()] = _parse_value(v)
    return kw


def _resolve_model_dir(path: str) -> Path:
    p = Path(path)
    if not (p / "config.json").exists() and (p / "model" / "config.json").exists():
        return p / "model"
    return p


def cmd_models(args: argparse.Namespace) -> int:
    from dynets.core.registry import describe_model, list_models

    for name in list_models(args.pattern):
        print(f"{name:20s} {describe_model(name)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dynets.core.registry import create_model
    from dynets.core.serialization import save
    from dynets.data import DATASET_STATS, load_dataset
    from dynets.depth.learned import fit_learned_exits
    from dynets.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    train_set = load_dataset(args.data, "train", limit=args.limit)
    val_set = load_dataset(args.data, "val")
    c, h, w = train_set.input_shape
    kw = dict(in_channels=c, image_size=h, num_classes=train_set.num_classes)
    if train_set.name in DATASET_STATS:
        kw.update(mean=tuple(DATASET_STATS[train_set.name][0]), std=tuple(DATASET_STATS[train_set.name][1]))
    kw.update(_model_kwargs(args.set))
    if h != w:
        raise SystemExit(f"--data: expected square images, got {h}x{w}")
    torch.manual_seed(args.seed)
    model = create_model(args.model, **kw)
    out = Path(args.out)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        augment=args.augment,
        distill=args.distill,
        exit_weights=args.exit_weights,
        checkpoint_dir=str(out / "checkpoints"),
        progress=not args.no_progress,
    )
    result = train(model, train_set, cfg, resume=args.resume, eval_data=val_set)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    model.eval()
    if len(getattr(model, "exit_predictors", [])):
        from dynets.bench.evaluate import collect

        val = collect(model, val_set)
        fit_learned_exits(model, val.exit_logits, val.labels)
    save(model, out / "model", extra={"history": result.history, "data": args.data, "model": args.model})
    last = result.history[-1] if result.history else {}
    print(
        f"saved {out / 'model'} (last epoch: loss {last.get('loss', float('nan')):.4f}, "
        f"val acc {last.get('val_acc', float('nan')):.4f})"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dynets.bench.evaluate import collect, format_table, sweep
    from dynets.bench.plots import plot_examples_by_exit, plot_pareto
    from dynets.core.serialization import atomic_write_bytes, load
    from dynets.data import load_dataset

    torch.set_num_threads(args.threads)
    model = load(_resolve_model_dir(args.model_dir))
    data = load_dataset(args.data, args.split, limit=args.limit)
    outs = collect(model, data, progress=True)
    if args.static:
        static = load(_resolve_model_dir(args.static))
        sx = torch.cat([static.forward_static(data.x[i : i + 256]) for i in range(0, len(data), 256)])
        static_row = {
            "accuracy": float((sx.argmax(-1) == data.y).double().mean()),
            "mean_flops": static.full_cost(),
        }
        label = "static baseline"
    else:
        static_row = {"accuracy": outs.accuracy_per_exit()[-1], "mean_flops": model.full_cost()}
        label = "final exit only"
    outs.full_cost = static_row["mean_flops"]
    kinds = [k.strip() for k in args.policies.split(",") if k.strip()]
    rows = sweep(outs, kinds)
    anytime = [
        {"exit": k, "accuracy": a, "mean_flops": float(outs.exit_costs[k])}
        for k, a in enumerate(outs.accuracy_per_exit())
    ]
    print(
        f"{len(data)} samples of {args.data}:{args.split}; {label}: "
        f"accuracy {100 * static_row['accuracy']:.2f}% at "
        f"{static_row['mean_flops'] / 1e6:.2f} MFLOPs"
    )
    print(format_table(rows, static_row))
    cur = outs.evaluate(model.policy)
    print(
        f"current policy {model.policy}: accuracy {100 * cur['accuracy']:.2f}%, "
        f"{cur['mean_flops'] / 1e6:.2f} MFLOPs ({cur['flops_ratio']:.2f} of static)"
    )
    out = Path(args.out)
    pareto = plot_pareto(
        rows, static_row, out / "pareto.png", anytime=anytime, title=f"{args.data}: accuracy vs cost"
    )
    with torch.no_grad():
        n = min(len(data), 512)
        dyn = model(data.x[:n])
    examples = plot_examples_by_exit(
        data.x[:n], dyn.exit_index, out / "examples_by_exit.png", labels=data.classes, preds=dyn.prediction
    )
    print(f"wrote {pareto}\nwrote {examples}")
    if args.json:
        atomic_write_bytes(
            args.json,
            json.dumps(
                {"static": static_row, "rows": rows, "anytime": anytime, "current": cur}, indent=2
            ).encode(),
        )
        print(f"wrote {args.json}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from dynets.bench.evaluate import collect
    from dynets.core.serialization import load, read_config, save
    from dynets.data import load_dataset
    from dynets.policies.calibration import calibrate

    torch.set_num_threads(args.threads)
    src = _resolve_model_dir(args.model_dir)
    model = load(src)
    data = load_dataset(args.data, args.split, limit=args.limit)
    outs = collect(model, data, progress=True)
    kinds = ["confidence", "entropy"] + (["learned"] if outs.learned is not None else [])
    kinds = kinds if args.policy == "auto" else [args.policy]
    results = []
    for kind in kinds:
        costs = outs.exit_costs_learned if kind == "learned" else outs.exit_costs
        try:
            results.append(
                calibrate(
                    kind,
                    outs.exit_logits,
                    outs.labels,
                    costs,
                    args.budget,
                    full_cost=model.full_cost(),
                    learned=outs.learned,
                )
            )
        except ValueError as e:
            raise SystemExit(f"calibrate: {e}") from None
    best = max(results, key=lambda r: r.val_accuracy)
    for r in results:
        mark = "*" if r is best else " "
        print(
            f"{mark} {r.policy}: {args.split} accuracy {100 * r.val_accuracy:.2f}%, "
            f"mean {r.val_flops / 1e6:.3f} "
            f"MFLOPs (target {r.target_flops / 1e6:.3f}, {r.val_flops / model.full_cost():.3f} of static)"
        )
    model.policy = best.policy
    dest = Path(args.out) if args.out else src
    save(model, dest, extra=read_config(src).get("extra", {}))
    print(f"saved {dest} with policy {best.policy}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dynets.bench.early_exit import HEADLINE_KEYS, EarlyExitBenchConfig, run

    if args.which != "early-exit":
        raise SystemExit(f"bench: expected one of ['early-exit'], got {args.which!r}")
    extra = {"epochs": args.epochs} if args.epochs else {}
    if args.limit:
        extra.update(train_limit=args.limit, test_limit=args.limit)
    cfg = EarlyExitBenchConfig(
        data=args.data, quick=args.quick, recipe=args.recipe, model_kw=_model_kwargs(args.set), **extra
    )
    r = run(cfg, json_path=args.json, out_dir=args.out, progress=not args.no_progress)
    print(json.dumps({k: r[k] if r[k] is None else round(r[k], 4) for k in HEADLINE_KEYS}, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dynets.bench.early_exit import EarlyExitBenchConfig, run
    from dynets.bench.evaluate import format_table

    print("dynets demo: an early-exit ResNet vs its static twin on scikit-learn's bundled digits (8x8)")
    cfg = EarlyExitBenchConfig(
        data="digits",
        epochs=args.epochs,
        batch_size=64,
        lr=0.05,
        budgets=(0.4, 0.5, 0.7),
        model_kw=dict(widths=(16, 32, 64), blocks=(2, 2, 2), exits=(0, 2), stem_stride=1),
        b1_samples=200,
        b64_samples=360,
        rounds=3,
    )
    out = Path(args.out)
    r = run(cfg, json_path=str(out / "demo.json"), out_dir=str(out), progress=not args.no_progress)
    print()
    print(format_table(r["sweep"], {"accuracy": r["static_acc"], "mean_flops": r["static_mflops"] * 1e6}))
    print()
    print(
        f"calibrated to {r['operating_point']['budget']:.0%} of the static cost: accuracy "
        f"{100 * r['dynamic_acc']:.2f}% (static {100 * r['static_acc']:.2f}%) "
        f"at {r['flops_ratio']:.2f} of its FLOPs; "
        f"wall-clock speed-up {r['speedup_b1']:.2f}x at batch 1, {r['speedup_b64']:.2f}x at batch 64"
    )
    print(f"plot: {out / 'demo_pareto.png'}")
    print(f"inputs by exit: {out / 'demo_examples_by_exit.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynets", description="Dynamic neural networks: spend compute per input."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list registered models")
    s.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'ee_*'")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("train", help="train a registered model on a dataset")
    s.add_argument("model", help="registered model name (see `dynets models`)")
    s.add_argument("--data", required=True, help="digits | mnist | cifar10 | npz:PATH | folder:PATH")
    s.add_argument("--out", required=True, help="run directory: RUN/model and RUN/checkpoints")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    s.add_argument("--augment", choices=["none", "crop_flip"], default="none")
    s.add_argument("--distill", type=float, default=0.0, help="self-distillation weight in [0, 1]")
    s.add_argument("--exit-weights", default="uniform", help="uniform | linear | sqrt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--limit", type=int, default=None, help="use only the first N training samples")
    s.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.pt")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override (JSON value)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="accuracy and mean FLOPs per policy setting, with plots")
    s.add_argument("model_dir")
    s.add_argument("--data", required=True)
    s.add_argument("--split", default="test", choices=["train", "val", "test"])
    s.add_argument("--static", default=None, help="a static baseline model directory for the same axes")
    s.add_argument("--policies", default="confidence,entropy,patience,learned")
    s.add_argument("--out", default="dynets-eval", help="folder for the PNGs")
    s.add_argument("--json", default=None, help="also write the table as JSON here")
    s.add_argument("--limit", type=int, default=None)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("calibrate", help="fit exit thresholds to a mean-FLOPs budget on held-out data")
    s.add_argument("model_dir")
    s.add_argument("--data", required=True)
    s.add_argument(
        "--budget", type=float, required=True, help="fraction of the static cost in (0, 1], or FLOPs"
    )
    s.add_argument("--policy", default="auto", choices=["auto", "confidence", "entropy", "learned"])
    s.add_argument("--split", default="val", choices=["train", "val", "test"])
    s.add_argument("--out", default=None, help="save the calibrated model here (default: in place)")
    s.add_argument("--limit", type=int, default=None)
    s.set_defaults(fn=cmd_calibrate)

    s = sub.add_parser("bench", help="run a benchmark (training included) and write its JSON")
    s.add_argument("which", choices=["early-exit"])
    s.add_argument("--data", default="cifar10")
    s.add_argument("--quick", action="store_true", help="reduced version (a few minutes)")
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--json", default=None)
    s.add_argument("--out", default=None, help="folder for the Markdown and PNGs (default: beside --json)")
    s.add_argument("--limit", type=int, default=None, help="train and test on at most N samples")
    s.add_argument(
        "--recipe",
        choices=["frozen", "joint"],
        default="frozen",
        help="exits trained on the frozen static backbone, or jointly from scratch",
    )
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override (JSON value)")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("demo", help="train and compare on the embedded digits dataset (about a minute)")
    s.add_argument("--out", default="dynets-demo")
    s.add_argument("--epochs", type=int, default=15)
    s.set_defaults(fn=cmd_demo)

    for name, sp in sub.choices.items():
        sp.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        if name in ("train", "bench", "demo"):
            sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"dynets {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
