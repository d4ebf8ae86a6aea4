"""Helpers shared by the benchmark drivers: timestamped log lines, cache keys for trained models, and
the host's CPU model."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path


def log(msg: str, tag: str = "bench") -> None:
    """One progress line, `[tag HH:MM:SS] msg`, flushed at once (benchmarks run for hours under nohup)."""
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cache_key(obj: object) -> str:
    """12 hex digits naming a trained model's settings in ~/.cache/dynets/bench. Every benchmark
    hashes the same way, so one benchmark reuses a model another has trained with equal settings;
    changing this invalidates every cached model."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cpu_model() -> str:
    """The host's CPU model name (from /proc/cpuinfo; platform.processor() where that is missing):
    speed-ups move with the machine, so every timed result says where it was measured."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
