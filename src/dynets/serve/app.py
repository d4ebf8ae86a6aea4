"""HTTP API (FastAPI): POST /predict, GET /health, GET /metrics, GET /info, and the OpenAPI document.

Every error is a 4xx/5xx JSON answer with a `detail` message that names the field, what was
expected and what was given; nothing a client sends can crash the server:

  400  malformed JSON body             413  body over --max-body-bytes, or too many inputs
  422  wrong shape/type/value, NaN, empty or unknown fields, budget outside (0, 1]
  503  queue full (with Retry-After) or shutting down       504  deadline passed before the batch
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from dynets.serve.adapter import InputError
from dynets.serve.batcher import QueueFull, ServerClosing
from dynets.serve.optional import require
from dynets.serve.server import DeadlineExceeded, InferenceServer

fastapi = require("fastapi", "dynets serve")
pydantic = require("pydantic", "dynets serve")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402


class PredictRequest(BaseModel):
    """Send `inputs` (image / tensor models) or `texts` (text models), not both."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[list[Any] | str] | None = Field(
        None,
        description="One entry per sample: a nested list of numbers in the model's input shape, "
        "or (image models) a base64 PNG string.",
        max_length=4096,
    )
    texts: list[str] | None = Field(None, description="Texts, for text models.", max_length=4096)
    budget: float | None = Field(
        None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Most cost allowed per sample, as a fraction of the full (static) cost, in (0, 1].",
    )
    deadline_ms: float | None = Field(
        None,
        gt=0,
        le=3_600_000,
        allow_inf_nan=False,
        description="Answer within this many milliseconds: a cheaper operating point is used if "
        "needed, and 504 if the batch cannot start in time.",
    )
    return_logits: bool = Field(False, description="Also return each sample's logits.")


class Prediction(BaseModel):
    label: int
    class_name: str
    confidence: float
    exit: int | None = None
    flops: float
    cost_fraction: float | None = None
    level: int | None = None
    batch_size: int
    decisions: dict[str, Any] | None = None
    logits: list[float] | None = None


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    operating_point: dict[str, Any] | None = None
    latency_ms: float


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _describe_validation(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        given = e.get("input")
        given_s = repr(given)
        given_s = given_s if len(given_s) <= 80 else given_s[:77] + "..."
        if e.get("type") == "extra_forbidden":
            parts.append(f"{loc}: unknown field; expected some of {sorted(PredictRequest.model_fields)}")
        elif e.get("type") == "json_invalid":
            parts.append(f"malformed JSON: {e.get('msg')}")
        else:
            parts.append(f"{loc}: {e.get('msg')} (got {given_s})")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, before any parsing."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = f"request body too large: expected at most {self.limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error(413, f"{too_big}, got {int(declared)}")(scope, receive, send)
        body = await _read_body(receive, self.limit)
        if body is None:
            return None
        if isinstance(body, str):
            return await _error(413, body)(scope, receive, send)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def create_app(server: InferenceServer) -> FastAPI:
    """The FastAPI application serving `server`; its lifespan starts and stops the batcher."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(
        title="dynets inference server",
        version="1",
        description=(
            f"A dynamic model ({server.served.architecture}) served with dynamic batching: samples that "
            f"leave at an early exit leave the batch. Budgets and deadlines move each request along the "
            f"calibrated accuracy-vs-cost curve."
        ),
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
        server.observe_response(status, None)
        return _error(status, _describe_validation(errors))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        server.observe_response(500, None)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def handle(req: PredictRequest) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        """One /predict request -> (status, JSON body, extra headers)."""
        start = time.perf_counter()

        def fail(status: int, message: str, headers: dict[str, str] | None = None):
            server.observe_response(status, None)
            return status, {"detail": message}, headers

        if server.draining:
            server.m_rejected.inc(reason="closing")
            return fail(503, "the server is shutting down", {"Retry-After": "1"})
        n = len(req.inputs or []) + len(req.texts or [])
        if req.inputs is not None and req.texts is not None:
            return fail(422, "expected either 'inputs' or 'texts', got both")
        limit = server.config.max_inputs_per_request
        if n > limit:
            return fail(413, f"too many inputs: expected at most {limit} per request, got {n}")
        try:
            xs = server.served.parse(req.inputs, req.texts)
            if not xs:
                field = "texts" if req.texts is not None else "inputs"
                raise InputError(f"'{field}': expected at least one sample, got an empty list")
            futures = server.submit(
                xs, budget=req.budget, deadline_ms=req.deadline_ms, return_logits=req.return_logits
            )
        except InputError as e:
            return fail(422, str(e))
        except QueueFull as e:
            server.m_rejected.inc(reason="queue_full")
            return fail(503, str(e), {"Retry-After": str(int(e.retry_after_s))})
        except ServerClosing as e:
            server.m_rejected.inc(reason="closing")
            return fail(503, str(e), {"Retry-After": "1"})
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            status, headers = 500, None
            if isinstance(failed, DeadlineExceeded):
                status = 504
            elif isinstance(failed, ServerClosing):
                status, headers = 503, {"Retry-After": "1"}
            elif isinstance(failed, (InputError, ValueError, TypeError)):
                status = 422
            msg = str(failed) if status != 500 else f"internal error: {type(failed).__name__}: {failed}"
            return fail(status, msg, headers)
        latency = time.perf_counter() - start
        server.observe_response(200, latency)
        body = {
            "predictions": results,
            "operating_point": server.operating_point(),
            "latency_ms": 1000 * latency,
        }
        return 200, body, None

    @app.post(
        "/predict",
        response_model=None,  # documented below; answers are built as JSON directly (no re-validation)
        responses={200: {"model": PredictResponse}, 400: {}, 413: {}, 422: {}, 503: {}, 504: {}},
        summary="Classify samples with the dynamic model",
    )
    async def predict(req: PredictRequest) -> Any:
        status, body, headers = await handle(req)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/health", summary="Liveness and load")
    async def health() -> Any:
        body = {
            "status": "draining" if server.draining else "ok",
            "model": server.served.architecture,
            "queue_depth": server.batcher.queue_depth,
            "queue_capacity": server.config.max_queue,
            "operating_point": server.operating_point(),
            "uptime_s": time.time() - server.started,
        }
        return JSONResponse(body, status_code=503 if server.draining else 200)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format 0.0.4)")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            server.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/info", summary="The model, its input format, the server settings and the operating points")
    async def info() -> Any:
        return _jsonable(server.info())

    app.add_middleware(BodyLimit, limit=server.config.max_body_bytes)
    return FastPredict(app, server, handle)


async def _read_body(receive: Any, limit: int) -> bytes | str | None:
    """The request body, or a 413 message past `limit` bytes, or None if the client left."""
    chunks, size, more = [], 0, True
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return f"request body too large: expected at most {limit} bytes, got more"
        chunks.append(chunk)
        more = msg.get("more_body", False)
    return b"".join(chunks)


class FastPredict:
    """The server's ASGI entry: POST /predict is answered here directly -- the body read once,
    validated by pydantic-core straight from the JSON bytes (`PredictRequest.model_validate_json`),
    the answer encoded once -- skipping the framework's per-request middleware and dependency
    machinery, which cost about as much event-loop time as the model's cheapest operating point.
    Same validation, messages and status codes as the FastAPI route (which still documents the
    endpoint in /openapi.json); every other request goes to the FastAPI app. Attributes are the
    FastAPI app's."""

    def __init__(self, app: FastAPI, server: InferenceServer, handle: Any) -> None:
        self.app, self.server, self.handle = app, server, handle

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        server, limit = self.server, self.server.config.max_body_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            server.observe_response(413, None)
            msg = f"request body too large: expected at most {limit} bytes, got {int(declared)}"
            return await _send(send, 413, {"detail": msg})
        body = await _read_body(receive, limit)
        if body is None:
            return None
        if isinstance(body, str):
            server.observe_response(413, None)
            return await _send(send, 413, {"detail": body})
        try:
            if not body.strip():
                raise ValueError("empty")
            req = PredictRequest.model_validate_json(body)
        except pydantic.ValidationError as e:
            errors = e.errors(include_url=False)
            status = 400 if any(x.get("type") == "json_invalid" for x in errors) else 422
            server.observe_response(status, None)
            return await _send(send, status, {"detail": _describe_validation(errors)})
        except ValueError:
            server.observe_response(422, None)
            return await _send(send, 422, {"detail": "body: Field required (got an empty body)"})
        try:
            status, content, extra = await self.handle(req)
        except Exception as e:  # noqa: BLE001 -- answered as a 500, never a crashed server
            server.observe_response(500, None)
            status, content, extra = 500, {"detail": f"internal error: {type(e).__name__}: {e}"}, None
        return await _send(send, status, content, extra)


async def _send(send: Any, status: int, content: Any, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _jsonable(obj: Any) -> Any:
    """NaN and infinity (not JSON) become None."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
