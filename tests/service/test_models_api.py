"""Model definitions: create, list, get, versions, activation (rollback), OpenAPI docs."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from nme import NMERegressor
from tests.service.factories import (
    features,
    model_payload,
    predict,
    refit,
)


def test_create_model_is_201_with_the_contract_shape(client: TestClient, auth: Callable) -> None:
    response = client.post("/v1/models", json=model_payload(), headers=auth("admin"))
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "mood"
    assert body["task"] == "regression"
    assert body["features"] == ["weekday", "typing_speed", "screen_minutes", "gps_km"]
    assert body["active_version"] is None
    assert body["classes"] is None and body["states"] is None
    assert body["architecture"]["hidden"] == [8]
    assert body["training"]["max_epochs"] == 4


def test_create_model_stores_the_estimators_defaults(client: TestClient, auth: Callable) -> None:
    payload = {"name": "m", "task": "regression", "features": ["a"], "training": {"lr": 0.01}}
    body = client.post("/v1/models", json=payload, headers=auth("admin")).json()
    defaults = inspect.signature(NMERegressor.__init__).parameters
    assert body["architecture"]["hidden"] == list(defaults["hidden"].default)
    assert body["architecture"]["placement"] == defaults["placement"].default
    assert body["training"]["anneal"] == defaults["anneal"].default
    assert body["training"]["lr"] == 0.01
    assert body["training"]["random_state"] == 0  # the service's choice: reproducible refits


def test_untrainable_placement_is_422_at_creation(client: TestClient, auth: Callable) -> None:
    # (a model stored before this check existed fails its refit instead: test_hostile_input)
    payload = model_payload(architecture={"hidden": [8], "placement": ["layers.7.weight"]})
    response = client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "architecture", "placement"]
    assert "layers.7.weight" in detail["msg"]


def test_duplicate_model_name_is_409(client: TestClient, auth: Callable, mood_model: dict) -> None:
    response = client.post("/v1/models", json=model_payload(), headers=auth("admin"))
    assert response.status_code == 409
    assert "already exists" in response.json()["detail"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"task": "ranking"}, "task"),
        ({"features": []}, "features"),
        ({"features": ["a", "a"]}, "repeated: a"),
        ({"classes": ["x", "y"]}, "classes must be null"),
        ({"task": "classification", "classes": ["only"]}, "at least two classes"),
        ({"task": "sequence", "states": None}, "at least two states"),
        ({"name": "bad name/with slash"}, "name"),
        ({"architecture": {"hidden": [0]}}, "hidden"),
        ({"architecture": {"method": "magic"}}, "method"),
        ({"training": {"lr": -1}}, "lr"),
        ({"training": {"epochs": 3}}, "epochs"),
        ({"training": {"anneal": 1.5}}, "anneal"),
        ({"architecture": {"forbidden_transitions": [["a", "b"]]}}, "sequence models"),
    ],
)
def test_invalid_model_definition_is_422(
    client: TestClient, auth: Callable, overrides: dict, message: str
) -> None:
    payload = model_payload(**overrides)
    if overrides.get("task") == "classification":
        payload["classes"] = overrides["classes"]
    response = client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 422, response.text
    assert message in response.text


def test_list_and_get_models(client: TestClient, auth: Callable, mood_model: dict) -> None:
    client.post("/v1/models", json=model_payload("alpha"), headers=auth("admin"))
    listing = client.get("/v1/models", headers=auth("predict")).json()
    assert listing["count"] == 2
    assert [m["name"] for m in listing["data"]] == ["alpha", "mood"]
    assert client.get("/v1/models/mood", headers=auth("predict")).json() == mood_model


def test_unknown_model_is_404(client: TestClient, auth: Callable) -> None:
    for path in ("/v1/models/nope", "/v1/models/nope/versions"):
        response = client.get(path, headers=auth("admin"))
        assert response.status_code == 404
        assert "nope" in response.json()["detail"]


def test_versions_list_and_rollback(client: TestClient, auth: Callable, trained_mood: dict) -> None:
    items = [{"user_id": "u0001", "features": features()}]
    first = predict(client, auth, items)
    assert refit(client, auth)["version"] == 2
    versions = client.get("/v1/models/mood/versions", headers=auth("admin")).json()
    assert versions["count"] == 2
    assert [(v["version"], v["status"]) for v in versions["data"]] == [(2, "active"), (1, "ready")]
    assert len(versions["data"][0]["artifact_sha256"]) == 64
    assert predict(client, auth, items)["version"] == 2

    response = client.post("/v1/models/mood/versions/1/activate", headers=auth("admin"))
    assert response.status_code == 200
    assert response.json()["status"] == "active"
    assert client.get("/v1/models/mood", headers=auth("admin")).json()["active_version"] == 1
    assert predict(client, auth, items) == first


def test_activate_unknown_version_is_404(
    client: TestClient, auth: Callable, mood_model: dict
) -> None:
    response = client.post("/v1/models/mood/versions/7/activate", headers=auth("admin"))
    assert response.status_code == 404


def test_openapi_documents_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    predict_body = schema["components"]["schemas"]["PredictRequest"]
    assert predict_body["examples"][0]["items"][0]["user_id"] == "u1"
    assert "bearer" in str(schema["components"]["securitySchemes"]).lower()


def test_stored_settings_survive_a_change_of_the_estimators_defaults(
    client: TestClient,
    auth: Callable,
    session_factory: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model keeps the settings it was created with (explicit or defaulted, the fit
    procedure included) when a release changes the estimators' defaults; a new model gets the
    new ones, and a model stored before the fit procedure was recorded keeps the old one."""
    from nme.base import _NMEEstimator
    from service.learning.kinds import kind_for
    from service.learning.kinds.base import LEGACY_TRAINING, PINNED_TRAINING_KEYS
    from service.storage import store

    payload = {"name": "old", "task": "regression", "features": ["a"],
               "training": {"lr": 0.01, "batch_size": 64}}
    created = client.post("/v1/models", json=payload, headers=auth("admin")).json()
    assert created["training"]["m_step"] == "laplace" and created["training"]["tol"] == 1e-4
    assert created["training"]["patience"] == 10 and created["training"]["lr"] == 0.01

    # a release with other defaults (the service reads them from the signature)
    init = _NMEEstimator.__init__
    names = [n for n, p in inspect.signature(init).parameters.items()
             if p.default is not inspect.Parameter.empty]
    changed = {"patience": 3, "m_step": "paper", "tol": 1e-2, "e_step": "final",
               "anneal": 0.5, "max_epochs": 7}
    defaults = dict(zip(names, init.__defaults__, strict=True))
    monkeypatch.setattr(init, "__defaults__",
                        tuple({**defaults, **changed}[n] for n in names))

    again = client.get("/v1/models/old", headers=auth("admin")).json()
    assert again["training"] == created["training"]
    assert again["architecture"] == created["architecture"]
    with session_factory() as session:
        model = store.get_model(session, name="old")
        assert model is not None
        params = kind_for("regression").build_estimator(model, device="cpu").get_params()
    for key, value in created["training"].items():
        assert params[key] == value, key

    fresh = {**payload, "name": "new", "training": {"lr": 0.01}}
    new = client.post("/v1/models", json=fresh, headers=auth("admin")).json()
    for key in changed:
        assert new["training"][key] == changed[key], key

    # stored before the fit procedure was recorded: the procedure of that time, not today's
    with session_factory() as session:
        model = store.get_model(session, name="old")
        assert model is not None
        model.training = {k: v for k, v in model.training.items()
                          if k not in PINNED_TRAINING_KEYS}
        session.commit()
        params = kind_for("regression").build_estimator(model, device="cpu").get_params()
    for key, value in LEGACY_TRAINING["regression"].items():
        assert params[key] == value, key
