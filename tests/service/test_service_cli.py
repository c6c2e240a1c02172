"""``nme-service`` commands: keys, refit, demo (without serving)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from service.app import create_app
from service.cli import main
from service.config import Settings
from service.storage.tables import ApiKey
from tests.service.factories import ingest, simulated_items


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The CLI reads the same settings as the test's app, from the environment."""
    monkeypatch.setenv("NME_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("NME_ARTIFACT_DIR", str(settings.artifact_dir))
    monkeypatch.setenv("NME_DEVICE", "cpu")
    return settings


def test_create_key_prints_a_working_key_once(
    env: Settings, client: TestClient, capsys: pytest.CaptureFixture, session_factory: sessionmaker
) -> None:
    assert main(["create-key", "--name", "app", "--scopes", "predict,ingest"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("nme_")
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with session_factory() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.name == "app")).one()
    assert row.scopes == ["ingest", "predict"]


def test_create_key_with_unknown_scope_fails(env: Settings, capsys: pytest.CaptureFixture) -> None:
    assert main(["create-key", "--name", "x", "--scopes", "root"]) == 1
    assert "scopes" in capsys.readouterr().err


def test_revoke_key_by_prefix(
    env: Settings, client: TestClient, capsys: pytest.CaptureFixture
) -> None:
    main(["create-key", "--name", "app", "--scopes", "predict"])
    key = capsys.readouterr().out.strip()
    prefix = key.split("_")[1]
    assert main(["revoke-key", prefix]) == 0
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert main(["revoke-key", "doesnotexist"]) == 1


def test_refit_command(
    env: Settings,
    client: TestClient,
    auth: Callable,
    mood_model: dict,
    capsys: pytest.CaptureFixture,
) -> None:
    ingest(client, auth, simulated_items(n_users=4, n_days=10))
    assert main(["refit", "--model", "mood"]) == 0
    out = capsys.readouterr()
    assert '"version": 1' in out.out and '"status": "active"' in out.out
    assert '"epoch": 1' in out.err


def test_demo_sets_everything_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # the demo's defaults live under ./var
    for name in ("NME_DATABASE_URL", "NME_ARTIFACT_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NME_DEVICE", "cpu")
    argv = ["demo", "--no-serve", "--users", "6", "--days", "15", "--epochs", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    key = re.search(r"admin API key \(shown once\): (\S+)", out).group(1)
    assert "curl -s http://127.0.0.1:8000/v1/models/mood/predict" in out
    assert re.search(r"checked through NMEClient: \S+ → [-\d.]+ \(personalised\); "
                     r"someone-new → [-\d.]+ \(generic\)", out), out
    assert "from service.client import NMEClient" in out
    assert (tmp_path / "var" / "nme.sqlite3").is_file()

    settings = Settings(device="cpu")  # the same ./var defaults the demo used
    with TestClient(create_app(settings)) as client:
        curl = re.search(r"-d '(\{\"items\": \[\{\"user_id\".*?)'$", out, re.M).group(1)
        response = client.post(
            "/v1/models/mood/predict",
            content=curl,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert response.status_code == 200
        personalized = [p["personalized"] for p in response.json()["predictions"]]
        assert personalized == [True, False]


def test_worker_burst_runs_queued_jobs_and_exits(
    client: TestClient,
    auth: Callable,
    trained_mood: dict,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    response = client.post(
        "/v1/models/mood/jobs", json={"kind": "user_update", "user_id": "u0001"},
        headers=auth("admin"),
    )
    monkeypatch.setenv("NME_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("NME_ARTIFACT_DIR", str(settings.artifact_dir))
    assert main(["worker", "--burst", "--name", "cli"]) == 0
    job = client.get(f"/v1/jobs/{response.json()['job']['id']}", headers=auth("admin")).json()
    assert job["status"] == "succeeded"
    logs = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    started = [entry for entry in logs if entry.get("action") == "start"]
    assert [(e["job"], e["kind"], e["worker"]) for e in started] == [
        (job["id"], "user_update", "cli")
    ]
