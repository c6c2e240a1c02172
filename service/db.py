"""Engine and session-factory construction (SQLite and PostgreSQL).

Called from the app lifespan, the CLI and tests; never at import time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
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

    PostgreSQL: pooled connections are checked before use (a restarted or terminated server
    costs one retry, not an error). ``connect_timeout`` (seconds) bounds connecting and waiting
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
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)


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
