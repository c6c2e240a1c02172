"""Fixtures: every database test runs on SQLite and on PostgreSQL.

Each backend gets one migrated database per test session (PostgreSQL: a uniquely named database,
dropped at the end), and every test starts from empty tables, so assertions can be exact. With
CI=true an unreachable PostgreSQL fails the run; elsewhere its variants are skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service import migrate
from service.app import create_app
from service.config import RateLimits, Settings
from service.db import make_engine, make_session_factory
from service.storage.keys import create_key
from service.storage.tables import Base
from tests.service.factories import create_model, ingest, refit, simulated_items

POSTGRES_URL = os.environ.get(
    "NME_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
KEY_SCOPES = {
    "admin": ["admin"],
    "ingest": ["ingest"],
    "predict": ["predict"],
    "all": ["admin", "ingest", "predict"],
}
IN_CI = os.environ.get("CI", "").lower() == "true"


def postgres_or_skip() -> str:
    """The admin URL of the test PostgreSQL server; skip (or, in CI, fail) if it is down."""
    try:
        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as err:  # any connection failure means "no PostgreSQL here"
        message = f"PostgreSQL at {POSTGRES_URL} is unreachable: {err}"
        if IN_CI:
            pytest.fail(message + " (CI=true requires it)", pytrace=False)
        pytest.skip(message)
    return POSTGRES_URL


def create_pg_database(admin_url: str) -> str:
    """Create a uniquely named database and return its URL."""
    name = f"nme_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(admin_url: str, url: str) -> None:
    """Drop a database made by :func:`create_pg_database` (closing leftover connections)."""
    name = make_url(url).database
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite file shared by the session's SQLite tests."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'nme.sqlite3'}"
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A migrated PostgreSQL database shared by the session's PostgreSQL tests."""
    admin_url = postgres_or_skip()
    url = create_pg_database(admin_url)
    migrate.upgrade(url)
    yield url
    drop_pg_database(admin_url, url)


def empty_tables(url: str) -> None:
    """Delete every row (keeping the schema), resetting ids so they start at 1 again."""
    engine = make_engine(url)
    tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as connection:
        # DELETE, not TRUNCATE: on these tiny tables it avoids TRUNCATE's new relation files
        # and fsyncs, which made PostgreSQL tests several times slower.
        for table in tables:  # children first: foreign keys are enforced
            connection.execute(text(f"DELETE FROM {table}"))
        if engine.dialect.name == "postgresql":
            for table in tables:
                if "id" in Base.metadata.tables[table].c:
                    connection.execute(
                        text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 1, false)")
                    )
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty, migrated database: once SQLite, once PostgreSQL."""
    url = request.getfixturevalue(f"{request.param}_url")
    empty_tables(url)
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A test-side engine on the test database (the app builds its own)."""
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for arranging and inspecting database state directly."""
    return make_session_factory(engine)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings for one test: its database, a private artifact dir, CPU, small batches."""
    return Settings(
        database_url=database_url,
        artifact_dir=tmp_path / "artifacts",
        device="cpu",
        max_batch=1000,
        # Tests change keys and activate versions behind the app's back (factories write to
        # the database directly) and assert at once: no caching. The caches' own tests turn
        # them on (tests/service/test_serving_caches.py).
        auth_cache_seconds=0.0,
        active_version_ttl_seconds=0.0,
        torch_threads=0,  # leave torch's process-wide setting alone for the other test suites
        rate_limits=RateLimits(enabled=False),  # tests/service/test_rate_limits.py turns them on
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A client of a fresh app (the lifespan runs: engine, caches)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def keys(session_factory: sessionmaker[Session]) -> dict[str, str]:
    """One API key per role: admin, ingest, predict, and ``all`` (every scope)."""
    with session_factory() as session:
        made = {role: create_key(session, name=role, scopes=s) for role, s in KEY_SCOPES.items()}
        session.commit()
    return made


@pytest.fixture
def auth(keys: dict[str, str]) -> Callable[[str], dict[str, str]]:
    """``auth("admin")`` → the Authorization header of that role's key."""
    return lambda role: {"Authorization": f"Bearer {keys[role]}"}


@pytest.fixture
def mood_model(client: TestClient, auth: Callable[[str], dict[str, str]]) -> dict:
    """An empty regression model ``mood`` (no data, no version)."""
    return create_model(client, auth)


@pytest.fixture
def trained_mood(
    client: TestClient, auth: Callable[[str], dict[str, str]], mood_model: dict
) -> dict:
    """``mood`` with 12 simulated users × 20 labelled days and an active version 1.

    Returns ``{"items": the ingested items, "version": the refit's answer}``.
    """
    items = simulated_items()
    ingest(client, auth, items)
    return {"items": items, "version": refit(client, auth)}
