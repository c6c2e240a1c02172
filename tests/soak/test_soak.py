"""A soak test of the learning loop left alone, with real processes on PostgreSQL.

One API process (uvicorn) and two workers serve one app for 30 simulated days: every day the
app ingests its users' features and labels, asks for predictions, sends labelled sequences to a
second (sequence) model, and sends a few hostile items. Faults are injected on the way: a label
of 1e30 (a valid float32, so accepted), a sequence through a forbidden transition, both workers
SIGKILLed in the middle of a refit, and every database connection terminated
(``pg_terminate_backend``) for a few seconds.

Then: every accepted label is stored exactly once; no answer was a 5xx except 503 during the
outage; every prediction was finite; versions and artifacts stay within retention; no more
refits ran than were queued by triggers or by hand; the final per-person error beats the
generic model's.

The default run is small (fixed seed, ~1–2 minutes, part of CI); ``NME_SOAK_LONG=1`` runs the
long one (more users, bigger network, every fault several times). Its figures are printed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from nme.simulate import simulate_mood
from service import migrate
from service.db import make_engine, make_session_factory
from service.demo import FEATURES
from service.storage.keys import create_key
from service.storage.tables import Job, ModelEvent, ModelVersion, Observation
from service.storage.tables import Sequence as SequenceRow
from tests.service.conftest import create_pg_database, drop_pg_database, postgres_or_skip

ROOT = Path(__file__).resolve().parents[2]
LONG = os.environ.get("NME_SOAK_LONG") == "1"


@dataclass(frozen=True)
class Size:
    users: int
    days: int
    hidden: list[int]
    epochs: int
    min_new_labels: int
    kill_days: tuple[int, ...]
    outage_days: tuple[int, ...]


SIZE = (
    Size(users=200, days=30, hidden=[64, 64], epochs=60, min_new_labels=800,
         kill_days=(8, 18, 26), outage_days=(12, 22))
    if LONG
    else Size(users=24, days=30, hidden=[16], epochs=25, min_new_labels=120,
              kill_days=(10,), outage_days=(16,))
)
KEEP_VERSIONS = 2
STATES = ["calm", "tense", "upbeat"]
FORBIDDEN = [["calm", "upbeat"]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """The database, the API process and the worker processes of one soak run."""

    url: str
    admin_url: str
    artifact_dir: Path
    logs: Path
    port: int
    keys: dict[str, str]
    env: dict[str, str]
    api: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    def start_api(self) -> None:
        self.api = self._spawn("serve", "api")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("the API did not come up")

    def start_worker(self) -> None:
        self.workers.append(self._spawn("worker", f"worker{len(self.workers)}"))

    def _spawn(self, command: str, name: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", command], cwd=ROOT, env=self.env,
            stdout=log, stderr=subprocess.STDOUT,
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for process in [*self.workers, self.api]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers, self.api]:
            if process is not None:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    admin_url = postgres_or_skip()
    url = create_pg_database(admin_url)
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as session:
        keys = {
            role: create_key(session, name=role, scopes=scopes)
            for role, scopes in {
                "admin": ["admin"], "ingest": ["ingest"], "predict": ["predict"]
            }.items()
        }
        session.commit()
    engine.dispose()
    port = free_port()
    env = {
        **os.environ,
        "NME_DATABASE_URL": url,
        "NME_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "NME_PORT": str(port),
        "NME_DEVICE": "cpu",
        "NME_TORCH_THREADS": "1",
        "NME_LOG_LEVEL": "warning",
        "NME_AUTH_CACHE_SECONDS": "5",
        "NME_REFIT_MIN_NEW_LABELS": str(SIZE.min_new_labels),
        "NME_REFIT_MAX_AGE_SECONDS": "0",
        "NME_REFIT_CHECK_SECONDS": "0.5",
        "NME_REFIT_BACKOFF_SECONDS": "2",
        "NME_JOB_POLL_SECONDS": "0.05",
        "NME_JOB_HEARTBEAT_SECONDS": "0.5",
        "NME_JOB_STALE_SECONDS": "2",
        "NME_JOB_RETRY_DELAY_SECONDS": "0.5",
        "NME_KEEP_VERSIONS": str(KEEP_VERSIONS),
        "NME_MAINTENANCE_SECONDS": "1",
        "NME_ARTIFACT_GRACE_SECONDS": "3",
        "NME_DB_CONNECT_TIMEOUT_SECONDS": "2",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    soak = Stack(url, admin_url, tmp_path / "artifacts", logs, port, keys, env)
    soak.start_api()
    soak.start_worker()
    soak.start_worker()
    try:
        yield soak
    finally:
        soak.stop()
        drop_pg_database(admin_url, url)


@dataclass
class Traffic:
    """Every answer the app got, by status, and the labels the service accepted."""

    client: httpx.Client
    keys: dict[str, str]
    statuses: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    outage: bool = False
    accepted_labels: set[tuple[str, str]] = field(default_factory=set)
    non_finite: list[str] = field(default_factory=list)

    def call(self, method: str, path: str, role: str, **kwargs: object) -> httpx.Response | None:
        for _ in range(20):  # a rate-limited call waits as Retry-After says, like a real app
            try:
                response = self.client.request(
                    method, path, headers={"Authorization": f"Bearer {self.keys[role]}"},
                    timeout=60, **kwargs,
                )
            except httpx.TransportError as err:
                if not self.outage:
                    self.unexpected.append(f"{method} {path}: {err!r}")
                return None
            self.statuses[response.status_code] += 1
            if response.status_code != 429:
                break
            time.sleep(float(response.headers.get("retry-after", "1")))
        if response.status_code >= 500 and not (self.outage and response.status_code == 503):
            self.unexpected.append(f"{method} {path} → {response.status_code}: {response.text}")
        return response

    def ingest(self, items: list[dict]) -> None:
        """Send a day's observations until they are accepted (a 503 is retried)."""
        for _ in range(100):
            response = self.call("POST", "/v1/models/mood/observations", "ingest",
                                 json={"items": items})
            if response is not None and response.status_code == 200:
                self.accepted_labels |= {
                    (i["user_id"], i["day"]) for i in items if i.get("label") is not None
                }
                return
            if response is not None and response.status_code != 503:
                raise AssertionError(f"ingest refused: {response.status_code} {response.text}")
            time.sleep(0.2)
        raise AssertionError("ingest never accepted")

    def predict(self, items: list[dict]) -> list[float] | None:
        response = self.call("POST", "/v1/models/mood/predict", "predict", json={"items": items})
        if response is None or response.status_code != 200:
            return None
        values = [p["prediction"] for p in response.json()["predictions"]]
        if not all(isinstance(v, float) and math.isfinite(v) for v in values):
            self.non_finite.append(str(values))
        return values

    def expect_422(self, path: str, role: str, body: dict) -> None:
        response = self.call("POST", path, role, json=body)
        if response is not None and not (self.outage and response.status_code == 503):
            assert response.status_code == 422, (path, response.status_code, response.text)


def terminate_connections(admin_url: str, url: str, seconds: float) -> None:
    """Kill every connection to the soak database, repeatedly, for ``seconds``."""
    database = make_url(url).database
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    deadline = time.monotonic() + seconds
    with admin.connect() as connection:
        while time.monotonic() < deadline:
            connection.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = :name AND pid <> pg_backend_pid()"),
                {"name": database},
            )
            time.sleep(0.05)
    admin.dispose()


def sequences_for(day: int, rng: np.random.Generator, users: int) -> list[dict]:
    items = []
    for u in range(min(users, 30 if LONG else 6)):
        x = rng.normal(0, 1, (5, 2))
        labels = [STATES[int(np.argmax([-a, b, a]))] for a, b in x]
        for t in range(1, len(labels)):
            if [labels[t - 1], labels[t]] in FORBIDDEN:
                labels[t] = "tense"
        items.append({
            "user_id": f"s{u}", "sequence_id": f"d{day}",
            "segments": [{"features": {"pitch": float(a), "energy": float(b)}} for a, b in x],
            "labels": labels,
        })
    return items


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out: {what}")


def test_thirty_days_left_alone(stack: Stack) -> None:  # noqa: C901 (one story, told in order)
    started = time.monotonic()
    frame, truth = simulate_mood(n_persons=SIZE.users, n_days=SIZE.days + 3, seed=0)
    frame["t"] = frame.groupby("user").cumcount()  # each user's day number
    rng = np.random.default_rng(0)
    db = make_engine(stack.url)
    sessions = make_session_factory(db)
    client = httpx.Client(base_url=stack.base)
    traffic = Traffic(client, stack.keys)

    created = traffic.call("POST", "/v1/models", "admin", json={
        "name": "mood", "task": "regression", "features": FEATURES,
        "architecture": {"hidden": SIZE.hidden, "placement": "last"},
        "training": {"max_epochs": SIZE.epochs, "patience": 5, "batch_size": 64, "lr": 0.01},
    })
    assert created is not None and created.status_code == 201, created
    created = traffic.call("POST", "/v1/models", "admin", json={
        "name": "affect", "task": "sequence", "features": ["pitch", "energy"],
        "states": STATES,
        "architecture": {"hidden": [8], "forbidden_transitions": FORBIDDEN},
        "training": {"max_epochs": 5, "batch_size": 8, "lr": 0.05},
    })
    assert created is not None and created.status_code == 201
    manual_refits = 0

    def idle() -> bool:
        with sessions() as session:
            return not session.scalar(
                select(func.count()).select_from(Job)
                .where(Job.status.in_(("queued", "running")))
            )

    def refit_running() -> bool:
        with sessions() as session:
            return bool(session.scalar(
                select(func.count()).select_from(Job)
                .where(Job.kind == "refit", Job.status == "running")
            ))

    for day in range(SIZE.days):
        rows = frame[frame["t"] == day]
        items = []
        for row in rows.itertuples():
            item = {
                "user_id": row.user, "day": str(row.day.date()),
                "features": {name: float(getattr(row, name)) for name in FEATURES},
            }
            if rng.random() < 0.8:  # most users rate their mood
                item["label"] = float(row.mood)
            items.append(item)
        if day == 5:  # a mistyped label: a valid float32, so it is accepted
            items[0]["label"] = 1e30
        traffic.ingest(items)
        # the app asks for today's predictions
        traffic.predict([{"user_id": i["user_id"], "features": i["features"]} for i in items[:20]])
        # sequences for the second model; one through a forbidden transition is refused
        seq = sequences_for(day, rng, SIZE.users)
        response = traffic.call("POST", "/v1/models/affect/sequences", "ingest",
                                json={"items": seq})
        assert response is None or response.status_code in (200, 503)
        bad_seq = {**seq[0], "sequence_id": f"bad{day}",
                   "labels": ["tense", "calm", "upbeat", "tense", "tense"]}
        traffic.expect_422("/v1/models/affect/sequences", "ingest", {"items": [bad_seq]})
        # hostile items: a label beyond float32, an unknown feature, a NaN written as a string
        hostile = dict(items[1])
        traffic.expect_422("/v1/models/mood/observations", "ingest",
                           {"items": [{**hostile, "label": 1e300}]})
        traffic.expect_422("/v1/models/mood/observations", "ingest",
                           {"items": [{**hostile, "features": {"bogus": 1.0}}]})
        traffic.expect_422("/v1/models/mood/predict", "predict",
                           {"items": [{"user_id": "x", "features": {"weekday": "NaN"}}]})

        if day in SIZE.kill_days:
            response = traffic.call("POST", "/v1/models/mood/refit", "admin")
            assert response is not None and response.status_code == 202
            manual_refits += 1
            wait_until(refit_running, 60, "a refit to start")
            time.sleep(0.3)
            for worker in stack.workers:
                worker.send_signal(signal.SIGKILL)
                worker.wait(10)
            stack.workers.clear()
            stack.start_worker()
            stack.start_worker()
        if day in SIZE.outage_days:
            traffic.outage = True
            killer = threading.Thread(
                target=terminate_connections, args=(stack.admin_url, stack.url, 3.0)
            )
            killer.start()
            probe = [{"user_id": items[2]["user_id"], "features": items[2]["features"]}]
            while killer.is_alive():
                traffic.predict(probe)
                traffic.call("GET", "/v1/models/mood", "predict")
                time.sleep(0.1)
            killer.join()
            time.sleep(1.0)  # the pool notices, the workers reconnect
            traffic.outage = False
        if LONG or day % 10 == 9:  # some days the app is quiet long enough for the jobs
            wait_until(idle, 600, "the day's jobs to finish")

    # Let the loop settle: every queued job done, a final version trained on all labels.
    response = traffic.call("POST", "/v1/models/mood/refit", "admin")
    assert response is not None and response.status_code == 202
    manual_refits += 1
    wait_until(idle, 300, "the queue to drain")

    def artifacts_within_retention() -> bool:
        with sessions() as session:
            referenced = set(session.scalars(select(ModelVersion.artifact_path)))
        on_disk = {
            f"{model.name}/{entry.name}"
            for model in stack.artifact_dir.iterdir() for entry in model.iterdir()
        }
        return on_disk == referenced

    # orphans of the killed refits go once the grace period passed (maintenance every second)
    wait_until(artifacts_within_retention, 30, "orphaned artifacts to be collected")

    # Held-out days: personalised vs generic predictions of the same features.
    held = frame[frame["t"] >= SIZE.days]
    features = [{name: float(v) for name, v in zip(FEATURES, row, strict=True)}
                for row in held[FEATURES].itertuples(index=False)]
    users = held["user"].tolist()
    personal = traffic.predict([{"user_id": u, "features": f}
                                for u, f in zip(users, features, strict=True)])
    generic = traffic.predict([{"user_id": f"new-{u}", "features": f}
                               for u, f in zip(users, features, strict=True)])
    assert personal is not None and generic is not None
    truth_y = held["mood"].to_numpy()
    per_person = {}
    for name, values in (("personal", personal), ("generic", generic)):
        errors = (np.asarray(values) - truth_y) ** 2
        by_user = {u: [] for u in set(users)}
        for u, e in zip(users, errors, strict=True):
            by_user[u].append(e)
        per_person[name] = float(np.mean([math.sqrt(np.mean(v)) for v in by_user.values()]))

    with sessions() as session:
        stored = session.execute(
            select(Observation.user_id, Observation.day, func.count())
            .where(Observation.label.is_not(None))
            .group_by(Observation.user_id, Observation.day)
        ).all()
        versions = session.scalars(select(ModelVersion)).all()
        refit_jobs = session.scalar(
            select(func.count()).select_from(Job).where(Job.kind == "refit")
        )
        queued_events = session.scalar(
            select(func.count()).select_from(ModelEvent).where(ModelEvent.kind == "refit_queued")
        )
        event_kinds = Counter(session.scalars(select(ModelEvent.kind)).all())
        per_model = Counter(
            f"{model_id}:{kind}" for model_id, kind in session.execute(
                select(ModelEvent.model_id, ModelEvent.kind)
            )
        )
        n_sequences = session.scalar(select(func.count()).select_from(SequenceRow))
        referenced = {v.artifact_path for v in versions}
    db.dispose()
    on_disk = {
        f"{model.name}/{entry.name}"
        for model in stack.artifact_dir.iterdir() for entry in model.iterdir()
    }
    figures = {
        "users": SIZE.users, "days": SIZE.days, "seconds": round(time.monotonic() - started, 1),
        "statuses": dict(sorted(traffic.statuses.items())), "labels": len(stored),
        "versions": len(versions), "refit_jobs": refit_jobs,
        "refit_queued_events": queued_events, "events": dict(event_kinds),
        "events_per_model": dict(per_model), "sequences": n_sequences,
        "per_person_rmse": per_person,
    }
    print("\nsoak figures:", json.dumps(figures, indent=1))

    assert traffic.unexpected == [], traffic.unexpected[:5]
    assert traffic.non_finite == []
    assert all(count == 1 for *_, count in stored)
    assert len(stored) == len(traffic.accepted_labels)
    by_model = Counter(v.model_id for v in versions)
    assert all(n <= KEEP_VERSIONS + 1 for n in by_model.values()), by_model
    assert all(v.metrics.get("val_score") is None or math.isfinite(v.metrics["val_score"])
               for v in versions)
    assert on_disk == referenced
    assert refit_jobs == queued_events  # every refit was queued by a trigger or by hand
    assert event_kinds["labels_skipped"] >= 1  # the 1e30 label
    assert per_person["personal"] < per_person["generic"]
