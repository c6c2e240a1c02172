"""Service settings, read from the environment (prefix ``NME_``) by pydantic-settings.

Nothing here is instantiated at import time: ``create_app(settings)`` and the CLI build a
``Settings`` when they need one, so tests can pass their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./var/nme.sqlite3"

RateScope = Literal["predict", "ingest", "admin", "read"]
"""What a request is charged to: the scope its route needs (``read``: routes any key may call)."""


class RateLimit(BaseModel):
    """A token bucket: ``rate`` requests per second on average, bursts of up to ``burst``."""

    model_config = ConfigDict(extra="forbid")

    rate: float = Field(gt=0.0, le=1e6, allow_inf_nan=False)
    burst: int = Field(ge=1, le=1_000_000)


DEFAULT_RATE_LIMITS: dict[str, RateLimit] = {
    "predict": RateLimit(rate=100.0, burst=200),
    "ingest": RateLimit(rate=20.0, burst=50),
    "admin": RateLimit(rate=5.0, burst=20),
    "read": RateLimit(rate=20.0, burst=50),
}
"""Per key and API process; see docs/service.md, Rate limits."""


class RateLimits(BaseModel):
    """``NME_RATE_LIMITS``, a JSON object. ``scopes`` overrides the defaults per scope,
    ``keys`` per API key (by its public prefix or its name) and scope; ``null`` means unlimited.

    Example: ``{"scopes": {"predict": {"rate": 50, "burst": 100}}, "keys": {"backend":
    {"predict": {"rate": 500, "burst": 1000}}, "3f9c0a1b2c4d": {"admin": null}}}``
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    failed_keys: RateLimit | None = RateLimit(rate=5.0, burst=20)
    """Per client address: key look-ups that end in 401 (unknown, malformed or revoked keys).
    Once a client's bucket is empty, a key the process has not verified recently gets 429
    without a database look-up, so spraying random keys cannot turn into a query per request;
    keys already in the key cache still pass. ``null``: unlimited."""
    scopes: dict[RateScope, RateLimit | None] = Field(default_factory=dict)
    keys: dict[str, dict[RateScope, RateLimit | None]] = Field(default_factory=dict)

    def limit_for(self, scope: str, *, prefix: str, name: str) -> RateLimit | None:
        """The bucket of a key for one scope: its own override (prefix before name), else the
        scope's setting, else the default; None means unlimited."""
        for who in (prefix, name):
            overrides = self.keys.get(who)
            if overrides is not None and scope in overrides:
                return overrides[scope]  # type: ignore[index]
        if scope in self.scopes:
            return self.scopes[scope]  # type: ignore[index]
        return DEFAULT_RATE_LIMITS.get(scope)


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
        default=1.0,
        ge=0.0,
        description="How long an API process trusts a verified API key without a database "
        "look-up: a revocation (CLI or API, in any process) is refused by every API process "
        "after at most this long. 0: look the key up on every request.",
    )
    active_version_ttl_seconds: float = Field(
        default=1.0,
        ge=0.0,
        description="How long an API process serves a model's active version without asking the "
        "database again: an activation made elsewhere (the worker's refit, another API process, "
        "a rollback) is served by every API process after at most this long; one made through "
        "this process's API at once. 0: look the active version up on every request.",
    )
    predict_fast_path: bool = Field(
        default=True,
        description="Answer well-formed predict requests without FastAPI's routing, dependency "
        "and body machinery (same answers, a fraction of the server time; anything unusual "
        "still goes through the declared route). False: every request takes the route.",
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
    # ------------------------------------------------------------- limits on requests
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest request body in bytes (413 otherwise), checked from Content-Length "
        "and while the body streams in, before anything parses it.",
    )
    max_features: int = Field(
        default=1_000,
        ge=1,
        le=10_000,
        description="Most features a model may define, and most entries in one feature map of a "
        "request (422 naming the field otherwise).",
    )
    max_segments: int = Field(
        default=1_000, ge=1, description="Most segments in one sequence (ingest and decode)."
    )
    max_segments_per_request: int = Field(
        default=100_000, ge=1, description="Most segments in all sequences of one request."
    )
    max_generic_parameters: int = Field(
        default=10_000_000,
        ge=1,
        description="Most generic parameters θ̄ (network weights) a model definition may have.",
    )
    max_person_parameters: int = Field(
        default=100_000,
        ge=1,
        description="Most person-specific parameters θⁱ per user (one float32 each in every user's "
        "database row) a model definition may have.",
    )
    rate_limits: RateLimits = Field(
        default_factory=RateLimits,
        description="Token buckets per API key and scope (JSON; see RateLimits).",
    )
    api_docs: bool = Field(
        default=True,
        description="Serve /docs, /redoc and /openapi.json (open, without a key; assets shipped "
        "with the service). False: none of the three exists.",
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
    refit_chunk_rows: int = Field(
        default=50_000,
        ge=1,
        description="A refit streams the model's labelled rows from the database in chunks of "
        "this many into preallocated arrays: peak memory is the arrays plus one chunk.",
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
    db_pool_size: int = Field(
        default=16,
        ge=1,
        le=1000,
        description="Database connections an API process keeps open for reuse. Size it to the "
        "requests one process handles at once (FastAPI runs handlers on up to 40 threads): a "
        "request beyond it opens and closes its own connection, which costs a new server "
        "backend on PostgreSQL and dominated predictions under load.",
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
