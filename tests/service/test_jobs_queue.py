"""The job queue: enqueue/coalesce, claim, heartbeat, finish, retry, stalled jobs, triggers,
and the jobs API (wire shape, scopes, errors). SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from service.jobs import queue
from service.jobs.triggers import check_refit_triggers
from service.storage.tables import Job, Model, User, utcnow
from tests.service.factories import features, get_job, ingest, run_jobs, simulated_items

WIRE_KEYS = {
    "id", "kind", "model", "user_id", "status", "attempts", "progress", "result_version",
    "error", "created_at", "started_at", "finished_at",
}


def model_id(session_factory: sessionmaker, name: str = "mood") -> int:
    with session_factory() as session:
        return session.scalars(select(Model.id).where(Model.name == name)).one()


def test_enqueue_coalesces_pending_jobs_per_model_and_user(
    mood_model: dict, session_factory: sessionmaker
) -> None:
    mid = model_id(session_factory)
    with session_factory() as session:
        first, created = queue.enqueue_job(session, kind="refit", model_id=mid)
        again, created_again = queue.enqueue_job(session, kind="refit", model_id=mid)
        session.commit()
    assert created and not created_again and again.id == first.id
    with session_factory() as session:
        claimed = queue.fetch_job(session)
        session.commit()
        assert claimed is not None and claimed.id == first.id
        # The running job no longer absorbs new work: labels that arrive now need a new job.
        fresh, created = queue.enqueue_job(session, kind="refit", model_id=mid)
        session.commit()
    assert created and fresh.id != first.id
    with pytest.raises(ValueError, match="user_id"), session_factory() as session:
        queue.enqueue_job(session, kind="user_update", model_id=mid)


def test_fetch_claims_oldest_due_job_once(mood_model: dict, session_factory: sessionmaker) -> None:
    mid = model_id(session_factory)
    with session_factory() as session:
        later, _ = queue.enqueue_job(
            session, kind="refit", model_id=mid, run_after=utcnow() + timedelta(hours=1)
        )
        session.commit()
        assert queue.fetch_job(session) is None  # not due yet
        session.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=1)))
        job = queue.fetch_job(session)
        session.commit()
    assert job is not None and job.id == later.id
    assert (job.status, job.attempts) == ("running", 1)
    assert job.started_at is not None and job.heartbeat_at is not None
    with session_factory() as session:
        assert queue.fetch_job(session) is None


def test_finish_heartbeat_and_retry_only_with_the_claim(
    mood_model: dict, session_factory: sessionmaker
) -> None:
    mid = model_id(session_factory)
    with session_factory() as session:
        queue.enqueue_job(session, kind="refit", model_id=mid)
        job = queue.fetch_job(session)
        session.commit()
        assert job is not None
        assert queue.update_heartbeat(session, job_id=job.id, attempt=1, progress={"epoch": 1})
        assert not queue.update_heartbeat(session, job_id=job.id, attempt=2)
        assert queue.retry_job(session, job_id=job.id, attempt=1, error="boom", delay_seconds=0)
        session.commit()
        again = queue.fetch_job(session)
        session.commit()
        assert again is not None and (again.id, again.attempts) == (job.id, 2)
        assert not queue.finish_job(session, job_id=job.id, attempt=1, status="succeeded")
        assert queue.finish_job(
            session, job_id=job.id, attempt=2, status="succeeded", result_version=3
        )
        session.commit()
        row = session.get(Job, job.id)
        session.refresh(row)
    assert (row.status, row.result_version, row.error) == ("succeeded", 3, None)
    assert row.finished_at is not None and row.progress == {"epoch": 1}


def test_stalled_jobs_are_requeued_then_failed_after_last_attempt(
    mood_model: dict, session_factory: sessionmaker
) -> None:
    mid = model_id(session_factory)
    with session_factory() as session:
        queue.enqueue_job(session, kind="refit", model_id=mid, max_attempts=2)
        session.commit()
        for expected_status in ("queued", "failed"):
            job = queue.fetch_job(session)
            assert job is not None
            session.execute(
                update(Job).values(heartbeat_at=utcnow() - timedelta(minutes=5))
            )
            session.commit()
            outcome = queue.requeue_stalled_jobs(session, stale_seconds=60)
            session.commit()
            assert (outcome.requeued if expected_status == "queued" else outcome.failed) == [
                job.id
            ]
            row = session.get(Job, job.id)
            session.refresh(row)
            assert row.status == expected_status and "worker lost" in row.error


def test_retry_policy_backs_off_and_stops() -> None:
    policy = queue.RetryPolicy(max_attempts=3, base_delay=5, factor=2, max_delay=15)
    assert [policy.delay(a) for a in (1, 2, 3)] == [5, 10, 15]
    assert policy.should_retry(2) and not policy.should_retry(3)


def test_ingest_queues_one_update_per_labelled_user_once_a_version_is_active(
    client: TestClient, auth: Callable, trained_mood: dict, session_factory: sessionmaker
) -> None:
    run_jobs(client)  # drain the refit's follow-ups
    items = [
        {"user_id": user, "day": f"2026-03-0{d}", "features": features(), "label": 50.0 + d}
        for user in ("u0001", "fresh") for d in (1, 2)
    ]
    items.append({"user_id": "unlabelled", "day": "2026-03-01", "features": features()})
    ingest(client, auth, items)
    ingest(client, auth, [{**items[0], "label": 99.0}])  # coalesced into the queued job
    with session_factory() as session:
        queued = session.execute(
            select(User.external_id, Job.kind)
            .join(User, User.id == Job.user_id)
            .where(Job.status == "queued")
            .order_by(User.external_id)
        ).all()
    assert queued == [("fresh", "user_update"), ("u0001", "user_update")]


def test_no_user_updates_before_the_first_version(
    client: TestClient, auth: Callable, mood_model: dict, session_factory: sessionmaker
) -> None:
    ingest(client, auth, simulated_items(n_users=2, n_days=3))
    with session_factory() as session:
        assert session.scalars(select(Job)).all() == []


def test_refit_triggers_by_count_and_age_coalesced(
    client: TestClient, auth: Callable, trained_mood: dict, session_factory: sessionmaker
) -> None:
    mid = model_id(session_factory)
    with session_factory() as session:
        assert check_refit_triggers(session, min_new_labels=3, max_age_seconds=0) == []
    new = [
        {"user_id": "u0001", "day": f"2026-04-0{d}", "features": features(), "label": 40.0}
        for d in range(1, 4)
    ]
    ingest(client, auth, new)
    with session_factory() as session:
        assert check_refit_triggers(session, min_new_labels=4, max_age_seconds=0) == []
        (fired,) = check_refit_triggers(session, min_new_labels=3, max_age_seconds=0)
        assert fired.model == "mood" and "3 new labels" in fired.reason
        session.commit()
        assert check_refit_triggers(session, min_new_labels=3, max_age_seconds=0) == []
        session.execute(update(Job).where(Job.kind == "refit").values(status="failed"))
        (aged,) = check_refit_triggers(session, min_new_labels=0, max_age_seconds=1e-6)
        assert "s old with 3 new labels" in aged.reason
        session.commit()
        refits = session.scalars(
            select(Job).where(Job.kind == "refit", Job.model_id == mid, Job.status == "queued")
        ).all()
    assert len(refits) == 1


# ---------------------------------------------------------------------------------- API


def test_refit_route_answers_202_with_the_job(
    client: TestClient, auth: Callable, trained_mood: dict
) -> None:
    response = client.post("/v1/models/mood/refit", headers=auth("admin"))
    assert response.status_code == 202
    job = response.json()["job"]
    assert set(job) == WIRE_KEYS
    assert (job["kind"], job["model"], job["status"], job["attempts"]) == (
        "refit", "mood", "queued", 0,
    )
    again = client.post("/v1/models/mood/jobs", json={"kind": "refit"}, headers=auth("admin"))
    assert again.status_code == 202 and again.json()["job"]["id"] == job["id"]  # coalesced
    run_jobs(client)
    done = get_job(client, auth, job["id"])
    assert set(done) == WIRE_KEYS
    assert (done["status"], done["attempts"], done["result_version"]) == ("succeeded", 1, 2)
    assert done["progress"]["stage"] == "done" and "version 2" in done["progress"]["message"]
    assert done["started_at"] <= done["finished_at"]
    listing = client.get("/v1/models/mood/jobs?kind=refit", headers=auth("admin")).json()
    assert [j["id"] for j in listing["data"]] == [job["id"], 1]
    assert listing["count"] == 2


def test_user_update_job_via_api(client: TestClient, auth: Callable, trained_mood: dict) -> None:
    response = client.post(
        "/v1/models/mood/jobs", json={"kind": "user_update", "user_id": "u0003"},
        headers=auth("admin"),
    )
    assert response.status_code == 202
    job = response.json()["job"]
    assert (job["kind"], job["user_id"]) == ("user_update", "u0003")
    run_jobs(client)
    done = get_job(client, auth, job["id"])
    assert (done["status"], done["result_version"]) == ("succeeded", 1)
    assert done["progress"]["n_labels"] == 20


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"kind": "user_update"}, 422),
        ({"kind": "refit", "user_id": "u1"}, 422),
        ({"kind": "nap"}, 422),
        ({"kind": "user_update", "user_id": "nobody"}, 404),
    ],
)
def test_bad_job_requests(
    client: TestClient, auth: Callable, mood_model: dict, body: dict, status: int
) -> None:
    response = client.post("/v1/models/mood/jobs", json=body, headers=auth("admin"))
    assert response.status_code == status, response.text


def test_jobs_need_admin_and_exist(client: TestClient, auth: Callable, mood_model: dict) -> None:
    assert client.post("/v1/models/mood/refit", headers=auth("admin")).status_code == 409
    assert client.get("/v1/jobs/1", headers=auth("predict")).status_code == 403
    assert client.get("/v1/jobs/99", headers=auth("admin")).status_code == 404
    assert client.get("/v1/models/nope/jobs", headers=auth("admin")).status_code == 404


def test_trigger_racing_a_manual_refit_adds_no_second_event(
    client: TestClient, auth: Callable, trained_mood: dict, session_factory: sessionmaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refit queued by hand between the trigger's look and its insert is joined, not
    announced twice: every ``refit_queued`` event names a job of its own."""
    from service.jobs import triggers
    from service.storage.tables import ModelEvent

    mid = model_id(session_factory)
    ingest(client, auth, [
        {"user_id": "u0001", "day": f"2026-04-0{d}", "features": features(), "label": 40.0}
        for d in range(1, 4)
    ])
    with session_factory() as session:
        manual, created = queue.enqueue_job(session, kind="refit", model_id=mid)
        assert created
        session.commit()
    monkeypatch.setattr(triggers, "pending_refit", lambda session, model_id: False)
    with session_factory() as session:
        assert check_refit_triggers(session, min_new_labels=3, max_age_seconds=0) == []
        session.commit()
        queued = session.scalars(
            select(Job.id).where(Job.kind == "refit", Job.status == "queued")
        ).all()
        announced = session.scalars(
            select(ModelEvent.job_id).where(ModelEvent.kind == "refit_queued")
        ).all()
    assert queued == [manual.id]
    assert manual.id not in announced
