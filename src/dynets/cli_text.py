"""The text side of the `dynets` command: `train text`, `eval` and `predict` for Dynamic BERT.

Kept apart from cli.py (which parses arguments and dispatches) so each file reads on its own.
Everything is checked before any work starts (files, columns, labels, the encoder directory), so
bad input ends with a message naming what was expected and what was given, and nothing is
written: the model directory is written once, atomically, at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

TEXT_ARCH = "DynamicBert"
TRAIN_DEFAULTS = {"epochs": 2, "batch_size": 32, "lr": 5e-5, "recipe": "two_stage"}


def add_table_options(s: argparse.ArgumentParser) -> None:
    """--text-column / --label-column / --delimiter / --no-header for TSV or CSV tables."""
    s.add_argument(
        "--text-column", default="sentence", help="column name or 0-based index (default: sentence)"
    )
    s.add_argument("--label-column", default="label", help="column name or 0-based index (default: label)")
    s.add_argument(
        "--delimiter", default=None, help="field separator (default: tab for .tsv, comma for .csv)"
    )
    s.add_argument("--no-header", action="store_true", help="the first line is data (columns by index)")


def _column(spec: str) -> str | int:
    return int(spec) if spec.strip().isdigit() else spec


def _delimiter(spec: str | None) -> str | None:
    return {"tab": "\t", "\\t": "\t", "comma": ","}.get(spec, spec) if spec else None


def read_table(path: str, option: str, args: argparse.Namespace, labels: list[str] | None = None) -> Any:
    """load_text_table with the command's column options; errors name the option and the file."""
    from dynets.text.data import load_text_table

    try:
        return load_text_table(
            path,
            text_column=_column(args.text_column),
            label_column=_column(args.label_column),
            delimiter=_delimiter(args.delimiter),
            labels=labels,
            header=not args.no_header,
        )
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise SystemExit(f"{option} {path}: {e}") from None


def is_text_model(model_dir: Path) -> bool:
    from dynets.core.serialization import read_config

    return read_config(model_dir).get("architecture") == TEXT_ARCH


def load_text_model(model_dir: Path, command: str) -> tuple[Any, dict]:
    """A saved DynamicBert and its config.json entries, or SystemExit naming what the dir holds."""
    from dynets.core.serialization import load, read_config

    meta = read_config(model_dir)
    if meta.get("architecture") != TEXT_ARCH:
        raise SystemExit(
            f"{command}: expected a text model directory ({TEXT_ARCH}, written by `dynets train text`), "
            f"got a {meta.get('architecture')} model in {model_dir}"
        )
    try:
        model = load(model_dir)
    except ImportError as e:
        raise SystemExit(f"{command}: {e}") from None
    if model.tokenizer is None:
        raise SystemExit(f"{command}: {model_dir} has no tokenizer/ folder; expected one beside the weights")
    return model, meta


def _limited(table: Any, limit: int | None) -> Any:
    if not limit:
        return table
    from dynets.text.data import TextTable

    n = min(limit, len(table))
    return TextTable(table.texts[:n], table.labels[:n], table.label_ids[:n], table.classes)


def _cheapest_within(outs: Any, drop: float = 0.01) -> tuple[Any, dict]:
    """The cheapest sweep setting whose accuracy is within `drop` of the final exit's."""
    from dynets.bench.text_eval import sweep_text
    from dynets.policies.exit_policies import NeverExitPolicy, make_policy

    final = outs.accuracy_per_exit()[-1]
    rows = [r for r in sweep_text(outs) if r["accuracy"] >= final - drop - 1e-12]
    if not rows:
        return NeverExitPolicy(), outs.evaluate(NeverExitPolicy())
    best = min(rows, key=lambda r: (r["mean_flops"], -r["accuracy"]))
    return make_policy(best["policy"], best["value"]), best


# ------------------------------------------------------------------------------------------ train
def cmd_train_text(args: argparse.Namespace) -> int:
    from dynets.bench.text_eval import collect_text
    from dynets.core.serialization import save
    from dynets.depth.learned import fit_learned_exits
    from dynets.text import DynamicBert, encode_table, train_text
    from dynets.train import TrainConfig

    given = {"--model": args.encoder, "--train": args.train, "--dev": args.dev}
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise SystemExit(
            f"train text: expected {', '.join(missing)} (e.g. --model ENCODER_DIR --train "
            f"train.tsv --dev dev.tsv), got none"
        )
    for flag, bad in (("--data", args.data), ("--set", args.set), ("--resume", args.resume)):
        if bad:
            raise SystemExit(
                f"train text: {flag} is for image models; text models take --model/--train/--dev"
            )
    torch.set_num_threads(args.threads)
    train_t = _limited(read_table(args.train, "--train", args), args.limit)
    dev_t = read_table(args.dev, "--dev", args, labels=train_t.classes)  # an unseen dev label: its line
    if len(train_t.classes) < 2:
        raise SystemExit(f"--train {args.train}: expected at least 2 distinct labels, got {train_t.classes}")
    dyna = None
    if args.dynabert:
        try:
            from dynets.text import dynabert as dyna
        except ImportError as e:
            raise SystemExit(
                f"train text --dynabert: DynaBERT (dynets.text.dynabert) is unavailable: {e}"
            ) from None
    torch.manual_seed(args.seed)
    kw = {"max_length": args.max_length} if args.max_length else {}
    kw["exit_pooling"] = args.exit_pooling
    try:
        model = DynamicBert.from_pretrained_encoder(args.encoder, train_t.classes, **kw)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"train text: --model {args.encoder}: {e}") from None
    train, dev = encode_table(model, train_t), encode_table(model, dev_t)
    d = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in TRAIN_DEFAULTS.items()}
    cfg = TrainConfig(
        epochs=d["epochs"],
        batch_size=d["batch_size"],
        lr=d["lr"],
        optimizer="adamw",
        weight_decay=0.01,
        warmup_epochs=min(0.1, float(d["epochs"])),
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"training {args.encoder} on {len(train)} sentences ({d['recipe']}, {len(train_t.classes)} labels)")
    history = train_text(model, train, d["recipe"], cfg, eval_data=dev).history
    if dyna is not None:
        print(f"DynaBERT: rewiring, then widths {dyna.WIDTHS} x depths {dyna.DEPTHS}")
        dyna.rewire(model, train, seed=args.seed)
        more = dyna.train_dynabert(model, train, cfg, widths=dyna.WIDTHS, depths=dyna.DEPTHS, eval_data=dev)
        history += [{**rec, "stage": "dynabert"} for rec in more.history]
        model.set_subnet(1.0, 1.0)
    model.eval()
    outs = collect_text(model, dev.x, dev.y)
    if len(model.exit_predictors):
        fit_learned_exits(model, outs.exit_logits, outs.labels, seed=args.seed)
        outs = collect_text(model, dev.x, dev.y)
    model.policy, point = _cheapest_within(outs)
    out = Path(args.out or "dynets-text") / "model"
    extra = {
        "history": history,
        "encoder": str(args.encoder),
        "train": str(args.train),
        "dev": str(args.dev),
        "recipe": d["recipe"],
        "dynabert": bool(args.dynabert),
        "columns": [args.text_column, args.label_column],
        "default_policy": "cheapest setting on --dev within 1 point of the final exit",
    }
    save(model, out, extra=extra)
    acc = outs.accuracy_per_exit()
    print(
        f"saved {out}: dev accuracy per exit {[round(a, 4) for a in acc]}; policy {model.policy}: "
        f"accuracy {point['accuracy']:.4f} at {point['flops_ratio']:.2f} of the static FLOPs "
        f"({point['mean_layers']:.2f} layers)"
    )
    return 0


# ------------------------------------------------------------------------------------------- eval
def cmd_eval_text(args: argparse.Namespace, model_dir: Path) -> int:
    from dynets.bench.plots import plot_pareto
    from dynets.bench.text_eval import (
        collect_text,
        format_grid_table,
        format_text_table,
        plot_grid,
        plot_speed_curves,
        run_text,
        subnet_grid,
        sweep_text,
        text_batches,
        time_rows,
    )
    from dynets.core.serialization import atomic_write_bytes
    from dynets.text import encode_table

    if args.static:
        raise SystemExit("eval: --static is for image models; a text model's static path is its final exit")
    torch.set_num_threads(args.threads)
    model, meta = load_text_model(model_dir, "eval")
    table = _limited(read_table(args.data, "--data", args, labels=model.config.labels), args.limit)
    kinds = [k.strip() for k in args.policies.split(",") if k.strip()]
    unknown = sorted(set(kinds) - {"confidence", "entropy", "patience", "learned"})
    if unknown:
        raise SystemExit(f"--policies: expected some of confidence,entropy,patience,learned, got {unknown}")
    widths, depths = _grid_axes(args, model, meta)
    data = encode_table(model, table)
    outs = collect_text(model, data.x, data.y, progress=True)
    rows = sweep_text(outs, kinds)
    K = outs.num_exits
    static_row = {"accuracy": outs.accuracy_per_exit()[-1], "mean_flops": outs.static_mean, "layers": K}
    batches = text_batches(model, data.x[: args.time_limit], args.batch_size) if not args.no_timing else None
    if batches and rows:
        time_rows(model, rows, batches, progress=True)
        static_row["sps"] = sorted(r["static_sps"] for r in rows)[len(rows) // 2]
    cur = run_text(model, data.x, model.policy, batch_size=args.batch_size)
    current = {
        "policy": model.policy.to_dict(),
        "accuracy": float((cur["logits"].argmax(-1) == data.y).double().mean()),
        "mean_layers": float((cur["exit_index"] + 1).double().mean()),
        "flops_ratio": float(cur["flops"].mean()) / outs.static_mean,
    }
    print(
        f"{len(data)} sentences of {args.data}; final exit (static path): accuracy "
        f"{100 * static_row['accuracy']:.2f}% at {static_row['mean_flops'] / 1e6:.1f} MFLOPs ({K} layers)"
    )
    print(format_text_table(rows, static_row))
    print(
        f"current policy {model.policy}: accuracy {100 * current['accuracy']:.2f}%, "
        f"{current['mean_layers']:.2f} layers, {current['flops_ratio']:.2f} of the static FLOPs"
    )
    grid = None
    if widths:
        grid = subnet_grid(
            model,
            data.x,
            data.y,
            widths,
            depths,
            batch_size=args.batch_size,
            policy=model.policy,
            timing_batches=batches,
            progress=True,
        )
        print(format_grid_table(grid))
    out = Path(args.out)
    anytime = [
        {"exit": k, "accuracy": a, "mean_flops": float(outs.costs[:, k].mean())}
        for k, a in enumerate(outs.accuracy_per_exit())
    ]
    written = [
        plot_pareto(
            rows,
            static_row,
            out / "pareto.png",
            anytime=anytime,
            title=f"{Path(args.data).name}: accuracy vs FLOPs",
        )
    ]
    if batches and rows:
        written.append(
            plot_speed_curves(
                rows,
                static_row["accuracy"],
                out / "speed.png",
                title=f"{Path(args.data).name}: accuracy vs wall-clock speed-up",
            )
        )
    if grid:
        written.append(plot_grid(grid, out / "width_depth.png", title="accuracy (%) per width x depth"))
    for p in written:
        print(f"wrote {p}")
    if args.json:
        payload = {"static": static_row, "rows": rows, "anytime": anytime, "current": current, "grid": grid}
        atomic_write_bytes(args.json, json.dumps(payload, indent=2).encode())
        print(f"wrote {args.json}")
    return 0


def _floats(spec: str, option: str) -> list[float]:
    try:
        return [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{option}: expected comma-separated numbers (e.g. 0.5,1.0), got {spec!r}") from None


def _grid_axes(args: argparse.Namespace, model: Any, meta: dict) -> tuple[list[float], list[float]]:
    """The width x depth grid to evaluate: asked for, or the DynaBERT axes for a DynaBERT-trained model."""
    asked = args.widths or args.depths or args.grid
    if not asked and not meta.get("extra", {}).get("dynabert"):
        return [], []
    if not callable(getattr(model, "set_subnet", None)):
        raise SystemExit(
            "eval: a width x depth grid needs DynaBERT support (DynamicBert.set_subnet), missing here"
        )
    from dynets.text import dynabert

    widths = _floats(args.widths, "--widths") if args.widths else list(dynabert.WIDTHS)
    depths = _floats(args.depths, "--depths") if args.depths else list(dynabert.DEPTHS)
    for w in widths:
        try:
            dynabert.check_width(w)
        except ValueError as e:
            raise SystemExit(f"--widths: {e}") from None
    for v in depths:
        try:
            dynabert.check_depth(v)
        except ValueError as e:
            raise SystemExit(f"--depths: {e}") from None
    return widths, depths


# ---------------------------------------------------------------------------------------- predict
def _read_lines(src: str) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines of a file or stdin ("-")."""
    if src == "-":
        text = sys.stdin.read()
    else:
        p = Path(src)
        if not p.is_file():
            raise SystemExit(
                f"predict: input file {src!r} does not exist (expected one sentence per line, or -)"
            )
        text = p.read_text(encoding="utf-8")
    lines = [(i + 1, t.strip()) for i, t in enumerate(text.splitlines())]
    blank = [i for i, t in lines if not t]
    if blank:
        print(f"predict: skipped {len(blank)} blank line(s): {blank[:10]}", file=sys.stderr)
    return [(i, t) for i, t in lines if t]


def _override_policy(args: argparse.Namespace, model: Any) -> Any:
    from dynets.policies.exit_policies import make_policy

    if args.threshold is None and args.policy is None:
        return model.policy
    kind = args.policy or model.policy.kind
    try:
        return make_policy(kind, args.threshold)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"predict: --policy {kind} --threshold {args.threshold}: {e}") from None


def _budget_policy(args: argparse.Namespace, model: Any, x: torch.Tensor) -> Any:
    """Thresholds meeting --budget (a fraction of the static cost) on --calibration data, or on the
    input itself when none is given (no labels then: the geometric strategy, which needs none)."""
    from dynets.bench.text_eval import collect_text
    from dynets.policies.calibration import calibrate
    from dynets.text import encode_table

    kind = args.policy or (model.policy.kind if hasattr(model.policy, "thresholds") else "confidence")
    if args.calibration:
        data = encode_table(
            model, read_table(args.calibration, "--calibration", args, labels=model.config.labels)
        )
        xc, yc, strategy = data.x, data.y, "best"
    else:
        xc, yc, strategy = x, torch.zeros(x.shape[0], dtype=torch.long), "geometric"
    outs = collect_text(model, xc, yc)
    try:
        cal = calibrate(
            kind,
            outs.exit_logits,
            outs.labels,
            outs.mean_costs(kind == "learned"),
            args.budget,
            full_cost=outs.static_mean,
            learned=outs.learned,
            strategy=strategy,
        )
    except ValueError as e:
        raise SystemExit(f"predict: --budget {args.budget}: {e}") from None
    return cal.policy


def cmd_predict(args: argparse.Namespace, model_dir: Path) -> int:
    from dynets.bench.text_eval import predict_text

    torch.set_num_threads(args.threads)
    if args.budget is not None and args.threshold is not None:
        raise SystemExit("predict: expected --threshold or --budget, got both")
    if not is_text_model(model_dir):
        return _predict_image(args, model_dir)
    if args.input.endswith(".npz"):
        raise SystemExit(f"predict: expected sentences (a text file or -) for a text model, got {args.input}")
    model, _ = load_text_model(model_dir, "predict")
    lines = _read_lines(args.input)
    if not lines:
        raise SystemExit(f"predict: expected at least one sentence in {args.input}, got none")
    if args.width is not None or args.depth is not None:
        if not callable(getattr(model, "set_subnet", None)):
            raise SystemExit("predict: --width/--depth need DynaBERT support (DynamicBert.set_subnet)")
        try:
            model.set_subnet(width=args.width or 1.0, depth=args.depth or 1.0)
        except ValueError as e:
            raise SystemExit(f"predict: {e}") from None
    policy = _override_policy(args, model)
    texts = [t for _, t in lines]
    if args.budget is not None:
        policy = _budget_policy(args, model, model.encode(texts))
    preds = predict_text(model, texts, policy, batch_size=args.batch_size)
    print(f"policy {policy}", file=sys.stderr)
    for (line, text), p in zip(lines, preds):
        if args.json:
            print(json.dumps({"line": line, "text": text, **p}))
        else:
            print(f"{p['label']}\t{p['confidence']:.4f}\t{p['exit_layer']}\t{p['flops']:.0f}")
    return 0


@torch.no_grad()
def _predict_image(args: argparse.Namespace, model_dir: Path) -> int:
    import numpy as np

    from dynets.core.serialization import load

    if args.budget is not None:
        raise SystemExit(
            "predict: --budget is for text models; for image models use `dynets calibrate` first"
        )
    if not args.input.endswith(".npz"):
        raise SystemExit(
            f"predict: expected an .npz with an array x (N, C, H, W) for an image model, got {args.input}"
        )
    if not Path(args.input).is_file():
        raise SystemExit(f"predict: input file {args.input!r} does not exist")
    with np.load(args.input) as f:
        if "x" not in f:
            raise SystemExit(f"predict: expected an array named x in {args.input}, got {sorted(f.files)}")
        x = torch.from_numpy(np.asarray(f["x"], dtype=np.float32))
    model = load(model_dir)
    policy = _override_policy(args, model) if hasattr(model, "policy") else None
    for i in range(0, x.shape[0], args.batch_size):
        out = (
            model(x[i : i + args.batch_size], policy=policy)
            if policy is not None
            else model(x[i : i + args.batch_size])
        )
        logits = out if isinstance(out, torch.Tensor) else out.logits
        conf, pred = logits.softmax(-1).max(-1)
        exits = getattr(out, "exit_index", None)
        flops = getattr(out, "flops", None)
        for j in range(logits.shape[0]):
            e = int(exits[j]) + 1 if exits is not None else None
            f_ = float(flops[j]) if flops is not None else None
            if args.json:
                print(
                    json.dumps(
                        {
                            "index": i + j,
                            "label": int(pred[j]),
                            "confidence": float(conf[j]),
                            "exit": e,
                            "flops": f_,
                        }
                    )
                )
            else:
                print(
                    f"{int(pred[j])}\t{float(conf[j]):.4f}\t{e if e is not None else '-'}\t"
                    f"{f'{f_:.0f}' if f_ is not None else '-'}"
                )
    return 0
