"""Serving benchmark on loopback: the budget-adaptive server against the same server pinned to its
most accurate operating point, at the request rate the pinned one serves within the SLO and at 2x
and 4x that rate.

    python -m dynets.bench.serving [--quick] [--model DIR --data SPEC] [--slo-ms 100] --json PATH

  1. the operating-point ladder is calibrated once on the val split and saved (`--ladder`)
  2. rate R0: open-loop probes of the pinned server at rising rates (x1.4 each), then `refine`
     bisection probes between the last rate within the SLO and the first over it; R0 is the
     highest probed rate whose p95 stayed within the SLO without errors, the break rate the
     lowest probed rate over it
  3. each server (a `python -m dynets.serve` subprocess, 1 torch thread) is driven at R0, 2 R0
     and 4 R0 for a fixed time by the load generator below; requests are single test images
     (base64 PNG) so accuracy is measured too
  4. p50 / p95 / p99 of answered requests, throughput, accuracy, errors by status, lost requests
     (sent without any HTTP answer), mean cost and the levels used -> JSON, Markdown, PNG

The load generator (`loadgen.py`) is open-loop (Poisson arrivals at a fixed rate, latency counted
from each request's scheduled time), bounded in requests and time, and sends only to the loopback
server it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from dynets.bench.loadgen import ServerProcess, batch_mean, generate_load, png_bodies

# ---------------------------------------------------------------------- the experiment


def run(
    model_dir: str,
    data: str,
    *,
    slo_ms: float = 100.0,
    quick: bool = False,
    duration_s: float | None = None,
    probe_s: float | None = None,
    multipliers: tuple[float, ...] = (1.0, 2.0, 4.0),
    max_batch_size: int = 32,
    max_batch_delay_ms: float = 5.0,
    max_queue: int = 512,
    threads: int = 1,
    start_rate: float | None = None,
    refine: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    import torch

    from dynets.core.serialization import load
    from dynets.data import load_dataset
    from dynets.serve.ladder import build_ladder

    torch.set_num_threads(threads)
    duration_s = duration_s or (4.0 if quick else 30.0)
    probe_s = probe_s or (2.0 if quick else 6.0)
    log = print if progress else (lambda *a, **k: None)
    val = load_dataset(data, "val", limit=500 if quick else 2000)
    test = load_dataset(data, "test", limit=300 if quick else 2000)
    model = load(model_dir)
    with torch.inference_mode():
        ladder = build_ladder(model, val.x, val.y, levels=6 if quick else 8)
    bodies, labels = png_bodies(test.x), test.y.tolist()
    common = [
        "--max-batch-size",
        str(max_batch_size),
        "--max-batch-delay-ms",
        str(max_batch_delay_ms),
        "--max-queue",
        str(max_queue),
        "--max-inputs-per-request",
        "1",
    ]
    result: dict[str, Any] = {
        "model_dir": model_dir,
        "data": data,
        "slo_ms": slo_ms,
        "quick": quick,
        "threads": threads,
        "max_batch_size": max_batch_size,
        "max_batch_delay_ms": max_batch_delay_ms,
        "max_queue": max_queue,
        "duration_s": duration_s,
        "ladder": ladder.to_dict(),
        "probes": [],
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        ladder_path = ladder.save(Path(tmp) / "ladder.json")
        fixed_args = [*common, "--ladder", str(ladder_path), "--budget", "1.0"]
        adaptive_args = [*common, "--ladder", str(ladder_path), "--latency-slo-ms", str(slo_ms)]

        def drive(server: ServerProcess, rate: float, seconds: float, seed: int) -> dict[str, Any]:
            before = server.metrics()
            r = run_fast(
                generate_load(
                    f"{server.base}/predict",
                    bodies,
                    labels,
                    rate=rate,
                    duration_s=seconds,
                    seed=seed,
                    warmup_s=min(2.0, seconds / 4),
                    max_connections=max(1024, 4 * max_queue),  # overload must reach the server's queue
                )
            )
            r["mean_batch_size"] = batch_mean(before, server.metrics())
            ctrl = server.info().get("controller")  # adaptive server: its state as the row ends
            if ctrl:
                r["controller"] = {
                    k: ctrl.get(k) for k in ("level", "sec_per_unit", "overhead_s", "mean_batch")
                }
            return r

        # 2. R0: the pinned server's highest probed rate within the SLO; the first rate over it is
        # where the fixed server breaks the SLO
        server = ServerProcess(model_dir, fixed_args, threads=threads)

        def probe(rate: float) -> bool:
            p = drive(server, rate, probe_s, seed=int(rate))
            ok = p["p95_ms"] is not None and p["p95_ms"] <= slo_ms and p["errors"] == 0
            result["probes"].append(
                {"rate": rate, "p95_ms": p["p95_ms"], "errors": p["errors"], "within_slo": ok}
            )
            verdict = "ok" if ok else "over"
            log(f"probe {rate:7.1f}/s: p95 {p['p95_ms']} ms, errors {p['errors']} -> {verdict}")
            time.sleep(1.0)
            return ok

        try:
            rate, r0, broke = start_rate or (20.0 if quick else 25.0), None, None
            while rate < 5000:
                ok = probe(rate)
                if ok:
                    r0, rate = rate, rate * 1.4
                elif r0 is None and rate > 2.0:  # even the first rate is too much: go down
                    rate /= 2
                else:
                    broke = rate
                    break
            for _ in range(refine if r0 is not None and broke is not None else 0):
                mid = round((r0 + broke) / 2, 1)  # bisect the gap between within and over
                if probe(mid):
                    r0 = mid
                else:
                    broke = mid
        finally:
            server.stop()
        if r0 is None:
            raise RuntimeError(
                f"even {result['probes'][0]['rate']}/s breaks the SLO; lower --start-rate or raise --slo-ms"
            )
        result["r0"] = r0
        result["fixed_break_rate"] = broke
        # 3. both servers at R0, 2 R0, 4 R0, and at twice the rate where the fixed one broke the SLO
        loads = sorted({*multipliers, *([2 * broke / r0] if broke else [])})
        for name, args in (("fixed", fixed_args), ("adaptive", adaptive_args)):
            server = ServerProcess(model_dir, args, threads=threads)
            try:
                for mult in loads:
                    r = drive(server, r0 * mult, duration_s, seed=int(100 * mult))
                    r.update(server=name, multiplier=mult)
                    result["rows"].append(r)
                    log(
                        f"{name:8s} {mult:.1f}x ({r0 * mult:.0f}/s): p50 {r['p50_ms']} p95 {r['p95_ms']} p99 "
                        f"{r['p99_ms']} ms, {r['throughput']:.1f}/s, acc {r['accuracy']}, "
                        f"errors {r['errors']}, lost {r['lost']}"
                    )
                    time.sleep(2.0)  # let the queue drain between load levels
            finally:
                result.setdefault("exit_codes", {})[name] = server.stop()
    result["summary"] = summarize(result, slo_ms, multipliers)
    return result


def summarize(result: dict[str, Any], slo_ms: float, multipliers: Any) -> dict[str, Any]:
    """Which rows kept p95 within the SLO, and the issue's test read two ways: the fixed server's
    break as the first *probed* rate over the SLO (conservative: its 20-s row at R0 may already be
    over), and as the lowest load of its 20-s rows that was over the SLO."""
    rows = {(r["server"], r["multiplier"]): r for r in result["rows"]}

    def within(r: dict | None) -> bool | None:
        return None if r is None or r["p95_ms"] is None else r["p95_ms"] <= slo_ms

    breaks = next((m for m in sorted(multipliers) if within(rows.get(("fixed", m))) is False), None)
    at_2x_break = (
        None if not result.get("fixed_break_rate") else 2 * result["fixed_break_rate"] / result["r0"]
    )
    return {
        "fixed_breaks_slo_at": breaks,
        "fixed_break_rate": result.get("fixed_break_rate"),
        "adaptive_load_at_2x_break": at_2x_break,
        "adaptive_within_slo_at_2x_break": within(rows.get(("adaptive", at_2x_break)))
        if at_2x_break
        else None,
        "adaptive_within_slo_at_2x_row_break": None
        if breaks is None
        else within(rows.get(("adaptive", 2 * breaks))),
        "adaptive_within_slo": {str(m): within(rows.get(("adaptive", m))) for m in multipliers},
        "fixed_within_slo": {str(m): within(rows.get(("fixed", m))) for m in multipliers},
        "lost_requests": sum(r["lost"] for r in result["rows"]),
    }


def run_fast(coro: Any) -> Any:
    """asyncio.run on uvloop where it is installed (the serve extra brings it): the load generator
    shares the machine's cores with the server, so its own per-request CPU counts against both."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Serving: budget-adaptive vs fixed operating point ({r['data']}, SLO p95 <= {r['slo_ms']:.0f} ms)",
        "",
        f"R0 = {r['r0']:.1f} requests/s (the fixed server's highest probed rate within the SLO); "
        f"{r['duration_s']:.0f} s per row, latency and accuracy over requests sent after the first "
        f"{r['rows'][0]['steady_from_s']:.1f} s.",
        "",
        "| server | load | offered/s | p50 ms | p95 ms | p99 ms | throughput/s | accuracy | errors | lost "
        "| mean cost | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for row in r["rows"]:
        lines.append(
            f"| {row['server']} | {row['multiplier']:.2g}x | {row['offered_rate']:.1f} | "
            f"{f(row['p50_ms'], '.1f')} | {f(row['p95_ms'], '.1f')} | {f(row['p99_ms'], '.1f')} | "
            f"{row['throughput']:.1f} | "
            f"{f(row['accuracy'] and 100 * row['accuracy'], '.2f')}% | {row['errors']} | {row['lost']} | "
            f"{f(row['mean_cost_fraction'], '.2f')} | {f(row['mean_batch_size'], '.1f')} |"
        )
    s = r["summary"]
    brk = s.get("fixed_break_rate") or float("nan")
    probed = ", ".join(f"{p['rate']:.0f}" for p in r["probes"])
    at2 = s.get("adaptive_load_at_2x_break") or float("nan")
    lines += [
        "",
        f"Fixed server: within the SLO at {r['r0']:.1f}/s, over it at the lowest probed rate above that, "
        f"{brk:.1f}/s (probed: {probed}/s). Adaptive server at twice that rate "
        f"({2 * brk:.1f}/s = {at2:.2f}x R0): "
        f"within the SLO: {s['adaptive_within_slo_at_2x_break']}; lost requests: {s['lost_requests']}.",
    ]
    b = s.get("fixed_breaks_slo_at")
    if b is not None and s.get("adaptive_within_slo_at_2x_row_break") is not None:
        lower = [float(m) for m, ok in s["fixed_within_slo"].items() if ok and float(m) < b]
        where = f"between {max(lower):.2g}x and {b:.2g}x" if lower else f"at or below {b:.2g}x"
        lines.append(
            f"Coarser reading from the {r['duration_s']:.0f}-s rows alone: the fixed server breaks the "
            f"SLO {where} R0; the adaptive server at twice the upper end ({2 * b * r['r0']:.1f}/s, "
            f"{2 * b:.2g}x) is within the SLO: {s['adaptive_within_slo_at_2x_row_break']}."
        )
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("fixed", "s--"), ("adaptive", "o-")):
        rows = [x for x in r["rows"] if x["server"] == name]
        m = [x["multiplier"] for x in rows]
        axes[0].plot(m, [x["p95_ms"] or float("nan") for x in rows], style, label=f"{name} p95")
        axes[1].plot(m, [100 * (x["accuracy"] or float("nan")) for x in rows], style, label=name)
    axes[0].axhline(r["slo_ms"], color="gray", lw=1, ls=":", label="SLO")
    axes[0].set(xlabel="load (x R0)", ylabel="p95 latency (ms)", yscale="log", title="latency")
    axes[1].set(xlabel="load (x R0)", ylabel="accuracy of answered requests (%)", title="accuracy")
    for ax in axes:
        ax.legend()
        ax.set_xticks([x["multiplier"] for x in r["rows"] if x["server"] == "fixed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from dynets.bench.deploy import bench_model
    from dynets.core.serialization import atomic_write_bytes

    p = argparse.ArgumentParser(prog="python -m dynets.bench.serving", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short rows on a digits model (about two minutes)")
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--slo-ms", type=float, default=100.0)
    p.add_argument("--duration-s", type=float, default=None, help="seconds per row (default 30, quick 4)")
    p.add_argument("--start-rate", type=float, default=None)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--refine",
        type=int,
        default=None,
        help="bisection probes between R0 and the break rate (default 3, quick 1)",
    )
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    model_dir, data = bench_model(args.model, args.data, quick=args.quick)
    r = run(
        model_dir,
        data,
        slo_ms=args.slo_ms,
        quick=args.quick,
        duration_s=args.duration_s,
        start_rate=args.start_rate,
        max_batch_size=args.max_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        threads=args.threads,
        refine=args.refine if args.refine is not None else (1 if args.quick else 3),
    )
    out = Path(args.json)
    atomic_write_bytes(out, json.dumps(r, indent=2).encode())
    atomic_write_bytes(out.with_suffix(".md"), markdown(r).encode())
    png = plot(r, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
