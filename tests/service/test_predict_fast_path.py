"""The predict fast path and the coalescing of concurrent predictions, through the app.

The fast path must be invisible: every request — well-formed or hostile — gets byte for byte the
answer the declared route gives with the fast path switched off. Concurrent requests answered
as one batch must each get exactly what they get alone, errors included.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.api import fastpath
from service.api.routes import predict as predict_route
from service.app import create_app
from service.config import Settings
from service.storage.keys import create_key
from tests.service.factories import classification_items, create_model, features, ingest, refit

Auth = Callable[[str], dict[str, str]]
PREDICT = "/v1/models/mood/predict"


def item(user_id: str, **overrides: float) -> dict:
    return {"user_id": user_id, "features": features(**overrides)}


@pytest.fixture
def route_client(settings: Settings, trained_mood: dict) -> Iterator[TestClient]:
    """A second app on the same database with the fast path off: the reference answers."""
    off = settings.model_copy(update={"predict_fast_path": False})
    with TestClient(create_app(off)) as client:
        yield client


@pytest.fixture
def fast_path_uses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many requests the fast path answered itself (their bodies validated there)."""
    calls: list[int] = []
    validate = fastpath.PredictRequest.model_validate_json

    class Spy:
        @staticmethod
        def model_validate_json(body: bytes) -> Any:
            request = validate(body)
            calls.append(1)
            return request

    monkeypatch.setattr(fastpath, "PredictRequest", Spy)
    return calls


@pytest.fixture
def more_keys(session_factory: sessionmaker[Session]) -> dict[str, str]:
    """A predict key limited to another model, and one without the predict scope."""
    with session_factory() as session:
        made = {
            "other_model": create_key(session, name="other", scopes=["predict"], models=["x"]),
            "ingest_only": create_key(session, name="ingest-only", scopes=["ingest"]),
        }
        session.commit()
    return made


def raw(payload: Any) -> bytes:
    return json.dumps(payload).encode()


JSON = {"Content-Type": "application/json"}
CASES: dict[str, tuple[str, bytes, dict[str, str]]] = {
    # name: (path, body, extra headers)
    "known and unknown users": (PREDICT, raw({"items": [item("u0001"), item("stranger")]}), JSON),
    "interval": (PREDICT, raw({"items": [item("u0002")], "interval": 0.9}), JSON),
    "charset parameter": (
        PREDICT,
        raw({"items": [item("u0003")]}),
        {"Content-Type": "application/json; charset=utf-8"},
    ),
    "empty items": (PREDICT, raw({"items": []}), JSON),
    "no items": (PREDICT, raw({}), JSON),
    "unknown key": (PREDICT, raw({"items": [item("u1")], "extra": 1}), JSON),
    "NaN feature": (
        PREDICT, b'{"items": [{"user_id": "u1", "features": {"weekday": NaN}}]}', JSON
    ),
    "string feature": (
        PREDICT, raw({"items": [{"user_id": "u1", "features": {"weekday": "1"}}]}), JSON
    ),
    "interval as string": (PREDICT, raw({"items": [item("u1")], "interval": "0.9"}), JSON),
    "interval of 1": (PREDICT, raw({"items": [item("u1")], "interval": 1}), JSON),
    "lone surrogate user id": (
        PREDICT, b'{"items": [{"user_id": "\\ud800", "features": {"weekday": 1}}]}', JSON
    ),
    "user id with a slash": (PREDICT, raw({"items": [item("a/b")]}), JSON),
    "byte order mark": (PREDICT, b"\xef\xbb\xbf" + raw({"items": [item("u1")]}), JSON),
    "not JSON": (PREDICT, b"{items", JSON),
    "text/plain": (PREDICT, raw({"items": [item("u1")]}), {"Content-Type": "text/plain"}),
    "no content type": (PREDICT, raw({"items": [item("u1")]}), {}),
    "missing feature": (
        PREDICT, raw({"items": [{"user_id": "u1", "features": {"weekday": 1.0}}]}), JSON
    ),
    "extra feature": (PREDICT, raw({"items": [item("u1", unknown_feature=1.0)]}), JSON),
    "too many items": (PREDICT, raw({"items": [item(f"u{i}") for i in range(1001)]}), JSON),
    "not finite prediction": (PREDICT, raw({"items": [item("u1", screen_minutes=3e38)]}), JSON),
    "no such model": ("/v1/models/nothing/predict", raw({"items": [item("u1")]}), JSON),
    "invalid model name": ("/v1/models/bad%20name!/predict", raw({"items": [item("u1")]}), JSON),
    "model without version": ("/v1/models/empty/predict", raw({"items": [item("u1")]}), JSON),
    "classifier with interval": (
        "/v1/models/moodclass/predict", raw({"items": [item("u1")], "interval": 0.9}), JSON
    ),
}
FAST = {"known and unknown users", "interval", "charset parameter", "not finite prediction",
        "missing feature", "extra feature", "too many items", "no such model",
        "model without version", "classifier with interval"}
"""Cases the fast path answers itself (valid JSON bodies); the rest go on to the route."""


@pytest.fixture
def other_models(client: TestClient, auth: Auth, trained_mood: dict) -> None:
    """A model without a version and a trained classifier beside ``mood``."""
    create_model(client, auth, name="empty")
    create_model(client, auth, name="moodclass", task="classification", classes=["low", "high"])
    ingest(client, auth, classification_items(trained_mood["items"]), name="moodclass")
    refit(client, auth, name="moodclass")


def test_the_fast_path_answers_exactly_as_the_route(
    client: TestClient,
    route_client: TestClient,
    keys: dict[str, str],
    more_keys: dict[str, str],
    other_models: None,
    fast_path_uses: list[int],
) -> None:
    """Every case with every key, on an app with the fast path and on one without (one test,
    so the models are trained once)."""
    mismatches = []
    for case, (path, body, headers) in CASES.items():
        for key in ("predict", "other_model", "ingest_only"):
            token = (keys | more_keys)[key]
            sent = {**headers, "Authorization": f"Bearer {token}"}
            before = len(fast_path_uses)
            fast = client.post(path, content=body, headers=sent)
            took_fast_path = len(fast_path_uses) > before
            reference = route_client.post(path, content=body, headers=sent)
            assert len(fast_path_uses) == before + took_fast_path, "reference took the fast path"
            if (fast.status_code, fast.json()) != (reference.status_code, reference.json()):
                mismatches.append((case, key, fast.status_code, fast.text, reference.text))
            assert fast.status_code != 500, (case, key, fast.text)
            assert took_fast_path == (key == "predict" and case in FAST), (case, key)
    assert not mismatches, mismatches


def test_well_formed_predictions_take_the_fast_path(
    client: TestClient, auth: Auth, trained_mood: dict, fast_path_uses: list[int]
) -> None:
    response = client.post(PREDICT, json={"items": [item("u0001")]}, headers=auth("predict"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert fast_path_uses == [1]
    requests = client.get("/metrics", headers=auth("admin")).text
    assert 'route="/v1/models/{name}/predict",status="200"' in requests


def test_concurrent_requests_coalesce_and_each_gets_its_own_answer(
    client: TestClient, auth: Auth, trained_mood: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = predict_route.predict_rows

    def poisoned_rows(*args: Any, **kwargs: Any) -> list:
        """The model's predictions, with NaN for the user ``poison`` (a model blowing up)."""
        predictions = rows(*args, **kwargs)
        return [replace(p, prediction=math.nan) if p.user_id == "poison" else p
                for p in predictions]

    monkeypatch.setattr(predict_route, "predict_rows", poisoned_rows)
    bodies: list[dict] = [
        {"items": [item(f"u{i % 12 + 1:04d}", typing_speed=3.0 + i / 10)]} for i in range(12)
    ]
    bodies[3] = {"items": [item("u0001"), item("u0002", unknown_feature=1.0)]}  # its own 422
    bodies[5] = {"items": [item("u0003")], "interval": 0.8}  # a batch of its own coverage
    bodies[7] = {"items": [item("u0004"), item("poison")]}  # its own 422: not finite
    bodies[9] = {"items": [item("stranger"), item("u0006")]}
    alone = [
        client.post(PREDICT, json=body, headers=auth("predict")) for body in bodies
    ]

    state = client.app.state
    run = state.predictions._run
    sizes: list[int] = []
    first = threading.Event()

    def slow_first(name: str, requests: list) -> list:
        if not first.is_set():  # hold the first batch so the others queue behind it
            first.set()
            threading.Event().wait(0.3)
        sizes.append(len(requests))
        return run(name, requests)

    state.predictions._run = slow_first
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(
            pool.map(lambda b: client.post(PREDICT, json=b, headers=auth("predict")), bodies)
        )
    assert max(sizes) > 1, sizes  # some requests really were answered together
    for one, other in zip(alone, together, strict=True):
        # float32 forward passes of 1 and of n rows may differ in the last bits
        assert other.status_code == one.status_code
        assert _shape(other.json()) == _shape(one.json())
        assert _numbers(other.json()) == pytest.approx(_numbers(one.json()), rel=1e-5)
    assert together[3].status_code == 422
    assert together[3].json()["detail"][0]["loc"][:3] == ["body", "items", 1]
    assert together[7].status_code == 422
    assert together[7].json()["detail"][0]["loc"][:3] == ["body", "items", 1]
    assert {r.status_code for i, r in enumerate(together) if i not in (3, 7)} == {200}


def _numbers(answer: dict) -> list[float]:
    return [
        p[field] for p in answer.get("predictions", [])
        for field in ("prediction", "lower", "upper") if field in p
    ]


def _shape(answer: dict) -> Any:
    """The answer with its numbers blanked: everything else must be equal."""
    if "predictions" not in answer:
        return answer
    blank = [
        {k: (None if k in ("prediction", "lower", "upper") else v) for k, v in p.items()}
        for p in answer["predictions"]
    ]
    return {**answer, "predictions": blank}


def test_a_database_gone_after_the_key_check_is_503_on_both_paths(
    client: TestClient,
    route_client: TestClient,
    auth: Auth,
    trained_mood: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The key is verified, then the θⁱ read finds the database gone: 503 with Retry-After
    from the fast path as from the route, and the next request after it returns is served."""
    from sqlalchemy.exc import OperationalError

    from service.storage import store

    real = store.fetch_person_params

    def gone(*_args: Any, **_kwargs: Any) -> dict:
        raise OperationalError("SELECT …", {}, Exception("server closed the connection"))

    monkeypatch.setattr(store, "fetch_person_params", gone)
    answers = [
        app.post(PREDICT, json={"items": [item("u0001")]}, headers=auth("predict"))
        for app in (client, route_client)
    ]
    for response in answers:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
    assert answers[0].json() == answers[1].json()
    monkeypatch.setattr(store, "fetch_person_params", real)
    again = client.post(PREDICT, json={"items": [item("u0001")]}, headers=auth("predict"))
    assert again.status_code == 200
