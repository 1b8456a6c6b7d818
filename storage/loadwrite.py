"""What `dialgate load` writes, each in one transaction with its
bookkeeping (storage.loader drives it).

- Events: the messages' stream sequences go into `loader_applied` first
  (ON CONFLICT DO NOTHING, the new ones returned): only messages not seen
  before are written, so a message delivered again after a crash between
  commit and acknowledgement stores nothing twice, events with or without
  an insert id. PostgreSQL copies the events (COPY, binary) straight into
  `events` inside a savepoint; only when that meets an insert id already
  stored (rare: the stream drops a request sent again within its duplicate
  window, and `loader_applied` a message seen before) does it roll back to
  the savepoint, copy them into a temporary table and insert them from it
  with ON CONFLICT DO NOTHING on (project, source, insert_id). SQLite takes
  the writer's own multi-row inserts (storage.sqlite).
- Identity, profile, device and group records: the database writer's own
  Transaction, fenced by the partition's row in `loader_progress`: the
  transaction first extends the holder's lease (and fails if another
  loader holds it now), skips messages at or below `last_seq`, and moves
  `last_seq` to the last one applied.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.model import Alias, Event, Rejection
from storage.engine import Backend, backend_of
from storage.faults import UNIQUE_VIOLATION
from storage.groups import Pending
from storage.logrecords import BadMessage, Batch, Row, decode, decode_rows
from storage.sql import EVENT_COLUMNS
from storage.sqlite import insert_events as sqlite_insert_events
from storage.sqlite import sqlite_rows, statements
from storage.transaction import Transaction

__all__ = ["LeaseLost", "LoadStore", "Prepared"]

# (stream sequence, message) in stream order; the payloads as they came.
Messages = Sequence[tuple[int, Batch]]
RawMessages = Sequence[tuple[int, bytes]]

log = logging.getLogger("dialgate.loader")


_PG_MARK = (
    "INSERT INTO loader_applied (stream, seq) SELECT $1, unnest($2::bigint[]) "
    "ON CONFLICT DO NOTHING RETURNING seq"
)
# On a conflict the events are copied (binary COPY) into a temporary table,
# then inserted from it: that second step costs the server more than the
# COPY itself, hence the direct COPY first. Measured against having the server unpack the messages' JSON
# itself (json_to_recordset over the copied payloads): the server's work is
# the limit, and unpacking there cost it more than the loader's Python
# spends building the rows. JSON travels as text and is cast here.
_PG_TEMP = (
    "CREATE TEMP TABLE IF NOT EXISTS load_events (project varchar, source varchar, name text, "
    "distinct_id text, anonymous_id text, user_id text, time bigint, received_at bigint, insert_id varchar, "
    "session_id text, properties text, context text, consent boolean) ON COMMIT DELETE ROWS"
)
_PG_COLUMNS = tuple(c.strip() for c in EVENT_COLUMNS.split(","))
_PG_FROM_TEMP = (
    f"INSERT INTO events ({EVENT_COLUMNS}) SELECT "
    f"{EVENT_COLUMNS.replace('properties, context', 'properties::jsonb, context::jsonb')} FROM load_events "
    "ON CONFLICT (project, source, insert_id) DO NOTHING"
)


class LeaseLost(Exception):
    """Another loader holds the partition now: nothing was written."""


class Prepared:
    """Messages decoded, ready to write: done while the previous batch
    commits. PostgreSQL: per message its events' COPY rows and its
    rejections; SQLite: the batches."""

    __slots__ = ("seqs", "rows", "rejections", "batches")

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.rows: dict[int, list[Row]] = {}
        self.rejections: dict[int, list[Rejection]] = {}
        self.batches: list[tuple[int, Batch]] = []


class LoadStore:
    def __init__(self, engine: AsyncEngine, stream: str, *, clock: Callable[[], int],
                 admit: Callable[[Rejection], bool], max_profile_bytes: int = 1_048_576) -> None:
        self._engine = engine
        self._stream = stream
        self._backend = backend_of(str(engine.url))
        self._clock = clock
        self._admit = admit
        self._max_profile_bytes = max_profile_bytes

    def prepare(self, messages: RawMessages) -> Prepared:
        """The payloads as they came, decoded and made ready to write; one
        that is not ours is logged and left out (it is acknowledged with its
        batch: delivering it again would not help)."""
        prepared = Prepared()
        for seq, data in messages:
            try:
                if self._backend is Backend.POSTGRESQL:
                    prepared.rows[seq], prepared.rejections[seq] = decode_rows(data)
                else:
                    prepared.batches.append((seq, decode(data)))
            except BadMessage as exc:
                log.error("stream message %d is not a batch of records (%s); skipped", seq, exc)
                continue
            prepared.seqs.append(seq)
        return prepared

    async def write_events(self, messages: RawMessages | Prepared) -> tuple[int, int]:
        """Events and rejections of the messages not written before:
        (events inserted, rejections stored)."""
        prepared = messages if isinstance(messages, Prepared) else self.prepare(messages)
        async with self._engine.begin() as conn:
            driver = await _driver(conn) if self._backend is Backend.POSTGRESQL else None
            fresh = await self._mark(conn, driver, prepared.seqs)
            if driver is not None:
                rows = [row for seq in prepared.seqs if seq in fresh for row in prepared.rows[seq]]
                rejections = [r for seq in prepared.seqs if seq in fresh for r in prepared.rejections[seq]]
                inserted = await _copy(driver, rows) if rows else 0
            else:
                batches = prepared.batches
                events = [e for seq, b in batches if seq in fresh for e in b.events]
                rejections = [r for seq, b in batches if seq in fresh for r in b.rejections]
                inserted = await self._insert(conn, events) if events else 0
            if rejections:
                await self._transaction(conn).rejections_insert(rejections)
            return inserted, len(rejections)

    async def _mark(self, conn: AsyncConnection, driver: Any, seqs: list[int]) -> set[int]:
        stream = self._stream
        if driver is not None:
            return {row[0] for row in await driver.fetch(_PG_MARK, stream, seqs)}

        def mark(sync: Connection) -> set[int]:
            fresh = set()
            for seq in seqs:
                cursor = sync.exec_driver_sql(
                    "INSERT OR IGNORE INTO loader_applied (stream, seq) VALUES (?, ?)", (stream, seq))
                if cursor.rowcount:
                    fresh.add(seq)
            return fresh

        return await conn.run_sync(mark)

    async def _insert(self, conn: AsyncConnection, events: list[Event]) -> int:
        """The events into SQLite, as its database sink writes them."""
        rows = sqlite_rows(events)
        planned = statements(rows)

        def run(sync: Connection) -> int:
            execute = functools.partial(_sqlite_execute, sync)
            stored = sqlite_insert_events(execute, planned, len(rows))
            return len(rows) if stored is None else len(stored) + sum(1 for e in events if e.insert_id is None)

        return await conn.run_sync(run)

    def _transaction(self, conn: AsyncConnection) -> Transaction:
        return Transaction(conn, self._backend, self._clock(), self._max_profile_bytes)

    async def acquire(self, name: str, holder: str, lease_ms: int) -> bool:
        """Take or keep the partition `name` for `lease_ms` from now: True if
        `holder` has it (it had it, nobody had, or the last lease ran out)."""
        now = self._clock()
        async with self._engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO loader_progress (name, last_seq, holder, expires_at) "
                     "VALUES (:n, 0, NULL, 0) ON CONFLICT (name) DO NOTHING"), {"n": name})
            result = await conn.execute(
                text("UPDATE loader_progress SET holder = :h, expires_at = :e WHERE name = :n "
                     "AND (holder = :h OR holder IS NULL OR expires_at < :now)"),
                {"h": holder, "e": now + lease_ms, "n": name, "now": now})
            return bool(result.rowcount)

    async def release(self, name: str, holder: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                text("UPDATE loader_progress SET holder = NULL, expires_at = 0 WHERE name = :n AND holder = :h"),
                {"n": name, "h": holder})

    async def last_seq(self, name: str) -> int:
        async with self._engine.connect() as conn:
            row = await conn.execute(text("SELECT last_seq FROM loader_progress WHERE name = :n"), {"n": name})
            return int(row.scalar() or 0)

    async def apply_identity(self, name: str, holder: str, lease_ms: int, messages: Messages) -> int:
        """The records of the messages after the partition's `last_seq`, in
        order, as the partition's holder; the count applied. LeaseLost if
        another loader holds it now."""
        async with self._engine.begin() as conn:
            fence = await conn.execute(
                text("UPDATE loader_progress SET expires_at = :e WHERE name = :n AND holder = :h "
                     "RETURNING last_seq"),
                {"e": self._clock() + lease_ms, "n": name, "h": holder})
            last = fence.scalar()
            if last is None:
                raise LeaseLost(name)
            fresh = [(seq, batch) for seq, batch in messages if seq > last]
            records = [r for _, batch in fresh for r in batch.records()]
            if not records:
                return 0
            tx = self._transaction(conn)
            if self._backend is Backend.POSTGRESQL:
                tx.driver = await _driver(conn)
            # Aliases are answered by the gateway before they are applied:
            # one that cannot be made is quarantined, whatever its dialect.
            work = [_lenient(r) for r in records if type(r) is not Rejection]
            rejections = [r for r in records if type(r) is Rejection]
            await tx.write([Pending(work, rejections, None)], self._admit)
            await conn.execute(text("UPDATE loader_progress SET last_seq = :s WHERE name = :n"),
                               {"s": fresh[-1][0], "n": name})
            return len(work)

    async def forget(self, below: int) -> None:
        """Drop the bookkeeping of messages at or below `below`, the
        consumer's acknowledgement floor: they are never delivered again."""
        async with self._engine.begin() as conn:
            await conn.execute(text("DELETE FROM loader_applied WHERE stream = :s AND seq <= :b"),
                               {"s": self._stream, "b": below})


def _lenient(record: Any) -> Any:
    if type(record) is Alias and record.strict:
        return msgspec.structs.replace(record, strict=False)
    return record


async def _driver(conn: AsyncConnection) -> Any:
    """The asyncpg connection under `conn`, inside the block SQLAlchemy opened."""
    await conn.exec_driver_sql("SELECT 1")
    return (await conn.get_raw_connection()).driver_connection


async def _copy(driver: Any, rows: list[Row]) -> int:
    """The rows into `events` (PostgreSQL), those whose insert id is
    stored already left out: the count inserted."""
    await driver.execute("SAVEPOINT load_copy")
    try:
        await driver.copy_records_to_table("events", records=rows, columns=_PG_COLUMNS)
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != UNIQUE_VIOLATION:  # the COPY met an insert id stored before
            raise
        await driver.execute("ROLLBACK TO SAVEPOINT load_copy")
        await driver.execute(_PG_TEMP)
        await driver.copy_records_to_table("load_events", records=rows, columns=_PG_COLUMNS)
        status: str = await driver.execute(_PG_FROM_TEMP)
        return int(status.rsplit(" ", 1)[-1])
    # The savepoint goes with the commit: no round trip to release it.
    return len(rows)


def _sqlite_execute(sync: Connection, sql: str, params: Sequence[Any]) -> Any:
    return sync.exec_driver_sql(sql, tuple(params))
