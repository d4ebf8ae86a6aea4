"""Property-based tests of the server's bad-input handling (hypothesis): whatever JSON a client
sends to POST /predict, the answer is 200, a 4xx with a "detail" message, or 504 (a deadline shorter
than the work), never a 500, and the server keeps answering afterwards."""

from __future__ import annotations

import json

import pytest
import torch
from serving_fixtures import SHAPE, calibration_data, make_server, tiny_model

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402  (the dev extra installs it)
from hypothesis import strategies as st  # noqa: E402

from dynets.serve import build_ladder  # noqa: E402
from dynets.serve.app import create_app  # noqa: E402

FIELDS = ["inputs", "texts", "budget", "deadline_ms", "return_logits"]

# any JSON value: scalars (NaN and infinities included, as a careless client may send them),
# nested lists and objects whose keys are sometimes the request's real field names
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def near_valid_inputs() -> st.SearchStrategy:
    """Lists shaped like images, some right (1x8x8), most wrong in one way or another."""
    pixel = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, 3)
    row = st.lists(pixel, min_size=0, max_size=9)
    image = st.lists(st.lists(row, min_size=0, max_size=9), min_size=0, max_size=2)
    good = st.just(torch.full(SHAPE, 0.5).tolist())
    return st.lists(good | image, min_size=0, max_size=3)


requests = st.one_of(
    json_values,
    st.fixed_dictionaries({"inputs": near_valid_inputs()}),
    st.fixed_dictionaries(
        {"inputs": st.just([torch.full(SHAPE, 0.25).tolist()])},
        optional={
            "budget": json_scalars,
            "deadline_ms": json_scalars,
            "return_logits": json_scalars,
            "surprise": json_scalars,
        },
    ),
)


@pytest.fixture(scope="module")
def client():
    torch.set_num_threads(1)
    model = tiny_model()
    x, y = calibration_data()
    server = make_server(model, build_ladder(model, x, y, levels=5))
    with TestClient(create_app(server), raise_server_exceptions=False) as c:
        yield c


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=requests)
def test_any_json_body_gets_200_a_4xx_or_504_never_a_500(client, body):
    raw = json.dumps(body, allow_nan=True)
    r = client.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (200, 504) or 400 <= r.status_code < 500, (raw[:200], r.status_code, r.text)
    if r.status_code != 200:
        assert isinstance(r.json().get("detail"), (str, list)) and r.json()["detail"], r.text
    assert client.get("/health").status_code == 200


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_get_a_4xx_never_a_500(client, raw):
    r = client.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (200, 504) or 400 <= r.status_code < 500, (raw[:80], r.status_code, r.text)
    assert client.get("/health").status_code == 200
