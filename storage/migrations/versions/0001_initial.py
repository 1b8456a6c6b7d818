"""Events, aliases, profiles, devices and rejections.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen here: later changes to storage/tables.py need their own revision.
Json = sa.JSON().with_variant(JSONB(), "postgresql")
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("project", sa.String(200), nullable=False),
        sa.Column("source", sa.String(50), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("distinct_id", sa.Text),
        sa.Column("anonymous_id", sa.Text),
        sa.Column("user_id", sa.Text),
        sa.Column("time", sa.BigInteger, nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.Column("insert_id", sa.String(255)),
        sa.Column("session_id", sa.Text),
        sa.Column("properties", Json, nullable=False),
        sa.Column("context", Json, nullable=False),
        sa.Column("consent", sa.Boolean),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.UniqueConstraint("project", "source", "insert_id", name="uq_events_project_source_insert_id"),
    )
    op.create_index("ix_events_project_distinct_id", "events", ["project", "distinct_id"])
    op.create_table(
        "aliases",
        sa.Column("project", sa.String(200), nullable=False),
        sa.Column("alias", sa.Text, nullable=False),
        sa.Column("distinct_id", sa.Text, nullable=False),
        sa.Column("person", sa.Text, nullable=False),
        sa.Column("source", sa.String(50), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("project", "alias", name="pk_aliases"),
    )
    op.create_index("ix_aliases_project_person", "aliases", ["project", "person"])
    op.create_table(
        "profiles",
        sa.Column("project", sa.String(200), nullable=False),
        sa.Column("distinct_id", sa.Text, nullable=False),
        sa.Column("properties", Json, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("project", "distinct_id", name="pk_profiles"),
    )
    op.create_table(
        "devices",
        sa.Column("project", sa.String(200), nullable=False),
        sa.Column("device_id", sa.Text, nullable=False),
        sa.Column("distinct_id", sa.Text, nullable=False),
        sa.Column("source", sa.String(50), nullable=False),
        sa.Column("push_token", sa.Text),
        sa.Column("os", sa.Text),
        sa.Column("os_version", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("app_build", sa.Text),
        sa.Column("app_version", sa.Text),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("project", "device_id", name="pk_devices"),
    )
    op.create_index("ix_devices_project_distinct_id", "devices", ["project", "distinct_id"])
    op.create_table(
        "rejections",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("project", sa.String(200)),
        sa.Column("source", sa.String(50), nullable=False),
        sa.Column("reason", sa.String(100), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("excerpt", sa.Text, nullable=False),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rejections"),
    )
    op.create_index("ix_rejections_project_source_reason", "rejections", ["project", "source", "reason"])


def downgrade() -> None:
    for table in ("rejections", "devices", "profiles", "aliases", "events"):
        op.drop_table(table)
