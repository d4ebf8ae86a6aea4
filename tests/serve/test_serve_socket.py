"""The server over a real socket on loopback (`python -m dynets.serve` in a subprocess), which
finishes the request in flight on SIGTERM and exits 0; the CLI's errors for bad model dirs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from serving_fixtures import SHAPE, tiny_model

import dynets
from dynets.serve.cli import main

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _wait_healthy(base: str, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"server at {base} did not become healthy")


def test_real_socket_and_sigterm_finishing_the_request_in_flight(tmp_path):
    model_dir = tmp_path / "model"
    dynets.save(tiny_model(), model_dir)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [
        sys.executable,
        "-m",
        "dynets.serve",
        "serve",
        str(model_dir),
        "--port",
        "0",
        "--no-warmup",
        "--max-batch-size",
        "8",
        "--max-batch-delay-ms",
        "1500",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://([\d.]+):(\d+)", line)
        assert m, line + proc.stdout.read() if proc.poll() is not None else line
        base = f"http://{m.group(1)}:{m.group(2)}"
        _wait_healthy(base)
        x = torch.rand((2, *SHAPE)).tolist()
        r = httpx.post(f"{base}/predict", json={"inputs": x}, timeout=30)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2
        assert "dynets_requests_total" in httpx.get(f"{base}/metrics", timeout=5).text
        assert "/predict" in httpx.get(f"{base}/openapi.json", timeout=5).json()["paths"]
        result = {}

        def request():
            result["r"] = httpx.post(f"{base}/predict", json={"inputs": x}, timeout=30)

        t = threading.Thread(target=request)
        t.start()
        time.sleep(0.4)  # the request now waits in the batcher (1.5 s batch delay)
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert result["r"].status_code == 200, result["r"].text
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_errors_for_missing_or_corrupt_model_dirs(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert main(["serve", str(tmp_path / "bad"), "--port", "0"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "bad"), "--out", str(tmp_path / "o")]) == 2
