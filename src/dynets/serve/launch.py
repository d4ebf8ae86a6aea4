"""Start-up: load a model directory and its operating points, bind a socket, run uvicorn.

`build_server` loads the model and its ladder (calibrated on held-out data, else saved beside the
model or given as a file, else the model's own policy); `serve` runs it until SIGINT / SIGTERM,
finishing the requests already queued first.
"""

from __future__ import annotations

import math
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import torch

from dynets.serve.adapter import ServedModel, load_served_model
from dynets.serve.knobs import build_knob_ladder
from dynets.serve.ladder import LADDER_FILE, Ladder, build_ladder, single_point_ladder
from dynets.serve.optional import require
from dynets.serve.server import InferenceServer, ServeConfig


def load_calibration_data(
    served: ServedModel, spec: str, *, limit: int | None = 2000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out (x, y) for the ladder: a dataset spec (`dynets.data.load_dataset`, split val) for
    image models, a .tsv / .csv table for text models."""
    if served.kind == "text":
        from dynets.text import encode_table, load_text_table

        table = load_text_table(spec, labels=served.labels)
        if limit:
            table.texts, table.labels = table.texts[:limit], table.labels[:limit]
        data = encode_table(served.model, table)
        return data.x, data.y
    from dynets.data import load_dataset

    data = load_dataset(spec, "val", limit=limit)
    if served.input_shape is not None and tuple(data.x.shape[1:]) != served.input_shape:
        raise ValueError(
            f"calibration data {spec!r}: expected inputs of shape {served.input_shape}, "
            f"got {tuple(data.x.shape[1:])}"
        )
    return data.x, data.y


def build_server(
    model_dir: str,
    config: ServeConfig,
    *,
    calibration_data: str | None = None,
    ladder_path: str | None = None,
    calibration_limit: int | None = 2000,
) -> InferenceServer:
    """Load the model and its ladder: calibrated on data, else saved, else the model's own policy."""
    served = load_served_model(model_dir, optimize=config.optimize)
    ladder = resolve_ladder(
        served,
        model_dir,
        calibration_data=calibration_data,
        ladder_path=ladder_path,
        calibration_limit=calibration_limit,
    )
    return InferenceServer(served, ladder, config)


def resolve_ladder(
    served: ServedModel,
    model_dir: str | None,
    *,
    calibration_data: str | None = None,
    ladder_path: str | None = None,
    calibration_limit: int | None = 2000,
) -> Ladder:
    if not served.supports_policy:
        if calibration_data or ladder_path:
            raise ValueError(
                f"{served.architecture} has no exit policy: operating points (calibration data, a ladder) "
                f"are unavailable for it"
            )
        return single_point_ladder(served.model)
    if calibration_data:
        with torch.inference_mode():
            x, y = load_calibration_data(served, calibration_data, limit=calibration_limit)
            if served.knob is not None:
                return build_knob_ladder(served.model, x, y)
            return build_ladder(served.model, x, y)
    if ladder_path:
        return Ladder.load(ladder_path)
    if model_dir and (Path(model_dir) / LADDER_FILE).is_file():
        return Ladder.load(Path(model_dir) / LADDER_FILE)
    return single_point_ladder(served.model)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket (port 0 picks a free one; read it with getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only for sockets
    # that say so, and without it a response written in two parts waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def make_uvicorn_server(server: InferenceServer) -> Any:
    uvicorn = require("uvicorn", "dynets serve")
    from dynets.serve.app import create_app

    cfg = uvicorn.Config(
        create_app(server),
        host=server.config.host,
        port=server.config.port,
        log_level=server.config.log_level,
        timeout_graceful_shutdown=int(math.ceil(server.config.graceful_timeout_s)),
        access_log=False,
        lifespan="on",
    )
    return uvicorn.Server(cfg)


def serve(server: InferenceServer, *, sock: socket.socket | None = None) -> None:
    """Run until SIGINT / SIGTERM; the batch in flight and the requests already queued finish first."""
    uv = make_uvicorn_server(server)
    sock = sock or bind_socket(server.config.host, server.config.port)
    if threading.current_thread() is threading.main_thread():
        # uvicorn handles SIGINT / SIGTERM itself (graceful shutdown), then re-raises the signal to
        # the handler that was installed before it: a no-op here, so a clean stop exits with 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
    uv.run(sockets=[sock])
