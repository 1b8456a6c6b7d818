"""Replay and daily retention: a rejection keeps what is needed to re-run it
(the whole record or body, and the dialect's endpoint), and a table where
gateways claim once-a-day maintenance.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows written before, and rejections without a payload (a
    # failed link, a profile over its size), are not replayable.
    op.add_column("rejections", sa.Column("payload", sa.Text, nullable=True))
    op.add_column("rejections", sa.Column("endpoint", sa.String(50), nullable=True))
    op.create_table(
        "maintenance",
        sa.Column("name", sa.String(50), nullable=False),
        # The UTC day (days since the epoch) the task last ran on.
        sa.Column("day", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_maintenance"),
    )


def downgrade() -> None:
    op.drop_table("maintenance")
    with op.batch_alter_table("rejections") as batch:
        batch.drop_column("endpoint")
        batch.drop_column("payload")
