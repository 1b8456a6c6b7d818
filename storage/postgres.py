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

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.model import Event, Rejection
from storage.engine import Backend, json_text
from storage.faults import UNIQUE_VIOLATION, Fault, classify, constraint, renew_connections, short, sqlstate
from storage.groups import (
    Attempt,
    Pending,
    assumed,
    events_and_touches,
    mark_prefix,
    plan_events,
    settle_events,
    touched,
)
from storage.sink import SinkOptions, Written
from storage.sql import (
    PG_INSERT,
    PG_INSERT_MARKED,
    PG_INSERT_TOUCHING,
    PG_MARK,
    PG_MARKED,
    PG_MARKS_PRUNE,
    lock_key,
)
from storage.transaction import Transaction

log = logging.getLogger("dialgate.writer")

# How long a group's commit mark is kept: its retry comes at once.
MARKS_KEPT_MS = 10 * 60 * 1000
# The commit mark's primary key (migration 0007).
_MARKS_KEY = "pk_commit_marks"


def _marked_before(exc: BaseException) -> bool:
    """A unique violation on the commit marks: this group's token is there,
    its transaction committed in an earlier attempt."""
    return sqlstate(exc) == UNIQUE_VIOLATION and constraint(exc) == _MARKS_KEY


async def insert_events(driver: Any, payload: str, touches: str | None = None,
                        now: int = 0, token: bytes | None = None) -> set[tuple[str, str, str]]:
    """PostgreSQL's one route for events: the JSON array of events in one
    statement, with `token` also the group's commit mark (with `touches`, a
    JSON array of {project, id}, the same statement also touches those
    profiles, stamped `now`, and needs the token); the keys stored. `driver`
    is an asyncpg connection; the caller owns the transaction."""
    if touches is not None:
        rows = await driver.fetch(PG_INSERT_TOUCHING, payload, touches, now, token)
    elif token is not None:
        rows = await driver.fetch(PG_INSERT_MARKED, payload, token)
    else:
        rows = await driver.fetch(PG_INSERT, payload)
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
        self._pruned_at = time.monotonic()
        self._pruning: asyncio.Task[None] | None = None

    async def write(self, group: list[Pending], lane: int, attempt: Attempt) -> list[Written]:
        try:
            results = await self._write(group, lane, attempt)
        except Exception as exc:
            if not (_marked_before(exc) or await self._committed_despite(exc, attempt)):
                raise
            # A group whose commit happened though its answer was lost:
            # nothing applied twice, answered as the first time.
            log.warning("the commit whose answer was lost had happened; not applied again")
            return attempt.results if attempt.results is not None else assumed(group)
        self._prune_marks()
        return results

    async def _committed_despite(self, exc: Exception, attempt: Attempt) -> bool:
        """After a failure the writer neither retries nor calls unavailable
        (it answers the group refused, or splits it and writes each request
        anew): whether the attempt's mark is there all the same, asked on a
        connection of its own. Only such failures pay the round trip."""
        if classify(exc).unavailable:  # retried as the same attempt, or 503
            return False
        try:
            async with self._engine.connect() as conn:
                found = await conn.execute(text(PG_MARKED), {"token": attempt.token})
                return found.first() is not None
        except Exception as check:
            log.warning("could not ask whether a failed write committed: %s", short(check))
            return False

    async def _write(self, group: list[Pending], lane: int, attempt: Attempt) -> list[Written]:
        now = self._clock()
        if events_and_touches(group):
            results = [Written() for _ in group]
            fresh, owner = plan_events(group, results)
            touches = touched(group, results)
            if touches:
                stored = await self._events[lane].insert_touching(
                    json_text(fresh), json_text([{"project": p, "id": i} for p, i in touches]),
                    sorted({p for p, _ in touches}), now, attempt.token)
                settle_events(owner, stored, results)
            elif fresh:
                settle_events(owner, await self._events[lane].insert(json_text(fresh), attempt.token), results)
            return results
        async with self._engine.begin() as conn:
            tx = Transaction(conn, Backend.POSTGRESQL, now, self._max_profile_bytes)
            # The group's mark, first: it opens the block (`straight` from here
            # on), and its success says no earlier attempt committed.
            await conn.execute(text(PG_MARK), {"token": attempt.token})
            attempt.results = None
            tx.driver = (await conn.get_raw_connection()).driver_connection

            async def insert(events: list[Event]) -> set[tuple[str, str, str]]:
                # json_text also turns U+0000 into U+FFFD in every string at once.
                return await insert_events(tx.driver, json_text(events))

            tx.insert = insert
            attempt.results = await tx.write(group, self._admit)
            return attempt.results

    def _prune_marks(self) -> None:
        """Marks older than MARKS_KEPT_MS dropped, at most once a minute, in
        a task of its own (no request waits for it): a range of the key."""
        moment = time.monotonic()
        if moment - self._pruned_at < 60 or self._pruning is not None:
            return
        self._pruned_at = moment
        self._pruning = asyncio.create_task(self._prune(int(time.time() * 1000) - MARKS_KEPT_MS))

    async def _prune(self, before_ms: int) -> None:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(text(PG_MARKS_PRUNE), {"before": mark_prefix(before_ms)})
        except Exception as exc:
            log.warning("dropping old commit marks: %s", short(exc))
        finally:
            self._pruning = None

    def lost(self) -> None:
        renew_connections(self._engine)

    async def close(self) -> None:
        if self._pruning is not None:  # best effort: the next process's turn
            self._pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruning
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

    async def insert(self, payload: str, token: bytes) -> set[tuple[str, str, str]]:
        """Insert the JSON array of events, and the group's commit mark; the
        keys stored."""
        await self._ready()
        try:
            stored = await insert_events(self._driver, payload, token=token)
        except BaseException as exc:
            if not isinstance(exc, Exception) or self._driver.is_closed() or classify(exc) is Fault.LOST:
                # Cancelled mid-statement, or the connection is gone: the
                # writer's retry (and the next group) starts on a fresh one.
                await self._discard()
            raise
        return stored

    async def insert_touching(self, payload: str, touches: str, projects: list[str],
                              now: int, token: bytes) -> set[tuple[str, str, str]]:
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
            stored = await insert_events(driver, payload, touches, now, token)
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

