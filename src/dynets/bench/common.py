"""Helpers shared by the benchmark drivers: timestamped log lines and cache keys for trained models."""

from __future__ import annotations

import hashlib
import json
import time


def log(msg: str, tag: str = "bench") -> None:
    """One progress line, `[tag HH:MM:SS] msg`, flushed at once (benchmarks run for hours under nohup)."""
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cache_key(obj: object) -> str:
    """12 hex digits naming a trained model's settings in ~/.cache/dynets/bench. Every benchmark
    hashes the same way, so one benchmark reuses a model another has trained with equal settings;
    changing this invalidates every cached model."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
