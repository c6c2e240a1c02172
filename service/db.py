"""Engine and session-factory construction (SQLite and PostgreSQL).

Called from the app lifespan, the CLI and tests; never at import time.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from service.config import normalize_database_url


def make_engine(
    url: str,
    *,
    connect_timeout: float | None = None,
    statement_timeout: float | None = None,
    **kwargs: Any,
) -> Engine:
    """Create an engine for ``url`` with the per-dialect settings the service relies on.

    SQLite: the file's directory is created, foreign keys are enforced (SQLite ignores them by
    default, and ``ON DELETE CASCADE`` is how a user is forgotten), and WAL journaling lets
    readers (predictions) proceed while a writer (ingest, refit) holds the lock.

    PostgreSQL: a pooled connection that sat idle for over ``PING_AFTER_IDLE_SECONDS`` is
    checked before use (a restarted or terminated server costs one retry, not an error); one
    returned moments ago — every connection under load — is used at once (SQLAlchemy's
    ``pool_pre_ping`` pinged on every checkout: a round trip per request, a quarter of a
    prediction's time on PostgreSQL). ``connect_timeout`` (seconds) bounds connecting and waiting
    for a pooled connection; ``statement_timeout`` (seconds, 0: none) makes the server cancel
    longer statements. The API sets both, so an unreachable or locked database answers 503
    instead of hanging requests.
    """
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )
        event.listen(engine, "connect", _configure_sqlite_connection)
        return engine
    connect_args: dict[str, Any] = {}
    if connect_timeout:
        connect_args["connect_timeout"] = max(1, math.ceil(connect_timeout))
        kwargs.setdefault("pool_timeout", connect_timeout)
    if statement_timeout:
        connect_args["options"] = f"-c statement_timeout={int(statement_timeout * 1000)}"
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    event.listen(engine, "checkin", _note_checkin)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


PING_AFTER_IDLE_SECONDS = 1.0
"""A pooled PostgreSQL connection idle longer than this is pinged before use."""


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in_at"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """The pessimistic disconnect check, only after idleness: raising ``DisconnectionError``
    makes the pool discard this connection and retry with a fresh one."""
    checked_in = record.info.get("checked_in_at")
    if checked_in is None or time.monotonic() - checked_in < PING_AFTER_IDLE_SECONDS:
        return  # new, or back from a request just now: it was working a moment ago
    try:
        # psycopg 3 leaves a returned connection idle (no transaction), so this is one round
        # trip; any failure means the connection is unusable.
        dbapi_connection.execute("SELECT 1")
        dbapi_connection.rollback()
    except Exception as err:  # psycopg raises OperationalError, InterfaceError, …
        raise DisconnectionError(f"stale pooled connection: {err}") from err


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (responses are built after it)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def is_sqlite(engine: Engine) -> bool:
    """Whether ``engine`` talks to SQLite (some statements differ per dialect)."""
    return engine.dialect.name == "sqlite"
