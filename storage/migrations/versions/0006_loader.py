"""The loader's bookkeeping (`dialgate load`): the stream messages of events
already written, and each identity partition's holder and progress.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per message of events written (its stream sequence), in the
    # transaction that wrote them: a message delivered again after a crash
    # between the commit and the acknowledgement is recognised and skipped.
    op.create_table(
        "loader_applied",
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("stream", "seq", name="pk_loader_applied"),
    )
    # One row per identity partition (a project of a stream): who holds it
    # until when, and the last stream sequence applied.
    op.create_table(
        "loader_progress",
        sa.Column("name", sa.String(300), nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("holder", sa.String(200)),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_loader_progress"),
    )


def downgrade() -> None:
    op.drop_table("loader_progress")
    op.drop_table("loader_applied")
