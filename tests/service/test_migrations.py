"""The schema is made by migrations only, migrates both ways, and matches the ORM exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from service import migrate
from service.app import create_app
from service.cli import main
from service.config import Settings
from service.db import make_engine
from service.storage.tables import Base
from tests.service.conftest import create_pg_database, drop_pg_database, postgres_or_skip


@pytest.fixture(params=["sqlite", "postgres"])
def blank_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database that was never migrated (not the session's shared one)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'blank.sqlite3'}"
        return
    admin_url = postgres_or_skip()
    url = create_pg_database(admin_url)
    yield url
    drop_pg_database(admin_url, url)


def schema_drift(url: str) -> list:
    """Differences between the migrated database and the ORM metadata."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_leaves_no_drift(blank_url: str) -> None:
    migrate.upgrade(blank_url)
    assert table_names(blank_url) == set(Base.metadata.tables)
    migrate.downgrade(blank_url, "base")
    assert table_names(blank_url) == set()
    migrate.upgrade(blank_url)
    assert schema_drift(blank_url) == []
    engine = make_engine(blank_url)
    assert migrate.schema_is_current(engine)
    engine.dispose()


def test_migrate_command_works_from_any_directory(
    blank_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no alembic.ini here
    monkeypatch.setenv("NME_DATABASE_URL", blank_url)
    assert main(["migrate"]) == 0
    assert schema_drift(blank_url) == []


def test_readyz_is_503_until_migrated(blank_url: str, tmp_path: Path) -> None:
    settings = Settings(database_url=blank_url, artifact_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["schema_revision"] is None
        migrate.upgrade(blank_url)
        response = client.get("/readyz")
        assert response.status_code == 200
        assert response.json()["status"] == "ready"


def test_healthz_needs_no_database(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'never.sqlite3'}")
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
