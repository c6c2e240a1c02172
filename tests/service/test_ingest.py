"""Ingest: idempotent upserts, and every kind of bad input is a 4xx naming the problem."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.storage.tables import Observation, Sequence, User
from tests.service.factories import create_model, features, ingest, simulated_items


def observation(user_id: str = "u1", day: str = "2026-11-01", **kwargs: object) -> dict:
    return {"user_id": user_id, "day": day, "features": features(), "label": 62.0, **kwargs}


def post(client: TestClient, auth: Callable, items: object, name: str = "mood") -> Response:
    return client.post(
        f"/v1/models/{name}/observations", json={"items": items}, headers=auth("ingest")
    )


def rows(session_factory: sessionmaker[Session]) -> list[tuple]:
    with session_factory() as session:
        return [
            (o.user_id, o.day, o.features, o.label, o.updated_at)
            for o in session.scalars(select(Observation).order_by(Observation.id))
        ]


def test_insert_then_update_counts(client: TestClient, auth: Callable, mood_model: dict) -> None:
    assert ingest(client, auth, [observation(), observation(day="2026-11-02")]) == {
        "inserted": 2,
        "updated": 0,
    }
    changed = [observation(label=70.0), observation(day="2026-11-03")]
    assert ingest(client, auth, changed) == {"inserted": 1, "updated": 1}


def test_idempotent_reingest_changes_nothing(
    client: TestClient, auth: Callable, mood_model: dict, session_factory: sessionmaker
) -> None:
    items = simulated_items(n_users=5, n_days=10)
    assert ingest(client, auth, items) == {"inserted": 50, "updated": 0}
    before = rows(session_factory)
    assert ingest(client, auth, items) == {"inserted": 0, "updated": 0}
    assert rows(session_factory) == before
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(User)) == 5


def test_unlabelled_observation_then_label(
    client: TestClient, auth: Callable, mood_model: dict, session_factory: sessionmaker
) -> None:
    assert ingest(client, auth, [observation(label=None)])["inserted"] == 1
    assert ingest(client, auth, [observation(label=55.5)]) == {"inserted": 0, "updated": 1}
    assert rows(session_factory)[0][3] == 55.5


def test_unknown_and_missing_features_are_422_naming_them(
    client: TestClient, auth: Callable, mood_model: dict
) -> None:
    bad = observation()
    bad["features"] = {**features(), "gps": 1.0}
    del bad["features"]["gps_km"]
    response = post(client, auth, [observation(), bad])
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "items", 1, "features"]
    assert error["msg"] == "unknown features: gps; missing features: gps_km"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_feature_is_422(
    client: TestClient, auth: Callable, mood_model: dict, literal: str
) -> None:
    # Python's JSON parser accepts these literals; they must be refused, and not crash the 422.
    text = json.dumps({"items": [observation()]}).replace("180.0", literal)
    response = client.post(
        "/v1/models/mood/observations",
        content=text,
        headers={**auth("ingest"), "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "items", 0, "features", "screen_minutes"]


def test_non_finite_label_is_422(client: TestClient, auth: Callable, mood_model: dict) -> None:
    text = json.dumps({"items": [observation()]}).replace("62.0", "NaN")
    response = client.post(
        "/v1/models/mood/observations",
        content=text,
        headers={**auth("ingest"), "Content-Type": "application/json"},
    )
    assert response.status_code == 422


def test_float32_overflow_is_422(client: TestClient, auth: Callable, mood_model: dict) -> None:
    item = observation()
    item["features"]["gps_km"] = 1e300
    assert post(client, auth, [item]).status_code == 422


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"features": {**features(), "weekday": "2"}}, "weekday"),
        ({"features": {**features(), "weekday": True}}, "weekday"),
        ({"features": {**features(), "weekday": None}}, "weekday"),
        ({"day": "yesterday"}, "day"),
        ({"user_id": ""}, "user_id"),
        ({"label": "happy"}, "label"),
        ({"extra": 1}, "extra"),
    ],
)
def test_wrong_types_are_422(
    client: TestClient, auth: Callable, mood_model: dict, change: dict, field: str
) -> None:
    response = post(
        client,
        auth,
        [observation(**change)] if "features" not in change else [{**observation(), **change}],
    )
    assert response.status_code == 422, response.text
    assert field in json.dumps(response.json()["detail"])


def test_empty_batch_is_422(client: TestClient, auth: Callable, mood_model: dict) -> None:
    assert post(client, auth, []).status_code == 422


def test_malformed_json_is_422(client: TestClient, auth: Callable, mood_model: dict) -> None:
    response = client.post(
        "/v1/models/mood/observations",
        content="{not json",
        headers={**auth("ingest"), "Content-Type": "application/json"},
    )
    assert response.status_code == 422


def test_duplicate_user_day_in_one_batch_is_422(
    client: TestClient, auth: Callable, mood_model: dict
) -> None:
    response = post(client, auth, [observation(), observation(label=1.0)])
    assert response.status_code == 422
    assert "duplicate (user_id, day)" in response.json()["detail"][0]["msg"]


def test_batch_over_maximum_is_413(client: TestClient, auth: Callable, mood_model: dict) -> None:
    items = [observation(user_id=f"u{i}") for i in range(1001)]  # settings.max_batch = 1000
    response = post(client, auth, items)
    assert response.status_code == 413
    assert "1000" in response.json()["detail"]


def test_unknown_model_is_404(client: TestClient, auth: Callable) -> None:
    assert post(client, auth, [observation()], name="nope").status_code == 404


def test_classification_labels_must_be_known_classes(client: TestClient, auth: Callable) -> None:
    create_model(client, auth, name="moodclass", task="classification")
    assert ingest(client, auth, [observation(label="high")], name="moodclass")["inserted"] == 1
    response = post(client, auth, [observation(label="ecstatic")], name="moodclass")
    assert response.status_code == 422
    assert "unknown class 'ecstatic'" in response.text


def sequence(sequence_id: str = "s1", labels: list | None = None, **kwargs: object) -> dict:
    segments = [{"features": features(weekday=float(k))} for k in range(3)]
    return {
        "user_id": "u1",
        "sequence_id": sequence_id,
        "segments": segments,
        "labels": labels if labels is not None else ["calm", "tense", "calm"],
        **kwargs,
    }


def post_sequences(
    client: TestClient, auth: Callable, items: list, name: str = "affect"
) -> Response:
    return client.post(
        f"/v1/models/{name}/sequences", json={"items": items}, headers=auth("ingest")
    )


def test_sequences_upsert(
    client: TestClient, auth: Callable, session_factory: sessionmaker
) -> None:
    create_model(client, auth, name="affect", task="sequence")
    assert post_sequences(client, auth, [sequence()]).json() == {"inserted": 1, "updated": 0}
    assert post_sequences(client, auth, [sequence()]).json() == {"inserted": 0, "updated": 0}
    relabelled = sequence(labels=["upbeat", "upbeat", "calm"])
    assert post_sequences(client, auth, [relabelled, sequence("s2")]).json() == {
        "inserted": 1,
        "updated": 1,
    }
    with session_factory() as session:
        stored = session.scalars(select(Sequence).order_by(Sequence.id)).all()
    assert [s.labels for s in stored] == [["upbeat", "upbeat", "calm"], ["calm", "tense", "calm"]]
    assert stored[0].segments[1] == features(weekday=1.0)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (sequence(labels=["calm", "furious", "calm"]), "unknown states: furious"),
        (sequence(labels=["calm"]), "labels has 1 entries but segments has 3"),
        (sequence(segments=[]), "segments"),
    ],
)
def test_invalid_sequences_are_422(
    client: TestClient, auth: Callable, item: dict, message: str
) -> None:
    create_model(client, auth, name="affect", task="sequence")
    response = post_sequences(client, auth, [item])
    assert response.status_code == 422
    assert message in response.text


def test_sequences_need_a_sequence_model(
    client: TestClient, auth: Callable, mood_model: dict
) -> None:
    response = post_sequences(client, auth, [sequence()], name="mood")
    assert response.status_code == 422
    assert "send observations to /observations" in response.text
