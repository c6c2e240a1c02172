"""ORM tables (SQLAlchemy 2, typed). The schema itself is only ever created by a migration.

Conventions:
- every constraint and index is named (``NAMING_CONVENTION``) so migrations can drop them and
  SQLite batch migrations can rebuild tables;
- JSON columns are JSONB on PostgreSQL (equality works, which the idempotent upsert needs);
- deleting a user or a model cascades in the database, so forgetting a user is one statement.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# none_as_null: a Python None is stored as SQL NULL (not JSON 'null'), so "IS NULL" means absent.
JsonType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")

TASKS = ("regression", "classification", "sequence")
VERSION_STATUSES = ("ready", "active")
JOB_KINDS = ("refit", "user_update")
JOB_STATUSES = ("queued", "running", "succeeded", "failed")
EVENT_KINDS = (
    "refit_queued",
    "version_trained",
    "activated",
    "rejected",
    "refit_failed",
    "rolled_back",
    "pruned",
    "labels_skipped",
    "sequences_skipped",
)


class UTCDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE`` that always reads back timezone-aware UTC.

    SQLite has no time zones and returns naive values; without this, the API would show
    ``…T08:38:51`` on SQLite and ``…T08:38:51+00:00`` on PostgreSQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; use timezone-aware UTC")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    """Declarative base carrying the shared metadata (and its naming convention)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ApiKey(Base):
    """An API key: only its SHA-256 is stored; ``prefix`` (public) finds the row."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JsonType)
    # The model names this key may reach; None: every model (an unscoped key).
    models: Mapped[list[str] | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Model(Base):
    """A named prediction task: its feature schema, classes/states, architecture, training."""

    __tablename__ = "models"
    __table_args__ = (CheckConstraint(_in("task", TASKS), name="task"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    task: Mapped[str] = mapped_column(String(16))
    features: Mapped[list[str]] = mapped_column(JsonType)
    classes: Mapped[list[str] | None] = mapped_column(JsonType)
    states: Mapped[list[str] | None] = mapped_column(JsonType)
    architecture: Mapped[dict[str, Any]] = mapped_column(JsonType)
    training: Mapped[dict[str, Any]] = mapped_column(JsonType)
    # Regression only: ``[low, high]`` a label must lie in (None: any float32-finite number).
    label_range: Mapped[list[float] | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The refit trigger's memory: labels changed after ``refit_attempted_at`` are new (an
    # attempt is activated, rejected or permanently failed); after ``refit_failures``
    # consecutive rejections or failures no refit is queued before ``refit_not_before``.
    refit_attempted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    refit_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    refit_not_before: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ModelVersion(Base):
    """One trained version of a model: θ̄ in the artifact, θⁱ in ``person_params``.

    At most one version per model is ``active`` (a partial unique index enforces it).
    """

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version"),
        CheckConstraint(_in("status", VERSION_STATUSES), name="status"),
        Index(
            "uq_model_versions_one_active",
            "model_id",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonType)
    artifact_path: Mapped[str] = mapped_column(String(1024))
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    n_users: Mapped[int] = mapped_column(Integer)
    n_observations: Mapped[int] = mapped_column(Integer)
    # When the training data was read: labels updated after it are "new" for the next refit.
    trained_until: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class User(Base):
    """An app's end user, by the app's own external id; shared by all models."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Observation(Base):
    """One day of one user's features for one model, with an optional label.

    Unique per (model, user, day): a resend is an upsert.
    """

    __tablename__ = "observations"
    __table_args__ = (
        UniqueConstraint("model_id", "user_id", "day"),
        Index(None, "model_id", "updated_at"),
        Index(None, "user_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    day: Mapped[date] = mapped_column(Date)
    features: Mapped[dict[str, float]] = mapped_column(JsonType)
    # A float (regression) or a class name (classification); NULL when unlabelled.
    label: Mapped[float | str | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Sequence(Base):
    """One labelled (or unlabelled) sequence of segments, e.g. the turns of a conversation."""

    __tablename__ = "sequences"
    __table_args__ = (
        UniqueConstraint("model_id", "user_id", "sequence_id"),
        Index(None, "user_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    sequence_id: Mapped[str] = mapped_column(String(128))
    # A list of per-segment feature dicts, in segment order.
    segments: Mapped[list[dict[str, float]]] = mapped_column(JsonType)
    labels: Mapped[list[str] | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PersonParam(Base):
    """θⁱ of one user in one model version: little-endian float32 bytes, artifact order."""

    __tablename__ = "person_params"
    __table_args__ = (Index(None, "user_id"),)

    version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    effects: Mapped[bytes] = mapped_column(LargeBinary)
    # The diagonal posterior variance of θⁱ in the same layout (None: written before intervals
    # existed; the prior Σ stands in).
    effects_var: Mapped[bytes | None] = mapped_column(LargeBinary)
    n_obs: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    """A background job (refit or per-user update), run by `nme-service worker` (service.jobs).

    ``coalesce_key`` (e.g. ``refit:3``) is unique among queued jobs, so "at most one pending per
    model (and user)" is enforced by the database rather than by a racy check.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("kind", JOB_KINDS), name="kind"),
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        Index(None, "status", "priority", "run_after"),
        Index(None, "model_id"),
        Index(None, "user_id"),
        Index(
            "uq_jobs_queued_coalesce_key",
            "coalesce_key",
            unique=True,
            sqlite_where=text("status = 'queued'"),
            postgresql_where=text("status = 'queued'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    # Lower runs first: refits (0) before user updates (10).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    coalesce_key: Mapped[str | None] = mapped_column(String(200))
    run_after: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    progress: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    error: Mapped[str | None] = mapped_column(Text)
    result_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ModelEvent(Base):
    """One entry of a model's history: a refit queued, a version trained, activated, rejected,
    failed, rolled back or pruned, labels skipped. ``detail`` is a human message (never raw
    exception text); ``data`` carries the numbers behind it (scores, counts)."""

    __tablename__ = "model_events"
    __table_args__ = (
        CheckConstraint(_in("kind", EVENT_KINDS), name="kind"),
        Index(None, "model_id", "id"),
        Index(None, "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    version: Mapped[int | None] = mapped_column(Integer)
    # No foreign key: job rows are pruned on their own schedule (events follow the same one).
    job_id: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(100))
    detail: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JsonType)

