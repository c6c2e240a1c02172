"""Regression tests for issue 11, "The API under hostile input": one test (or more) for every
case its "What we see today" list names, on SQLite and PostgreSQL. None may answer a 5xx."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.config import Settings
from service.storage.tables import Model, User, utcnow
from tests.service.factories import (
    features,
    get_job,
    model_payload,
    run_jobs,
    sequence_model_payload,
)

# ------------------------------------------------------------------- server errors on plain input


@pytest.mark.parametrize(
    "job_id", ["99999999999999999999999", "9223372036854775808", "2147483648", "0", "-1", "1e3"]
)
def test_job_ids_beyond_the_column_are_4xx(client: TestClient, auth: Callable, job_id: str) -> None:
    response = client.get(f"/v1/jobs/{job_id}", headers=auth("admin"))
    assert response.status_code in (404, 422), response.text
    if response.status_code == 422:
        assert response.json()["detail"][0]["loc"] == ["path", "job_id"]


@pytest.mark.parametrize("version", [str(2**63), str(2**31), "0", "-5"])
def test_activating_a_version_beyond_the_column_is_4xx(
    client: TestClient, auth: Callable, mood_model: dict, version: str
) -> None:
    response = client.post(f"/v1/models/mood/versions/{version}/activate", headers=auth("admin"))
    assert response.status_code in (404, 422), response.text


def raw_post(client: TestClient, path: str, text: str, headers: dict) -> object:
    """POST ``text`` as a JSON body byte for byte (escapes such as ``\\ud800`` stay escapes)."""
    return client.post(
        path, content=text.encode(), headers={**headers, "Content-Type": "application/json"}
    )


def observation_text(user_id_json: str) -> str:
    item = json.dumps({"day": "2026-01-01", "features": features(), "label": 50.0})
    return '{"items": [{"user_id": ' + user_id_json + ", " + item[1:] + "]}"


def predict_text(user_id_json: str) -> str:
    feature_map = json.dumps(features())
    return '{"items": [{"user_id": ' + user_id_json + ', "features": ' + feature_map + "}]}"


@pytest.mark.parametrize(
    "user_id_json",
    [r'"a\ud800b"', r'"\udfff"', r'"a\u0000b"', r'"tab\there"', r'"\u007f"', r'"\u0085"'],
)
def test_user_ids_with_surrogates_or_control_characters_are_422(
    client: TestClient, auth: Callable, trained_mood: dict, user_id_json: str
) -> None:
    for path, text, role in [
        ("/v1/models/mood/observations", observation_text(user_id_json), "ingest"),
        ("/v1/models/mood/predict", predict_text(user_id_json), "predict"),
    ]:
        response = raw_post(client, path, text, auth(role))
        assert response.status_code == 422, (path, response.text)
        detail = response.json()["detail"]
        assert detail[0]["loc"] == ["body", "items", 0, "user_id"], detail


def test_lone_surrogate_elsewhere_in_a_body_is_422(
    client: TestClient, auth: Callable, mood_model: dict
) -> None:
    text = '{"items": [{"user_id": "u1", "day": "2026-01-01", "features": {"\\ud800": 1.0}}]}'
    response = raw_post(client, "/v1/models/mood/observations", text, auth("ingest"))
    assert response.status_code == 422
    text = '{"name": "x", "task": "regression", "features": ["a\\udc00"]}'
    assert raw_post(client, "/v1/models", text, auth("admin")).status_code == 422


def test_nul_anywhere_in_stored_text_is_422_on_both_databases(
    client: TestClient, auth: Callable, mood_model: dict
) -> None:
    bad_feature = model_payload(name="nul", features=["a\x00b"])
    assert client.post("/v1/models", json=bad_feature, headers=auth("admin")).status_code == 422
    classes = model_payload(name="cls", task="classification", classes=["lo\x00", "hi"])
    assert client.post("/v1/models", json=classes, headers=auth("admin")).status_code == 422
    affect = sequence_model_payload()
    assert client.post("/v1/models", json=affect, headers=auth("admin")).status_code == 201
    sequence = {
        "user_id": "u1",
        "sequence_id": "s\x001",
        "segments": [{"features": {"pitch": 1.0, "energy": 0.0}}],
    }
    response = client.post(
        "/v1/models/affect/sequences", json={"items": [sequence]}, headers=auth("ingest")
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "items", 0, "sequence_id"]


def test_nul_in_path_parameters_is_4xx(
    client: TestClient, auth: Callable, mood_model: dict
) -> None:
    assert client.get("/v1/models/mo%00od", headers=auth("admin")).status_code in (404, 422)
    assert client.get("/v1/models/mood/users/a%00b", headers=auth("predict")).status_code == 404
    assert client.delete("/v1/users/a%00b", headers=auth("admin")).status_code == 404


# --------------------------------------------------------------------- ids that cannot be forgotten


@pytest.mark.parametrize(
    "user_id", ["team/alice", " ", "\t \n", "\u3000", "", "x" * 129, ".", ".."]
)
def test_new_user_ids_breaking_the_rule_are_422(
    client: TestClient, auth: Callable, mood_model: dict, user_id: str
) -> None:
    item = {"user_id": user_id, "day": "2026-01-01", "features": features(), "label": 1.0}
    response = client.post(
        "/v1/models/mood/observations", json={"items": [item]}, headers=auth("ingest")
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "items", 0, "user_id"]


@pytest.mark.parametrize("user_id", ["ünïcødé-😀", "a b", "x" * 128, "alice@example.com", "100%"])
def test_user_ids_within_the_rule_round_trip(
    client: TestClient, auth: Callable, mood_model: dict, user_id: str
) -> None:
    item = {"user_id": user_id, "day": "2026-01-01", "features": features(), "label": 1.0}
    response = client.post(
        "/v1/models/mood/observations", json={"items": [item]}, headers=auth("ingest")
    )
    assert response.status_code == 200, response.text
    from urllib.parse import quote

    path = quote(user_id, safe="")
    response = client.get(f"/v1/models/mood/users/{path}", headers=auth("predict"))
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == user_id
    assert client.delete(f"/v1/users/{path}", headers=auth("admin")).status_code == 204
    assert client.get(f"/v1/models/mood/users/{path}", headers=auth("predict")).status_code == 404


def legacy_user(session_factory: sessionmaker[Session], external_id: str) -> None:
    """A user stored before the id rule existed (the old API accepted it)."""
    with session_factory() as session:
        session.add(User(external_id=external_id, created_at=utcnow()))
        session.commit()


@pytest.mark.parametrize(
    ("external_id", "path"),
    [("team/alice", "team%2Falice"), ("team/alice", "team/alice"), ("  ", "%20%20"),
     ("tab\tid", "tab%09id"), ("a/b/c/", "a%2Fb%2Fc%2F")],
)
def test_stored_ids_breaking_the_rule_stay_readable_and_deletable(
    client: TestClient,
    auth: Callable,
    mood_model: dict,
    session_factory: sessionmaker[Session],
    external_id: str,
    path: str,
) -> None:
    legacy_user(session_factory, external_id)
    response = client.get(f"/v1/models/mood/users/{path}", headers=auth("predict"))
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == external_id
    assert client.delete(f"/v1/users/{path}", headers=auth("admin")).status_code == 204
    assert client.get(f"/v1/models/mood/users/{path}", headers=auth("predict")).status_code == 404
    with session_factory() as session:
        assert session.scalar(select(User).where(User.external_id == external_id)) is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # PostgreSQL refused NUL
def test_stored_nul_id_is_deletable_on_sqlite(
    client: TestClient, auth: Callable, mood_model: dict, session_factory: sessionmaker[Session]
) -> None:
    legacy_user(session_factory, "a\x00b")
    assert client.get("/v1/models/mood/users/a%00b", headers=auth("predict")).status_code == 200
    assert client.delete("/v1/users/a%00b", headers=auth("admin")).status_code == 204


# ------------------------------------------------------------------------------ unbounded requests


@pytest.fixture
def small_body_client(settings: Settings) -> Iterator[TestClient]:
    """An app that accepts bodies up to 64 KiB."""
    with TestClient(create_app(settings.model_copy(update={"max_body_bytes": 65_536}))) as c:
        yield c


def test_body_over_the_limit_is_413_from_content_length(
    small_body_client: TestClient, auth: Callable
) -> None:
    body = b'{"items": [' + b"1," * 40_000 + b"1]}"
    response = small_body_client.post(
        "/v1/models/mood/predict",
        content=body,
        headers={**auth("predict"), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert "NME_MAX_BODY_BYTES" in response.json()["detail"]


def test_body_over_the_limit_is_413_while_streaming(
    small_body_client: TestClient, auth: Callable
) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"items": ['
        for _ in range(100):
            yield b"1," * 1000
        yield b"1]}"

    response = small_body_client.post(
        "/v1/models/mood/predict",
        content=chunks(),
        headers={**auth("predict"), "Content-Type": "application/json"},
    )
    assert response.status_code == 413


def test_422_quotes_only_an_excerpt_of_the_input(
    client: TestClient, auth: Callable, mood_model: dict
) -> None:
    huge = "x" * 500_000
    body = {"items": [{"user_id": huge, "day": "2026-01-01", "features": features()}]}
    response = client.post("/v1/models/mood/observations", json=body, headers=auth("ingest"))
    assert response.status_code == 422
    assert len(response.content) < 2_000
    # a body that is not JSON at all is not echoed back either
    response = client.post(
        "/v1/models/mood/observations",
        content=b"\xff" * 200_000,
        headers={**auth("ingest"), "Content-Type": "text/plain"},
    )
    assert response.status_code == 422
    assert len(response.content) < 2_000


def test_422_survives_non_finite_and_deeply_nested_input(
    client: TestClient, auth: Callable, mood_model: dict
) -> None:
    text = '{"items": [{"user_id": "u1", "features": {"weekday": NaN}, "x": Infinity}]}'
    response = raw_post(client, "/v1/models/mood/predict", text, auth("predict"))
    assert response.status_code == 422
    deep = '{"items": ' + "[" * 900 + "]" * 900 + "}"
    response = raw_post(client, "/v1/models/mood/predict", deep, auth("predict"))
    assert response.status_code in (400, 422)
    deeper = '{"items": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = raw_post(client, "/v1/models/mood/predict", deeper, auth("predict"))
    assert response.status_code in (400, 413, 422)


class ReceiveSpy:
    """An ASGI ``receive`` that records whether the app ever asked for the body."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.calls = 0

    async def __call__(self) -> dict:
        self.calls += 1
        return {"type": "http.request", "body": self.body, "more_body": False}


def call_asgi(client: TestClient, method: str, path: str, headers: dict, body: bytes) -> tuple:
    """Run one request through the app with a spying ``receive``; returns (status, spy)."""
    spy = ReceiveSpy(body)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "state": {},
    }
    client.portal.call(client.app, scope, spy, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], spy


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nme_000000000000_nope"}, {"Authorization": "Basic eDp5"}],
)
def test_unauthenticated_requests_are_401_before_the_body_is_read(
    client: TestClient, keys: dict, headers: dict
) -> None:
    body = b'{"items": [' + b"1," * 1_000_000 + b"1]}"
    headers = {**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}
    status, spy = call_asgi(client, "POST", "/v1/models/mood/predict", headers, body)
    assert status == 401
    assert spy.calls == 0


def test_malformed_json_without_a_key_is_401(client: TestClient) -> None:
    response = client.post(
        "/v1/models", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 401


def test_feature_map_size_is_limited_and_named(
    client: TestClient, auth: Callable, trained_mood: dict, settings: Settings
) -> None:
    many = {f"f{k}": 1.0 for k in range(settings.max_features + 1)}
    response = client.post(
        "/v1/models/mood/predict",
        json={
            "items": [
                {"user_id": "u1", "features": features()},
                {"user_id": "u2", "features": many},
            ]
        },
        headers=auth("predict"),
    )
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "items", 1, "features"]
    assert "NME_MAX_FEATURES" in detail["msg"]


@pytest.fixture
def small_client(settings: Settings) -> Iterator[TestClient]:
    """An app with small segment and feature limits."""
    limits = {"max_segments": 10, "max_segments_per_request": 50, "max_features": 8}
    with TestClient(create_app(settings.model_copy(update=limits))) as c:
        yield c


@pytest.fixture
def affect(small_client: TestClient, auth: Callable) -> dict:
    payload = sequence_model_payload()
    response = small_client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 201, response.text
    return response.json()


def segs(n: int) -> list[dict]:
    return [{"features": {"pitch": 0.1, "energy": 0.2}}] * n


def test_segments_per_sequence_are_limited_and_named(
    small_client: TestClient, auth: Callable, affect: dict
) -> None:
    items = [
        {"user_id": "u1", "sequence_id": "short", "segments": segs(3)},
        {"user_id": "u1", "sequence_id": "long", "segments": segs(11)},
    ]
    response = small_client.post(
        "/v1/models/affect/sequences", json={"items": items}, headers=auth("ingest")
    )
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "items", 1, "segments"]
    assert "NME_MAX_SEGMENTS" in detail["msg"]
    response = small_client.post(
        "/v1/models/affect/decode",
        json={"user_id": "u1", "segments": segs(11)},
        headers=auth("predict"),
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "segments"]


def test_total_segments_per_request_are_limited_and_named(
    small_client: TestClient, auth: Callable, affect: dict
) -> None:
    items = [{"user_id": "u1", "sequence_id": f"s{k}", "segments": segs(10)} for k in range(6)]
    response = small_client.post(
        "/v1/models/affect/sequences", json={"items": items}, headers=auth("ingest")
    )
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "items"]
    assert "NME_MAX_SEGMENTS_PER_REQUEST" in detail["msg"]
    # within both limits: stored
    response = small_client.post(
        "/v1/models/affect/sequences", json={"items": items[:5]}, headers=auth("ingest")
    )
    assert response.status_code == 200, response.text


def test_segment_feature_maps_are_limited_too(
    small_client: TestClient, auth: Callable, affect: dict
) -> None:
    wide = [{"features": {f"f{k}": 0.0 for k in range(9)}}]
    response = small_client.post(
        "/v1/models/affect/decode", json={"user_id": "u1", "segments": wide},
        headers=auth("predict"),
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "segments", 0, "features"]


def test_model_with_too_many_features_is_422(small_client: TestClient, auth: Callable) -> None:
    payload = model_payload(name="wide", features=[f"f{k}" for k in range(9)])
    response = small_client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "features"]


# ------------------------------------------------------------ model definitions that cannot run


def test_model_over_the_parameter_budget_is_422(client: TestClient, auth: Callable) -> None:
    architecture = {"hidden": [4096] * 8, "placement": "all", "method": "nme"}
    payload = model_payload(
        name="huge", features=[f"f{k}" for k in range(10_000)], architecture=architecture
    )
    response = client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 422, response.text[:500]
    assert len(response.content) < 5_000
    payload["features"] = payload["features"][:1000]
    response = client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 422, response.text[:500]
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "architecture", "hidden"]
    assert "NME_MAX_GENERIC_PARAMETERS" in detail["msg"]


def test_person_parameters_over_the_budget_are_422(
    client: TestClient, auth: Callable, settings: Settings
) -> None:
    payload = model_payload(
        name="wide", architecture={"hidden": [512, 512], "placement": "all", "method": "nme"}
    )
    response = client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 422, response.text[:500]
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "architecture", "placement"]
    assert "NME_MAX_PERSON_PARAMETERS" in detail["msg"]
    # the same network with θⁱ on the last layer only is fine
    payload["architecture"]["placement"] = "last"
    assert client.post("/v1/models", json=payload, headers=auth("admin")).status_code == 201


@pytest.mark.parametrize(
    ("task", "architecture", "field"),
    [
        ("regression", {"placement": ["layers.7.weight"]}, "placement"),
        ("regression", {"placement": "T"}, "placement"),
        ("regression", {"placement": "bogus"}, "placement"),
        ("regression", {"placement": ["(("]}, "placement"),
        ("regression", {"placement": []}, "placement"),
        ("sequence", {"placement": "everything"}, "placement"),
        ("sequence", {"placement": ["start"], "learn_start_end": True}, "placement"),
    ],
)
def test_untrainable_architecture_is_422_at_creation(
    client: TestClient, auth: Callable, task: str, architecture: dict, field: str
) -> None:
    payload = model_payload(name="bad", task=task, architecture={"hidden": [8], **architecture})
    if task == "sequence":
        payload["features"] = ["pitch", "energy"]
    response = client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "architecture", field]


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({"random_state": 2**80}, "random_state"),
        ({"random_state": -1}, "random_state"),
        ({"patience": 10**30}, "patience"),
        ({"weight_decay": 1e308}, "weight_decay"),
        ({"max_epochs": 2**63}, "max_epochs"),
    ],
)
def test_out_of_range_training_options_are_422(
    client: TestClient, auth: Callable, training: dict, field: str
) -> None:
    payload = model_payload(training=training)
    response = client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "training", field]


def test_infinite_training_option_is_422(client: TestClient, auth: Callable) -> None:
    text = json.dumps(model_payload()).replace('"lr": 0.01', '"lr": 0.01, "weight_decay": Infinity')
    assert "Infinity" in text
    assert raw_post(client, "/v1/models", text, auth("admin")).status_code == 422


def test_anneal_null_is_the_plain_m_step_and_refits_use_it(
    client: TestClient, auth: Callable, session_factory: sessionmaker[Session]
) -> None:
    training = {"max_epochs": 3, "batch_size": 64, "anneal": None}
    payload = model_payload(training=training)
    response = client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 201, response.text
    assert response.json()["training"]["anneal"] is None
    omitted = client.post(
        "/v1/models", json=model_payload(name="omitted", training={}), headers=auth("admin")
    )
    assert omitted.json()["training"]["anneal"] == 0.8
    with session_factory() as session:
        model = session.scalar(select(Model).where(Model.name == "mood"))
        from service.learning.kinds import kind_of

        estimator = kind_of(model).build_estimator(model, device="cpu")
        assert estimator.anneal is None


def test_mlp_lme_is_not_offered_by_the_service(client: TestClient, auth: Callable) -> None:
    payload = model_payload(architecture={"hidden": [8], "method": "mlp-lme"})
    response = client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "architecture", "method"]
    method = client.app.openapi()["components"]["schemas"]["ArchitectureSpec"]["properties"][
        "method"
    ]
    assert "mlp-lme" not in json.dumps(method["anyOf"])


def test_legacy_model_with_bad_placement_still_fails_its_refit_cleanly(
    client: TestClient, auth: Callable, session_factory: sessionmaker[Session]
) -> None:
    """A model stored before creation-time validation existed fails at refit, without retries."""
    response = client.post("/v1/models", json=model_payload(), headers=auth("admin"))
    assert response.status_code == 201
    with session_factory() as session:
        model = session.scalar(select(Model).where(Model.name == "mood"))
        model.architecture = {**model.architecture, "placement": ["layers.7.weight"]}
        session.commit()
    items = [
        {"user_id": f"u{k % 3}", "day": f"2026-01-{k + 1:02d}", "features": features(),
         "label": float(k)}
        for k in range(12)
    ]
    client.post("/v1/models/mood/observations", json={"items": items}, headers=auth("ingest"))
    response = client.post("/v1/models/mood/refit", headers=auth("admin"))
    assert response.status_code == 202
    run_jobs(client)
    job = get_job(client, auth, response.json()["job"]["id"])
    assert (job["status"], job["attempts"]) == ("failed", 1)


@pytest.mark.parametrize("key", ["a\x00b", "\ud800", "x" * 300])
def test_forged_cursor_with_unstorable_text_is_422(
    client: TestClient, auth: Callable, mood_model: dict, key: str
) -> None:
    import base64

    raw = json.dumps({"after": key}).encode()  # json escapes NUL and surrogates
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    response = client.get(f"/v1/models?cursor={cursor}", headers=auth("admin"))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "cursor"]
