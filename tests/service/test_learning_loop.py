"""A learning loop that can be left alone: no refit storms, no poisoned versions, bounded
storage, a decision log, priorities and faults. SQLite and PostgreSQL (in-process worker)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import sessionmaker

import service.learning.refit as refit_module
from service.config import Settings
from service.jobs import queue
from service.jobs.tasks import refit_model
from service.jobs.triggers import check_refit_triggers
from service.learning.champion import decide
from service.learning.kinds.tabular import gross_outliers
from service.learning.serving import Predictor
from service.learning.user_update import fit_user, write_user_fit
from service.storage import retention
from service.storage.tables import (
    Job,
    Model,
    ModelEvent,
    ModelVersion,
    Observation,
    PersonParam,
    User,
    utcnow,
)
from service.storage.tables import Sequence as SequenceRow
from tests.service.factories import (
    FORBIDDEN,
    create_model,
    features,
    get_job,
    ingest,
    predict,
    run_jobs,
    sequence_model_payload,
    simulated_items,
    simulated_sequences,
)

Auth = Callable[[str], dict[str, str]]


def events(client: TestClient, auth: Auth, name: str = "mood", **params: Any) -> list[dict]:
    response = client.get(f"/v1/models/{name}/events", params=params, headers=auth("admin"))
    assert response.status_code == 200, response.text
    return response.json()["data"]


def kinds(client: TestClient, auth: Auth, name: str = "mood") -> list[str]:
    return [event["kind"] for event in events(client, auth, name, limit=1000)]


def shuffled_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refits train on permuted labels (and are scored on the true ones): they lose."""
    original = refit_module.fit_estimator

    def fit_on_shuffled_labels(model: Any, data: Any, **kwargs: Any) -> Any:
        rng = np.random.default_rng(0)
        return original(model, replace(data, y_train=rng.permutation(data.y_train)), **kwargs)

    monkeypatch.setattr(refit_module, "fit_estimator", fit_on_shuffled_labels)


def check_triggers(session_factory: sessionmaker, min_new_labels: int = 1) -> list:
    with session_factory() as session:
        queued = check_refit_triggers(session, min_new_labels=min_new_labels, max_age_seconds=0)
        session.commit()
    return queued


def version_rows(session_factory: sessionmaker) -> list[tuple[int, str]]:
    with session_factory() as session:
        return [
            (v.version, v.status)
            for v in session.scalars(select(ModelVersion).order_by(ModelVersion.version))
        ]


# ---------------------------------------------------------------------------- refit storms


def test_rejected_refit_is_not_queued_again_without_new_labels(
    client: TestClient,
    auth: Auth,
    trained_mood: dict,
    session_factory: sessionmaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_jobs(client)
    shuffled_fits(monkeypatch)
    client.post("/v1/models/mood/refit", headers=auth("admin"))
    run_jobs(client)
    assert version_rows(session_factory) == [(1, "active"), (2, "ready")]
    # Before: every check re-queued a refit (labels newer than the *active* version).
    for _ in range(3):
        assert check_triggers(session_factory) == []
        assert run_jobs(client) == 0
    assert version_rows(session_factory) == [(1, "active"), (2, "ready")]
    with session_factory() as session:
        model = session.scalar(select(Model))
        assert model is not None and model.refit_failures == 1
        assert model.refit_not_before is not None and model.refit_not_before > utcnow()


def test_after_a_rejection_new_labels_wait_for_the_back_off(
    client: TestClient,
    auth: Auth,
    trained_mood: dict,
    session_factory: sessionmaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run_jobs(client)
    shuffled_fits(monkeypatch)
    client.post("/v1/models/mood/refit", headers=auth("admin"))
    run_jobs(client)
    ingest(client, auth, simulated_items(n_users=3, n_days=5, seed=7))
    assert check_triggers(session_factory) == []  # backing off
    with session_factory() as session:
        session.execute(update(Model).values(refit_not_before=utcnow() - timedelta(seconds=1)))
        session.commit()
    (queued,) = check_triggers(session_factory)
    assert "new labels" in queued.reason
    event = events(client, auth, kind="refit_queued")[0]
    assert event["actor"] == "trigger" and event["job_id"] == queued.job_id


def test_permanently_failing_refit_does_not_loop(
    client: TestClient, auth: Auth, session_factory: sessionmaker
) -> None:
    create_model(client, auth, name="moods", task="classification")
    items = [{**item, "label": "low"} for item in simulated_items(n_users=3, n_days=6)]
    ingest(client, auth, items, name="moods")  # one class only: a refit cannot train
    assert len(check_triggers(session_factory)) == 1
    run_jobs(client)
    (failed,) = [e for e in events(client, auth, "moods") if e["kind"] == "refit_failed"]
    assert "two classes" in failed["detail"]
    for _ in range(3):
        assert check_triggers(session_factory) == []
        run_jobs(client)
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


# ---------------------------------------------------------------------------- event log


def test_event_log_tells_which_version_served_when_and_why(
    client: TestClient, auth: Auth, trained_mood: dict, settings: Settings
) -> None:
    run_jobs(client)
    client.post("/v1/models/mood/refit", headers=auth("admin"))
    run_jobs(client)
    rollback = client.post("/v1/models/mood/versions/1/activate", headers=auth("admin"))
    assert rollback.status_code == 200
    log = events(client, auth)
    assert [e["kind"] for e in log[:4]] == [
        "rolled_back", "activated", "version_trained", "refit_queued"
    ]
    assert log[0]["actor"] == "key:admin" and log[0]["version"] == 1
    assert log[3]["actor"] == "key:admin" and log[3]["job_id"] is not None
    assert log[1]["data"]["challenger_score"] is not None
    assert set(log[0]) == {"id", "at", "kind", "version", "job_id", "actor", "detail", "data"}
    ids = [e["id"] for e in log]
    assert ids == sorted(ids, reverse=True)
    page = client.get(
        "/v1/models/mood/events", params={"limit": 2}, headers=auth("admin")
    ).json()
    assert page["count"] == len(log) and len(page["data"]) == 2 and page["next_cursor"]
    assert client.get("/v1/models/mood/events", headers=auth("predict")).status_code == 403


def test_job_errors_and_event_details_are_human_messages(
    client: TestClient,
    auth: Auth,
    trained_mood: dict,
    monkeypatch: pytest.MonkeyPatch,
    session_factory: sessionmaker,
) -> None:
    run_jobs(client)
    client.app.state.settings = client.app.state.settings.model_copy(
        update={"job_max_attempts": 1}
    )

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("SELECT secret FROM api_keys WHERE key_hash = 'abc'")

    monkeypatch.setattr(refit_module, "fit_estimator", broken)
    with session_factory() as session:
        session.execute(update(Job).values(max_attempts=1))
        session.commit()
    job = client.post("/v1/models/mood/refit", headers=auth("admin")).json()["job"]
    with session_factory() as session:
        session.execute(update(Job).values(max_attempts=1))
        session.commit()
    run_jobs(client)
    done = get_job(client, auth, job["id"])
    assert done["status"] == "failed"
    assert "SELECT" not in done["error"] and "RuntimeError" in done["error"]
    failed = events(client, auth, kind="refit_failed")[0]
    assert "SELECT" not in failed["detail"]


# ---------------------------------------------------------------------------- poison


@pytest.mark.parametrize("label", [1e300, -3.5e38])
def test_labels_beyond_float32_are_422(
    client: TestClient, auth: Auth, mood_model: dict, label: float
) -> None:
    item = {"user_id": "u1", "day": "2026-01-01", "features": features(), "label": label}
    response = client.post(
        "/v1/models/mood/observations", json={"items": [item]}, headers=auth("ingest")
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "items", 0, "label"]


def test_label_range_is_declared_at_creation_and_enforced(client: TestClient, auth: Auth) -> None:
    model = create_model(client, auth, label_range=[0, 100])
    assert model["label_range"] == [0.0, 100.0]
    good = {"user_id": "u1", "day": "2026-01-01", "features": features(), "label": 100.0}
    bad = {**good, "day": "2026-01-02", "label": 3e38}
    response = client.post(
        "/v1/models/mood/observations", json={"items": [good, bad]}, headers=auth("ingest")
    )
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "items", 1, "label"] and "label_range" in error["msg"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"label_range": [5, 5]},
        {"label_range": [10, 0]},
        {"label_range": [0, 1e39]},
        {"label_range": [0, 1], "task": "classification"},
    ],
)
def test_bad_label_range_is_422(client: TestClient, auth: Auth, overrides: dict) -> None:
    from tests.service.factories import model_payload

    response = client.post("/v1/models", json=model_payload(**overrides), headers=auth("admin"))
    assert response.status_code == 422


def test_gross_outlier_label_is_left_out_of_the_refit_and_logged(
    client: TestClient, auth: Auth, mood_model: dict
) -> None:
    items = simulated_items()
    items[7]["label"] = 1e30  # a valid float32: accepted at ingest, then poisoned every fit
    ingest(client, auth, items)
    client.post("/v1/models/mood/refit", headers=auth("admin"))
    run_jobs(client)
    skipped = events(client, auth, kind="labels_skipped")
    assert len(skipped) == 1 and skipped[0]["data"]["n_labels"] == 1
    assert float(skipped[0]["data"]["labels"][0]["label"]) == 1e30  # JSONB may give an int
    answer = predict(client, auth, [{"user_id": items[7]["user_id"], "features": features()}])
    value = answer["predictions"][0]["prediction"]
    assert answer["version"] == 1 and 0 < value < 100


def test_outlier_rule_keeps_honest_skewed_labels() -> None:
    rng = np.random.default_rng(0)
    mostly_five = np.concatenate([np.full(900, 5.0), rng.integers(1, 11, 100).astype(float)])
    assert not gross_outliers(mostly_five)[0].any()
    normal = rng.normal(50, 10, 5000)
    assert not gross_outliers(normal)[0].any()
    poisoned = np.concatenate([normal, [1e30, -3e38]])
    assert gross_outliers(poisoned)[0].sum() == 2


def test_non_finite_training_result_is_never_recorded(
    client: TestClient, auth: Auth, mood_model: dict, monkeypatch: pytest.MonkeyPatch,
    session_factory: sessionmaker,
) -> None:
    ingest(client, auth, simulated_items())
    original = refit_module.fit_estimator

    def nan_weights(model: Any, data: Any, **kwargs: Any) -> Any:
        estimator, metrics = original(model, data, **kwargs)
        with torch.no_grad():
            next(estimator.module_.parameters()).fill_(float("nan"))
        return estimator, metrics

    monkeypatch.setattr(refit_module, "fit_estimator", nan_weights)
    job = client.post("/v1/models/mood/refit", headers=auth("admin")).json()["job"]
    run_jobs(client)
    assert get_job(client, auth, job["id"])["status"] == "failed"
    assert version_rows(session_factory) == []
    assert "non-finite" in events(client, auth, kind="refit_failed")[0]["detail"]


def test_first_version_must_beat_the_training_mean(
    client: TestClient,
    auth: Auth,
    mood_model: dict,
    session_factory: sessionmaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingest(client, auth, simulated_items())
    original = refit_module.fit_estimator

    def fit_on_mirrored_labels(model: Any, data: Any, **kwargs: Any) -> Any:
        # Labels mirrored around their mean: every prediction lands on the wrong side, so the
        # version is worse than predicting the mean (scored on the true labels).
        mirrored = 2 * data.y_train.mean() - data.y_train
        return original(model, replace(data, y_train=mirrored), **kwargs)

    monkeypatch.setattr(refit_module, "fit_estimator", fit_on_mirrored_labels)
    client.post("/v1/models/mood/refit", headers=auth("admin"))
    run_jobs(client)
    assert version_rows(session_factory) == [(1, "ready")]
    rejected = events(client, auth, kind="rejected")[0]
    assert "trivial predictor" in rejected["detail"]
    response = client.post(
        "/v1/models/mood/predict",
        json={"items": [{"user_id": "u1", "features": features()}]},
        headers=auth("predict"),
    )
    assert response.status_code == 409


def test_champion_with_a_non_finite_score_cannot_block() -> None:
    decision = decide(-5.0, float("nan"), 3, score_name="neg_rmse")
    assert decision.activate and "not finite" in decision.reason
    assert not decide(float("nan"), -5.0, 3, score_name="neg_rmse").activate


def test_predictions_are_never_null(client: TestClient, auth: Auth, trained_mood: dict) -> None:
    huge = {name: 3.0e38 for name in features()}
    response = client.post(
        "/v1/models/mood/predict",
        json={"items": [{"user_id": "u0001", "features": huge},
                        {"user_id": "u0001", "features": features()}]},
        headers=auth("predict"),
    )
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        values = [p["prediction"] for p in response.json()["predictions"]]
        assert all(isinstance(v, float) and np.isfinite(v) for v in values)
    else:
        assert response.json()["detail"][0]["loc"][:3] == ["body", "items", 0]


# ---------------------------------------------------------------------------- sequences


def test_forbidden_transition_is_refused_at_ingest(client: TestClient, auth: Auth) -> None:
    client.post("/v1/models", json=sequence_model_payload(), headers=auth("admin"))
    item = simulated_sequences(n_users=1, n_sequences=1, length=4)[0]
    item["labels"] = ["tense", FORBIDDEN[0][0], FORBIDDEN[0][1], "tense"]
    response = client.post(
        "/v1/models/affect/sequences", json={"items": [item]}, headers=auth("ingest")
    )
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "items", 0, "labels", 2]
    assert "'calm' → 'upbeat'" in error["msg"] and "1 → 2" in error["msg"]


def test_refit_skips_a_stored_forbidden_sequence_and_says_so(
    client: TestClient, auth: Auth, session_factory: sessionmaker
) -> None:
    client.post("/v1/models", json=sequence_model_payload(), headers=auth("admin"))
    items = simulated_sequences()
    client.post("/v1/models/affect/sequences", json={"items": items}, headers=auth("ingest"))
    with session_factory() as session:  # a row stored before ingest refused such paths
        row = session.scalar(select(SequenceRow).where(SequenceRow.sequence_id == "seq0"))
        assert row is not None
        row.labels = ["calm", "upbeat", *row.labels[2:]]
        session.commit()
    job = client.post("/v1/models/affect/refit", headers=auth("admin")).json()["job"]
    run_jobs(client)
    assert get_job(client, auth, job["id"])["status"] == "succeeded"
    skipped = events(client, auth, "affect", kind="sequences_skipped")
    assert len(skipped) == 1 and skipped[0]["data"]["n_sequences"] == 1


# ---------------------------------------------------------------------------- label semantics


def stored_label(session_factory: sessionmaker) -> Any:
    with session_factory() as session:
        return session.scalar(select(Observation.label))


def test_omitted_label_keeps_the_stored_one_and_null_clears_it(
    client: TestClient, auth: Auth, mood_model: dict, session_factory: sessionmaker
) -> None:
    item = {"user_id": "u1", "day": "2026-01-01", "features": features(), "label": 61.0}
    ingest(client, auth, [item])
    without = {k: v for k, v in item.items() if k != "label"}
    assert ingest(client, auth, [without]) == {"inserted": 0, "updated": 0}
    assert stored_label(session_factory) == 61.0
    changed = ingest(client, auth, [{**without, "features": features(gps_km=9.0)}])
    assert changed == {"inserted": 0, "updated": 1} and stored_label(session_factory) == 61.0
    assert ingest(client, auth, [{**item, "label": None}])["updated"] == 1
    assert stored_label(session_factory) is None


def test_omitted_sequence_labels_are_kept(
    client: TestClient, auth: Auth, session_factory: sessionmaker
) -> None:
    client.post("/v1/models", json=sequence_model_payload(), headers=auth("admin"))
    item = simulated_sequences(n_users=1, n_sequences=1)[0]
    post = lambda body: client.post(  # noqa: E731
        "/v1/models/affect/sequences", json={"items": [body]}, headers=auth("ingest")
    )
    post(item)
    post({k: v for k, v in item.items() if k != "labels"})
    with session_factory() as session:
        assert session.scalar(select(SequenceRow.labels)) == item["labels"]
    post({**item, "labels": None})
    with session_factory() as session:
        assert session.scalar(select(SequenceRow.labels)) is None


# ---------------------------------------------------------------------------- retention


def test_retention_keeps_the_active_and_newest_versions(
    client: TestClient,
    auth: Auth,
    mood_model: dict,
    settings: Settings,
    session_factory: sessionmaker,
) -> None:
    ingest(client, auth, simulated_items(n_users=4, n_days=10))
    for _ in range(4):
        refit_model(session_factory, model_name="mood", artifact_dir=settings.artifact_dir,
                    device="cpu", keep_versions=1)
    assert version_rows(session_factory) == [(3, "ready"), (4, "active")]
    on_disk = {p.name for p in (settings.artifact_dir / "mood").iterdir()}
    with session_factory() as session:
        referenced = {v.artifact_path.split("/")[1] for v in session.scalars(select(ModelVersion))}
        assert session.scalar(
            select(func.count(func.distinct(PersonParam.version_id)))
        ) == 2
    assert on_disk == referenced
    pruned = [e for e in events(client, auth) if e["kind"] == "pruned"]
    assert sorted(e["version"] for e in pruned) == [1, 2]


def test_orphaned_and_stale_temporary_artifacts_are_collected(
    client: TestClient, auth: Auth, trained_mood: dict, settings: Settings,
    session_factory: sessionmaker,
) -> None:
    folder = settings.artifact_dir / "mood"
    (kept,) = list(folder.iterdir())
    orphan, temporary, fresh = folder / "20200101T000000-dead", folder / ".tmp-x", folder / "new"
    for path in (orphan, temporary, fresh):
        path.mkdir()
        (path / "weights.safetensors").write_bytes(b"x")
    old = time.time() - 7200
    for path in (orphan, temporary, kept):
        os.utime(path, (old, old))
    with session_factory() as session:
        removed = retention.collect_orphans(
            session, artifact_dir=settings.artifact_dir, grace_seconds=3600
        )
    assert sorted(removed) == ["mood/.tmp-x", "mood/20200101T000000-dead"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([kept.name, "new"])


def test_finished_jobs_and_events_are_pruned_after_their_retention(
    client: TestClient, auth: Auth, trained_mood: dict, session_factory: sessionmaker
) -> None:
    run_jobs(client)
    with session_factory() as session:
        session.execute(update(Job).values(finished_at=utcnow() - timedelta(days=30)))
        session.execute(update(ModelEvent).values(at=utcnow() - timedelta(days=30)))
        session.add(Job(kind="refit", model_id=session.scalar(select(Model.id)), status="queued"))
        session.commit()
        jobs, pruned_events = retention.prune_finished(
            session, older_than=utcnow() - timedelta(days=7)
        )
        session.commit()
        assert jobs >= 1 and pruned_events >= 1
        assert session.scalars(select(Job.status)).all() == ["queued"]


def test_metrics_sums_job_durations_in_the_database(
    client: TestClient, auth: Auth, mood_model: dict, session_factory: sessionmaker
) -> None:
    now = utcnow()
    with session_factory() as session:
        model_id = session.scalar(select(Model.id))
        session.add_all(
            Job(kind="refit", model_id=model_id, status="succeeded",
                started_at=now - timedelta(seconds=s), finished_at=now)
            for s in (2.5, 4.0)
        )
        session.commit()
    text = client.get("/metrics", headers=auth("admin")).text
    assert 'nme_job_duration_seconds_count{kind="refit",status="succeeded"} 2.0' in text
    total = next(
        line for line in text.splitlines()
        if line.startswith('nme_job_duration_seconds_sum{kind="refit",status="succeeded"}')
    )
    assert abs(float(total.split()[-1]) - 6.5) < 0.01


# ---------------------------------------------------------------------------- priorities


def test_refits_run_before_queued_user_updates(
    client: TestClient, auth: Auth, trained_mood: dict, session_factory: sessionmaker
) -> None:
    run_jobs(client)
    with session_factory() as session:
        model_id = session.scalar(select(Model.id))
        users = session.scalars(select(User.id)).all()
        queue.enqueue_user_updates(session, model_id=model_id, user_ids=users)
        refit_job, _ = queue.enqueue_job(session, kind="refit", model_id=model_id)
        session.commit()
        claimed = queue.fetch_job(session)
        assert claimed is not None and claimed.id == refit_job.id


def test_two_updates_of_one_user_never_run_at_once(
    client: TestClient, auth: Auth, trained_mood: dict, session_factory: sessionmaker
) -> None:
    run_jobs(client)
    with session_factory() as session:
        model_id = session.scalar(select(Model.id))
        user_id = session.scalar(select(User.id).where(User.external_id == "u0001"))
        first, _ = queue.enqueue_job(session, kind="user_update", model_id=model_id,
                                     user_id=user_id)
        session.commit()
        assert queue.fetch_job(session).id == first.id  # type: ignore[union-attr]
        session.commit()
        second, created = queue.enqueue_job(session, kind="user_update", model_id=model_id,
                                            user_id=user_id)
        session.commit()
        assert created and second.id != first.id
        assert queue.fetch_job(session) is None  # its twin is running
        session.rollback()
        queue.finish_job(session, job_id=first.id, attempt=1, status="succeeded")
        session.commit()
        assert queue.fetch_job(session).id == second.id  # type: ignore[union-attr]


def test_an_older_fit_never_overwrites_a_newer_row(
    client: TestClient, auth: Auth, trained_mood: dict, session_factory: sessionmaker,
    settings: Settings,
) -> None:
    run_jobs(client)
    predictor = Predictor(artifact_dir=settings.artifact_dir, device="cpu")
    with session_factory() as session:
        model_id = session.scalar(select(Model.id))
        user_id = session.scalar(select(User.id).where(User.external_id == "u0001"))
    stale = fit_user(session_factory, predictor, model_id=model_id, user_id=user_id)
    ingest(client, auth, [{"user_id": "u0001", "day": "2027-01-01", "features": features(),
                           "label": 99.0}])
    fresh = fit_user(session_factory, predictor, model_id=model_id, user_id=user_id)
    with session_factory() as session:
        assert "re-fitted" in write_user_fit(session, fresh).reason
        session.commit()
        assert "newer update" in write_user_fit(session, stale).reason
        session.commit()
        row = session.scalar(select(PersonParam).where(PersonParam.user_id == user_id,
                                                        PersonParam.version_id == 1))
        assert row is not None and row.n_obs == fresh.outcome.n_labels


# ---------------------------------------------------------------------------- faults


def test_artifact_survives_a_failed_commit_that_the_server_kept(
    client: TestClient, auth: Auth, mood_model: dict, settings: Settings,
    session_factory: sessionmaker,
) -> None:
    ingest(client, auth, simulated_items(n_users=4, n_days=10))
    trained = refit_module.train_version(
        session_factory, model_name="mood", artifact_dir=settings.artifact_dir, device="cpu"
    )
    path = settings.artifact_dir / trained.artifact_path
    with (
        pytest.raises(ConnectionError),
        refit_module.keep_artifact_if_committed(session_factory, trained),
    ):
        with session_factory() as session:
            refit_module.record_version(session, trained)
            session.commit()
        raise ConnectionError("connection lost while the server committed")
    assert path.is_dir()  # the version row exists, so its artifact must too

    def unreachable() -> Any:
        raise ConnectionError("database down")

    with (
        pytest.raises(RuntimeError),
        refit_module.keep_artifact_if_committed(unreachable, trained),  # type: ignore[arg-type]
    ):
        raise RuntimeError("boom")
    assert path.is_dir()  # unknown: kept for the orphan collector


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_activation_checks_the_artifact(
    client: TestClient, auth: Auth, trained_mood: dict, settings: Settings,
    session_factory: sessionmaker, damage: str,
) -> None:
    with session_factory() as session:
        path = settings.artifact_dir / session.scalar(select(ModelVersion.artifact_path))
        session.execute(update(ModelVersion).values(status="ready"))
        session.commit()
    if damage == "missing":
        for file in path.iterdir():
            file.unlink()
        path.rmdir()
    else:
        (path / "config.json").write_text("{}")
    response = client.post("/v1/models/mood/versions/1/activate", headers=auth("admin"))
    expected = {"missing": "missing", "corrupt": "sha256"}[damage]
    assert response.status_code == 409 and expected in response.json()["detail"]


def test_worker_survives_a_database_outage(
    client: TestClient, trained_mood: dict, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sqlalchemy.exc import OperationalError

    from service.jobs import worker as worker_module

    monkeypatch.setattr(worker_module, "OUTAGE_FIRST_WAIT", 0.01)
    worker = worker_module.Worker(client.app.state.settings, name="outage")
    real_claim, calls = worker.claim, []

    def flaky_claim() -> Any:
        calls.append(1)
        if len(calls) <= 3:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return real_claim()

    monkeypatch.setattr(worker, "claim", flaky_claim)
    with caplog.at_level("INFO", logger="service.worker"):
        try:
            worker.run(burst=True)
        finally:
            worker.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("database unreachable" in m for m in messages) == 1
    assert sum("database reachable again" in m for m in messages) == 1
    assert len(calls) >= 4


def test_api_answers_503_with_retry_after_while_the_database_is_down(tmp_path: Path) -> None:
    from service.app import create_app
    from service.auth import generate_key

    settings = Settings(
        database_url="postgresql://postgres@127.0.0.1:1/nowhere",
        artifact_dir=tmp_path, device="cpu", db_connect_timeout_seconds=1,
        auth_cache_seconds=0.0, torch_threads=0,
    )
    with TestClient(create_app(settings)) as client:
        key = generate_key().plaintext
        response = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert client.get("/healthz").status_code == 200


def test_replacing_the_active_model_leaks_no_network(
    client: TestClient, auth: Auth, trained_mood: dict, settings: Settings,
    session_factory: sessionmaker,
) -> None:
    import gc
    import weakref

    with session_factory() as session:
        version = session.scalar(select(ModelVersion))
        assert version is not None
        session.expunge(version)
    predictor = Predictor(artifact_dir=settings.artifact_dir, device="cpu")
    alive: list[weakref.ref] = []
    gc.collect()
    gc.freeze()  # as the API does after start-up: only reference counting frees objects now
    try:
        for k in range(100):
            # a new version id each time: the cache replaces its entry
            loaded = predictor.load(replace_id(version, 1000 + k))
            alive.append(weakref.ref(loaded.estimator.module_))
            del loaded
    finally:
        gc.unfreeze()
    assert sum(ref() is not None for ref in alive) == 1


def replace_id(version: ModelVersion, new_id: int) -> ModelVersion:
    """A detached copy of a version row with another id (what the cache keys on)."""
    copy = ModelVersion(**{c.name: getattr(version, c.name) for c in ModelVersion.__table__.c})
    copy.id = new_id
    return copy


def test_healthz_is_not_blocked_by_a_predict_waiting_on_the_database(
    client: TestClient, auth: Auth, trained_mood: dict, settings: Settings, engine: Any,
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("table locks that block readers need PostgreSQL")
    import threading

    from sqlalchemy import text

    with engine.connect() as locker:
        locker.execute(text("LOCK TABLE models IN ACCESS EXCLUSIVE MODE"))
        result: dict[str, Any] = {}

        def blocked_predict() -> None:
            result["status"] = client.post(
                "/v1/models/mood/predict",
                json={"items": [{"user_id": "u0001", "features": features()}]},
                headers=auth("predict"),
            ).status_code

        thread = threading.Thread(target=blocked_predict)
        thread.start()
        time.sleep(0.5)
        started = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        health_seconds = time.perf_counter() - started
        time.sleep(1.0)
        locker.rollback()
    thread.join(timeout=30)
    assert health_seconds < 0.5
    assert result["status"] == 200


def test_a_refit_that_kills_its_worker_every_time_backs_off_instead_of_looping(
    client: TestClient, auth: Auth, trained_mood: dict, session_factory: sessionmaker
) -> None:
    """A refit whose worker dies on every attempt (out of memory, say) is failed by the dead-
    worker reaper with a ``refit_failed`` event and back-off, like a failure the runner saw:
    the trigger does not queue it again at once, so it cannot kill workers forever."""
    from service.jobs.worker import reap_stalled_jobs

    run_jobs(client)
    ingest(client, auth, [
        {"user_id": "u0001", "day": f"2026-06-{d:02d}", "features": features(), "label": 50.0}
        for d in range(1, 6)
    ])
    with session_factory() as session:
        model = session.scalar(select(Model))
        assert model is not None
        job, _ = queue.enqueue_job(session, kind="refit", model_id=model.id, max_attempts=1)
        session.commit()
        claimed = queue.fetch_job(session)  # a worker takes it ...
        assert claimed is not None and claimed.id == job.id
        session.commit()
        session.execute(  # ... and dies: its heartbeat goes stale
            update(Job).where(Job.id == job.id)
            .values(heartbeat_at=utcnow() - timedelta(minutes=10))
        )
        session.commit()
    with session_factory() as session:
        outcome = reap_stalled_jobs(session, stale_seconds=60, backoff_seconds=600)
        session.commit()
    assert outcome.failed == [job.id]
    assert "refit_failed" in kinds(client, auth)
    failed = next(e for e in events(client, auth, limit=1000) if e["kind"] == "refit_failed")
    assert "worker died" in failed["detail"] and "Traceback" not in failed["detail"]
    with session_factory() as session:
        model = session.scalar(select(Model))
        assert model is not None and model.refit_failures == 1
        assert model.refit_not_before is not None and model.refit_not_before > utcnow()
    assert check_triggers(session_factory) == []  # the same labels do not re-queue it
    assert get_job(client, auth, job.id)["status"] == "failed"
