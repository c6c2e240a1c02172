"""Learning in the background, in-process: per-user updates (also for sequence models),
champion/challenger, retries, metrics. SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

import service.learning.refit as refit_module
from nme import load_estimator
from nme.base import _Items
from service.config import Settings
from service.jobs import tasks
from service.storage import store
from service.storage.codec import decode_effects
from service.storage.tables import Job, PersonParam, User
from tests.service.factories import (
    features,
    get_job,
    ingest,
    predict,
    run_jobs,
    sequence_model_payload,
    simulated_sequences,
)


def test_new_user_is_personalised_by_the_next_worker_cycle(
    client: TestClient, auth: Callable, trained_mood: dict, session_factory: sessionmaker
) -> None:
    run_jobs(client)
    item = {"user_id": "newbie", "features": features()}
    before = predict(client, auth, [item])["predictions"][0]
    assert before["personalized"] is False
    labels = [
        {"user_id": "newbie", "day": f"2026-05-{d:02d}", "features": features(), "label": 95.0}
        for d in range(1, 21)
    ]
    ingest(client, auth, labels)
    assert run_jobs(client) == 1  # one coalesced user_update, no refit
    after = predict(client, auth, [item])
    prediction = after["predictions"][0]
    assert after["version"] == 1 and prediction["personalized"] is True
    assert abs(prediction["prediction"] - 95.0) < abs(before["prediction"] - 95.0) - 5.0
    with session_factory() as session:
        row = session.execute(
            select(PersonParam.n_obs).join(User, User.id == PersonParam.user_id)
            .where(User.external_id == "newbie")
        ).scalar_one()
    assert row == 20


def test_user_update_starts_from_the_current_row_and_only_changes_that_user(
    client: TestClient, auth: Callable, trained_mood: dict, session_factory: sessionmaker
) -> None:
    run_jobs(client)

    def rows() -> dict[str, bytes]:
        with session_factory() as session:
            return dict(
                session.execute(
                    select(User.external_id, PersonParam.effects).join(
                        User, User.id == PersonParam.user_id
                    )
                ).all()
            )

    before = rows()
    ingest(client, auth, [
        {"user_id": "u0002", "day": "2026-06-01", "features": features(), "label": 10.0}
    ])
    run_jobs(client)
    after = rows()
    assert {u for u in before if before[u] != after[u]} == {"u0002"}


def test_worse_challenger_is_not_activated(
    client: TestClient,
    auth: Callable,
    trained_mood: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_jobs(client)
    original = refit_module.fit_estimator

    def fit_on_shuffled_labels(model: Any, data: Any, **kwargs: Any) -> Any:
        # Only the network sees shuffled labels; both versions are scored on the true ones.
        rng = np.random.default_rng(0)
        return original(model, replace(data, y_train=rng.permutation(data.y_train)), **kwargs)

    monkeypatch.setattr(refit_module, "fit_estimator", fit_on_shuffled_labels)
    job = client.post("/v1/models/mood/refit", headers=auth("admin")).json()["job"]
    run_jobs(client)
    done = get_job(client, auth, job["id"])
    assert (done["status"], done["result_version"]) == ("succeeded", 2)
    decision = done["progress"]["champion_challenger"]
    assert decision["activate"] is False and decision["champion_version"] == 1
    assert decision["challenger_score"] < decision["champion_score"]
    assert "kept ready" in done["progress"]["message"] and "worse" in decision["reason"]
    versions = client.get("/v1/models/mood/versions", headers=auth("admin")).json()["data"]
    assert [(v["version"], v["status"]) for v in versions] == [(2, "ready"), (1, "active")]
    assert versions[0]["metrics"]["champion_challenger"] == decision
    assert predict(client, auth, [{"user_id": "u0001", "features": features()}])["version"] == 1


def test_failing_job_is_retried_then_succeeds(
    client: TestClient,
    auth: Callable,
    trained_mood: dict,
    monkeypatch: pytest.MonkeyPatch,
    session_factory: sessionmaker,
) -> None:
    run_jobs(client)
    client.app.state.settings = client.app.state.settings.model_copy(
        update={"job_retry_delay_seconds": 0.0}
    )
    real = tasks.RUNNERS["user_update"]
    calls: list[int] = []

    def flaky(context: Any, claim: Any) -> Any:
        calls.append(claim.attempt)
        if claim.attempt == 1:
            raise OSError("database went away")
        return real(context, claim)

    monkeypatch.setitem(tasks.RUNNERS, "user_update", flaky)
    response = client.post(
        "/v1/models/mood/jobs", json={"kind": "user_update", "user_id": "u0001"},
        headers=auth("admin"),
    )
    run_jobs(client)
    done = get_job(client, auth, response.json()["job"]["id"])
    assert calls == [1, 2]
    assert (done["status"], done["attempts"]) == ("succeeded", 2)
    assert done["error"] is None  # the failed attempt is in the worker log


def test_sequence_model_user_update(
    client: TestClient, auth: Callable, session_factory: sessionmaker, settings: Settings
) -> None:
    response = client.post("/v1/models", json=sequence_model_payload(), headers=auth("admin"))
    assert response.status_code == 201
    items = simulated_sequences()
    client.post("/v1/models/affect/sequences", json={"items": items}, headers=auth("ingest"))
    client.post("/v1/models/affect/refit", headers=auth("admin"))
    run_jobs(client)
    newcomer = [
        {**item, "user_id": "stranger", "sequence_id": f"n{k}"}
        for k, item in enumerate(simulated_sequences(n_users=1, seed=7))
    ]
    body = {"user_id": "stranger", "segments": newcomer[0]["segments"]}
    decoded = client.post("/v1/models/affect/decode", json=body, headers=auth("predict"))
    assert decoded.json()["personalized"] is False
    client.post("/v1/models/affect/sequences", json={"items": newcomer}, headers=auth("ingest"))
    with session_factory() as session:
        kinds = session.scalars(select(Job.kind).where(Job.status == "queued")).all()
    assert kinds == ["user_update"]
    assert run_jobs(client) == 1
    decoded = client.post("/v1/models/affect/decode", json=body, headers=auth("predict"))
    assert decoded.json()["personalized"] is True
    user = client.get("/v1/models/affect/users/stranger", headers=auth("predict")).json()
    assert user["personalized"] is True and user["n_labels"] == 10

    # The update refreshed Tⁱ (and the last layer) by the tagger's exact Newton E-step: the
    # stored row is the posterior mode, so the objective's gradient vanishes there and a
    # further Newton E-step from it stays put.
    with session_factory() as session:
        model = store.get_model(session, name="affect")
        version = store.get_active_version(session, model_id=model.id)
        order = list(model.features)  # the estimator's columns, as the service feeds them
        stored = decode_effects(session.execute(
            select(PersonParam.effects).join(User, User.id == PersonParam.user_id)
            .where(User.external_id == "stranger", PersonParam.version_id == version.id)
        ).scalar_one())
    estimator = load_estimator(settings.artifact_dir / version.artifact_path)
    assert estimator._newton_e_step()  # last+T of hidden=[8]: d = 36 ≤ HESSIAN_MAX_DIM
    inputs = ([np.array([[seg["features"][f] for f in order] for seg in item["segments"]],
                        np.float32) for item in newcomer],
              [item["labels"] for item in newcomer])
    again = estimator.fit_person(*inputs, init=stored)
    np.testing.assert_allclose(again, stored, atol=1e-4)
    x, mask, y = estimator._labelled_tensors(*inputs, "features", "labels")
    items = _Items(x=x, y=y, ids=[0] * len(newcomer), mask=mask)
    theta = torch.tensor(stored, requires_grad=True)
    rows = theta.expand(len(newcomer), -1)
    persons = torch.zeros(len(newcomer), dtype=torch.long)
    nll = estimator._train_losses(items, persons, torch.arange(len(newcomer)), rows)[0].sum()
    objective = nll / estimator.sigma2_ + (theta**2 / estimator._Sigma_flat).sum()
    (grad,) = torch.autograd.grad(objective, theta)
    assert float(grad.abs().max()) < 1e-3 * (1 + float(objective)), grad


def test_metrics_need_admin_and_report_traffic_jobs_and_versions(
    client: TestClient, auth: Callable, trained_mood: dict
) -> None:
    predict(client, auth, [
        {"user_id": "u0001", "features": features()},
        {"user_id": "nobody", "features": features()},
    ])
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth("predict")).status_code == 403
    response = client.get("/metrics", headers=auth("admin"))
    assert response.status_code == 200
    text = response.text
    assert (
        'nme_http_requests_total{method="POST",route="/v1/models/{name}/predict",status="200"} 1.0'
        in text
    )
    assert 'nme_http_request_duration_seconds_count{method="POST",route=' in text
    assert 'nme_predictions_total{model="mood",personalized="true"} 1.0' in text
    assert 'nme_predictions_total{model="mood",personalized="false"} 1.0' in text
    assert 'nme_personalized_ratio{model="mood"} 0.5' in text
    assert 'nme_active_version{model="mood"} 1.0' in text
    assert 'nme_jobs{kind="refit",status="succeeded"} 1.0' in text
    assert 'nme_jobs{kind="user_update",status="succeeded"} 12.0' in text  # refit follow-ups
    assert 'nme_job_duration_seconds_count{kind="refit",status="succeeded"} 1.0' in text
