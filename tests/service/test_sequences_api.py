"""Sequence models end to end: ingest → refit (NME-CRF) → decode, transitions per user."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from tests.service.factories import (
    FORBIDDEN,
    STATES,
    features,
    model_payload,
    refit,
    sequence_model_payload,
    simulated_sequences,
)


def segments(n: int = 5) -> list[dict]:
    """``n`` segments cycling through a few feature values."""
    values = itertools.islice(itertools.cycle([(1.5, -0.5), (-1.0, 1.0), (0.2, 0.3)]), n)
    return [{"features": {"pitch": a, "energy": b}} for a, b in values]


def decode(client: TestClient, auth: Callable, **body: object) -> dict:
    response = client.post("/v1/models/affect/decode", json=body, headers=auth("predict"))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def affect_model(client: TestClient, auth: Callable) -> dict:
    """An empty sequence model ``affect``."""
    response = client.post("/v1/models", json=sequence_model_payload(), headers=auth("admin"))
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def trained_affect(client: TestClient, auth: Callable, affect_model: dict) -> dict:
    """``affect`` with 6 users × 10 labelled sequences and an active version 1."""
    items = simulated_sequences()
    response = client.post(
        "/v1/models/affect/sequences", json={"items": items}, headers=auth("ingest")
    )
    assert response.json() == {"inserted": 60, "updated": 0}
    return refit(client, auth, name="affect")


def test_sequence_model_defaults_come_from_the_tagger(affect_model: dict) -> None:
    assert affect_model["architecture"]["placement"] == "last+T"
    assert affect_model["architecture"]["forbidden_transitions"] == FORBIDDEN
    assert affect_model["states"] == STATES


def test_a_sequence_model_keeps_its_sigma2_rule(affect_model: dict, session_factory) -> None:
    """σ² = ½ (the tagger's default since the exact Tⁱ E-step) is recorded with a new model;
    a model stored before it trains with the rule of its time, the mean loss."""
    from service.learning.kinds import kind_for
    from service.storage import store

    assert affect_model["training"]["sigma2"] == "nll"
    with session_factory() as session:
        model = store.get_model(session, name="affect")
        assert model is not None
        kind = kind_for("sequence")
        assert kind.build_estimator(model, device="cpu").sigma2 == "nll"
        model.training = {k: v for k, v in model.training.items() if k != "sigma2"}
        assert kind.build_estimator(model, device="cpu").sigma2 == "mean_loss"


def test_refit_trains_a_sequence_version(trained_affect: dict) -> None:
    assert trained_affect["version"] == 1 and trained_affect["status"] == "active"
    metrics = trained_affect["metrics"]
    assert metrics["score_name"] == "segment_accuracy"
    assert metrics["n_train"] == 48 and metrics["n_val"] == 12 and metrics["n_users"] == 6
    assert 0 <= metrics["val_score"] <= 1


def test_decode_personalised_user(client: TestClient, auth: Callable, trained_affect: dict) -> None:
    body = decode(client, auth, user_id="s001", segments=segments(7))
    assert body["model"] == "affect" and body["version"] == 1
    assert body["personalized"] is True
    assert len(body["path"]) == 7 and set(body["path"]) <= set(STATES)
    assert isinstance(body["score"], float)
    assert body["marginals"] is None
    forbidden = {tuple(pair) for pair in FORBIDDEN}
    assert not forbidden & set(itertools.pairwise(body["path"]))


def test_decode_with_marginals(client: TestClient, auth: Callable, trained_affect: dict) -> None:
    body = decode(client, auth, user_id="stranger", segments=segments(4), marginals=True)
    assert body["personalized"] is False
    assert len(body["marginals"]) == 4
    for row in body["marginals"]:
        assert set(row) == set(STATES)
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-5)


def test_user_transitions(client: TestClient, auth: Callable, trained_affect: dict) -> None:
    body = client.get("/v1/models/affect/users/s002", headers=auth("predict")).json()
    assert body["personalized"] is True and body["n_labels"] == 10
    assert body["bias"] is None
    matrix = body["transitions"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    for row in matrix:
        assert sum(row) == pytest.approx(1.0, abs=1e-9)
    assert matrix[STATES.index("calm")][STATES.index("upbeat")] == 0.0


def test_decode_without_version_is_409(
    client: TestClient, auth: Callable, affect_model: dict
) -> None:
    response = client.post(
        "/v1/models/affect/decode",
        json={"user_id": "u1", "segments": segments()},
        headers=auth("predict"),
    )
    assert response.status_code == 409


def test_decode_unknown_feature_is_422(
    client: TestClient, auth: Callable, affect_model: dict
) -> None:
    body = {"user_id": "u1", "segments": [{"features": {"pitch": 1.0}}]}
    response = client.post("/v1/models/affect/decode", json=body, headers=auth("predict"))
    assert response.status_code == 422
    assert "missing features: energy" in response.text


def test_decode_on_regression_model_is_422(
    client: TestClient, auth: Callable, mood_model: dict
) -> None:
    body = {"user_id": "u1", "segments": [{"features": features()}]}
    response = client.post("/v1/models/mood/decode", json=body, headers=auth("predict"))
    assert response.status_code == 422
    assert "use /predict" in response.text


def test_decode_unknown_model_is_404(client: TestClient, auth: Callable) -> None:
    body = {"user_id": "u1", "segments": segments()}
    response = client.post("/v1/models/nope/decode", json=body, headers=auth("predict"))
    assert response.status_code == 404


def test_refit_without_labelled_sequences_is_409(
    client: TestClient, auth: Callable, affect_model: dict
) -> None:
    response = client.post("/v1/models/affect/refit", headers=auth("admin"))
    assert response.status_code == 409
    assert "no labels" in response.json()["detail"]


def test_forbidden_transition_must_name_states(client: TestClient, auth: Callable) -> None:
    payload = sequence_model_payload()
    payload["architecture"]["forbidden_transitions"] = [["calm", "furious"]]
    response = client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 422
    assert "unknown states: furious" in response.text


def test_regression_model_refuses_sequence_options(client: TestClient, auth: Callable) -> None:
    payload = model_payload("other", architecture={"learn_start_end": True})
    response = client.post("/v1/models", json=payload, headers=auth("admin"))
    assert response.status_code == 422
