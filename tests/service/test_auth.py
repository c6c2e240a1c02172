"""API keys: hashed at rest, Bearer header, 401/403, revocation, and every route guarded."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import BaseRoute

from service.auth import generate_key, key_matches, key_prefix, parse_scopes
from service.storage.keys import create_key, revoke_key
from service.storage.tables import ApiKey

OPEN_ROUTES = {"/healthz", "/readyz"}
FILLERS = {"name": "mood", "version": "1", "user_id": "u1", "job_id": "1"}


def walk(routes: Sequence[BaseRoute]) -> Iterator[APIRoute]:
    """Every APIRoute under ``routes``, descending into included routers.

    Recent FastAPI keeps an included router as one node (holding ``original_router``) instead
    of copying its routes into ``app.routes``.
    """
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from walk(route.original_router.routes)


def api_routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, route path) of every API route in ``app.routes``."""
    return sorted(
        (method, re.sub(r":path}", "}", route.path))  # OpenAPI drops the path convertor
        for route in walk(client.app.routes)
        for method in route.methods
    )


def test_route_walk_finds_every_documented_operation(client: TestClient) -> None:
    documented = sorted(
        (method.upper(), path)
        for path, operations in client.app.openapi()["paths"].items()
        for method in operations
    )
    assert api_routes(client) == documented


def test_every_route_but_health_refuses_anonymous_requests(client: TestClient) -> None:
    routes = api_routes(client)
    assert len(routes) == 20  # + GET …/events, DELETE /v1/models/{name}/users/{user_id}
    for method, template in routes:
        path = re.sub(r"{(\w+)}", lambda m: FILLERS[m.group(1)], template)
        response = client.request(method, path)
        if path in OPEN_ROUTES:
            assert response.status_code == 200, path
        else:
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header",
    ["Bearer nme_000000000000_not-a-key", "Bearer garbage", "Basic dXNlcjpwdw==", "Bearer "],
)
def test_bad_credentials_are_401(client: TestClient, keys: dict, header: str) -> None:
    response = client.get("/v1/models", headers={"Authorization": header})
    assert response.status_code == 401


def test_key_with_right_prefix_but_wrong_secret_is_401(client: TestClient, keys: dict) -> None:
    forged = keys["admin"][:-4] + "AAAA"
    response = client.get("/v1/models", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401


def test_missing_scope_is_403(client: TestClient, auth: Callable, mood_model: dict) -> None:
    body = {"items": [{"user_id": "u1", "features": {}}]}
    assert (
        client.post("/v1/models/mood/predict", json=body, headers=auth("ingest")).status_code == 403
    )
    assert client.post("/v1/models", json={}, headers=auth("predict")).status_code == 403
    assert client.delete("/v1/users/u1", headers=auth("ingest")).status_code == 403
    response = client.post("/v1/models/mood/observations", json={}, headers=auth("admin"))
    assert response.status_code == 403
    assert "ingest" in response.json()["detail"]


def test_any_valid_key_can_read_models(client: TestClient, auth: Callable) -> None:
    for role in ("admin", "ingest", "predict"):
        assert client.get("/v1/models", headers=auth(role)).status_code == 200


def test_revoked_key_is_401(
    client: TestClient, session_factory: sessionmaker[Session], keys: dict, auth: Callable
) -> None:
    assert client.get("/v1/models", headers=auth("predict")).status_code == 200
    with session_factory() as session:
        assert revoke_key(session, key_or_prefix=keys["predict"])
        session.commit()
    response = client.get("/v1/models", headers=auth("predict"))
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


def test_only_the_hash_is_stored(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        plaintext = create_key(session, name="k", scopes=["predict"])
        session.commit()
        row = session.scalars(select(ApiKey)).one()
    assert plaintext not in (row.key_hash, row.prefix)
    assert plaintext.split("_", 2)[2] not in row.key_hash
    assert key_matches(plaintext, row.key_hash)
    assert row.prefix == key_prefix(plaintext)


def test_generated_keys_are_unique_and_well_formed() -> None:
    keys = [generate_key() for _ in range(50)]
    assert len({k.plaintext for k in keys}) == 50
    assert all(key_prefix(k.plaintext) == k.prefix for k in keys)
    assert not key_matches(keys[0].plaintext, keys[1].key_hash)


def test_parse_scopes_refuses_unknown_scopes() -> None:
    assert parse_scopes("predict, admin") == ["admin", "predict"]
    with pytest.raises(ValueError, match="subset"):
        parse_scopes("predict,root")
    with pytest.raises(ValueError):
        parse_scopes("")
