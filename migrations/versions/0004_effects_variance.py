"""The posterior variance of each user's θⁱ beside the row (prediction intervals).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for rows written before: their intervals use the prior Σ (wider, never narrower).
    with op.batch_alter_table("person_params") as batch:
        batch.add_column(sa.Column("effects_var", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("person_params") as batch:
        batch.drop_column("effects_var")
