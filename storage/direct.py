"""The writer's direct paths for groups of events only: SQLite on a thread
and connection of its own, PostgreSQL on a connection each lane keeps."""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage.engine import sqlite_pragmas
from storage.faults import Fault, classify, short
from storage.sql import PG_INSERT, PG_INSERT_TOUCHING, SQLITE_INSERT_PLAIN, SQLITE_ROW, SQLITE_ROWS, lock_key

log = logging.getLogger("dialgate.writer")

# How long a group waits for SQLite's write lock held by another process.
LOCK_WAIT = 30.0


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
        # Statements and parameters made before taking the write lock, which
        # every worker's writer waits for.
        statements = [
            (sqlite_insert_sql(len(chunk)), [value for row in chunk for value in row])
            for chunk in (rows[start : start + SQLITE_ROWS] for start in range(0, len(rows), SQLITE_ROWS))
        ]
        self._begin(conn)
        try:
            top = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
            changed = 0
            for sql, params in statements:
                changed += conn.execute(sql, params).rowcount
            stored = None
            if changed != len(rows):
                stored = {
                    (p, s, i)
                    for p, s, i in conn.execute(
                        "SELECT project, source, insert_id FROM events WHERE id > ? AND insert_id IS NOT NULL",
                        (top,),
                    )
                }
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


class PgEvents:
    """PostgreSQL's path for groups of events only: the insert as one
    statement, with no transaction block around it, on a connection the lane
    keeps checked out (and for events that touch their profiles, the same
    statement with the touches, in a short transaction: `insert_touching`).

    A statement outside a block is its own transaction, committed (and, with
    the server's default synchronous_commit, flushed) before its result
    comes back, so a group costs one round trip instead of three (BEGIN,
    INSERT, COMMIT), and none of SQLAlchemy's per-transaction work: about a
    sixth of the CPU a group cost through `engine.begin()`, which is most of
    a lone request's cost at low load.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None
        self._driver: Any = None  # the asyncpg connection

    async def insert(self, payload: str) -> set[tuple[str, str, str]]:
        """Insert the JSON array of events; the keys stored."""
        await self._ready()
        try:
            rows = await self._driver.fetch(PG_INSERT, payload)
        except BaseException as exc:
            if not isinstance(exc, Exception) or self._driver.is_closed() or classify(exc) is Fault.LOST:
                # Cancelled mid-statement, or the connection is gone: the
                # writer's retry (and the next group) starts on a fresh one.
                await self._discard()
            raise
        return {(p, s, i) for p, s, i in rows if i is not None}

    async def insert_touching(self, payload: str, touches: str, projects: list[str],
                              now: int) -> set[tuple[str, str, str]]:
        """Insert the JSON array of events and touch the profiles of the
        JSON array of {project, id} (each resolved to its person), in one
        transaction holding the projects' profile locks shared: touches go
        side by side on every lane, while the ordered lane's identity and
        profile work (which holds them exclusive) waits for them, and they
        for it. The lock comes in a statement before the one that reads the
        links, so that one's snapshot sees every merge committed before."""
        await self._ready()
        driver = self._driver
        # Integers of our own making, so the statement may carry them: BEGIN
        # and the locks in one round trip (the simple protocol takes several).
        begin = "BEGIN;" + "".join(f"SELECT pg_advisory_xact_lock_shared({lock_key(p)});" for p in projects)
        try:
            await driver.execute(begin)
            rows = await driver.fetch(PG_INSERT_TOUCHING, payload, touches, now)
            await driver.execute("COMMIT")
        except BaseException as exc:
            await self._abandon(exc)
            raise
        return {(p, s, i) for p, s, i in rows if i is not None}

    async def _ready(self) -> bool:
        """Check a connection out when the lane has none (True: just now).
        One left inside a transaction, which nothing should leave, is
        dropped rather than have the next group's statements join it; one
        the server closed while idle (a restart, a failover, a cut network,
        `pg_terminate_backend`) is dropped without a word."""
        if self._driver is not None and self._driver.is_closed():
            await self._discard()
        elif self._driver is not None and self._driver.is_in_transaction():
            log.error("the events connection was left inside a transaction; dropped")
            await self._discard()
        if self._driver is None:
            await self._checkout()
            return True
        return False

    async def _abandon(self, exc: BaseException) -> None:
        """After a failure with the transaction begun, or perhaps begun (a
        failed BEGIN may have opened it, a cancelled lock wait may yet be
        granted): rolled back, so the connection is clean for the next
        group; dropped when it cannot be (closed, cancelled, or the
        rollback fails)."""
        driver = self._driver
        if isinstance(exc, Exception) and not driver.is_closed() and classify(exc) is not Fault.LOST:
            try:
                await driver.execute("ROLLBACK")
                return
            except Exception:
                pass
        await self._discard()

    async def _checkout(self) -> None:
        conn = await self._engine.connect()
        try:
            self._driver = (await conn.get_raw_connection()).driver_connection
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def _discard(self) -> None:
        conn, self._conn, self._driver = self._conn, None, None
        if conn is not None:
            try:
                await conn.invalidate()
                await conn.close()
            except Exception:
                pass  # already gone; the pool has forgotten it

    async def close(self) -> None:
        conn, self._conn, self._driver = self._conn, None, None
        if conn is not None:
            try:
                await conn.close()
            except Exception as exc:  # the server went away: nothing to give back
                log.warning("closing the events connection: %s", short(exc))

