"""Export benchmark for the families no other benchmark trains a model of: Skip-LSTM, ACT and
frame-skip RNNs (UCR ECG5000), the MoE transformer (SST-2 words) and A-ViT halting (CIFAR-10).

Each is trained briefly on its real task (a few epochs: enough for its decisions to differ from
sample to sample; the accuracy is reported, not a target), cached in ~/.cache/dynets/bench, then
exported in both formats and compared with its eager self on the test split: decisions,
predictions, logits, per-sample FLOPs, and eager vs exported speed at batch 1 and 64 (alternating
rounds in one process, as `dynets.bench.deploy export`).

    python -m dynets.bench.export_families [--quick] --json benchmarks/results/export_families.json
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import torch

from dynets.bench.common import cache_key, log
from dynets.bench.deploy import families_table, family_entry, write
from dynets.core.registry import create_model
from dynets.core.serialization import load, save
from dynets.data import cache_dir, data_root, load_dataset
from dynets.train import TrainConfig, train


@dataclass(frozen=True)
class Spec:
    name: str  # zoo name
    data: str  # "ucr:...", "cifar10" or "sst2"
    key: str  # the decision compared per sample
    model_kw: dict
    epochs: int
    lr: float
    batch_size: int = 64
    train_limit: int | None = None
    # run-time setting applied after training (not part of the cache key): an operating point at
    # which the decisions differ from sample to sample, so the export's compaction paths run
    setting: dict | None = None


RNN = dict(hidden=128, cell="gru")
SPECS = (
    Spec(
        "skip_lstm",
        "ucr:ECG5000",
        "updated",
        dict(hidden=128, budget_weight=0.5),
        40,
        3e-3,
        setting={"update_budget": 0.5},  # threshold calibrated to update half the steps
    ),
    Spec(
        "act_rnn",
        "ucr:ECG5000",
        "ponder",
        dict(RNN, max_ponder=4, ponder_weight=1e-3),
        40,
        3e-3,
        setting={"epsilon": 0.3},  # halt at a halting sum of 0.7: some steps after one pass, some later
    ),
    Spec(
        "frameskip_rnn",
        "ucr:ECG5000",
        "read",
        dict(RNN, max_skip=4, budget_weight=1.0),
        40,
        3e-3,
        setting={"stop_confidence": 0.95},
    ),
    Spec(
        "moe_transformer",
        "sst2",
        "expert",
        dict(num_classes=2, d_model=128, n_heads=4, n_layers=2, d_ff=512, num_experts=8, k=1),
        3,
        1e-3,
    ),
    Spec("avit_tiny", "cifar10", "depth", {}, 2, 1e-3, 128, train_limit=20000),
)


class _Tokens:
    """SST-2 word ids as the train loop's dataset (x float, the model casts ids back)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x.float(), y

    def __len__(self) -> int:
        return len(self.y)


def _data(spec: Spec, quick: bool, test_limit: int) -> tuple[Any, torch.Tensor, dict]:
    """(train set, test inputs, extra model kw) for a spec."""
    limit = min(spec.train_limit or 10**9, 2000 if quick else 10**9)
    if spec.data == "sst2":
        from dynets.bench.moe import load_sst2

        train_set, dev, vocab = load_sst2(data_root() / "data" / "sst2")
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(train_set.y), generator=g)[:limit]
        return _Tokens(train_set.x[idx], train_set.y[idx]), dev.x[:test_limit], {"vocab_size": len(vocab)}
    train_set = load_dataset(spec.data, "train", limit=limit)
    test = load_dataset(spec.data, "test", limit=test_limit)
    kw: dict = {"num_classes": train_set.num_classes}
    if spec.data.startswith("ucr:"):
        kw.update(input_size=train_set.x.shape[2], seq_len=train_set.x.shape[1])
    return train_set, test.x, kw


def _trained(spec: Spec, train_set: Any, kw: dict, quick: bool, progress: bool) -> torch.nn.Module:
    epochs = 1 if quick else spec.epochs
    tc = dict(epochs=epochs, batch_size=spec.batch_size, lr=spec.lr, seed=0, progress=progress)
    path = (
        cache_dir()
        / "bench"
        / f"export_families-{spec.name}-{cache_key([spec.data, len(train_set), kw, tc])}"
    )
    if (path / "config.json").is_file():
        log(f"reusing trained {spec.name} from {path}")
        return load(path).eval()
    torch.manual_seed(0)
    model = create_model(spec.name, **kw)
    log(f"training {spec.name} on {spec.data} ({len(train_set)} samples, {epochs} epochs)")
    start = time.time()
    train(model, train_set, TrainConfig(**tc))
    log(f"trained {spec.name} in {time.time() - start:.0f} s")
    model.eval()
    save(model, path)
    return model


def run(*, quick: bool = False, threads: int = 2, progress: bool = True, only: tuple[str, ...] = ()) -> dict:
    torch.set_num_threads(threads)
    rounds, test_limit = (3, 256) if quick else (7, 1024)
    result: dict[str, Any] = {"quick": quick, "threads": threads, "rounds": rounds, "families": {}}
    for spec in SPECS:
        if only and spec.name not in only:
            continue
        train_set, x, extra = _data(spec, quick, test_limit)
        kw = {**spec.model_kw, **extra}
        model = _trained(spec, train_set, kw, quick, progress)
        setting = dict(spec.setting or {})
        if "update_budget" in setting:
            from dynets.temporal.skip_rnn import calibrate_update_threshold

            setting["threshold"] = calibrate_update_threshold(
                model, train_set.x[:256], setting["update_budget"]
            )
        if "epsilon" in setting:
            model.config.epsilon = setting["epsilon"]
        if "stop_confidence" in setting:
            model.stop_confidence = setting["stop_confidence"]
        with torch.inference_mode():
            logits = torch.cat([model(x[i : i + 256]).logits for i in range(0, len(x), 256)])
        test_y = _test_labels(spec, len(x))
        entry = {
            "data": spec.data,
            "test_samples": int(x.shape[0]),
            "test_accuracy": float((logits.argmax(-1) == test_y).double().mean()),
            "setting": setting,
            **family_entry(model, x, spec.key, ("onnx", "torch"), rounds, threads),
        }
        result["families"][spec.name] = entry
        o = entry["onnx"]
        log(
            f"{spec.name}: acc {entry['test_accuracy']:.4f}, {entry['mean_mflops']:.2f} MFLOPs, "
            f"onnx decisions {o['decision_agreement']:.4f}, FLOPs equal {o['flops_equal']}, speed-up b1 "
            f"{o['speed']['batch_1']['speedup']:.2f} b64 {o['speed']['batch_64']['speedup']:.2f}"
        )
    return result


def _test_labels(spec: Spec, n: int) -> torch.Tensor:
    if spec.data == "sst2":
        from dynets.bench.moe import load_sst2

        return load_sst2(data_root() / "data" / "sst2")[1].y[:n]
    return load_dataset(spec.data, "test", limit=n).y


def markdown(r: dict) -> str:
    lines = [
        f"# Export of the remaining families ({'quick' if r['quick'] else 'full'} run, "
        f"{r['threads']} threads)",
        "",
        "Each model trained briefly on its task (accuracy below is for orientation, not a target), "
        "exported in both formats, and run on the test split against its eager self.",
        "",
        "| model | data | run-time setting | test accuracy | mean MFLOPs per sample | decision compared "
        "| its mean |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    keys = {s.name: s.key for s in SPECS}
    for name, e in r["families"].items():
        setting = ", ".join(f"{k} {v:.3g}" for k, v in e.get("setting", {}).items()) or "as trained"
        lines.append(
            f"| {name} | {e['data']} | {setting} | {100 * e['test_accuracy']:.2f}% | {e['mean_mflops']:.3f} "
            f"| {keys[name]} | {e['decision_mean']:.3f} |"
        )
    lines += ["", *families_table(r["families"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dynets.bench.export_families", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="one epoch on 2,000 samples each (a few minutes)")
    p.add_argument("--only", default="", help="comma-separated zoo names (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    only = tuple(n for n in a.only.split(",") if n)
    bad = [n for n in only if n not in {s.name for s in SPECS}]
    if bad:
        p.error(f"--only: expected names among {[s.name for s in SPECS]}, got {bad}")
    r = run(quick=a.quick, threads=a.threads, progress=not a.no_progress, only=only)
    write(r, a.json, markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
