"""The serving caches' staleness bounds in one process: the active version
(``NME_ACTIVE_VERSION_TTL_SECONDS``) and verified keys (``NME_AUTH_CACHE_SECONDS``).

Changes made behind the app's back (another process's activation or revocation, simulated by
writing to the database directly) are seen within the bound, not before it is needed; an
activation through this process's API is seen at once. Several real API processes:
tests/service/test_api_processes.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.config import Settings
from service.jobs.tasks import refit_model
from service.storage import store
from service.storage.keys import create_key, revoke_key
from tests.service.factories import create_model, features, ingest, simulated_items

TTL = 0.5


@pytest.fixture
def cached(settings: Settings) -> Iterator[TestClient]:
    """An app with both caches on, bounded at ``TTL`` seconds."""
    with_caches = settings.model_copy(
        update={"auth_cache_seconds": TTL, "active_version_ttl_seconds": TTL}
    )
    with TestClient(create_app(with_caches)) as client:
        yield client


@pytest.fixture
def two_versions(
    client: TestClient, auth: Callable, settings: Settings, session_factory: sessionmaker
) -> None:
    """``mood`` with version 1 active and version 2 ready."""
    create_model(client, auth)
    client.app.state.settings = settings.model_copy(update={"user_updates_on_ingest": False})
    ingest(client, auth, simulated_items())
    for activate in (True, False):
        refit_model(session_factory, model_name="mood", artifact_dir=settings.artifact_dir,
                    device="cpu", activate=activate, follow_up_updates=False)


def served_version(client: TestClient, auth: Callable) -> int:
    body = {"items": [{"user_id": "u0001", "features": features()}]}
    response = client.post("/v1/models/mood/predict", json=body, headers=auth("predict"))
    assert response.status_code == 200, response.text
    return response.json()["version"]


def activate_behind_the_apps_back(session_factory: sessionmaker[Session], number: int) -> None:
    """What another process's activation looks like to this one: only the database changes."""
    with session_factory() as session:
        model = store.get_model(session, name="mood")
        assert model is not None
        version = store.get_version(session, model_id=model.id, version=number)
        assert version is not None
        store.activate_version(session, version=version)
        session.commit()


def test_activation_elsewhere_is_served_within_the_bound(
    cached: TestClient, auth: Callable, session_factory: sessionmaker, two_versions: None
) -> None:
    assert served_version(cached, auth) == 1
    activate_behind_the_apps_back(session_factory, 2)
    changed = time.monotonic()
    assert served_version(cached, auth) == 1  # cached: no query for the active version
    while served_version(cached, auth) != 2:
        assert time.monotonic() - changed < TTL + 0.5, "activation not seen within the bound"
        time.sleep(0.02)


def test_activation_through_this_process_is_served_at_once(
    cached: TestClient, auth: Callable, two_versions: None
) -> None:
    assert served_version(cached, auth) == 1
    for number in (2, 1, 2):  # activation and rollback
        response = cached.post(f"/v1/models/mood/versions/{number}/activate", headers=auth("admin"))
        assert response.status_code == 200, response.text
        assert served_version(cached, auth) == number


def test_revoked_key_is_refused_within_the_bound(
    cached: TestClient, session_factory: sessionmaker, two_versions: None
) -> None:
    with session_factory() as session:
        key = create_key(session, name="app", scopes=["predict"])
        session.commit()
    headers = {"Authorization": f"Bearer {key}"}
    assert cached.get("/v1/models", headers=headers).status_code == 200
    with session_factory() as session:
        assert revoke_key(session, key_or_prefix=key)
        session.commit()
    revoked = time.monotonic()
    while (status := cached.get("/v1/models", headers=headers).status_code) != 401:
        assert status == 200
        assert time.monotonic() - revoked < TTL + 0.5, "revocation not seen within the bound"
        time.sleep(0.02)
