"""Initial schema: api_keys, models, model_versions, users, observations, sequences,
person_params, jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the ORM's column types: a migration must not change when the ORM does.
JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
TZ = sa.DateTime(timezone=True)


def _cascade(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    referred = target.split(".")[0]
    return sa.ForeignKeyConstraint(
        [column], [target], ondelete="CASCADE", name=f"fk_{table}_{column}_{referred}"
    )


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("scopes", JSON, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("revoked_at", TZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("prefix", name="uq_api_keys_prefix"),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("task", sa.String(16), nullable=False),
        sa.Column("features", JSON, nullable=False),
        sa.Column("classes", JSON, nullable=True),
        sa.Column("states", JSON, nullable=True),
        sa.Column("architecture", JSON, nullable=False),
        sa.Column("training", JSON, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("name", name="uq_models_name"),
        sa.CheckConstraint(
            "task IN ('regression', 'classification', 'sequence')", name="ck_models_task"
        ),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(128), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("external_id", name="uq_users_external_id"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("artifact_path", sa.String(1024), nullable=False),
        sa.Column("artifact_sha256", sa.String(64), nullable=False),
        sa.Column("n_users", sa.Integer(), nullable=False),
        sa.Column("n_observations", sa.Integer(), nullable=False),
        sa.Column("trained_until", TZ, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("activated_at", TZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        _cascade("model_versions", "model_id", "models.id"),
        sa.UniqueConstraint("model_id", "version", name="uq_model_versions_model_id_version"),
        sa.CheckConstraint("status IN ('ready', 'active')", name="ck_model_versions_status"),
    )
    op.create_index(
        "uq_model_versions_one_active",
        "model_versions",
        ["model_id"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "observations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("features", JSON, nullable=False),
        sa.Column("label", JSON, nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_observations"),
        _cascade("observations", "model_id", "models.id"),
        _cascade("observations", "user_id", "users.id"),
        sa.UniqueConstraint(
            "model_id", "user_id", "day", name="uq_observations_model_id_user_id_day"
        ),
    )
    op.create_index(
        "ix_observations_model_id_updated_at", "observations", ["model_id", "updated_at"]
    )
    op.create_index("ix_observations_user_id", "observations", ["user_id"])
    op.create_table(
        "sequences",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("sequence_id", sa.String(128), nullable=False),
        sa.Column("segments", JSON, nullable=False),
        sa.Column("labels", JSON, nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sequences"),
        _cascade("sequences", "model_id", "models.id"),
        _cascade("sequences", "user_id", "users.id"),
        sa.UniqueConstraint(
            "model_id", "user_id", "sequence_id", name="uq_sequences_model_id_user_id_sequence_id"
        ),
    )
    op.create_index("ix_sequences_user_id", "sequences", ["user_id"])
    op.create_table(
        "person_params",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("effects", sa.LargeBinary(), nullable=False),
        sa.Column("n_obs", sa.Integer(), nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("version_id", "user_id", name="pk_person_params"),
        _cascade("person_params", "version_id", "model_versions.id"),
        _cascade("person_params", "user_id", "users.id"),
    )
    op.create_index("ix_person_params_user_id", "person_params", ["user_id"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("coalesce_key", sa.String(200), nullable=True),
        sa.Column("run_after", TZ, nullable=False),
        sa.Column("heartbeat_at", TZ, nullable=True),
        sa.Column("progress", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result_version", sa.Integer(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("finished_at", TZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        _cascade("jobs", "model_id", "models.id"),
        _cascade("jobs", "user_id", "users.id"),
        sa.CheckConstraint("kind IN ('refit', 'user_update')", name="ck_jobs_kind"),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed')", name="ck_jobs_status"
        ),
    )
    op.create_index("ix_jobs_status_run_after", "jobs", ["status", "run_after"])
    op.create_index("ix_jobs_model_id", "jobs", ["model_id"])
    op.create_index("ix_jobs_user_id", "jobs", ["user_id"])
    op.create_index(
        "uq_jobs_queued_coalesce_key",
        "jobs",
        ["coalesce_key"],
        unique=True,
        sqlite_where=sa.text("status = 'queued'"),
        postgresql_where=sa.text("status = 'queued'"),
    )


def downgrade() -> None:
    # Children before parents, so foreign keys never dangle.
    for table in ("jobs", "person_params", "sequences", "observations", "model_versions"):
        op.drop_table(table)
    for table in ("users", "models", "api_keys"):
        op.drop_table(table)
