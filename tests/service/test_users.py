"""What a model knows about a user, and forgetting a user everywhere."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.storage.tables import Observation, PersonParam, Sequence, User
from tests.service.factories import create_model, features, predict


def test_user_summary(client: TestClient, auth: Callable, trained_mood: dict) -> None:
    response = client.get("/v1/models/mood/users/u0001", headers=auth("predict"))
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "mood" and body["user_id"] == "u0001"
    assert body["n_labels"] == 20
    assert body["personalized"] is True
    assert body["version"] == 1
    assert isinstance(body["bias"], float)
    assert body["transitions"] is None


def test_user_without_version_has_no_bias(
    client: TestClient, auth: Callable, mood_model: dict
) -> None:
    item = {"user_id": "u1", "day": "2026-01-01", "features": features(), "label": None}
    client.post("/v1/models/mood/observations", json={"items": [item]}, headers=auth("ingest"))
    body = client.get("/v1/models/mood/users/u1", headers=auth("predict")).json()
    assert body == {
        "model": "mood",
        "user_id": "u1",
        "n_labels": 0,
        "personalized": False,
        "version": None,
        "bias": None,
        "transitions": None,
    }


def test_unknown_user_is_404(client: TestClient, auth: Callable, trained_mood: dict) -> None:
    assert client.get("/v1/models/mood/users/nobody", headers=auth("predict")).status_code == 404


def counts(session: Session, user_id: int) -> dict[str, int]:
    def count(table: type[Observation | Sequence | PersonParam]) -> int:
        return session.scalar(
            select(func.count()).select_from(table).where(table.user_id == user_id)
        )

    return {t.__tablename__: count(t) for t in (Observation, Sequence, PersonParam)}


def test_delete_user_forgets_them_everywhere(
    client: TestClient, auth: Callable, trained_mood: dict, session_factory: sessionmaker
) -> None:
    create_model(client, auth, name="affect", task="sequence")
    sequence = {
        "user_id": "u0001",
        "sequence_id": "s1",
        "segments": [{"features": features()}],
        "labels": ["calm"],
    }
    client.post("/v1/models/affect/sequences", json={"items": [sequence]}, headers=auth("ingest"))
    with session_factory() as session:
        user_id = session.scalar(select(User.id).where(User.external_id == "u0001"))
        assert counts(session, user_id) == {"observations": 20, "sequences": 1, "person_params": 1}
        total_before = session.scalar(select(func.count()).select_from(Observation))

    response = client.delete("/v1/users/u0001", headers=auth("admin"))
    assert response.status_code == 204
    assert response.content == b""

    with session_factory() as session:
        assert counts(session, user_id) == {"observations": 0, "sequences": 0, "person_params": 0}
        assert session.scalar(select(func.count()).select_from(Observation)) == total_before - 20
    assert client.get("/v1/models/mood/users/u0001", headers=auth("predict")).status_code == 404
    assert client.delete("/v1/users/u0001", headers=auth("admin")).status_code == 404
    body = predict(client, auth, [{"user_id": "u0001", "features": features()}])
    assert body["predictions"][0]["personalized"] is False


def test_delete_unknown_user_is_404(client: TestClient, auth: Callable) -> None:
    assert client.delete("/v1/users/ghost", headers=auth("admin")).status_code == 404
