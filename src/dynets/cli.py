"""The `dynets` command: train, eval, predict, calibrate, bench, demo, models.

Every command has --help; long work shows tqdm progress. Models are directories written by
`dynets.save` (config.json + model.safetensors); `train --out RUN` writes RUN/model and keeps
per-epoch checkpoints in RUN/checkpoints (so `--resume` continues an interrupted run).
Text models (Dynamic BERT): `train text --model ENCODER --train FILE --dev FILE`, and `eval` /
`predict` recognise a text model directory by its architecture; their code is in cli_text.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from dynets.cli_bench import EXTERNAL_BENCHES, bench_names, run_external
from dynets.cli_text import add_table_options
from dynets.serve.cli import add_parsers as add_serve_parsers


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

    if args.model == "text":
        from dynets.cli_text import cmd_train_text

        if args.teacher is not None or args.kd is not None:
            raise SystemExit(
                "train text: --teacher and --kd are for image and sequence models (not text yet)"
            )
        return cmd_train_text(args)
    text_only = {
        "--model": args.encoder,
        "--train": args.train,
        "--dev": args.dev,
        "--dynabert": args.dynabert,
    }
    used = [k for k, v in text_only.items() if v]
    if used:
        raise SystemExit(f"train {args.model}: {', '.join(used)} are for `dynets train text`")
    if not args.data or not args.out:
        raise SystemExit(f"train {args.model}: expected --data and --out (e.g. --data digits --out RUN)")
    for name, default in (("epochs", 10), ("batch_size", 128), ("lr", 0.05)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    torch.set_num_threads(args.threads)
    train_set = load_dataset(args.data, "train", limit=args.limit)
    val_set = load_dataset(args.data, "val")
    shape = tuple(train_set.input_shape)
    if len(shape) == 2:  # sequences (T, F): recurrent and sequence models
        kw = dict(input_size=shape[1], num_classes=train_set.num_classes, seq_len=shape[0])
    elif len(shape) == 3:
        c, h, w = shape
        if h != w:
            raise SystemExit(f"--data: expected square images, got {h}x{w}")
        kw = dict(in_channels=c, image_size=h, num_classes=train_set.num_classes)
        if train_set.name in DATASET_STATS:
            mean, std = DATASET_STATS[train_set.name]
            kw.update(mean=tuple(mean), std=tuple(std))
    else:
        raise SystemExit(f"--data: expected images (C, H, W) or sequences (T, F), got shape {shape}")
    kw.update(_model_kwargs(args.set))
    if args.kd is not None and args.teacher is None:
        raise SystemExit(f"train {args.model}: --kd {args.kd} expected a --teacher model directory, got none")
    teacher = None
    if args.teacher is not None:
        from dynets.core.serialization import load

        teacher = load(_resolve_model_dir(args.teacher))
        want = getattr(teacher, "input_shape", None)
        if want is not None and tuple(want) != shape:
            raise SystemExit(
                f"--teacher {args.teacher}: expected a model for inputs {shape} like --data {args.data}, "
                f"got one for {tuple(want)}"
            )
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
        kd=0.0 if teacher is None else (0.5 if args.kd is None else args.kd),
        exit_weights=args.exit_weights,
        checkpoint_dir=str(out / "checkpoints"),
        progress=not args.no_progress,
    )
    result = train(model, train_set, cfg, resume=args.resume, eval_data=val_set, teacher=teacher)
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

    model_dir = _resolve_model_dir(args.model_dir)
    from dynets.cli_text import cmd_eval_text, is_text_model
    from dynets.core.serialization import read_config

    if is_text_model(model_dir):
        return cmd_eval_text(args, model_dir)
    if Path(args.data).suffix.lower() in (".tsv", ".csv"):
        raise SystemExit(
            f"eval: --data {args.data} is a text table: expected a text model directory (DynamicBert), "
            f"got a {read_config(model_dir).get('architecture')} model in {model_dir}"
        )
    torch.set_num_threads(args.threads)
    model = load(model_dir)
    data = load_dataset(args.data, args.split, limit=args.limit)
    if not hasattr(model, "exit_stages"):  # not an early-exit network: evaluate at its current setting
        return _eval_generic(args, model, data)
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


def _eval_generic(args: argparse.Namespace, model: torch.nn.Module, data) -> int:
    """Block skipping, widths, experts, routes, tokens, steps: accuracy, mean FLOPs and the mean of
    each per-sample decision at the model's current run-time setting."""
    from dynets.bench.evaluate import evaluate_dynamic
    from dynets.core.serialization import atomic_write_bytes

    r = evaluate_dynamic(model, data, progress=True)
    ratio = f" ({r['flops_ratio']:.3f} of its static cost)" if "flops_ratio" in r else ""
    print(
        f"{r['samples']} samples of {args.data}:{args.split}: accuracy {100 * r['accuracy']:.2f}%, "
        f"mean {r['mean_flops'] / 1e6:.3f} MFLOPs per sample{ratio}"
    )
    for name, v in r["decisions_mean"].items():
        print(f"  decision {name}: mean {v:.4f}")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(r, indent=2).encode())
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


def cmd_predict(args: argparse.Namespace) -> int:
    from dynets.cli_text import cmd_predict as predict

    return predict(args, _resolve_model_dir(args.model_dir))


def cmd_bench_bert(args: argparse.Namespace) -> int:
    from dynets.bench.bert import HEADLINE_KEYS, BertBenchConfig, run

    if args.set or args.recipe:
        raise SystemExit(
            "bench bert: --set and --recipe are for early-exit (bert tries two_stage, distill and joint)"
        )
    extra: dict = {"epochs": args.epochs} if args.epochs else {}
    if args.train_limit:
        extra["train_limit"] = args.train_limit
    if args.limit:
        extra["dev_limit"] = args.limit
    if args.bert_val_rows is not None:
        extra["val_rows"] = args.bert_val_rows
    if args.bert_joint_epochs is not None:
        extra["joint_epochs"] = args.bert_joint_epochs
    if args.bert_recipes:
        extra["recipes"] = tuple(r.strip() for r in args.bert_recipes.split(",") if r.strip())
    cfg = BertBenchConfig(
        quick=args.quick, threads=args.threads, data=args.data, encoder=args.encoder, **extra
    )
    if args.train_limit:  # an explicit limit wins over --quick's
        cfg.train_limit = args.train_limit
    r = run(cfg, json_path=args.json, out_dir=args.out, progress=not args.no_progress)
    print(json.dumps({k: round(r[k], 4) for k in HEADLINE_KEYS}, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dynets.bench.early_exit import HEADLINE_KEYS, EarlyExitBenchConfig, run

    if args.which == "bert":
        return cmd_bench_bert(args)
    if args.which != "early-exit":
        raise SystemExit(f"bench: expected one of ['early-exit', 'bert'], got {args.which!r}")
    if args.train_limit or args.encoder:
        raise SystemExit("bench early-exit: --train-limit and --encoder are for `bench bert`")
    extra = {"epochs": args.epochs} if args.epochs else {}
    if args.limit:
        extra.update(train_limit=args.limit, test_limit=args.limit)
    cfg = EarlyExitBenchConfig(
        data=args.data or "cifar10",
        quick=args.quick,
        recipe=args.recipe or "frozen",
        model_kw=_model_kwargs(args.set),
        **extra,
    )
    if args.finetune_epochs is not None:
        if cfg.recipe != "finetune" or args.finetune_epochs < 1:
            raise SystemExit(
                f"bench early-exit: --finetune-epochs expects --recipe finetune and a count >= 1, got "
                f"recipe {cfg.recipe!r} and {args.finetune_epochs}"
            )
        cfg.finetune_epochs = args.finetune_epochs
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

    s = sub.add_parser(
        "train",
        help="train a registered model on a dataset, or `train text` a Dynamic BERT on a TSV/CSV",
        description="Image models: dynets train MODEL --data DATA --out RUN. Text: dynets train text "
        "--model ENCODER_DIR --train FILE --dev FILE [--out RUN] fine-tunes a Hugging Face BERT-family "
        "encoder with an exit after every layer and saves RUN/model.",
    )
    s.add_argument("model", help="registered model name (see `dynets models`), or `text` for Dynamic BERT")
    s.add_argument("--data", default=None, help="digits | mnist | cifar10 | npz:PATH | folder:PATH")
    s.add_argument("--out", default=None, help="run directory: RUN/model (+ RUN/checkpoints for images)")
    s.add_argument("--epochs", type=int, default=None, help="default 10 (images), 2 (text)")
    s.add_argument("--batch-size", type=int, default=None, help="default 128 (images), 32 (text)")
    s.add_argument("--lr", type=float, default=None, help="default 0.05 (images, SGD), 5e-5 (text, AdamW)")
    s.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    s.add_argument("--augment", choices=["none", "crop_flip"], default="none")
    s.add_argument("--distill", type=float, default=0.0, help="self-distillation weight in [0, 1]")
    s.add_argument("--teacher", default=None, help="a trained model directory to distil from (images)")
    s.add_argument("--kd", type=float, default=None, help="weight in (0, 1] of --teacher's soft labels (0.5)")
    s.add_argument("--exit-weights", default="uniform", help="uniform | linear | sqrt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--limit", type=int, default=None, help="use only the first N training samples")
    s.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.pt")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override (JSON value)")
    t = s.add_argument_group("text (dynets train text)")
    t.add_argument("--model", dest="encoder", default=None, help="local Hugging Face encoder directory")
    t.add_argument("--train", default=None, help="training table (.tsv or .csv)")
    t.add_argument(
        "--dev", default=None, help="dev table: learned exits and the default policy are fit on it"
    )
    t.add_argument(
        "--recipe",
        default=None,
        choices=["two_stage", "joint", "distill", "joint_distill"],
        help="default two_stage",
    )
    t.add_argument("--max-length", type=int, default=None, help="tokens per sentence (longer: truncated)")
    t.add_argument(
        "--exit-pooling",
        choices=["mean", "cls"],
        default="mean",
        help="early exits pool the mean of the tokens (default) or the [CLS] state (DeeBERT)",
    )
    t.add_argument("--dynabert", action="store_true", help="also train DynaBERT widths x depths")
    add_table_options(t)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="accuracy and mean FLOPs (text: and sentences/s) per policy setting")
    s.add_argument("model_dir")
    s.add_argument("--data", required=True, help="a dataset (image models) or a .tsv/.csv table (text)")
    s.add_argument("--split", default="test", choices=["train", "val", "test"])
    s.add_argument("--static", default=None, help="a static baseline model directory for the same axes")
    s.add_argument("--policies", default="confidence,entropy,patience,learned")
    s.add_argument("--out", default="dynets-eval", help="folder for the PNGs")
    s.add_argument("--json", default=None, help="also write the table as JSON here")
    s.add_argument("--limit", type=int, default=None)
    t = s.add_argument_group("text models")
    t.add_argument("--batch-size", type=int, default=32, help="batch size of the timed dynamic runs")
    t.add_argument("--no-timing", action="store_true", help="skip the sentences/s measurements")
    t.add_argument("--time-limit", type=int, default=256, help="sentences used for timing")
    t.add_argument("--grid", action="store_true", help="evaluate the DynaBERT width x depth grid")
    t.add_argument("--widths", default=None, help="grid widths, e.g. 0.25,0.5,0.75,1.0")
    t.add_argument("--depths", default=None, help="grid depths, e.g. 0.5,0.75,1.0")
    add_table_options(t)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser(
        "predict",
        help="predict sentences (text model) or an .npz of images, one line of output per input",
        description="Text models read one sentence per line from FILE or stdin (-) and print, tab-"
        "separated: label, confidence, exit layer (1-based encoder layer), FLOPs. Image models take an "
        ".npz with an array x (N, C, H, W) and print: class index, confidence, exit, FLOPs.",
    )
    s.add_argument("model_dir")
    s.add_argument("input", nargs="?", default="-", help="a text file, - for stdin, or an .npz (images)")
    s.add_argument(
        "--policy", default=None, choices=["confidence", "entropy", "patience", "learned", "never"]
    )
    s.add_argument("--threshold", type=float, default=None, help="the policy's threshold (or patience)")
    s.add_argument("--budget", type=float, default=None, help="calibrate to this fraction of the static cost")
    s.add_argument("--calibration", default=None, help="labelled table to calibrate --budget on")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--width", type=float, default=None, help="DynaBERT width multiplier")
    s.add_argument("--depth", type=float, default=None, help="DynaBERT depth multiplier")
    s.add_argument("--json", action="store_true", help="JSON lines instead of tab-separated values")
    add_table_options(s)
    s.set_defaults(fn=cmd_predict)

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
    s.add_argument(
        "which",
        choices=bench_names(),
        help="early-exit and bert take the options below; the others take their own "
        "(`dynets bench NAME --help`)",
    )
    s.add_argument("--data", default=None, help="early-exit: dataset (default cifar10); bert: SST-2 folder")
    s.add_argument("--quick", action="store_true", help="reduced version (a few minutes)")
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--json", default=None)
    s.add_argument("--out", default=None, help="folder for the Markdown and PNGs (default: beside --json)")
    s.add_argument("--limit", type=int, default=None, help="train and test on at most N samples")
    s.add_argument(
        "--recipe",
        choices=["frozen", "joint", "finetune"],
        default=None,
        help="exits trained on the frozen static backbone, jointly from scratch, or frozen then "
        "the whole network fine-tuned",
    )
    s.add_argument(
        "--finetune-epochs", type=int, default=None, help="early-exit --recipe finetune: epochs (default 5)"
    )
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override (JSON value)")
    s.add_argument("--train-limit", type=int, default=None, help="bert: training sentences (default 12000)")
    s.add_argument("--encoder", default=None, help="bert: encoder directory (default: shared MiniLM-L6)")
    s.add_argument(
        "--bert-recipes",
        default=None,
        help="bert: comma-separated exit recipes (default two_stage,distill,joint,joint_distill)",
    )
    s.add_argument(
        "--bert-val-rows",
        choices=["sentences", "long"],
        default=None,
        help="bert: validation = complete training sentences (default) or rows of >= 10 words",
    )
    s.add_argument(
        "--bert-joint-epochs",
        type=int,
        default=None,
        help="bert: epochs of joint_distill's last stage, encoder and every exit together (default 1)",
    )
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("demo", help="train and compare on the embedded digits dataset (about a minute)")
    s.add_argument("--out", default="dynets-demo")
    s.add_argument("--epochs", type=int, default=15)
    s.set_defaults(fn=cmd_demo)

    add_serve_parsers(sub)

    for name, sp in sub.choices.items():
        sp.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        if name in ("train", "bench", "demo"):
            sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in EXTERNAL_BENCHES:
        return run_external(argv[1], argv[2:])  # benchmarks with their own options
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"dynets {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
