"""The SQLite store: one writer, its events on a thread of their own.

Identity, profile and device work runs in a transaction through SQLAlchemy
(aiosqlite), serialised across processes by SQLite's single write lock
(BEGIN IMMEDIATE, see storage.engine). Events take one route whatever the
group: `insert_events`, the same statements through the sqlite3 connection
of `SqliteEvents` for groups of events alone, and through the transaction's
connection otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.model import Event, Rejection
from storage.engine import Backend, json_text, sqlite_pragmas
from storage.faults import Fault, classify, renew_connections
from storage.groups import Attempt, Pending, clean, events_only, plan_events, settle_events
from storage.sink import SinkOptions, Written
from storage.sql import SQLITE_INSERT_PLAIN, SQLITE_ROW, SQLITE_ROWS
from storage.transaction import Transaction

# How long a group waits for SQLite's write lock held by another process.
LOCK_WAIT = 30.0

Statement = tuple[str, list[Any]]
Execute = Callable[[str, Sequence[Any]], Any]  # a DB-API execute: a cursor back


class SqliteStore:
    """storage.commit.Store for SQLite."""

    lanes = 1  # one write lock: a second lane would only wait for it

    def __init__(self, engine: AsyncEngine, options: SinkOptions, *, clock: Callable[[], int],
                 admit: Callable[[Rejection], bool]) -> None:
        self._engine = engine
        self._clock = clock
        self._admit = admit
        self._max_profile_bytes = options.max_profile_bytes
        self._direct = SqliteEvents.for_url(engine.url)

    async def write(self, group: list[Pending], lane: int, attempt: Attempt) -> list[Written]:
        # No network between the process and its database: a commit's
        # outcome is never lost on the way, `attempt` is not needed.
        if self._direct is not None and events_only(group):
            results = [Written() for _ in group]
            fresh, owner = plan_events(group, results)
            if fresh:
                settle_events(owner, await self._direct.insert(sqlite_rows(fresh)), results)
            return results
        async with self._engine.begin() as conn:
            tx = Transaction(conn, Backend.SQLITE, self._clock(), self._max_profile_bytes,
                             insert=functools.partial(_insert_in, conn))
            return await tx.write(group, self._admit)

    def lost(self) -> None:
        renew_connections(self._engine)

    async def close(self) -> None:
        if self._direct is not None:
            await self._direct.close()


def statements(rows: list[tuple[Any, ...]]) -> list[Statement]:
    """The multi-row inserts for the rows of `sqlite_rows`, chunked under
    SQLite's bound-value limit."""
    return [
        (sqlite_insert_sql(len(chunk)), [value for row in chunk for value in row])
        for chunk in (rows[start : start + SQLITE_ROWS] for start in range(0, len(rows), SQLITE_ROWS))
    ]


def insert_events(execute: Execute, planned: list[Statement], count: int) -> set[tuple[str, str, str]] | None:
    """SQLite's one route for events, inside a transaction holding the write
    lock: the keys stored, None if all `count` rows were.

    No RETURNING (every returned row is another acquisition of the GIL):
    under the write lock the new rows are exactly those with an id above the
    largest one before the insert, read back only when some were duplicates.
    """
    top = execute("SELECT coalesce(max(id), 0) FROM events", ()).fetchone()[0]
    changed = 0
    for sql, params in planned:
        changed += execute(sql, params).rowcount
    if changed == count:
        return None
    found = execute("SELECT project, source, insert_id FROM events WHERE id > ? AND insert_id IS NOT NULL", (top,))
    return {(p, s, i) for p, s, i in found}


async def _insert_in(conn: AsyncConnection, events: list[Event]) -> set[tuple[str, str, str]] | None:
    """`insert_events` on a transaction's aiosqlite connection."""
    rows = sqlite_rows(events)
    planned = statements(rows)

    def run(sync: Connection) -> set[tuple[str, str, str]] | None:
        return insert_events(lambda sql, params: sync.exec_driver_sql(sql, tuple(params)), planned, len(rows))

    return await conn.run_sync(run)


def sqlite_rows(events: list[Event]) -> list[tuple[Any, ...]]:
    # A request's events share one context dict: encode it once.
    contexts: dict[int, str] = {}
    rows = []
    for event in events:
        context = contexts.get(id(event.context))
        if context is None:
            context = contexts[id(event.context)] = json_text(event.context)
        rows.append((
            event.project,
            event.source,
            clean(event.name),
            clean(event.distinct_id),
            clean(event.anonymous_id),
            clean(event.user_id),
            event.time,
            event.received_at,
            clean(event.insert_id),
            clean(event.session_id),
            json_text(event.properties),
            context,
            event.consent,
        ))
    return rows



@functools.lru_cache(maxsize=64)
def sqlite_insert_sql(rows: int) -> str:
    return SQLITE_INSERT_PLAIN.format(values=",".join([SQLITE_ROW] * rows))


class SqliteEvents:
    """SQLite's path for groups of events only: the whole transaction (BEGIN
    IMMEDIATE, insert, COMMIT) in one call on a thread of its own, on a
    connection of its own.

    Through aiosqlite every statement is a hop to its thread and back, and
    every row of a RETURNING result another acquisition of the GIL; while
    the event loop is busy validating the next requests, each of those waits,
    and the writer (hence every request) with it. Here a group costs one hop
    and a handful of GIL hand-overs: the insert has no RETURNING, since under
    the write lock the new rows are exactly those with an id above the
    largest one before the insert, read back only when some were duplicates.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dialgate-sqlite")

    @classmethod
    def for_url(cls, url: Any) -> SqliteEvents | None:
        database = url.database or ""
        if database in ("", ":memory:") or url.query:
            return None  # a private in-memory database, or options we do not replicate
        return cls(database)

    async def insert(self, rows: list[tuple[Any, ...]]) -> set[tuple[str, str, str]] | None:
        """Insert the rows in one transaction; the keys stored, None if all."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._insert, rows)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._disconnect)
        self._thread.shutdown(wait=True)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        for pragma in sqlite_pragmas():
            conn.execute(pragma)
        # In WAL mode only taking the write lock can find the database busy;
        # _begin polls for it instead of SQLite's sleeping handler.
        conn.execute("PRAGMA busy_timeout=0")
        return conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @staticmethod
    def _begin(conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, polling for the write lock every half millisecond
        while another process holds it: SQLite's own busy handler sleeps in
        growing steps (up to 100 ms), so with several workers each would
        mostly wait on a lock that was free long ago."""
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.0005)

    def _insert(self, rows: list[tuple[Any, ...]]) -> set[tuple[str, str, str]] | None:
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        # Statements made before taking the write lock, which every worker's
        # writer waits for.
        planned = statements(rows)
        self._begin(conn)
        try:
            stored = insert_events(conn.execute, planned, len(rows))
            conn.execute("COMMIT")
        except BaseException as exc:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if classify(exc) is Fault.LOST:
                    self._disconnect()  # an I/O error: the retry opens the file afresh
            except sqlite3.Error:
                self._disconnect()  # start afresh on the next group
            raise
        return stored
