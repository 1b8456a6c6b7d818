"""The tables, as SQLAlchemy Core metadata (migrations freeze their own copy)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

Json = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")

events = Table(
    "events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("project", String(200), nullable=False),
    Column("source", String(50), nullable=False),
    Column("name", Text, nullable=False),
    Column("distinct_id", Text),
    Column("anonymous_id", Text),
    Column("user_id", Text),
    Column("time", BigInteger, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("insert_id", String(255)),
    Column("session_id", Text),
    Column("properties", Json, nullable=False),
    Column("context", Json, nullable=False),
    Column("consent", Boolean),
    # The authority on duplicates; NULL insert ids never conflict.
    UniqueConstraint("project", "source", "insert_id"),
    Index(None, "project", "distinct_id"),
    # Time ranges (admin `since`/`until`, export); migration 0004.
    Index(None, "project", "time"),
)

# One row per id that has been linked to a person. `person` is the root of its
# tree, kept current when trees merge, so resolving an id is one lookup.
aliases = Table(
    "aliases",
    metadata,
    Column("project", String(200), primary_key=True),
    Column("alias", Text, primary_key=True),
    Column("distinct_id", Text, nullable=False),
    Column("person", Text, nullable=False),
    Column("source", String(50), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Index(None, "project", "person"),
)

# Keyed by the person (the root id); a deleted profile has no row.
profiles = Table(
    "profiles",
    metadata,
    Column("project", String(200), primary_key=True),
    Column("distinct_id", Text, primary_key=True),
    Column("properties", Json, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# Group profiles (Mixpanel's `/groups`), keyed by (group_key, group_id)
# within the project, apart from person profiles: no alias resolves to a
# group. A deleted group has no row.
groups = Table(
    "groups",
    metadata,
    Column("project", String(200), primary_key=True),
    Column("group_key", Text, primary_key=True),
    Column("group_id", Text, primary_key=True),
    Column("properties", Json, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

devices = Table(
    "devices",
    metadata,
    Column("project", String(200), primary_key=True),
    Column("device_id", Text, primary_key=True),
    Column("distinct_id", Text, nullable=False),
    Column("source", String(50), nullable=False),
    Column("push_token", Text),
    Column("os", Text),
    Column("os_version", Text),
    Column("model", Text),
    Column("app_build", Text),
    Column("app_version", Text),
    Column("updated_at", BigInteger, nullable=False),
    Index(None, "project", "distinct_id"),
)

rejections = Table(
    "rejections",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("project", String(200)),
    Column("source", String(50), nullable=False),
    Column("reason", String(100), nullable=False),
    Column("detail", Text, nullable=False),
    Column("excerpt", Text, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    # What `dialgate replay` re-runs: the whole record (or body) and the
    # dialect's endpoint name; NULL when there is nothing to re-run.
    Column("payload", Text),
    Column("endpoint", String(50)),
    Index(None, "project", "source", "reason"),
    # Expiry deletes by age (retention.quarantine_days).
    Index(None, "received_at"),
)

# Once-a-day maintenance (the daily prune): the gateway that moves `day`
# forward runs it, so one of many workers or hosts does.
maintenance = Table(
    "maintenance",
    metadata,
    Column("name", String(50), primary_key=True),
    Column("day", BigInteger, nullable=False),
)

# `dialgate load` (storage.loader): the messages of events written, and the
# identity partitions' holders and progress.
loader_applied = Table(
    "loader_applied",
    metadata,
    Column("stream", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
)

loader_progress = Table(
    "loader_progress",
    metadata,
    Column("name", String(300), primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
    Column("holder", String(200)),
    Column("expires_at", BigInteger, nullable=False),
)

# The PostgreSQL sink's commit marks (storage.postgres): a group's token
# (its unix ms, big-endian, then 8 random bytes), inserted in its
# transaction, tells a retry whether a commit whose answer was lost happened.
commit_marks = Table(
    "commit_marks",
    metadata,
    Column("token", LargeBinary, primary_key=True),
)
