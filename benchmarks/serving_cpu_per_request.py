"""CPU time per request of the inference server, by thread: the event loop (HTTP, JSON, PNG
decoding, batching) and the inference worker. CPU time, read from /proc, is far less disturbed
by other load on the machine than wall-clock.

    .venv/bin/python benchmarks/serving_cpu_per_request.py [--label NAME] [--json PATH]

Starts `python -m dynets.serve` on the early-exit CIFAR-10 model of the early-exit benchmark
(cached), warms it up, then drives it three times for 8 s at 150 requests/s (single base64 PNG
images) and reports, per answered request, the CPU milliseconds of its main thread (the event
loop) and of its other threads. To compare two versions of the code, run it with
PYTHONPATH=<other checkout>/src (the server subprocess inherits it).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from dynets.bench.loadgen import generate_load, png_bodies
from dynets.core.serialization import atomic_write_bytes
from dynets.data import load_dataset
from dynets.data.paths import cache_dir


def thread_cpu(pid: int) -> dict[str, float]:
    tck = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        fields = Path(task, "stat").read_text().split(")")[1].split()
        out[task.rsplit("/", 1)[1]] = (int(fields[11]) + int(fields[12])) / tck
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="current")
    p.add_argument("--json", default=None)
    p.add_argument("--port", type=int, default=8791)
    p.add_argument("--rate", type=float, default=150.0)
    args = p.parse_args()
    runs = sorted((cache_dir() / "bench").glob("early_exit_cifar10-finetune-*"))
    if not runs:
        sys.exit("no cached early-exit CIFAR-10 model: run benchmarks/early_exit_cifar10.sh first")
    bodies = png_bodies(load_dataset("cifar10", "test", limit=500).x)
    cmd = [sys.executable, "-m", "dynets.serve", "serve", str(runs[0]), "--port", str(args.port)]
    cmd += ["--max-batch-size", "32", "--threads", "1"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if "on http://" in line:
                break
        url = f"http://127.0.0.1:{args.port}/predict"
        labels = [0] * len(bodies)
        asyncio.run(generate_load(url, bodies, labels, rate=100, duration_s=3))  # warm-up
        loop_ms, other_ms = [], []
        for _ in range(3):
            before = thread_cpu(server.pid)
            r = asyncio.run(generate_load(url, bodies, labels, rate=args.rate, duration_s=8))
            after = thread_cpu(server.pid)
            n = r["answered"]
            loop_ms.append(1000 * (after[str(server.pid)] - before.get(str(server.pid), 0)) / n)
            rest = sum(v - before.get(k, 0) for k, v in after.items() if k != str(server.pid))
            other_ms.append(1000 * rest / n)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    result = {
        "label": args.label,
        "rate": args.rate,
        "event_loop_cpu_ms_per_request": statistics.median(loop_ms),
        "other_threads_cpu_ms_per_request": statistics.median(other_ms),
        "runs": {"event_loop": loop_ms, "other_threads": other_ms},
    }
    print(json.dumps(result))
    if args.json:
        path = Path(args.json)
        prev = json.loads(path.read_text()) if path.is_file() else {}
        prev[args.label] = result
        atomic_write_bytes(path, json.dumps(prev, indent=2).encode())


if __name__ == "__main__":
    main()
