"""The unattended learning loop: a per-model event log, the refit trigger's memory, label
ranges, and job priorities.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the ORM's column types: a migration must not change when the ORM does.
JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
TZ = sa.DateTime(timezone=True)
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


def upgrade() -> None:
    op.create_table(
        "model_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("at", TZ, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("data", JSON, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_model_events"),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], ondelete="CASCADE",
            name="fk_model_events_model_id_models",
        ),
        sa.CheckConstraint(
            "kind IN (" + ", ".join(f"'{k}'" for k in EVENT_KINDS) + ")",
            name="ck_model_events_kind",
        ),
    )
    op.create_index("ix_model_events_model_id_id", "model_events", ["model_id", "id"])
    op.create_index("ix_model_events_at", "model_events", ["at"])
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("label_range", JSON, nullable=True))
        batch.add_column(sa.Column("refit_attempted_at", TZ, nullable=True))
        batch.add_column(
            sa.Column("refit_failures", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("refit_not_before", TZ, nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
        batch.drop_index("ix_jobs_status_run_after")
        batch.create_index("ix_jobs_status_priority_run_after", ["status", "priority", "run_after"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_status_priority_run_after")
        batch.create_index("ix_jobs_status_run_after", ["status", "run_after"])
        batch.drop_column("priority")
    with op.batch_alter_table("models") as batch:
        for column in ("refit_not_before", "refit_failures", "refit_attempted_at", "label_range"):
            batch.drop_column(column)
    op.drop_table("model_events")
