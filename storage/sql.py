"""The SQL the writer sends straight to the drivers, written once."""

from __future__ import annotations

import zlib

EVENT_COLUMNS = (
    "project, source, name, distinct_id, anonymous_id, user_id, time, received_at, "
    "insert_id, session_id, properties, context, consent"
)
# One statement and one parameter for any batch: the events travel as one
# JSON array (encoded from the Event structs in one msgspec call) that the
# server unpacks, instead of per-element encoding of 13 arrays in Python.
PG_INSERT = (
    f"INSERT INTO events ({EVENT_COLUMNS}) "
    f"SELECT {EVENT_COLUMNS} FROM json_to_recordset($1::json) AS e("
    "project varchar, source varchar, name text, distinct_id text, anonymous_id text, user_id text, "
    "time bigint, received_at bigint, insert_id varchar, session_id text, properties jsonb, "
    "context jsonb, consent boolean"
    ") ON CONFLICT (project, source, insert_id) DO NOTHING RETURNING project, source, insert_id"
)
# The events, and in the same statement the profiles they touch: each id
# resolved to its person, a missing profile created empty, an existing one
# only updated (in (project, person) order, as every profile write here);
# and the group's commit mark.
PG_INSERT_TOUCHING = (
    "WITH mark AS (INSERT INTO commit_marks (token) VALUES ($4::bytea)), touched AS ("
    "INSERT INTO profiles (project, distinct_id, properties, created_at, updated_at) "
    "SELECT DISTINCT t.project, coalesce(a.person, t.id), '{}'::jsonb, $3::bigint, $3::bigint "
    "FROM json_to_recordset($2::json) AS t(project varchar, id text) "
    "LEFT JOIN aliases a ON a.project = t.project AND a.alias = t.id "
    "ORDER BY 1, 2 "
    "ON CONFLICT (project, distinct_id) DO UPDATE SET "
    "updated_at = greatest(profiles.updated_at, excluded.updated_at)) "
    + PG_INSERT
)
# The events marking the database with their group's token ($2), as
# PG_INSERT_TOUCHING always does ($4): a retry after a lost answer knows
# whether they committed (storage.postgres). An INSERT in WITH runs whether
# the main statement reads it.
PG_INSERT_MARKED = "WITH mark AS (INSERT INTO commit_marks (token) VALUES ($2::bytea)) " + PG_INSERT
PG_MARK = "INSERT INTO commit_marks (token) VALUES (:token)"
PG_MARKED = "SELECT 1 FROM commit_marks WHERE token = :token"
PG_MARKS_PRUNE = "DELETE FROM commit_marks WHERE token < :before"
PG_LOCK = "SELECT pg_advisory_xact_lock($1)"
PG_LINKS = "SELECT alias, person FROM aliases WHERE project = $1 AND alias = ANY($2::text[])"
PG_PROFILES = (
    "SELECT distinct_id, properties::text FROM profiles WHERE project = $1 AND distinct_id = ANY($2::text[])"
)
# The rows as one JSON array, as the events go: a new profile gets its
# created_at, an existing one keeps its own.
PG_PROFILES_UPSERT = (
    "INSERT INTO profiles (project, distinct_id, properties, created_at, updated_at) "
    "SELECT project, distinct_id, properties, created_at, updated_at FROM json_to_recordset($1::json) AS r("
    "project varchar, distinct_id text, properties jsonb, created_at bigint, updated_at bigint"
    ") ON CONFLICT (project, distinct_id) DO UPDATE SET properties = excluded.properties, "
    "updated_at = greatest(profiles.updated_at, excluded.updated_at)"
)
SQLITE_ROW = "(" + ",".join("?" * 13) + ")"
SQLITE_INSERT_PLAIN = (
    f"INSERT INTO events ({EVENT_COLUMNS}) VALUES {{values}} "
    "ON CONFLICT (project, source, insert_id) DO NOTHING"
)
# SQLite allows 32766 bound values per statement: 2000 rows of 13.
SQLITE_ROWS = 2000


def lock_key(project: str) -> int:
    # A stable signed 64-bit key per project for pg_advisory_xact_lock.
    return zlib.crc32(b"dialgate-profiles:" + project.encode()) - 2**31
