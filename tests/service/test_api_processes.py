"""Two real API processes on one PostgreSQL database and one artifact directory.

An activation made through process 1 is served by process 1 at once and by process 2 within
``NME_ACTIVE_VERSION_TTL_SECONDS``; while it propagates every batch answer comes wholly from one
version (its predictions equal that version's, never a mix); a key revoked with the CLI is
refused by both within ``NME_AUTH_CACHE_SECONDS``. PostgreSQL only: cross-process state is what
is tested (with CI=true an unreachable server fails, as for every PostgreSQL test).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.app import create_app
from service.cli import main as cli
from service.config import RateLimits, Settings
from service.db import make_engine, make_session_factory
from service.jobs.tasks import refit_model
from service.storage.keys import create_key
from tests.service.conftest import empty_tables
from tests.service.factories import create_model, features, ingest, simulated_items

ROOT = Path(__file__).resolve().parents[2]
BOUND = 1.0
"""Both processes' NME_ACTIVE_VERSION_TTL_SECONDS and NME_AUTH_CACHE_SECONDS."""
SLACK = 1.0
"""Polling and request time on a busy 2-core machine, on top of the bound."""
USERS = [f"u{k:04d}" for k in range(1, 13)] + ["stranger"]


# The fixtures are module-scoped: starting two API processes and training two versions is most
# of the time here, and the tests touch disjoint state (one activates, one revokes another key).


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api-processes")


@pytest.fixture(scope="module")
def pg_settings(postgres_url: str, workdir: Path) -> Settings:
    """Settings on an emptied PostgreSQL test database, caches off for the arranging app."""
    empty_tables(postgres_url)
    return Settings(
        database_url=postgres_url, artifact_dir=workdir / "artifacts", device="cpu",
        auth_cache_seconds=0.0, active_version_ttl_seconds=0.0, torch_threads=0,
        rate_limits=RateLimits(enabled=False), user_updates_on_ingest=False,
    )


@pytest.fixture(scope="module")
def pg_sessions(pg_settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_settings.database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def keys(pg_sessions: sessionmaker[Session]) -> dict[str, str]:
    with pg_sessions() as session:
        made = {
            "admin": create_key(session, name="admin", scopes=["admin", "ingest", "predict"]),
            "app": create_key(session, name="app", scopes=["predict"]),
        }
        session.commit()
    return made


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def api_processes(pg_settings: Settings, workdir: Path, two_versions: None) -> Iterator[list[str]]:
    """Two ``nme-service serve`` processes; their base URLs."""
    env = {
        **os.environ,
        "NME_DATABASE_URL": pg_settings.database_url,
        "NME_ARTIFACT_DIR": str(pg_settings.artifact_dir),
        "NME_DEVICE": "cpu",
        "NME_TORCH_THREADS": "1",
        "NME_ACTIVE_VERSION_TTL_SECONDS": str(BOUND),
        "NME_AUTH_CACHE_SECONDS": str(BOUND),
        "NME_RATE_LIMITS": '{"enabled": false}',
        "NME_LOG_LEVEL": "warning",
    }
    started: list[subprocess.Popen] = []
    urls: list[str] = []
    try:
        for k in range(2):
            port = free_port()
            log = (workdir / f"api{k}.log").open("w")
            started.append(subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            ))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        for url, process in zip(urls, started, strict=True):
            while True:
                assert process.poll() is None, (workdir / "api0.log").read_text()
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "API process did not start within 60 s"
                time.sleep(0.1)
        yield urls
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def two_versions(pg_settings: Settings, pg_sessions: sessionmaker, keys: dict[str, str]) -> None:
    """``mood`` with version 1 active and version 2 ready (trained after the same users' labels
    were replaced by other simulated ones, so the two versions answer differently)."""
    with TestClient(create_app(pg_settings)) as client:
        auth = lambda _role: {"Authorization": f"Bearer {keys['admin']}"}  # noqa: E731
        create_model(client, auth)
        for seed, activate in ((0, True), (1, False)):
            ingest(client, auth, simulated_items(seed=seed))
            refit_model(pg_sessions, model_name="mood", artifact_dir=pg_settings.artifact_dir,
                        device="cpu", activate=activate, follow_up_updates=False)


def predict(http: httpx.Client, url: str, key: str) -> tuple[int, list[float]]:
    """One batch of known users and a stranger: (version, predictions)."""
    body = {"items": [{"user_id": u, "features": features()} for u in USERS]}
    response = http.post(
        f"{url}/v1/models/mood/predict", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    return answer["version"], [p["prediction"] for p in answer["predictions"]]


def activate(http: httpx.Client, url: str, key: str, number: int) -> None:
    response = http.post(
        f"{url}/v1/models/mood/versions/{number}/activate",
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200, response.text


def same(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


def test_activation_reaches_every_process_within_the_bound_and_never_mixes(
    api_processes: list[str], keys: dict[str, str]
) -> None:
    first, second = api_processes
    admin = keys["admin"]
    with httpx.Client(timeout=30) as http:
        activate(http, first, admin, 1)
        time.sleep(BOUND)  # whatever either process cached before, both now serve version 1
        answers = {1: predict(http, first, admin)[1]}
        assert predict(http, second, admin) == (1, pytest.approx(answers[1], rel=1e-6))

        activate(http, first, admin, 2)
        switched = time.monotonic()
        version, answers[2] = predict(http, first, admin)
        assert version == 2  # the process that activated serves the new version at once
        assert not same(answers[1], answers[2]), "the two versions should answer differently"

        seen: list[int] = []
        while True:
            version, values = predict(http, second, admin)
            elapsed = time.monotonic() - switched
            seen.append(version)
            # one version per batch: the predictions are exactly that version's
            assert same(values, answers[version]), (version, values, answers)
            if version == 2:
                break
            assert elapsed < BOUND + SLACK, f"process 2 served version 1 after {elapsed:.2f} s"
            time.sleep(0.02)
        # and it never goes back; either process gives the same answer (stateless processes)
        for url in (first, second):
            for _ in range(5):
                version, values = predict(http, url, admin)
                assert version == 2 and same(values, answers[2])
        assert set(seen) <= {1, 2}


def test_revoked_key_is_refused_by_every_process_within_the_bound(
    api_processes: list[str],
    keys: dict[str, str],
    pg_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,  # the CLI reads NME_DATABASE_URL
) -> None:
    app_key = keys["app"]
    with httpx.Client(timeout=30) as http:
        for url in api_processes:  # both processes verified (and cached) the key
            predict(http, url, app_key)
        monkeypatch.setenv("NME_DATABASE_URL", pg_settings.database_url)
        assert cli(["revoke-key", app_key.split("_")[1]]) == 0
        revoked = time.monotonic()
        pending = set(api_processes)
        while pending:
            for url in sorted(pending):
                response = http.get(
                    f"{url}/v1/models", headers={"Authorization": f"Bearer {app_key}"}
                )
                if response.status_code == 401:
                    pending.discard(url)
                else:
                    assert response.status_code == 200, response.text
            elapsed = time.monotonic() - revoked
            assert not pending or elapsed < BOUND + SLACK, f"{pending} still accept it"
            time.sleep(0.02)
        for url in api_processes:  # and stays refused
            response = http.post(
                f"{url}/v1/models/mood/predict",
                json={"items": [{"user_id": "u0001", "features": features()}]},
                headers={"Authorization": f"Bearer {app_key}"},
            )
            assert response.status_code == 401
