"""Serving: personalised vs generic predictions, one θⁱ query and one forward pass per request,
classification, and input validation."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, text

from nme import load_estimator
from service import db
from service.app import create_app
from service.config import Settings
from tests.service.factories import (
    classification_items,
    create_model,
    features,
    ingest,
    predict,
    refit,
    simulated_items,
)


def item(user_id: str, **overrides: float) -> dict:
    return {"user_id": user_id, "features": features(**overrides)}


def test_personalised_user_differs_from_unknown_user(
    client: TestClient, auth: Callable, trained_mood: dict
) -> None:
    body = predict(client, auth, [item("u0001"), item("stranger")])
    assert body["model"] == "mood"
    assert body["version"] == 1
    known, unknown = body["predictions"]
    assert known["user_id"] == "u0001" and known["personalized"] is True
    assert unknown["user_id"] == "stranger" and unknown["personalized"] is False
    assert set(known) == {"user_id", "prediction", "personalized"}
    assert known["prediction"] != pytest.approx(unknown["prediction"], abs=1e-6)
    assert 0 < unknown["prediction"] < 100  # label scale, not z-scores


def test_prediction_matches_the_estimator(
    client: TestClient, auth: Callable, trained_mood: dict, settings, session_factory
) -> None:
    from service.storage import store

    with session_factory() as session:
        model = store.get_model(session, name="mood")
        version = store.get_active_version(session, model_id=model.id)
    estimator = load_estimator(settings.artifact_dir / version.artifact_path)
    x = np.array([list(features().values())], dtype=np.float32)
    generic = estimator.predict_with_effects(
        x, np.zeros((1, estimator.n_effects_), np.float32), np.zeros(1, bool)
    )
    body = predict(client, auth, [item("stranger")])
    assert body["predictions"][0]["prediction"] == pytest.approx(float(generic[0]), rel=1e-6)


@pytest.fixture
def statements(client: TestClient) -> Iterator[list[str]]:
    """SQL statements the app executes while the test runs."""
    seen: list[str] = []
    engine = client.app.state.engine

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def test_batch_fetches_person_params_in_one_query(
    client: TestClient, auth: Callable, trained_mood: dict, statements: list[str]
) -> None:
    """With the serving caches off (as in these tests' settings), a prediction costs three
    statements whatever the batch size: the key, the model with its active version (one joined
    query), and the batch's θⁱ rows (one query, nothing per user)."""
    users = [f"u{k:04d}" for k in range(1, 13)] + [f"new{k}" for k in range(88)]
    predict(client, auth, [item("u0001")])  # load the artifact outside the measured request
    statements.clear()
    body = predict(client, auth, [item(u, gps_km=float(k)) for k, u in enumerate(users)])
    assert sum(p["personalized"] for p in body["predictions"]) == 12
    assert sum("person_params" in s for s in statements) == 1
    assert len(statements) == 3


def test_warm_predict_costs_one_statement(
    settings: Settings, auth: Callable, trained_mood: dict
) -> None:
    """The production path: with the key cache (``NME_AUTH_CACHE_SECONDS``) and the
    active-version cache (``NME_ACTIVE_VERSION_TTL_SECONDS``) on, a process's first prediction
    reads the key, the model with its active version, and the θⁱ rows (3 statements); every
    further one within the bounds reads only the batch's θⁱ rows: exactly 1 statement, for one
    user or a hundred. (θⁱ is never cached: a per-user update must show at once.)"""
    cached = settings.model_copy(
        update={"auth_cache_seconds": 60.0, "active_version_ttl_seconds": 60.0}
    )
    with TestClient(create_app(cached)) as warm:
        seen: list[str] = []
        event.listen(
            warm.app.state.engine,
            "before_cursor_execute",
            lambda _conn, _cursor, statement, *_args: seen.append(statement),
        )
        predict(warm, auth, [item("u0001")])
        assert len(seen) == 3
        for batch in ([item("u0002")], [item(f"u{k:04d}") for k in range(1, 101)]):
            seen.clear()
            body = predict(warm, auth, batch)
            assert body["version"] == trained_mood["version"]["version"]
            assert len(seen) == 1 and "person_params" in seen[0]


def test_batch_equals_single_requests(
    client: TestClient, auth: Callable, trained_mood: dict
) -> None:
    items = [item("u0003", gps_km=2.0), item("nobody"), item("u0007", weekday=6.0)]
    batch = predict(client, auth, items)["predictions"]
    singles = [predict(client, auth, [one])["predictions"][0] for one in items]
    for a, b in zip(batch, singles, strict=True):
        assert a["prediction"] == pytest.approx(b["prediction"], rel=1e-5)


def test_model_without_active_version_is_409(
    client: TestClient, auth: Callable, mood_model: dict
) -> None:
    response = client.post(
        "/v1/models/mood/predict", json={"items": [item("u1")]}, headers=auth("predict")
    )
    assert response.status_code == 409
    assert "refit" in response.json()["detail"]


def test_unknown_model_is_404(client: TestClient, auth: Callable) -> None:
    response = client.post(
        "/v1/models/nope/predict", json={"items": [item("u1")]}, headers=auth("predict")
    )
    assert response.status_code == 404


def test_predict_unknown_feature_is_422(
    client: TestClient, auth: Callable, trained_mood: dict
) -> None:
    bad = item("u1")
    bad["features"]["mood_yesterday"] = 3.0
    response = client.post(
        "/v1/models/mood/predict", json={"items": [item("u1"), bad]}, headers=auth("predict")
    )
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {
            "loc": ["body", "items", 1, "features"],
            "msg": "unknown features: mood_yesterday",
            "type": "feature_schema",
        }
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"items": []},
        {"items": [{"user_id": "u1"}]},
        {"items": [{"user_id": "u1", "features": {"weekday": "x"}}]},
        {"item": []},
        [],
    ],
)
def test_predict_malformed_body_is_422(
    client: TestClient, auth: Callable, trained_mood: dict, body: object
) -> None:
    response = client.post("/v1/models/mood/predict", json=body, headers=auth("predict"))
    assert response.status_code == 422


def test_predict_nan_is_422(client: TestClient, auth: Callable, trained_mood: dict) -> None:
    text = json.dumps({"items": [item("u1")]}).replace("6.0", "NaN")
    response = client.post(
        "/v1/models/mood/predict",
        content=text,
        headers={**auth("predict"), "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["input"] == "nan"


def test_predict_batch_over_maximum_is_413(
    client: TestClient, auth: Callable, trained_mood: dict
) -> None:
    items = [item(f"u{k}") for k in range(1001)]
    response = client.post(
        "/v1/models/mood/predict", json={"items": items}, headers=auth("predict")
    )
    assert response.status_code == 413


def test_classification_returns_class_and_probabilities(client: TestClient, auth: Callable) -> None:
    create_model(client, auth, name="moodclass", task="classification")
    ingest(client, auth, classification_items(simulated_items()), name="moodclass")
    assert refit(client, auth, name="moodclass")["metrics"]["score_name"] == "accuracy"
    body = predict(client, auth, [item("u0002"), item("stranger")], name="moodclass")
    for prediction in body["predictions"]:
        assert prediction["prediction"] in {"low", "high"}
        assert set(prediction["probabilities"]) == {"low", "high"}
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        best = max(prediction["probabilities"], key=prediction["probabilities"].get)
        assert prediction["prediction"] == best
    assert [p["personalized"] for p in body["predictions"]] == [True, False]
    user = client.get("/v1/models/moodclass/users/u0002", headers=auth("predict")).json()
    assert set(user["bias"]) == {"low", "high"}


def test_sequence_model_predict_is_422(client: TestClient, auth: Callable) -> None:
    create_model(client, auth, name="affect", task="sequence")
    response = client.post(
        "/v1/models/affect/predict", json={"items": [item("u1")]}, headers=auth("predict")
    )
    assert response.status_code == 422
    assert "/decode" in response.text


def test_predict_survives_a_terminated_pooled_connection(
    client: TestClient,
    auth: Callable,
    trained_mood: dict,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pooled PostgreSQL connection whose backend died while it sat idle (a restart, an
    idle-session timeout) is pinged on checkout and replaced: the request succeeds, no 503.
    (The ping happens only after ``PING_AFTER_IDLE_SECONDS``; set to 0 here to avoid a sleep.)"""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite connections do not die under the pool")
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)
    predict(client, auth, [item("u0001")])  # the pool now holds a connection
    killer = db.make_engine(database_url)
    with killer.connect() as connection:
        killed = connection.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    killer.dispose()
    assert killed >= 1
    assert predict(client, auth, [item("u0001")])["predictions"][0]["personalized"]
