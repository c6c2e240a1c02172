"""Every list pages the same way: ``?limit=&cursor=`` → ``{data, count (total), next_cursor}``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.api.paging import decode_cursor, encode_cursor
from service.errors import InvalidInput
from service.storage import store
from service.storage.tables import Job
from tests.service.factories import create_model

Auth = Callable[[str], dict[str, str]]


def walk(client: TestClient, auth: Auth, path: str, limit: int, **params: str) -> list[list]:
    """Follow ``next_cursor`` to the end; returns the pages' data, checking every page's count."""
    pages, cursor, totals = [], None, set()
    while True:
        query = {"limit": str(limit), **params, **({"cursor": cursor} if cursor else {})}
        response = client.get(path, params=query, headers=auth("admin"))
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["data"])
        totals.add(body["count"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 100, "paging does not terminate"
    assert len(totals) == 1 and totals.pop() == sum(len(p) for p in pages)
    return pages


def test_models_page_by_name_with_the_total_count(client: TestClient, auth: Auth) -> None:
    for name in ("e", "a", "d", "b", "c"):
        create_model(client, auth, name=name)
    pages = walk(client, auth, "/v1/models", limit=2)
    assert [[m["name"] for m in page] for page in pages] == [["a", "b"], ["c", "d"], ["e"]]


def test_exactly_full_last_page_has_no_cursor(client: TestClient, auth: Auth) -> None:
    for name in ("a", "b"):
        create_model(client, auth, name=name)
    body = client.get("/v1/models", params={"limit": 2}, headers=auth("admin")).json()
    assert (len(body["data"]), body["count"], body["next_cursor"]) == (2, 2, None)


def test_jobs_page_past_the_first_thousand(
    client: TestClient, auth: Auth, mood_model: dict, session_factory: sessionmaker[Session]
) -> None:
    with session_factory() as session:
        model = store.get_model(session, name="mood")
        assert model is not None
        session.add_all(
            Job(kind="refit", model_id=model.id, status="succeeded") for _ in range(1203)
        )
        session.commit()
    pages = walk(client, auth, "/v1/models/mood/jobs", limit=1000)
    ids = [job["id"] for page in pages for job in page]
    assert [len(p) for p in pages] == [1000, 203]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 1203
    filtered = client.get(
        "/v1/models/mood/jobs", params={"status": "queued"}, headers=auth("admin")
    ).json()
    assert (filtered["count"], filtered["data"], filtered["next_cursor"]) == (0, [], None)


@pytest.mark.parametrize(
    "cursor",
    [
        "not-base64!",
        "e30",  # {}
        encode_cursor("a-name"),  # a string key on an id-ordered list
        encode_cursor(2**80),
        "eyJhZnRlciI6dHJ1ZX0",  # {"after":true}
        "x" * 257,
    ],
)
def test_bad_cursor_is_422_naming_the_cursor(
    client: TestClient, auth: Auth, mood_model: dict, cursor: str
) -> None:
    response = client.get(
        "/v1/models/mood/versions", params={"cursor": cursor}, headers=auth("admin")
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "cursor"]


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "1e3", "99999999999999999999"])
def test_limit_out_of_range_is_422(client: TestClient, auth: Auth, limit: str) -> None:
    response = client.get("/v1/models", params={"limit": limit}, headers=auth("admin"))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "limit"]


def test_cursor_round_trips_keys_of_either_type() -> None:
    assert decode_cursor(encode_cursor(41), int) == 41
    assert decode_cursor(encode_cursor("mood-ü"), str) == "mood-ü"
    assert decode_cursor(None, int) is None
    with pytest.raises(InvalidInput):
        decode_cursor(encode_cursor(41), str)
