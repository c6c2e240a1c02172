"""Scratch PostgreSQL databases for the benchmarks: created on a server, dropped afterwards.

Importable from any script in this folder (``python benchmarks/x.py`` puts the folder on the
path), like ``serve``'s helpers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


def create_database(admin_url: str, prefix: str = "nme_bench") -> str:
    """Create an empty database ``<prefix>_<random>`` on the server of ``admin_url`` (any
    database on it); returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, url: str) -> None:
    """Drop the database of ``url`` (connections to it are ended)."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(
                text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
            )
    finally:
        admin.dispose()


@contextmanager
def scratch_database(admin_url: str, prefix: str = "nme_bench") -> Iterator[str]:
    """The URL of a new empty database, dropped when the block ends."""
    url = create_database(admin_url, prefix)
    try:
        yield url
    finally:
        drop_database(admin_url, url)
