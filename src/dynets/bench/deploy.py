"""Deployment benchmarks: exported vs eager (speed, equality) and fp32 vs int8 vs adaptive precision.

    python -m dynets.bench.deploy export       [--quick] [--model DIR --data SPEC] --json PATH
    python -m dynets.bench.deploy quantization [--quick] [--model DIR --data SPEC] --json PATH

The model: the early-exit CIFAR-10 model of the early-exit benchmark when it is cached (and the
data is there), else a cached digits model, else a small one trained on digits in about a minute.
Thresholds come from calibration on the val split; everything reported is on the test split.
Speeds are medians of alternating rounds in one process (`bench.wallclock`), so ratios are what
count, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynets.core.serialization import atomic_write_bytes, load, save

# ---------------------------------------------------------------------- the model under test


def _cached(pattern: str) -> list[Path]:
    from dynets.data.paths import cache_dir

    runs = [p for p in (cache_dir() / "bench").glob(pattern) if (p / "config.json").is_file()]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def bench_model(
    model_dir: str | None = None, data: str | None = None, *, quick: bool = False
) -> tuple[str, str]:
    """(model directory, dataset spec) for the deployment benchmarks."""
    if model_dir:
        if not data:
            raise ValueError("--model needs --data (the dataset it was trained on)")
        return model_dir, data
    if not quick and (data in (None, "cifar10")):
        from dynets.data import load_dataset

        # the headline early-exit model (recipe finetune), else the frozen-recipe one
        for run in _cached("early_exit_cifar10-finetune-*") + _cached("early_exit_cifar10-frozen-*"):
            try:
                load_dataset("cifar10", "val", limit=1)
            except (FileNotFoundError, ValueError):
                break
            return str(run), "cifar10"
    for run in _cached("early_exit_digits-frozen-*"):
        if json.loads((run / "config.json").read_text())["config"].get("widths") == [16, 32, 64]:
            return str(run), "digits"
    return str(train_digits_model()), "digits"


def train_digits_model(epochs: int = 15) -> Path:
    """A small early-exit ResNet on scikit-learn's digits, cached (about a minute on 2 cores)."""
    from dynets.core.registry import create_model
    from dynets.data import DATASET_STATS, load_dataset
    from dynets.data.paths import cache_dir
    from dynets.train import TrainConfig, train

    out = cache_dir() / "bench" / "deploy-digits"
    if (out / "config.json").is_file():
        return out
    data = load_dataset("digits", "train")
    mean, std = DATASET_STATS["digits"]
    torch.manual_seed(0)
    model = create_model(
        "ee_resnet",
        in_channels=1,
        image_size=8,
        num_classes=10,
        widths=(16, 32, 64),
        blocks=(2, 2, 2),
        exits=(0, 2),
        stem_stride=1,
        mean=mean,
        std=std,
    )
    train(model, data, TrainConfig(epochs=epochs, batch_size=64, lr=0.05, progress=False))
    save(model.eval(), out)
    return out


def calibrated(model: torch.nn.Module, data: str, budget: float = 0.5, limit: int = 2000) -> Any:
    """The model with its policy calibrated to `budget` of the static cost on the val split."""
    from dynets.bench.evaluate import collect
    from dynets.data import load_dataset
    from dynets.policies.calibration import calibrate

    val = load_dataset(data, "val", limit=limit)
    outs = collect(model, val)
    model.policy = calibrate(
        "confidence", outs.exit_logits, outs.labels, outs.exit_costs, budget, full_cost=model.full_cost()
    ).policy
    return model


def _median_time(fn: Callable[[], object], rounds: int) -> float:
    fn()
    ts = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - start)
    return statistics.median(ts)


def _alternate(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, timed in alternating order round by round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------- export


def run_export(model_dir: str, data: str, *, quick: bool = False, threads: int = 1) -> dict[str, Any]:
    from dynets.data import load_dataset
    from dynets.export import StagedRuntime, export_staged

    torch.set_num_threads(threads)
    model = calibrated(load(model_dir), data)
    test = load_dataset(data, "test", limit=256 if quick else 2000)
    x = test.x
    result: dict[str, Any] = {
        "model_dir": model_dir,
        "data": data,
        "samples": int(x.shape[0]),
        "quick": quick,
        "policy": model.policy.to_dict(),
        "threads": threads,
        "formats": {},
    }
    with torch.inference_mode():
        ref = model(x)
    rounds = 3 if quick else 7
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("onnx", "torch"):
            start = time.perf_counter()
            out = export_staged(model, Path(tmp) / fmt, format=fmt, whole_graph=(fmt == "torch"))
            export_s = time.perf_counter() - start
            rt = StagedRuntime(out, threads=threads)
            got = rt.run(x.numpy())
            entry: dict[str, Any] = {
                "export_seconds": export_s,
                "exit_agreement": float((got["exit_index"] == ref.exit_index.numpy()).mean()),
                "max_abs_logit_diff": float(np.abs(got["logits"] - ref.logits.numpy()).max()),
                "prediction_agreement": float(
                    (got["logits"].argmax(-1) == ref.logits.argmax(-1).numpy()).mean()
                ),
                "flops_equal": bool(np.array_equal(got["flops"], ref.flops.numpy())),
            }
            entry["speed"] = _speeds(model, rt, x, rounds)
            if fmt == "torch" and (out / "whole_graph.pt2").is_file():
                entry["whole_graph"] = _whole_graph_entry(model, out / "whole_graph.pt2", x, ref, rounds)
            result["formats"][fmt] = entry
    result["families"] = _family_entries(data, x, rounds, threads)
    if not quick:
        result["families"]["dynamic_bert"] = _text_entry(rounds, threads)
    return result


def _speeds(
    model: Any,
    rt: Any,
    x: torch.Tensor,
    rounds: int,
    make_batches: Callable | None = None,
    sizes: tuple[int, int] = (1, 64),
) -> dict[str, Any]:
    """Eager vs exported runtime, alternating, at batch 1 (the first 64 samples) and a large batch
    (all samples); `make_batches(n, bs)` builds the batches of the first n samples (default: slices
    of x)."""
    speed = {}
    for bs in sizes:
        n = min(x.shape[0], 64) if bs == 1 else x.shape[0]
        batches = make_batches(n, bs) if make_batches else [x[i : min(i + bs, n)] for i in range(0, n, bs)]
        nb = [b.numpy() for b in batches]

        def eager(batches=batches):
            with torch.inference_mode():
                for b in batches:
                    model(b)

        def exported(nb=nb):
            for b in nb:
                rt.run(b)

        t = _alternate({"eager": eager, "exported": exported}, rounds)
        speed[f"batch_{bs}"] = {
            "eager_ms_per_sample": 1000 * t["eager"] / n,
            "exported_ms_per_sample": 1000 * t["exported"] / n,
            "speedup": t["eager"] / t["exported"],
        }
    return speed


# the other exportable families: (zoo name, cache pattern of its trained model, decision key, formats)
FAMILIES = (
    ("skip_resnet", "skip_width_{data}-skip-*", "blocks_run", ("onnx", "torch")),
    ("routed_resnet", "routing_params_{data}-routed-*", "branch", ("onnx", "torch")),
    ("slimmable_resnet", "skip_width_{data}-slim-*", "width_index", ("onnx", "torch")),
    ("dyconv_resnet", "routing_params_{data}-dyconv-*", None, ("torch",)),  # no ONNX form: see export
    ("dynamicvit_tiny", "spatial_{data}-dvit-*", "kept_idx_0", ("onnx", "torch")),
    ("glance_focus", "spatial_{data}-gf-*", "focused", ("onnx", "torch")),
)


def _family_entries(data: str, x: torch.Tensor, rounds: int, threads: int) -> dict[str, Any]:
    """The other exportable families (FAMILIES), each exported from its trained model of the
    issue-4/5 benchmarks when that is cached (else recorded as missing)."""
    out: dict[str, Any] = {}
    for name, pattern, key, formats in FAMILIES:
        runs = _cached(pattern.format(data=data))
        if not runs:
            out[name] = {"missing": f"no trained model cached under {pattern.format(data=data)}"}
            continue
        model = load(runs[0]).eval()
        out[name] = {"model_dir": str(runs[0]), **family_entry(model, x, key, formats, rounds, threads)}
    return out


def family_entry(
    model: Any,
    x: torch.Tensor,
    key: str | None,
    formats: tuple[str, ...],
    rounds: int,
    threads: int,
    make_batches: Callable | None = None,
) -> dict[str, Any]:
    """One model exported in each format against its eager self (with its saved policy): agreement
    of the decision `key` (per sample, all of its entries), of predictions, logit difference,
    FLOPs equality, and eager vs runtime speed at batch 1 and 64."""
    from dynets.export import export_model, load_runtime

    with torch.inference_mode():
        ref = model(x)
    entry: dict[str, Any] = {}
    if key is not None:
        entry["decision_mean"] = float(ref.decisions[key].double().mean())
    entry["mean_mflops"] = float(ref.flops.double().mean()) / 1e6
    full = model.full_cost() if callable(getattr(model, "full_cost", None)) else None
    if isinstance(full, (int, float)):  # one figure for every input (not per length, as MoE's)
        entry["mean_flops_ratio"] = 1e6 * entry["mean_mflops"] / float(full)
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            rt = load_runtime(export_model(model, Path(tmp) / fmt, format=fmt), threads=threads)
            got = rt.run(x.numpy())
            f: dict[str, Any] = {
                "max_abs_logit_diff": float(np.abs(got["logits"] - ref.logits.numpy()).max()),
                "prediction_agreement": float(
                    (got["logits"].argmax(-1) == ref.logits.argmax(-1).numpy()).mean()
                ),
                "flops_equal": bool(np.array_equal(got["flops"], ref.flops.numpy())),
                "speed": _speeds(model, rt, x, rounds, make_batches),
            }
            if key is not None:
                f["decision_agreement"] = float(
                    (got[key] == ref.decisions[key].numpy()).reshape(x.shape[0], -1).all(1).mean()
                )
            entry[fmt] = f
    return entry


def _whole_graph_entry(model: Any, path: Path, x: torch.Tensor, ref: Any, rounds: int) -> dict[str, Any]:
    """Equality of the torch.cond whole graph with the eager model, and its batch-1 speed."""
    from dynets.export import score_thresholds

    whole = torch.export.load(str(path)).module()
    thr = score_thresholds(model.policy, model.num_exits)
    singles = [x[i : i + 1] for i in range(min(64, x.shape[0]))]
    with torch.inference_mode():
        wl, we = whole(x, thr)

        def whole_b1() -> None:
            for b in singles:
                whole(b, thr)

        def eager_b1() -> None:
            for b in singles:
                model(b)

        t = _alternate({"eager": eager_b1, "whole": whole_b1}, rounds)
    return {
        "exit_agreement": float((we == ref.exit_index).double().mean()),
        "max_abs_logit_diff": float((wl - ref.logits).abs().max()),
        "batch_1": {
            "eager_ms_per_sample": 1000 * t["eager"] / len(singles),
            "whole_graph_ms_per_sample": 1000 * t["whole"] / len(singles),
            "speedup": t["eager"] / t["whole"],
        },
    }


def _text_entry(rounds: int, threads: int, pattern: str = "bert-sst2-two_stage-*") -> dict[str, Any]:
    """Dynamic BERT (the issue-3 benchmark's two-stage model, with the policy it was saved with)
    on SST-2 dev: exits, logits and FLOPs of the exported runtime against the eager model, and
    speed at batch 1 and 32 (dev in its order, padded per batch)."""
    from dynets.data.paths import data_root
    from dynets.export import export_model, load_runtime
    from dynets.text.data import load_text_table

    runs = _cached(pattern)
    try:
        dev = data_root() / "data" / "sst2" / "dev.tsv"
        texts = load_text_table(dev).texts
    except (FileNotFoundError, ValueError) as e:
        return {"missing": f"SST-2 dev not found ({e})"}
    if not runs:
        return {"missing": f"no trained model cached under {pattern}"}
    model = load(runs[0]).eval()
    x = model.encode(texts)
    with torch.inference_mode():
        ref = model(x)

    def batches(n: int, bs: int) -> list[torch.Tensor]:  # dev in its order, padded per batch
        return [model.encode(texts[i : min(i + bs, n)]) for i in range(0, n, bs)]

    entry: dict[str, Any] = {
        "model_dir": str(runs[0]),
        "samples": len(texts),
        "policy": model.policy.to_dict(),
        "mean_exit_layer": float(ref.decisions["exit_layer"].double().mean()) + 1,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("onnx", "torch"):
            rt = load_runtime(export_model(model, Path(tmp) / fmt, format=fmt), threads=threads)
            got = rt.run(x.numpy())
            f: dict[str, Any] = {
                "exit_agreement": float((got["exit_index"] == ref.exit_index.numpy()).mean()),
                "prediction_agreement": float(
                    (got["logits"].argmax(-1) == ref.logits.argmax(-1).numpy()).mean()
                ),
                "max_abs_logit_diff": float(np.abs(got["logits"] - ref.logits.numpy()).max()),
                "flops_equal": bool(np.array_equal(got["flops"], ref.flops.numpy())),
                "speed": _speeds(model, rt, x, rounds, batches, sizes=(1, 32)),
            }
            entry[fmt] = f
    return entry


# ---------------------------------------------------------------------- quantization


def run_quantization(model_dir: str, data: str, *, quick: bool = False, threads: int = 1) -> dict[str, Any]:
    from dynets.data import load_dataset
    from dynets.policies import ConfidencePolicy
    from dynets.quant import quantize_early_exit

    torch.set_num_threads(threads)
    model = calibrated(load(model_dir), data)
    ee_policy = model.policy
    val = load_dataset(data, "val", limit=256 if quick else 1000)
    test = load_dataset(data, "test", limit=256 if quick else 2000)
    start = time.perf_counter()
    q = quantize_early_exit(model, val.x, policy=ConfidencePolicy(0.9))
    quantize_s = time.perf_counter() - start
    x, y = test.x, test.y
    fast = model.optimize_for_inference()  # fp32 with BatchNorm folded, the fair fp32 baseline
    variants: dict[str, Callable[[torch.Tensor], Any]] = {
        "fp32 static": lambda b: fast.forward_static(b),
        "int8 static": lambda b: q.forward_int8(b),
        "fp32 early exit": lambda b: fast(b, policy=ee_policy),
        "int8 early exit": lambda b: q.forward_int8(b, ee_policy),
    }
    thresholds = (0.8, 0.95) if quick else (0.7, 0.8, 0.9, 0.95, 0.99)
    last = [model.num_exits - 1]
    for t in thresholds:
        pol = ConfidencePolicy(t)
        variants[f"adaptive static (int8 accepted at confidence >= {t})"] = lambda b, pol=pol: q(
            b, pol, fp32_static=True, decide_at=last
        )
        variants[f"adaptive early exit (int8 accepted at >= {t})"] = lambda b, pol=pol: q(
            b, pol, fp32_policy=ee_policy
        )
    rows = []
    batches = [x[i : i + 64] for i in range(0, x.shape[0], 64)]
    singles = [x[i : i + 1] for i in range(min(x.shape[0], 48 if quick else 200))]
    rounds = 3 if quick else 5
    for name, fn in variants.items():
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = [fn(b) for b in batches]
            logits = torch.cat([o.logits if hasattr(o, "logits") else o for o in outs])
            row: dict[str, Any] = {
                "variant": name,
                "accuracy": float((logits.argmax(-1) == y).double().mean()),
            }
            if hasattr(outs[0], "flops"):
                row["mean_flops"] = float(torch.cat([o.flops for o in outs]).mean())
                prec = [o.decisions.get("precision") for o in outs]
                if prec[0] is not None:
                    row["fp32_rerun_fraction"] = float(torch.cat(prec).double().mean())
            else:
                row["mean_flops"] = model.full_cost()
            t64 = _median_time(lambda fn=fn: [fn(b) for b in batches], rounds)
            t1 = _median_time(lambda fn=fn: [fn(b) for b in singles], rounds)
        row["ms_per_sample_b64"] = 1000 * t64 / x.shape[0]
        row["ms_per_sample_b1"] = 1000 * t1 / len(singles)
        rows.append(row)
    base = rows[0]
    for r in rows:
        r["speedup_b64"] = base["ms_per_sample_b64"] / r["ms_per_sample_b64"]
        r["speedup_b1"] = base["ms_per_sample_b1"] / r["ms_per_sample_b1"]
    return {
        "model_dir": model_dir,
        "data": data,
        "samples": int(x.shape[0]),
        "quick": quick,
        "threads": threads,
        "quantize_seconds": quantize_s,
        "backend": torch.backends.quantized.engine,
        "early_exit_policy": ee_policy.to_dict(),
        "rows": rows,
    }


def markdown_quantization(r: dict[str, Any]) -> str:
    lines = [
        f"# Input-adaptive quantization ({r['data']}, {r['samples']} test samples, {r['threads']} thread(s))",
        "",
        "| variant | accuracy | mean MFLOPs | fp32 re-run | ms/sample b64 | ms/sample b1 | speed-up b64 "
        "| speed-up b1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        rerun = f"{100 * row['fp32_rerun_fraction']:.1f}%" if "fp32_rerun_fraction" in row else "-"
        lines.append(
            f"| {row['variant']} | {100 * row['accuracy']:.2f}% | {row['mean_flops'] / 1e6:.2f} | {rerun} | "
            f"{row['ms_per_sample_b64']:.3f} | {row['ms_per_sample_b1']:.3f} | {row['speedup_b64']:.2f} | "
            f"{row['speedup_b1']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def markdown_export(r: dict[str, Any]) -> str:
    lines = [
        f"# Export ({r['data']}, {r['samples']} test samples, {r['threads']} thread(s))",
        "",
        "| format | exits equal | max abs logit diff | batch | eager ms/sample | exported ms/sample "
        "| speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt, e in r["formats"].items():
        for key, s in e["speed"].items():
            lines.append(
                f"| {fmt} | {100 * e['exit_agreement']:.2f}% | {e['max_abs_logit_diff']:.2e} | {key[6:]} | "
                f"{s['eager_ms_per_sample']:.3f} | {s['exported_ms_per_sample']:.3f} | {s['speedup']:.2f} |"
            )
        if "whole_graph" in e:
            w = e["whole_graph"]
            lines.append(
                f"| {fmt} whole graph (torch.cond) | {100 * w['exit_agreement']:.2f}% | "
                f"{w['max_abs_logit_diff']:.2e} | 1 | {w['batch_1']['eager_ms_per_sample']:.3f} | "
                f"{w['batch_1']['whole_graph_ms_per_sample']:.3f} | {w['batch_1']['speedup']:.2f} |"
            )
    fam = r.get("families") or {}
    if fam:
        lines += [
            "",
            "## Other families (their trained issue-4 models, the saved policy)",
            "",
            *families_table(fam),
        ]
    return "\n".join(lines) + "\n"


def families_table(fam: dict[str, Any]) -> list[str]:
    """Markdown rows of `family_entry` results: per model and format, agreement, FLOPs, speed."""
    lines = [
        "| model | format | decisions equal | predictions equal | max abs logit diff | FLOPs equal "
        "| speed-up b1 | speed-up b64 (BERT: b32) |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, e in fam.items():
        if "missing" in e:
            lines.append(f"| {name} | - | {e['missing']} | | | | | |")
            continue
        for fmt in ("onnx", "torch"):
            if fmt not in e:
                continue
            f = e[fmt]
            agree = f.get("decision_agreement", f.get("exit_agreement"))
            dec = "n/a" if agree is None else f"{100 * agree:.2f}%"
            big = next(v for k, v in f["speed"].items() if k != "batch_1")
            lines.append(
                f"| {name} | {fmt} | {dec} | {100 * f['prediction_agreement']:.2f}% | "
                f"{f['max_abs_logit_diff']:.2e} | {f['flops_equal']} | "
                f"{f['speed']['batch_1']['speedup']:.2f} | {big['speedup']:.2f} |"
            )
    return lines


def write(result: dict[str, Any], json_path: str, markdown: str) -> None:
    atomic_write_bytes(json_path, json.dumps(result, indent=2).encode())
    atomic_write_bytes(Path(json_path).with_suffix(".md"), markdown.encode())
    print(f"wrote {json_path} and {Path(json_path).with_suffix('.md')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynets.bench.deploy", description=__doc__.splitlines()[0])
    p.add_argument("which", choices=["export", "quantization"])
    p.add_argument("--quick", action="store_true", help="a small digits run (a minute or two)")
    p.add_argument("--model", default=None, help="a saved early-exit model directory")
    p.add_argument("--data", default=None, help="its dataset spec (digits, cifar10, npz:PATH)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    model_dir, data = bench_model(args.model, args.data, quick=args.quick)
    if args.which == "export":
        r = run_export(model_dir, data, quick=args.quick, threads=args.threads)
        write(r, args.json, markdown_export(r))
    else:
        r = run_quantization(model_dir, data, quick=args.quick, threads=args.threads)
        write(r, args.json, markdown_quantization(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
