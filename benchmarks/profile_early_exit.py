"""Where the early-exit model's batch-1 and compaction time goes (issue 2 diagnostics).

Uses the default-width models cached by the narrow run (its command is in benchmarks/early_exit_cifar10.sh;
run that first) and the CIFAR-10 test
images; 2 threads; every measurement alternates its variants over chunks of 20 images, 11 rounds.
Writes benchmarks/results/profile_early_exit.{json,md}:

  - rows: index_select vs take_rows on an NHWC 64x64x8x8 tensor (40 rows kept);
  - path: per-image time of the static path and of a forced exit at each exit, as fractions of the
    static time, beside the FLOPs fractions;
  - parts: the same image stream through the stages only, + exit heads, + policy decisions.

    .venv/bin/python benchmarks/profile_early_exit.py
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from dynets.bench.early_exit import _validated_static
from dynets.core.serialization import atomic_write_bytes, load
from dynets.core.tensors import take_rows
from dynets.data import cache_dir, load_dataset
from dynets.policies.exit_policies import ConfidencePolicy

OUT = Path(__file__).parent / "results" / "profile_early_exit"
OPERATING = [0.8671789765357971, 0.7911008596420288, 0.5887022614479065]  # results/early_exit_cifar10.json


def per_image_us(fns: dict, xs: list[torch.Tensor], rounds: int = 11, chunk: int = 20) -> dict[str, float]:
    totals = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():  # warm-up
            for b in xs[:chunk]:
                f(b)
        for r in range(rounds):
            spent = dict.fromkeys(fns, 0.0)
            for c, i in enumerate(range(0, len(xs), chunk)):
                items = list(fns.items()) if (r + c) % 2 == 0 else list(reversed(fns.items()))
                for k, f in items:
                    start = time.perf_counter()
                    for b in xs[i : i + chunk]:
                        f(b)
                    spent[k] += time.perf_counter() - start
            for k, v in spent.items():
                totals[k].append(v)
    return {k: 1e6 * statistics.median(v) / len(xs) for k, v in totals.items()}


def main() -> None:
    torch.set_num_threads(2)
    bench = cache_dir() / "bench"
    dyn = load(next(bench.glob("early_exit_cifar10-finetune-cbb0b6892cc0"))).eval()
    static = load(next(bench.glob("early_exit_cifar10-static-9befe6bfaa8a"))).eval()
    fd, fs = dyn.optimize_for_inference(), static.optimize_for_inference()
    x = load_dataset("cifar10", "test").x[:200]
    xs = [x[i : i + 1] for i in range(len(x))]
    result: dict = {"threads": 2, "images": len(xs), "torch": torch.__version__}

    # 1. compaction of NHWC features
    h = torch.randn(64, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:40].sort().values
    t = per_image_us(
        {"index_select": lambda b: h.index_select(0, idx), "take_rows": lambda b: take_rows(h, idx)}, xs
    )
    result["rows_us"] = {
        **t,
        "index_select_keeps_nhwc": h.index_select(0, idx).is_contiguous(memory_format=torch.channels_last),
    }

    # 2. time of each exit path vs its FLOPs
    never = ConfidencePolicy([1.0, 1.0, 1.0])
    fns = {"static": _validated_static(fs)}
    for k in range(3):
        pol = ConfidencePolicy([0.0 if j == k else 1.0 for j in range(3)])
        fns[f"exit{k}"] = lambda b, p=pol: fd(b, p)
    fns["exit3"] = lambda b: fd(b, never)
    t = per_image_us(fns, xs)
    costs, full = fd.exit_costs().tolist(), fd.full_cost()
    result["path"] = [
        {
            "path": k,
            "us": t[k],
            "time_fraction": t[k] / t["static"],
            "flops_fraction": 1.0 if k == "static" else costs[int(k[-1])] / full,
        }
        for k in fns
    ]

    # 3. parts of the full path: stages, + heads, + policy decisions
    def stages(b, heads=False, policy=False):
        hh, state = fd._prepare(b), never.init_state(1, b.device)
        for i, st in enumerate(fd.stages):
            hh = st(hh)
            if heads and i in fd.exit_stages[:-1]:
                k = fd.exit_stages.index(i)
                lg = fd.heads[k](hh)
                if policy:
                    never.step_single(k, lg, state)
        return fd.heads[-1](hh)

    result["parts_us"] = per_image_us(
        {
            "stages": stages,
            "stages+heads": lambda b: stages(b, True),
            "stages+heads+policy": lambda b: stages(b, True, True),
        },
        xs,
    )

    md = [
        "# Early exit: where the time goes (2 threads, CIFAR-10 test images, batch 1)",
        "",
        f"NHWC row selection (40 of 64 rows, 64x8x8): index_select "
        f"{result['rows_us']['index_select']:.1f} us "
        f"(returns NCHW: keeps NHWC = {result['rows_us']['index_select_keeps_nhwc']}), "
        f"take_rows {result['rows_us']['take_rows']:.1f} us.",
        "",
        "| path | us per image | time vs static | FLOPs vs static |",
        "|---|---:|---:|---:|",
    ]
    md += [
        f"| {r['path']} | {r['us']:.0f} | {r['time_fraction']:.3f} | {r['flops_fraction']:.3f} |"
        for r in result["path"]
    ]
    p = result["parts_us"]
    md += [
        "",
        f"Full path in parts: stages {p['stages']:.0f} us, + 3 exit heads {p['stages+heads']:.0f} us, "
        f"+ 3 policy decisions {p['stages+heads+policy']:.0f} us.",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(OUT.with_suffix(".json"), json.dumps(result, indent=2).encode())
    atomic_write_bytes(OUT.with_suffix(".md"), ("\n".join(md) + "\n").encode())
    print("\n".join(md))


if __name__ == "__main__":
    main()
