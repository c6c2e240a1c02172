"""Keys limited to named models: every route, the scoped admin, the per-model forget, the CLI."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.cli import main
from service.config import Settings
from service.jobs import queue
from service.storage.keys import create_key
from service.storage.tables import Job, Model, Observation, PersonParam, User
from tests.service.factories import create_model, features, ingest, run_jobs, simulated_items
from tests.service.test_auth import OPEN_ROUTES, api_routes

Auth = Callable[[str], dict[str, str]]
EVERYWHERE_ONLY = {("POST", "/v1/models"), ("GET", "/metrics"), ("DELETE", "/v1/users/{user_id}")}


def scoped_key(session_factory: sessionmaker[Session], models: list[str]) -> dict[str, str]:
    """The header of a key with every scope, limited to ``models``."""
    with session_factory() as session:
        key = create_key(
            session, name="app-b", scopes=["admin", "ingest", "predict"], models=models
        )
        session.commit()
    return {"Authorization": f"Bearer {key}"}


def test_a_scoped_key_reaches_only_its_models_on_every_route(
    client: TestClient, auth: Auth, trained_mood: dict, session_factory: sessionmaker[Session]
) -> None:
    create_model(client, auth, name="other")
    run_jobs(client)
    with session_factory() as session:
        job_id = session.scalar(select(func.min(Job.id)))
    headers = scoped_key(session_factory, ["other"])
    fillers = {"name": "mood", "version": "1", "user_id": "u0001", "job_id": str(job_id)}
    for method, template in api_routes(client):
        path = re.sub(r"{(\w+)}", lambda m: fillers[m.group(1)], template)
        response = client.request(method, path, headers=headers, json={})
        if path in OPEN_ROUTES:
            assert response.status_code == 200
        elif (method, template) in EVERYWHERE_ONLY:
            assert response.status_code == 403, (method, path, response.text)
        elif template == "/v1/models":
            assert [m["name"] for m in response.json()["data"]] == ["other"]
            assert response.json()["count"] == 1
        else:  # a model route or a job of another model: as if it did not exist
            assert response.status_code == 404, (method, path, response.status_code)
            assert "mood" in response.text or str(job_id) in response.text


def test_a_scoped_admin_manages_its_own_model(
    client: TestClient, auth: Auth, trained_mood: dict, session_factory: sessionmaker[Session]
) -> None:
    run_jobs(client)
    headers = scoped_key(session_factory, ["mood"])
    job = client.post("/v1/models/mood/refit", headers=headers)
    assert job.status_code == 202
    assert client.get(f"/v1/jobs/{job.json()['job']['id']}", headers=headers).status_code == 200
    assert client.get("/v1/models/mood/jobs", headers=headers).json()["count"] >= 1
    run_jobs(client)
    assert client.post("/v1/models/mood/versions/1/activate", headers=headers).status_code == 200
    events = client.get("/v1/models/mood/events", headers=headers).json()["data"]
    assert events[0]["actor"] == "key:app-b"
    assert client.delete("/v1/models/mood/users/u0001", headers=headers).status_code == 204
    assert client.delete("/v1/users/u0002", headers=headers).status_code == 403


def test_forgetting_a_user_in_one_model_leaves_the_others(
    client: TestClient, auth: Auth, trained_mood: dict, session_factory: sessionmaker[Session]
) -> None:
    run_jobs(client)
    create_model(client, auth, name="mood2")
    ingest(client, auth, simulated_items(n_users=2, n_days=5), name="mood2")
    with session_factory() as session:
        mood = session.scalar(select(Model.id).where(Model.name == "mood"))
        user = session.scalar(select(User.id).where(User.external_id == "u0001"))
        queue.enqueue_job(session, kind="user_update", model_id=mood, user_id=user)
        session.commit()
    response = client.delete("/v1/models/mood/users/u0001", headers=auth("admin"))
    assert response.status_code == 204
    with session_factory() as session:
        def count(table: type, **where: int) -> int:
            conditions = [getattr(table, k) == v for k, v in where.items()]
            return session.scalar(select(func.count()).select_from(table).where(*conditions))

        assert count(Observation, model_id=mood, user_id=user) == 0
        assert count(Observation, user_id=user) == 5  # mood2 keeps its days
        assert count(PersonParam, user_id=user) == 0
        assert count(Job, model_id=mood, user_id=user, status="queued") == 0
    answer = client.post(
        "/v1/models/mood/predict", json={"items": [{"user_id": "u0001", "features": features()}]},
        headers=auth("predict"),
    ).json()
    assert answer["predictions"][0]["personalized"] is False
    assert client.delete("/v1/models/mood/users/nobody", headers=auth("admin")).status_code == 404


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("NME_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("NME_ARTIFACT_DIR", str(settings.artifact_dir))
    return settings


def test_cli_creates_and_lists_scoped_keys(
    env: Settings, client: TestClient, capsys: pytest.CaptureFixture
) -> None:
    assert main(["create-key", "--name", "app-a", "--scopes", "predict", "--models",
                 "mood, affect"]) == 0
    key = capsys.readouterr().out.strip()
    assert main(["create-key", "--name", "ops", "--scopes", "admin"]) == 0
    capsys.readouterr()
    assert main(["list-keys"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"app-a\s+predict\s+affect,mood\s", listing), listing
    assert re.search(r"ops\s+admin\s+\*\s", listing), listing
    assert key not in listing
    assert main(["create-key", "--name", "x", "--scopes", "predict", "--models", "a/b"]) == 1
    assert "not a model name: a/b" in capsys.readouterr().err
