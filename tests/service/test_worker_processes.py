"""Real worker processes: SIGKILL mid-refit (crash safety), two workers on PostgreSQL sharing
50 jobs, and 8 client threads ingesting 10 000 labels while a worker refits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from service.config import Settings
from service.jobs import queue
from service.jobs.tasks import refit_model
from service.storage.tables import Job, Model, ModelVersion, Observation, PersonParam, User, utcnow
from tests.service.factories import create_model, features, ingest, predict, simulated_items

ROOT = Path(__file__).resolve().parents[2]
SLOW_TRAINING = {"max_epochs": 30, "patience": 30, "batch_size": 8, "lr": 0.01}
WORKER_ENV = {
    "NME_DEVICE": "cpu",
    "NME_TORCH_THREADS": "1",
    "NME_JOB_HEARTBEAT_SECONDS": "0.2",
    "NME_JOB_STALE_SECONDS": "1.0",
    "NME_JOB_POLL_SECONDS": "0.05",
    "NME_REFIT_CHECK_SECONDS": "0.5",
    "NME_REFIT_MIN_NEW_LABELS": "0",
    "NME_REFIT_MAX_AGE_SECONDS": "0",
    "NME_JOB_RETRY_DELAY_SECONDS": "0",
    "NME_LOG_LEVEL": "info",
}


class WorkerProcess:
    """``nme-service worker`` in a subprocess, logging JSON lines to a file."""

    def __init__(self, settings: Settings, log: Path, *args: str) -> None:
        env = {
            **os.environ,
            **WORKER_ENV,
            "NME_DATABASE_URL": settings.database_url,
            "NME_ARTIFACT_DIR": str(settings.artifact_dir),
        }
        self.log = log
        self._handle = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", *args],
            cwd=ROOT, env=env, stdout=self._handle, stderr=subprocess.STDOUT,
        )

    def records(self) -> list[dict]:
        """The JSON log records so far."""
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self._handle.close()
        return code


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"worker{len(started)}.log", *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(signal.SIGKILL)


def wait_for(condition: Callable[[], object], timeout: float = 60, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


def job_row(session_factory: sessionmaker, job_id: int) -> Job:
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def slow_mood(client: TestClient, auth: Callable, settings: Settings,
              session_factory: sessionmaker, n_users: int = 20, n_days: int = 30) -> None:
    """A model whose refit takes a few seconds, with an active version 1."""
    create_model(client, auth, architecture={"hidden": [32, 32]}, training=SLOW_TRAINING)
    client.app.state.settings = settings.model_copy(update={"user_updates_on_ingest": False})
    ingest(client, auth, simulated_items(n_users=n_users, n_days=n_days))
    client.app.state.settings = settings
    refit_model(session_factory, model_name="mood", artifact_dir=settings.artifact_dir,
                device="cpu", follow_up_updates=False)


def test_sigkill_mid_refit_is_safe_and_retried(
    client: TestClient,
    auth: Callable,
    settings: Settings,
    session_factory: sessionmaker,
    workers: Callable[..., WorkerProcess],
) -> None:
    slow_mood(client, auth, settings, session_factory)
    job_id = client.post("/v1/models/mood/refit", headers=auth("admin")).json()["job"]["id"]
    first = workers()
    wait_for(
        lambda: (job_row(session_factory, job_id).progress or {}).get("epoch", 0) >= 2,
        what="the refit to be mid-training",
    )
    # A label arrives while the model trains.
    late = [{"user_id": "late", "day": f"2026-07-{d:02d}", "features": features(), "label": 80.0}
            for d in range(1, 6)]
    ingest(client, auth, late)
    first.stop(signal.SIGKILL)
    killed = job_row(session_factory, job_id)
    assert (killed.status, killed.attempts) == ("running", 1)
    assert killed.progress["stage"] == "training"

    # 1. The active version keeps serving; 2. no half-written version exists.
    item = {"user_id": "u0001", "features": features()}
    assert predict(client, auth, [item])["version"] == 1
    with session_factory() as session:
        versions = session.execute(select(ModelVersion.version, ModelVersion.status)).all()
    assert versions == [(1, "active")]

    # 3. The next worker requeues the job once its heartbeat is stale, and runs it to the end.
    time.sleep(float(WORKER_ENV["NME_JOB_STALE_SECONDS"]) + 0.2)
    second = workers("--burst")
    assert second.process.wait(120) == 0
    done = job_row(session_factory, job_id)
    assert (done.status, done.attempts, done.result_version) == ("succeeded", 2, 2)
    actions = [(r.get("action"), r.get("job")) for r in second.records()]
    assert ("requeue", job_id) in actions and ("start", job_id) in actions

    # The label that arrived mid-refit is in the active version's θⁱ.
    with session_factory() as session:
        active = session.scalars(
            select(ModelVersion).where(ModelVersion.status == "active")
        ).one()
        n_obs = session.execute(
            select(PersonParam.n_obs).join(User, User.id == PersonParam.user_id)
            .where(User.external_id == "late", PersonParam.version_id == active.id)
        ).scalar_one()
    assert n_obs == 5
    assert predict(client, auth, [{"user_id": "late", "features": features()}])[
        "predictions"][0]["personalized"]


def test_two_workers_run_fifty_jobs_exactly_once(
    postgres_url: str,
    client: TestClient,
    auth: Callable,
    settings: Settings,
    session_factory: sessionmaker,
    workers: Callable[..., WorkerProcess],
) -> None:
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("several workers need PostgreSQL (SKIP LOCKED)")
    create_model(client, auth)
    ingest(client, auth, simulated_items(n_users=50, n_days=6))
    refit_model(session_factory, model_name="mood", artifact_dir=settings.artifact_dir,
                device="cpu", follow_up_updates=False)
    start_at = utcnow() + timedelta(seconds=6)  # both workers are polling by then
    with session_factory() as session:
        model_id = session.scalars(select(Model.id)).one()
        user_ids = session.scalars(select(User.id)).all()
        for user_id in user_ids:
            queue.enqueue_job(session, kind="user_update", model_id=model_id, user_id=user_id,
                              run_after=start_at)
        session.commit()
    assert len(user_ids) == 50
    pair = [workers("--name", "a"), workers("--name", "b")]

    def all_done() -> bool:
        with session_factory() as session:
            return session.scalar(
                select(func.count()).where(Job.status.in_(("succeeded", "failed")))
            ) == 50

    wait_for(all_done, timeout=90, what="50 jobs")
    assert [worker.stop(signal.SIGTERM) for worker in pair] == [0, 0]  # drained, clean exit
    started = [
        record["job"] for worker in pair for record in worker.records()
        if record.get("action") == "start"
    ]
    assert sorted(started) == sorted(set(started)) and len(started) == 50
    assert all(any(r.get("action") == "start" for r in w.records()) for w in pair)
    with session_factory() as session:
        rows = session.execute(select(Job.status, Job.attempts)).all()
    assert set(rows) == {("succeeded", 1)}


def test_concurrent_ingest_during_refit_keeps_every_label_once(
    postgres_url: str,
    client: TestClient,
    auth: Callable,
    settings: Settings,
    session_factory: sessionmaker,
    workers: Callable[..., WorkerProcess],
) -> None:
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("the concurrency test runs on PostgreSQL")
    slow_mood(client, auth, settings, session_factory)
    with session_factory() as session:
        initial = session.scalar(select(func.count()).select_from(Observation))
    job_id = client.post("/v1/models/mood/refit", headers=auth("admin")).json()["job"]["id"]
    worker = workers()
    wait_for(lambda: job_row(session_factory, job_id).status == "running", what="the refit")

    # 100 users × 100 days, each (user, day) once.
    sent = [
        {"user_id": f"c{k % 100:03d}",
         "day": (date(2030, 1, 1) + timedelta(days=k // 100)).isoformat(),
         "features": features(gps_km=float(k % 13)), "label": float(k % 97)}
        for k in range(10_000)
    ]
    batches = [sent[i : i + 125] for i in range(0, len(sent), 125)]

    def post(batch: list[dict]) -> int:
        response = client.post(
            "/v1/models/mood/observations", json={"items": batch}, headers=auth("ingest")
        )
        assert response.status_code == 200, response.text
        return response.json()["inserted"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        inserted = sum(pool.map(post, batches))
    assert job_row(session_factory, job_id).status == "running"  # the refit was still going
    assert inserted == 10_000
    wait_for(lambda: job_row(session_factory, job_id).status == "succeeded", what="refit end")
    assert worker.stop(signal.SIGTERM) == 0
    with session_factory() as session:
        rows = session.execute(
            select(User.external_id, Observation.day, Observation.label)
            .join(User, User.id == Observation.user_id)
            .where(User.external_id.like("c%"))
        ).all()
        total = session.scalar(select(func.count()).select_from(Observation))
    assert total == initial + 10_000
    assert sorted((u, d.isoformat(), float(label)) for u, d, label in rows) == sorted(
        (i["user_id"], i["day"], i["label"]) for i in sent
    )
