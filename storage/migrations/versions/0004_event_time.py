"""An index on (project, time) of events, for time ranges (admin `since` /
`until`, `dialgate export --since/--until`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_events_project_time", "events", ["project", "time"])


def downgrade() -> None:
    op.drop_index("ix_events_project_time", table_name="events")
