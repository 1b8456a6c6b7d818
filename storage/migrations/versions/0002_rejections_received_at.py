"""An index on rejections.received_at, so that expiry finds old rows fast.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_rejections_received_at", "rejections", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_rejections_received_at", table_name="rejections")
