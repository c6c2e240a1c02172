"""Run Alembic programmatically, from any working directory.

The migration scripts live in the repository's top-level ``migrations/`` folder, which the build
maps into the package as ``service.migrations`` (``pyproject.toml``: ``package-dir``). So a clone
(editable install), a wheel and the container all find them through the import system, and can
migrate a database without the repository's ``alembic.ini``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from service.config import normalize_database_url


def _migrations_dir() -> Path:
    spec = importlib.util.find_spec("service.migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    # A source checkout on sys.path that was never installed.
    return Path(__file__).resolve().parents[1] / "migrations"


MIGRATIONS_DIR = _migrations_dir()


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the packaged migrations and at ``url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation treats "%" specially (URL-encoded passwords contain it).
    config.set_main_option("sqlalchemy.url", normalize_database_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Downgrade the database at ``url`` to ``revision``."""
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    """The newest revision among the packaged migrations."""
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def schema_is_current(engine: Engine) -> bool:
    """Whether the database schema is at the packaged head revision."""
    return current_revision(engine) == head_revision()
