"""The PostgreSQL store: lanes side by side, one insert route for events.

Events take one route whatever the group: `insert_events`, one statement on
an asyncpg connection (the events as one JSON array). Groups of events alone
(or with the touches of their profiles) send it on a connection their lane
keeps (`PgEvents`); every other group runs a transaction through SQLAlchemy
and sends the same statement on that transaction's asyncpg connection.

Identity and profile work of a project is serialised across processes by a
transaction-scoped advisory lock per project (exclusive for the ordered
lane's work, shared for touches). Events need no lock: the unique
constraint on (project, source, insert_id) decides duplicates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.model import Event, Rejection
from storage.engine import Backend, json_text
from storage.faults import Fault, classify, renew_connections, short
from storage.groups import Pending, events_and_touches, plan_events, settle_events, touched
from storage.sink import SinkOptions, Written
from storage.sql import PG_INSERT, PG_INSERT_TOUCHING, lock_key
from storage.transaction import Transaction

log = logging.getLogger("dialgate.writer")


async def insert_events(driver: Any, payload: str, touches: str | None = None,
                        now: int = 0) -> set[tuple[str, str, str]]:
    """PostgreSQL's one route for events: the JSON array of events in one
    statement (with `touches`, a JSON array of {project, id}, the same
    statement also touches those profiles, stamped `now`); the keys stored.
    `driver` is an asyncpg connection; the caller owns the transaction."""
    if touches is None:
        rows = await driver.fetch(PG_INSERT, payload)
    else:
        rows = await driver.fetch(PG_INSERT_TOUCHING, payload, touches, now)
    return {(p, s, i) for p, s, i in rows if i is not None}


class PostgresStore:
    """storage.commit.Store for PostgreSQL."""

    def __init__(self, engine: AsyncEngine, options: SinkOptions, *, clock: Callable[[], int],
                 admit: Callable[[Rejection], bool]) -> None:
        self._engine = engine
        self._clock = clock
        self._admit = admit
        self._max_profile_bytes = options.max_profile_bytes
        self.lanes = max(1, options.lanes)
        # Each lane's groups of events go through a connection of its own,
        # one statement each (with touches: one statement in a transaction).
        self._events = [PgEvents(engine) for _ in range(self.lanes)]

    async def write(self, group: list[Pending], lane: int) -> list[Written]:
        if events_and_touches(group):
            results = [Written() for _ in group]
            fresh, owner = plan_events(group, results)
            touches = touched(group, results)
            if touches:
                stored = await self._events[lane].insert_touching(
                    json_text(fresh), json_text([{"project": p, "id": i} for p, i in touches]),
                    sorted({p for p, _ in touches}), self._clock())
                settle_events(owner, stored, results)
            elif fresh:
                settle_events(owner, await self._events[lane].insert(json_text(fresh)), results)
            return results
        async with self._engine.begin() as conn:
            tx = Transaction(conn, Backend.POSTGRESQL, self._clock(), self._max_profile_bytes)
            tx.driver = (await conn.get_raw_connection()).driver_connection

            async def insert(events: list[Event]) -> set[tuple[str, str, str]]:
                if not tx.straight():
                    # Nothing has opened the block yet (Transaction.write
                    # opens it before the events whenever it can).
                    await conn.exec_driver_sql("SELECT 1")
                # json_text also turns U+0000 into U+FFFD in every string at once.
                return await insert_events(tx.driver, json_text(events))

            tx.insert = insert
            return await tx.write(group, self._admit)

    def lost(self) -> None:
        renew_connections(self._engine)

    async def close(self) -> None:
        for events in self._events:
            await events.close()


class PgEvents:
    """A lane's groups of events only: the insert as one
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
            stored = await insert_events(self._driver, payload)
        except BaseException as exc:
            if not isinstance(exc, Exception) or self._driver.is_closed() or classify(exc) is Fault.LOST:
                # Cancelled mid-statement, or the connection is gone: the
                # writer's retry (and the next group) starts on a fresh one.
                await self._discard()
            raise
        return stored

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
            stored = await insert_events(driver, payload, touches, now)
            await driver.execute("COMMIT")
        except BaseException as exc:
            await self._abandon(exc)
            raise
        return stored

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

