"""Commit marks: each write transaction of the PostgreSQL sink inserts its
group's token, so that when the answer to its commit is lost the retry
knows whether it committed (the token is there: a unique violation on
`pk_commit_marks`, nothing applied twice). A token starts with its unix
milliseconds (8 bytes, big-endian): the key grows in time order, and marks
older than ten minutes are dropped by a range of it (storage.postgres).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "commit_marks",
        sa.Column("token", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("token", name="pk_commit_marks"),
    )


def downgrade() -> None:
    op.drop_table("commit_marks")
