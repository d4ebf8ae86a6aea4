"""The HTTP server in-process: predictions against the eager model, dynamic batching, budgets,
back-pressure (503), deadlines (504), bad input (4xx, never 500), metrics, other model kinds."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import threading

import numpy as np
import pytest
import torch
from serving_fixtures import SHAPE, calibration_data, make_server, tiny_model

from dynets.core.outputs import DynamicOutput
from dynets.serve import InferenceServer, Ladder, ServeConfig, ServedModel
from dynets.serve.ladder import single_point_ladder
from dynets.serve.metrics import parse_prometheus_text

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from dynets.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server_parts():
    model = tiny_model()
    x, y = calibration_data()
    from dynets.serve import build_ladder

    return model, build_ladder(model, x, y, levels=5)


def samples(n: int, seed: int = 7) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def png_b64(img: torch.Tensor) -> str:
    from PIL import Image

    arr = (img[0].numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def run_async(coro):
    return asyncio.run(coro)


async def started(server: InferenceServer):
    await server.start()
    transport = httpx.ASGITransport(app=create_app(server))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def test_predictions_match_the_eager_model(server_parts):
    model, ladder = server_parts
    server = make_server(model, ladder)
    x = samples(3)
    with TestClient(create_app(server)) as c:
        r = c.post("/predict", json={"inputs": x.tolist(), "return_logits": True})
        assert r.status_code == 200, r.text
        body = r.json()
        ref = model(x, policy=ladder.points[0].policy)
        assert [p["exit"] for p in body["predictions"]] == ref.exit_index.tolist()
        assert [p["label"] for p in body["predictions"]] == ref.prediction.tolist()
        got = torch.tensor([p["logits"] for p in body["predictions"]])
        torch.testing.assert_close(got, ref.logits, rtol=1e-4, atol=1e-5)
        assert [p["flops"] for p in body["predictions"]] == ref.flops.tolist()
        assert body["operating_point"]["level"] == 0

        # (H, W) lists for one-channel models, and base64 PNG (bytes / 255)
        r = c.post("/predict", json={"inputs": [x[0, 0].tolist(), png_b64(x[1])]})
        assert r.status_code == 200, r.text
        q = (x[1] * 255).round() / 255
        ref2 = model(torch.stack([x[0], q]), policy=ladder.points[0].policy)
        assert [p["label"] for p in r.json()["predictions"]] == ref2.prediction.tolist()

        h = c.get("/health").json()
        assert h["status"] == "ok" and h["model"] == "EarlyExitResNet"
        info = c.get("/info").json()
        assert info["model"]["input"]["shape"] == list(SHAPE) and len(info["ladder"]["points"]) == len(ladder)
        spec = c.get("/openapi.json").json()
        assert "/predict" in spec["paths"] and "PredictRequest" in json.dumps(spec)


BAD = [
    ({"inputs": [[[1.0, 2.0]]]}, 422, "expected shape (1, 8, 8) or (8, 8)"),
    ({"inputs": [[[0.0] * 8] * 7 + [[0.0] * 5]]}, 422, "ragged"),
    ({"inputs": [[["a"] * 8] * 8]}, 422, "inputs[0]"),
    ({"inputs": samples(1).tolist(), "foo": 1}, 422, "foo: unknown field"),
    ({"inputs": samples(1).tolist(), "budget": 0}, 422, "budget: Input should be greater than 0"),
    ({"inputs": samples(1).tolist(), "budget": 1.5}, 422, "budget: Input should be less than or equal to 1"),
    ({"inputs": samples(1).tolist(), "budget": "half"}, 422, "budget"),
    ({"inputs": samples(1).tolist(), "deadline_ms": -5}, 422, "deadline_ms"),
    ({"inputs": []}, 422, "expected at least one sample"),
    ({}, 422, "expected 'inputs'"),
    ({"texts": ["hello"]}, 422, "this model takes image inputs"),
    ({"inputs": ["%%%not base64"]}, 422, "not base64"),
    ({"inputs": [base64.b64encode(b"GIF89a....").decode()]}, 422, "expected a PNG"),
    ({"inputs": 5}, 422, "inputs"),
]


@pytest.mark.parametrize("body,status,message", BAD)
def test_bad_input_gets_a_clear_4xx(server_parts, body, status, message):
    server = make_server(*server_parts)
    with TestClient(create_app(server)) as c:
        r = c.post("/predict", json=body)
        assert r.status_code == status, r.text
        assert message in r.json()["detail"], r.json()["detail"]


def test_nan_wrong_png_size_malformed_json_and_size_limits(server_parts):
    server = make_server(*server_parts, max_body_bytes=20_000, max_inputs_per_request=4, max_queue=8)
    with TestClient(create_app(server)) as c:
        bad = samples(1).tolist()
        bad[0][0][3][4] = float("nan")
        raw = json.dumps({"inputs": bad})  # a NaN literal, which Python's JSON parser accepts
        r = c.post("/predict", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "finite" in r.json()["detail"]
        big = png_b64(torch.rand(1, 16, 16))
        r = c.post("/predict", json={"inputs": [big]})
        assert r.status_code == 422 and "expected a 8x8 PNG, got 16x16" in r.json()["detail"]
        r = c.post("/predict", content=b'{"inputs": [', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]
        r = c.post("/predict", content=b"x" * 30_000, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "at most 20000 bytes" in r.json()["detail"]
        r = c.post("/predict", json={"inputs": samples(5).tolist()})
        assert r.status_code == 413 and "at most 4 per request, got 5" in r.json()["detail"]
        assert c.get("/health").status_code == 200


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([0, 1, -1, 0.5, 1e308, -1e-308, 10**30])
    if kind == 1:
        return rng.choice(["", "a", "iVBORw0KGgo=", "data:image/png;base64,AAAA", "\u00e9" * 3])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind in (3, 4):
        return rng.choice([float("nan"), float("inf"), 2.5])
    if kind in (5, 6):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["inputs", "texts", "budget", "deadline_ms", "return_logits", "x", ""]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_random_bodies_never_crash_the_server(server_parts):
    """A seeded property test: arbitrary JSON (and near-valid requests) gets 200, a 4xx, or 504 for a
    deadline shorter than the work, never a 500."""
    server = make_server(*server_parts)
    rng = random.Random(0)
    valid = samples(1)[0].tolist()
    with TestClient(create_app(server), raise_server_exceptions=False) as c:
        for i in range(150):
            if i % 3 == 0:
                body = {
                    "inputs": [valid],
                    rng.choice(["budget", "deadline_ms", "return_logits"]): _random_json(rng),
                }
            elif i % 3 == 1:
                body = {"inputs": [_random_json(rng)]}
            else:
                body = _random_json(rng)
            raw = json.dumps(body, allow_nan=True)
            r = c.post("/predict", content=raw, headers={"content-type": "application/json"})
            assert r.status_code in (200, 504) or 400 <= r.status_code < 500, (
                raw[:200],
                r.status_code,
                r.text,
            )
            assert "detail" in r.json() or r.status_code == 200
        assert c.get("/health").status_code == 200


def test_concurrent_requests_share_one_forward_with_their_own_budgets(server_parts):
    model, ladder = server_parts
    server = make_server(model, ladder, max_batch_size=8, max_batch_delay_ms=5000)
    calls = []
    forward = server.served.forward

    def counting(x, policy=None):
        calls.append(x.shape[0])
        return forward(x, policy)

    server.served.forward = counting
    x = samples(8, seed=3)
    budgets = [None, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45]

    async def main():
        client = await started(server)
        try:
            rs = await asyncio.gather(
                *[
                    client.post(
                        "/predict", json={"inputs": [x[i].tolist()], "budget": b, "return_logits": True}
                    )
                    for i, b in enumerate(budgets)
                ]
            )
        finally:
            await client.aclose()
            await server.stop()
        return rs

    rs = run_async(main())
    assert calls == [8] and server.batcher.batches == 1  # one batch, one forward
    for i, r in enumerate(rs):
        assert r.status_code == 200, r.text
        p = r.json()["predictions"][0]
        assert p["batch_size"] == 8
        level = 0 if budgets[i] is None else ladder.level_for_budget(budgets[i])
        assert p["level"] == level
        ref = model(x[i : i + 1], policy=ladder.points[level].policy)  # each sample alone, its own policy
        assert p["exit"] == int(ref.exit_index[0])
        torch.testing.assert_close(torch.tensor(p["logits"]), ref.logits[0], rtol=1e-4, atol=1e-5)


def _blocked(server: InferenceServer) -> threading.Event:
    gate = threading.Event()
    run = server.run_batch

    def slow(items):
        gate.wait(10)
        return run(items)

    server.batcher.run = slow
    return gate


def test_full_queue_answers_503_with_retry_after_and_loses_nothing(server_parts):
    server = make_server(
        *server_parts, max_batch_size=1, max_batch_delay_ms=0, max_queue=4, max_inputs_per_request=4
    )
    gate = _blocked(server)
    x = samples(6)

    async def main():
        client = await started(server)
        try:
            first = asyncio.create_task(client.post("/predict", json={"inputs": [x[0].tolist()]}))
            while server.batcher.in_flight == 0:  # the first sample is in the (blocked) worker
                await asyncio.sleep(0.01)
            second = asyncio.create_task(client.post("/predict", json={"inputs": x[1:5].tolist()}))
            while len(server.batcher.pending) < 4:
                await asyncio.sleep(0.01)
            rejected = await client.post("/predict", json={"inputs": [x[5].tolist()]})
            gate.set()
            return rejected, await first, await second
        finally:
            gate.set()
            await client.aclose()
            await server.stop()

    rejected, first, second = run_async(main())
    assert rejected.status_code == 503 and int(rejected.headers["retry-after"]) >= 1
    assert "queue is full" in rejected.json()["detail"]
    assert first.status_code == 200 and second.status_code == 200
    assert len(second.json()["predictions"]) == 4
    assert server.m_rejected.value(reason="queue_full") == 1


def test_deadline_passed_before_the_batch_gets_504(server_parts):
    server = make_server(*server_parts, max_batch_size=1, max_batch_delay_ms=0)
    gate = _blocked(server)
    x = samples(2)

    async def main():
        client = await started(server)
        try:
            first = asyncio.create_task(client.post("/predict", json={"inputs": [x[0].tolist()]}))
            while server.batcher.in_flight == 0:
                await asyncio.sleep(0.01)
            late = asyncio.create_task(
                client.post("/predict", json={"inputs": [x[1].tolist()], "deadline_ms": 20})
            )
            await asyncio.sleep(0.15)
            gate.set()
            return await first, await late
        finally:
            gate.set()
            await client.aclose()
            await server.stop()

    first, late = run_async(main())
    assert first.status_code == 200
    assert late.status_code == 504 and "deadline passed" in late.json()["detail"]


def test_metrics_text_parses_and_adds_up(server_parts):
    server = make_server(*server_parts)
    with TestClient(create_app(server)) as c:
        for i in range(3):
            assert c.post("/predict", json={"inputs": samples(4, seed=i).tolist()}).status_code == 200
        c.post("/predict", json={"inputs": [[1.0]]})
        text = c.get("/metrics").text
    m = parse_prometheus_text(text)
    assert m["dynets_requests_total"][(("status", "200"),)] == 3
    assert m["dynets_requests_total"][(("status", "422"),)] == 1
    assert m["dynets_samples_total"][()] == 12
    assert sum(m["dynets_exit_total"].values()) == 12
    buckets = sorted(
        ((float(dict(k)["le"]), v) for k, v in m["dynets_request_latency_seconds_bucket"].items()),
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == m["dynets_request_latency_seconds_count"][()] == 3
    model = server.served.model
    most = (
        float(model.exit_costs()[-1]) / model.full_cost()
    )  # the last exit costs a little over the static path
    assert m["dynets_flops_per_sample_mean"][()] > 0 and 0 < m["dynets_cost_fraction_mean"][()] <= most
    assert m["dynets_operating_point_available"][()] == 1 and m["dynets_operating_point_level"][()] == 0
    assert m["dynets_queue_depth"][()] == 0 and m["dynets_operating_point_budget"][()] == 1.0


class NoPolicyModel(torch.nn.Module):
    """A dynamic model without an exit policy (e.g. block skipping): decisions but no operating point."""

    def __init__(self) -> None:
        super().__init__()
        self.input_shape = (4,)
        self.num_classes = 3
        self.lin = torch.nn.Linear(4, 3)

    def check_input(self, x):
        if x.shape[1:] != (4,):
            raise ValueError(f"input: expected shape (B, 4), got {tuple(x.shape)}")

    def forward(self, x):
        skip = x[:, 0] > 0.5
        return DynamicOutput(
            self.lin(x), None, torch.where(skip, 10.0, 20.0).double(), decisions={"skipped": skip}
        )


def test_model_without_policy_reports_operating_point_unavailable():
    model = NoPolicyModel().eval()
    server = InferenceServer(ServedModel(model), single_point_ladder(model), ServeConfig(warmup=False))
    with TestClient(create_app(server)) as c:
        r = c.post("/predict", json={"inputs": [[0.9, 0, 0, 0], [0.1, 0, 0, 0]]})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["decisions"]["skipped"] for p in preds] == [True, False] and preds[0]["exit"] is None
        assert r.json()["operating_point"] is None
        r = c.post("/predict", json={"inputs": [[0.9, 0, 0, 0]], "budget": 0.5})
        assert r.status_code == 422 and "operating points are unavailable" in r.json()["detail"]
        r = c.post("/predict", json={"inputs": [[0.9, 0, 0]]})
        assert r.status_code == 422 and "expected shape (4,)" in r.json()["detail"]
        m = parse_prometheus_text(c.get("/metrics").text)
    assert m["dynets_operating_point_available"][()] == 0
    assert m["dynets_decision_total"][(("name", "skipped"), ("value", "True"))] == 1


def test_text_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dynets.text import DynamicBert

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] good bad movie the was".split()
    cfg = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=len(words) + 5,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path)
    model = DynamicBert.from_pretrained_encoder(tmp_path, ["neg", "pos"]).eval()
    server = InferenceServer(ServedModel(model), single_point_ladder(model), ServeConfig(warmup=False))
    with TestClient(create_app(server)) as c:
        r = c.post("/predict", json={"texts": ["the movie was good", "bad"], "return_logits": True})
        assert r.status_code == 200, r.text
        ref = model(model.encode(["the movie was good", "bad"]))
        preds = r.json()["predictions"]
        assert [p["exit"] for p in preds] == ref.exit_index.tolist()
        torch.testing.assert_close(
            torch.tensor([p["logits"] for p in preds]), ref.logits, rtol=1e-4, atol=1e-5
        )
        assert all(p["class_name"] in ("neg", "pos") and p["cost_fraction"] > 0 for p in preds)
        r = c.post("/predict", json={"texts": ["  "]})
        assert r.status_code == 422 and "non-empty text" in r.json()["detail"]
        r = c.post("/predict", json={"inputs": [[1, 2]]})
        assert r.status_code == 422 and "expected 'texts'" in r.json()["detail"]


def test_ladder_round_trip_and_budget_levels(server_parts, tmp_path):
    _, ladder = server_parts
    ratios = [p.cost_ratio for p in ladder.points]
    assert ratios == sorted(ratios, reverse=True) and len(ladder) >= 3
    assert ladder.level_for_budget(1.0) == 0 and ladder.level_for_budget(1e-3) == len(ladder) - 1
    for p_i, p in enumerate(ladder.points):
        assert ladder.level_for_budget(p.cost_ratio) <= p_i
    back = Ladder.load(ladder.save(tmp_path))
    assert back.to_dict()["points"] == ladder.to_dict()["points"]
    with pytest.raises(ValueError, match="not a valid operating-point ladder"):
        (tmp_path / "bad.json").write_text("{}")
        Ladder.load(tmp_path / "bad.json")


def test_a_served_early_exit_model_is_its_inference_copy(tmp_path):
    """`dynets serve DIR` serves the model's optimize_for_inference copy (BatchNorm folded, NHWC):
    the same exits and FLOPs as the saved model; --no-optimize (optimize=False) serves it as saved."""
    from dynets.core.serialization import save
    from dynets.serve import load_served_model
    from dynets.serve.launch import build_server

    m = tiny_model()
    save(m, tmp_path / "ee")
    fast = load_served_model(str(tmp_path / "ee"))
    plain = load_served_model(str(tmp_path / "ee"), optimize=False)
    assert fast.model.inference_only and not plain.model.inference_only
    assert fast.describe()["optimized_for_inference"] and not plain.describe()["optimized_for_inference"]
    x, _ = calibration_data(64)
    a, b = plain.forward(x, m.policy), fast.forward(x, m.policy)
    assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.flops, b.flops)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert build_server(str(tmp_path / "ee"), ServeConfig(warmup=False)).served.model.inference_only
    server = build_server(str(tmp_path / "ee"), ServeConfig(warmup=False, optimize=False))
    assert not server.served.model.inference_only
