"""`dynets serve` and `dynets export`: `add_parsers(subparsers)` registers both on the main CLI.

Standalone: `python -m dynets.serve serve DIR ...` / `python -m dynets.serve export DIR ...`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _model_dir(path: str) -> str:
    p = Path(path)
    if not (p / "config.json").exists() and (p / "model" / "config.json").exists():
        return str(p / "model")  # a `dynets train --out RUN` directory
    return str(p)


def _clean_missing(fn):
    """A missing optional extra ends the command with its install hint, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        from dynets.serve.optional import MissingDependencyError

        try:
            return fn(args)
        except MissingDependencyError as e:
            raise SystemExit(f"dynets {args.command}: error: {e}") from None

    run.__name__ = fn.__name__
    return run


@_clean_missing
def cmd_serve(args: argparse.Namespace) -> int:
    from dynets.serve.launch import bind_socket, build_server, serve
    from dynets.serve.optional import require
    from dynets.serve.server import ServeConfig

    require("fastapi", "dynets serve")
    require("uvicorn", "dynets serve")
    config = ServeConfig(
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        max_queue=args.max_queue,
        max_inputs_per_request=min(args.max_inputs_per_request, args.max_queue),
        max_body_bytes=args.max_body_bytes,
        latency_slo_ms=args.latency_slo_ms,
        budget=args.budget,
        threads=args.threads,
        graceful_timeout_s=args.graceful_timeout_s,
        warmup=not args.no_warmup,
        log_level=args.log_level,
        optimize=not args.no_optimize,
    )
    server = build_server(
        _model_dir(args.model_dir),
        config,
        calibration_data=args.calibration_data,
        ladder_path=args.ladder,
        calibration_limit=args.calibration_limit,
    )
    if args.save_ladder:
        print(f"wrote {server.ladder.save(args.save_ladder)}", flush=True)
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    ladder = server.ladder
    op = "unavailable (the model has no exit policy)"
    if server.served.supports_policy:
        mode = f"adaptive, SLO {args.latency_slo_ms} ms" if server.adaptive else "fixed"
        op = f"{len(ladder)} levels ({ladder.source}), {mode}"
    print(
        f"dynets serve: {server.served.architecture} on http://{host}:{port} (operating points: {op})",
        flush=True,
    )
    serve(server, sock=sock)
    return 0


@_clean_missing
def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from dynets.export.staged import export_model_dir

    torch.set_num_threads(args.threads)
    out = export_model_dir(
        _model_dir(args.model_dir),
        args.out,
        format=args.format,
        granularity=args.granularity,
        opset=args.opset,
        whole_graph=args.whole_graph,
    )
    print(
        f"wrote {out} ({args.format}; run it with {out / 'dynets_runtime.py'} or dynets.export.load_runtime)"
    )
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve` and `export` (conflict_handler="resolve", so a later shared --threads is fine)."""
    s = subparsers.add_parser(
        "serve",
        help="serve a saved dynamic model over HTTP (dynamic batching, budgets, latency SLO)",
        conflict_handler="resolve",
    )
    s.add_argument("model_dir", help="a directory written by dynets.save (or a `train --out` run)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--max-batch-size", type=int, default=32)
    s.add_argument("--max-batch-delay-ms", type=float, default=5.0, help="longest wait to fill a batch")
    s.add_argument("--max-queue", type=int, default=256, help="samples queued before 503 + Retry-After")
    s.add_argument("--max-inputs-per-request", type=int, default=64)
    s.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    s.add_argument(
        "--latency-slo-ms", type=float, default=None, help="p95 target: move the operating point with load"
    )
    s.add_argument(
        "--budget", type=float, default=None, help="pin the operating point (fraction of full cost)"
    )
    s.add_argument(
        "--calibration-data",
        default=None,
        help="held-out data for the operating-point ladder: a dataset spec (digits, cifar10, npz:PATH; its "
        "val split) or, for text models, a .tsv/.csv table",
    )
    s.add_argument("--calibration-limit", type=int, default=2000)
    s.add_argument("--ladder", default=None, help="an operating_points.json written by --save-ladder")
    s.add_argument("--save-ladder", default=None, help="write the ladder here (file or directory)")
    s.add_argument("--graceful-timeout-s", type=float, default=10.0)
    s.add_argument("--log-level", default="warning")
    s.add_argument("--no-warmup", action="store_true")
    s.add_argument(
        "--no-optimize",
        action="store_true",
        help="serve the model as saved, not its inference copy (early exit: BatchNorm folded, NHWC)",
    )
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads of the inference worker")
    s.set_defaults(fn=cmd_serve)

    e = subparsers.add_parser(
        "export",
        help="export a dynamic model (early exit, block skipping, routing, dynamic parameters) as "
        "graphs cut at its decisions, plus a runtime that takes them",
        conflict_handler="resolve",
    )
    e.add_argument("model_dir")
    e.add_argument("--format", choices=["onnx", "torch"], default="onnx")
    e.add_argument("--out", required=True, help="output directory (written atomically)")
    e.add_argument(
        "--granularity",
        choices=["block", "stage"],
        default="block",
        help="early exit: graphs per block or stage",
    )
    e.add_argument("--opset", type=int, default=17)
    e.add_argument(
        "--whole-graph", action="store_true", help="early exit: also a torch.cond whole graph (torch format)"
    )
    e.add_argument("--threads", type=int, default=1)
    e.set_defaults(fn=cmd_export)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynets.serve")
    add_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"dynets {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
