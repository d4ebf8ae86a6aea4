"""A load generator of the project's own for the serving benchmark, and the server it drives.

`generate_load` sends open-loop Poisson traffic (a fixed rate, bounded in requests and time;
latency counted from each request's scheduled send time, so a slow server cannot slow arrivals
down) to one URL, and `summarize` turns the per-request records into percentiles, throughput,
accuracy, errors by status and lost requests. `ServerProcess` runs `python -m dynets.serve` on a
free loopback port and stops it with SIGTERM. Traffic only ever goes to that loopback server.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dynets.serve.optional import require


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


class _Stale(Exception):
    """A kept-alive connection that the server closed while it was idle."""


class _HTTPPool:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams for POSTing pre-encoded JSON bodies.

    The load generator shares two cores with the server under test, so it must cost little CPU
    per request: requests are bytes built once, responses are read by Content-Length, and only a
    200's JSON is parsed. `max_connections` must exceed the server's queue bound: otherwise an
    overloaded server never sees a full queue (and never answers 503), and the excess waits inside
    the client, where it shows up only as latency."""

    def __init__(self, url: str, max_connections: int) -> None:
        m = re.match(r"http://([^/:]+):(\d+)(/.*)?$", url)
        if not m:
            raise ValueError(f"url: expected http://HOST:PORT/PATH, got {url!r}")
        self.host, self.port, self.path = m.group(1), int(m.group(2)), m.group(3) or "/"
        self.free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(max_connections)

    def head(self, n: int) -> bytes:
        return (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {n}\r\n\r\n"
        ).encode()

    async def post(self, request: bytes) -> tuple[int, bytes]:
        async with self.slots:
            while self.free:  # a kept-alive connection the server has closed meanwhile is retried on another
                try:
                    return await self._exchange(self.free.pop(), request)
                except (_Stale, ConnectionError):
                    continue
            conn = await asyncio.open_connection(self.host, self.port)
            return await self._exchange(conn, request)

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
    ) -> tuple[int, bytes]:
        reader, writer = conn
        try:
            writer.write(request)
            first = await reader.readline()
            if not first:  # closed by the server before it read the request: nothing was processed
                writer.close()
                raise _Stale
            status = int(first.split()[1])
            length, close = 0, False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
                elif name.strip().lower() == "connection" and "close" in value.lower():
                    close = True
            body = await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self.free.append(conn)
        return status, body

    def close(self) -> None:
        for _, writer in self.free:
            writer.close()
        self.free.clear()


async def generate_load(
    url: str,
    bodies: list[bytes],
    labels: list[int],
    *,
    rate: float,
    duration_s: float,
    max_requests: int = 100_000,
    timeout_s: float = 30.0,
    seed: int = 0,
    warmup_s: float = 0.0,
    max_connections: int = 2048,
) -> dict[str, Any]:
    """Open-loop Poisson load at `rate` requests/s for `duration_s` (at most `max_requests`), body i
    cycling through `bodies`. Latency is measured from the scheduled send time."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration_s: expected > 0, got {rate} and {duration_s}")
    rng = random.Random(seed)
    times, t = [], 0.0
    while len(times) < max_requests:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        times.append(t)
    records: list[dict[str, Any]] = []
    pool = _HTTPPool(url, max_connections)
    requests = [pool.head(len(b)) + b for b in bodies]
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def send(i: int, scheduled: float) -> None:
        rec: dict[str, Any] = {"scheduled": scheduled - start, "label": labels[i % len(labels)]}
        try:
            status, body = await asyncio.wait_for(pool.post(requests[i % len(requests)]), timeout_s)
            rec["status"] = status
            if status == 200:
                p = json.loads(body)["predictions"][0]
                rec.update(
                    pred=p["label"], level=p.get("level"), cost=p.get("cost_fraction"), exit=p.get("exit")
                )
        except asyncio.TimeoutError:
            rec["status"] = "timeout"
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
            rec["status"] = f"error:{type(e).__name__}"
        rec["latency"] = loop.time() - scheduled
        records.append(rec)

    tasks = []
    try:
        for i, ti in enumerate(times):
            delay = start + ti - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(i, start + ti)))
        send_end = loop.time()
        await asyncio.gather(*tasks)
    finally:
        pool.close()
    wall = loop.time() - start
    return summarize(
        records, sent=len(times), wall_s=wall, send_s=send_end - start, rate=rate, warmup_s=warmup_s
    )


def summarize(
    records: list[dict[str, Any]],
    *,
    sent: int,
    wall_s: float,
    send_s: float,
    rate: float,
    warmup_s: float = 0.0,
) -> dict[str, Any]:
    steady = [r for r in records if r["scheduled"] >= warmup_s]
    ok = [r for r in steady if r["status"] == 200]
    lat = [1000 * r["latency"] for r in ok]
    statuses = Counter(str(r["status"]) for r in records)
    answered = sum(1 for r in records if isinstance(r["status"], int))
    costs = [r["cost"] for r in ok if r.get("cost") is not None]
    return {
        "offered_rate": rate,
        "sent": sent,
        "achieved_send_rate": sent / max(send_s, 1e-9),
        "answered": answered,
        "lost": sent - answered,  # no HTTP answer at all (timeouts, connection errors)
        "ok": sum(1 for r in records if r["status"] == 200),
        "errors": sent - sum(1 for r in records if r["status"] == 200),
        "status_counts": dict(statuses),
        "throughput": sum(1 for r in records if r["status"] == 200) / wall_s,
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "accuracy": float(np.mean([r["pred"] == r["label"] for r in ok])) if ok else None,
        "mean_cost_fraction": float(np.mean(costs)) if costs else None,
        "levels": dict(Counter(str(r.get("level")) for r in ok)),
        "steady_from_s": warmup_s,
        "wall_s": wall_s,
    }


# ---------------------------------------------------------------------- the server under test


class ServerProcess:
    """`python -m dynets.serve serve ...` on a free loopback port; stopped with SIGTERM."""

    def __init__(self, model_dir: str, args: list[str], *, threads: int = 1) -> None:
        src = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        cmd = [
            sys.executable,
            "-m",
            "dynets.serve",
            "serve",
            model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--threads",
            str(threads),
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.base = ""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {' '.join(cmd)}")
            m = re.search(r"on (http://[\d.]+:\d+)", line)
            if m:
                self.base = m.group(1)
                break
        if not self.base:
            self.stop()
            raise RuntimeError("server did not report its address within 300 s")
        self._wait_healthy()

    def _wait_healthy(self, timeout_s: float = 120.0) -> None:
        httpx = require("httpx", "the serving benchmark")
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server at {self.base} is not healthy after {timeout_s} s")

    def metrics(self) -> str:
        httpx = require("httpx", "the serving benchmark")
        return httpx.get(f"{self.base}/metrics", timeout=10).text

    def info(self) -> dict:
        httpx = require("httpx", "the serving benchmark")
        return httpx.get(f"{self.base}/info", timeout=10).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def batch_mean(before: str, after: str) -> float | None:
    from dynets.serve.metrics import parse_prometheus_text

    b, a = parse_prometheus_text(before), parse_prometheus_text(after)
    n = a["dynets_batch_size_count"][()] - b["dynets_batch_size_count"][()]
    s = a["dynets_batch_size_sum"][()] - b["dynets_batch_size_sum"][()]
    return s / n if n else None


def png_bodies(x: Any) -> list[bytes]:
    """One JSON body per image: {"inputs": [base64 PNG]} (values are quantized to 1/255)."""
    from PIL import Image

    bodies = []
    for img in x:
        arr = (img.numpy() * 255).round().clip(0, 255).astype(np.uint8)
        pil = (
            Image.fromarray(arr[0], mode="L")
            if arr.shape[0] == 1
            else Image.fromarray(arr.transpose(1, 2, 0))
        )
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        bodies.append(json.dumps({"inputs": [base64.b64encode(buf.getvalue()).decode()]}).encode())
    return bodies
