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
        "each over threads cost more in hand-offs than it saved (measurements in "
        "docs/service.md, Performance). Scale with "
        "more processes instead.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # ------------------------------------------------------------- background learning
    user_updates_on_ingest: bool = Field(
        default=True,
        description="Ingesting labels enqueues a per-user update (θⁱ only) for each affected "
        "user of a model that has an active version.",
    )
    refit_min_new_labels: int = Field(
        default=1000,
        ge=0,
        description="The worker enqueues a refit once this many labels were added or changed "
        "since the active version's training data was read (0: never by count).",
    )
    refit_max_age_seconds: float = Field(
        default=86_400.0,
        ge=0.0,
        description="The worker enqueues a refit when the active version is older than this and "
        "at least one label is new (0: never by age).",
    )
    refit_check_seconds: float = Field(
        default=60.0, gt=0.0, description="How often the worker checks the refit triggers."
    )
    job_poll_seconds: float = Field(
        default=1.0, gt=0.0, description="How long an idle worker sleeps between polls."
    )
    job_heartbeat_seconds: float = Field(
        default=5.0, gt=0.0, description="How often a worker refreshes its running job's heartbeat."
    )
    job_stale_seconds: float = Field(
        default=60.0,
        gt=0.0,
        description="A running job whose heartbeat is older than this belongs to a dead worker "
        "and is requeued (or failed after its last attempt).",
    )
    job_max_attempts: int = Field(
        default=3, ge=1, le=100, description="Attempts per job before it is marked failed."
    )
    job_retry_delay_seconds: float = Field(
        default=5.0,
        ge=0.0,
        description="Back-off before a failed job's first retry; doubles per attempt (max 10 min).",
    )
    refit_backoff_seconds: float = Field(
        default=600.0,
        ge=0.0,
        description="After a refit is rejected or fails for good, the model's next automatic "
        "refit waits this long, doubling with each further rejection or failure (at most a day); "
        "an activation resets it.",
    )
    keep_versions: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="Retention: each model keeps its active version and the newest this many "
        "others (with their artifacts and θⁱ rows); older versions are deleted.",
    )
    job_retention_seconds: float = Field(
        default=7 * 86_400.0,
        gt=0.0,
        description="Finished job rows and model events older than this are deleted.",
    )
    artifact_grace_seconds: float = Field(
        default=3600.0,
        gt=0.0,
        description="An artifact directory (or .tmp-* directory) no version references is "
        "deleted once it is older than this.",
    )
    maintenance_seconds: float = Field(
        default=600.0,
        gt=0.0,
        description="How often a worker collects orphaned artifacts and prunes old job rows, "
        "events and versions (also once at start).",
    )
    db_connect_timeout_seconds: float = Field(
        default=5.0,
        gt=0.0,
        description="API processes give up connecting to the database after this long and "
        "answer 503 with Retry-After.",
    )
    db_statement_timeout_seconds: float = Field(
        default=30.0,
        ge=0.0,
        description="API processes cancel a statement after this long (PostgreSQL; 0: no limit).",
    )
    worker_alive_file: Path | None = Field(
        default=None,
        description="A file the worker touches on every heartbeat and idle poll (container health "
        "checks compare its mtime with the clock).",
    )

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        # SQLite serialises writers and lives on one disk: fine for the demo, wrong for N API
        # processes and workers behind a load balancer.
        if self.environment == "production" and self.database_url.startswith("sqlite"):
            raise ValueError("NME_ENVIRONMENT=production requires a PostgreSQL NME_DATABASE_URL")
        # A heartbeat slower than the stale limit would get live jobs requeued under the worker.
        if self.job_stale_seconds <= 2 * self.job_heartbeat_seconds:
            raise ValueError(
                "NME_JOB_STALE_SECONDS must exceed twice NME_JOB_HEARTBEAT_SECONDS "
                f"({self.job_stale_seconds} <= 2 × {self.job_heartbeat_seconds})"
            )
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
