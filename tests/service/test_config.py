"""Settings come from NME_* variables and refuse unsafe production values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings, normalize_database_url


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NME_DATABASE_URL", "NME_ARTIFACT_DIR", "NME_DEVICE", "NME_MAX_BATCH"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.database_url == "sqlite:///./var/nme.sqlite3"
    assert settings.artifact_dir == Path("var/artifacts")
    assert settings.device == "auto"
    assert settings.max_batch == 10_000


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NME_DATABASE_URL", "postgresql://u:p@db/nme")
    monkeypatch.setenv("NME_DEVICE", "cuda")
    monkeypatch.setenv("NME_MAX_BATCH", "50")
    settings = Settings()
    assert settings.sqlalchemy_url == "postgresql+psycopg://u:p@db/nme"
    assert settings.device == "cuda" and settings.max_batch == 50


def test_invalid_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NME_DEVICE", "tpu")
    with pytest.raises(ValidationError):
        Settings()


def test_production_refuses_sqlite() -> None:
    with pytest.raises(ValidationError, match="PostgreSQL"):
        Settings(environment="production", database_url="sqlite:///x.db")
    Settings(environment="production", database_url="postgresql://db/nme")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://h/db", "postgresql+psycopg://h/db"),
        ("postgresql://h/db", "postgresql+psycopg://h/db"),
        ("postgresql+psycopg://h/db", "postgresql+psycopg://h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_normalize_database_url(url: str, expected: str) -> None:
    assert normalize_database_url(url) == expected
