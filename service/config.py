"""Service settings, read from the environment (prefix ``NME_``) by pydantic-settings.

Nothing here is instantiated at import time: ``create_app(settings)`` and the CLI build a
``Settings`` when they need one, so tests can pass their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./var/nme.sqlite3"


class Settings(BaseSettings):
    """Everything the API process and the CLI need to know about their environment."""

    model_config = SettingsConfigDict(env_prefix="NME_", extra="ignore")

    environment: Literal["local", "production"] = Field(
        default="local",
        description="`production` refuses settings that are only safe on a developer machine.",
    )
    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        description="SQLAlchemy URL; `postgresql://…` is served through psycopg 3.",
    )
    artifact_dir: Path = Field(
        default=Path("./var/artifacts"),
        description="Where model-version artifacts (θ̄ and config) are written.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Torch device for training and inference."
    )
    max_batch: int = Field(
        default=10_000, ge=1, description="Largest number of items in one request (else 413)."
    )
    auth_cache_seconds: float = Field(
        default=2.0,
        ge=0.0,
        description="How long a verified API key is trusted without a database look-up; "
        "a revocation takes effect after at most this long.",
    )
    torch_threads: int = Field(
        default=1,
        ge=0,
        description="Intra-op threads torch may use in the API process and in `nme-service "
        "refit | demo` (0: torch's default). Serving runs many small forward passes; spreading "
        "each over threads cost more in hand-offs than it saved (measured on 2 CPUs: a 1 000-row "
        "batch took 88 ms on 2 threads, 1 ms on 1; 10 training epochs 10 s vs 2.3 s). Scale with "
        "more processes instead.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        # SQLite serialises writers and lives on one disk: fine for the demo, wrong for N API
        # processes and workers behind a load balancer.
        if self.environment == "production" and self.database_url.startswith("sqlite"):
            raise ValueError("NME_ENVIRONMENT=production requires a PostgreSQL NME_DATABASE_URL")
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL with the psycopg 3 driver made explicit for PostgreSQL."""
        return normalize_database_url(self.database_url)


def normalize_database_url(url: str) -> str:
    """Map ``postgres://`` / ``postgresql://`` to the psycopg 3 driver; leave others alone."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url
