"""The batched writer: group commit for every dialect.

Requests enqueue their records and wait on a future. One task per process
takes whatever is queued (at most `max_rows` rows), writes it in one
transaction and resolves each request's future with that request's own
outcome. While a transaction runs, new requests queue up and form the next
group, so the group grows with load and a lone request waits for nobody.

If a group's transaction fails for a reason other than the database being
unreachable, each request of the group is retried in a transaction of its
own, so one bad request never fails the others.

Identity and profile records of a project are serialised across processes:
SQLite by its single writer lock (BEGIN IMMEDIATE), PostgreSQL by a
transaction-scoped advisory lock per project. Events need no lock: the unique
constraint on (project, source, insert_id) decides duplicates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.model import Alias, Device, Event, ProfileUpdate, Record, Rejection
from storage.direct import PgEvents, SqliteEvents
from storage.engine import Backend, backend_of, json_text
from storage.expiry import QuarantineExpiry
from storage.faults import Fault, classify, is_unavailable, renew_connections, short, sqlstate
from storage.groups import Pending, Written, clean, is_touch, plan_events, settle_events, sqlite_rows
from storage.transaction import Transaction

__all__ = ["Backlogged", "StorageUnavailable", "Unstorable", "Writer", "Written", "is_unavailable"]

log = logging.getLogger("dialgate.writer")


class StorageUnavailable(Exception):
    """The database could not be reached; nothing of the request was stored."""


class Backlogged(StorageUnavailable):
    """The worker's writer backlog is full: answered as the database being
    unavailable (503 with Retry-After), so that SDKs send the batch again."""


class Unstorable(Exception):
    """The database refused this request's data; nothing of it was stored."""


# Rows queued or in flight on a lane before event requests overflow to the next.
_LANE_BACKLOG = 1000


class Writer:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_rows: int = 5000,
        delay_ms: float = 0.0,
        clock: Callable[[], int],
        admit: Callable[[Rejection], bool] = lambda _r: True,
        lanes: int = 1,
        max_backlog_rows: int = 100_000,
        max_profile_bytes: int = 1_048_576,
        keep_days: int = 0,
    ) -> None:
        self._engine = engine
        self._backend = backend_of(str(engine.url))
        self._max_rows = max_rows
        self._delay = delay_ms / 1000.0
        self._clock = clock
        # Quarantine sampling for rejections found while writing.
        self._admit = admit
        # Rows queued or being written, all lanes: past this, submit refuses.
        self._max_backlog = max_backlog_rows
        self._max_profile_bytes = max_profile_bytes
        self._expiry = QuarantineExpiry(engine, keep_days, clock) if keep_days > 0 else None
        # Lanes write concurrently, each its own transactions. Lane 0 alone
        # takes identity and profile records, so they keep arrival order;
        # requests of events only (or events and touches of their profiles)
        # go to the least loaded lane (the unique key settles concurrent
        # duplicates). SQLite has one writer lock: 1 lane.
        count = 1 if self._backend is Backend.SQLITE else max(1, lanes)
        self._queues: list[asyncio.Queue[Pending | None]] = [asyncio.Queue() for _ in range(count)]
        self._load = [0] * count  # rows queued or being written, per lane
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._sqlite_events = SqliteEvents.for_url(engine.url) if self._backend is Backend.SQLITE else None
        # PostgreSQL: each lane's events-only groups go through a connection
        # of its own, one statement each (with touches: one statement in a
        # transaction).
        self._pg_events = (
            [PgEvents(engine) for _ in range(count)] if self._backend is Backend.POSTGRESQL else []
        )

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(lane), name=f"dialgate-writer-{lane}")
            for lane in range(len(self._queues))
        ]
        if self._expiry is not None:
            self._expiry.start()

    async def close(self) -> None:
        """Write everything already queued, then stop."""
        self._closed = True
        if self._expiry is not None:
            await self._expiry.stop()
        for queue in self._queues:
            queue.put_nowait(None)
        for task in self._tasks:
            await task
        self._tasks = []
        if self._sqlite_events is not None:
            await self._sqlite_events.close()
        for pg in self._pg_events:
            await pg.close()

    def _enqueue(self, pending: Pending) -> None:
        if not pending.records or any(type(r) is not Event and not is_touch(r) for r in pending.records):
            # Identity, profile and device work, and rejections written on
            # their own: the ordered lane. (A touch commutes with every other
            # profile change but a concurrent delete, whose order against
            # another request in flight nobody could have known: events that
            # touch their profiles take the event lanes.)
            lane = 0
        else:
            lane = self._event_lane()
        self._load[lane] += pending.rows
        self._queues[lane].put_nowait(pending)

    def _event_lane(self) -> int:
        # Fill one lane while it keeps up, so small requests still share big
        # groups (one commit for many); overflow to the next only on a real
        # backlog. Event lanes first, the ordered lane 0 last.
        order = [*range(1, len(self._queues)), 0]
        for lane in order:
            if self._load[lane] < _LANE_BACKLOG:
                return lane
        return min(order, key=lambda i: self._load[i])

    async def submit(self, records: list[Record], rejections: list[Rejection] = []) -> Written:
        if self._closed or not self._tasks:
            raise StorageUnavailable("writer is shut down")
        if self._over_backlog(len(records) + len(rejections)):
            raise Backlogged(f"the writer's backlog is over {self._max_backlog} rows")
        future: asyncio.Future[Written] = asyncio.get_running_loop().create_future()
        self._enqueue(Pending(records, list(rejections), future))
        # Should the request be cancelled, so is this future, and the group
        # it is part of is written all the same (nobody is told).
        return await future

    def quarantine(self, rejections: list[Rejection]) -> None:
        """Store rejections without making anyone wait for them."""
        if rejections and not self._closed and self._tasks and not self._over_backlog(len(rejections)):
            self._enqueue(Pending([], rejections, None))

    def _over_backlog(self, rows: int) -> bool:
        # A request alone is always taken, however large: it must fit somewhere.
        backlog = sum(self._load)
        return backlog > 0 and backlog + rows > self._max_backlog

    async def _run(self, lane: int) -> None:
        queue = self._queues[lane]
        stopping = False
        while not stopping:
            first = await queue.get()
            if first is None:
                break
            if self._delay:
                await asyncio.sleep(self._delay)
            group = [first]
            rows = first.rows
            while rows < self._max_rows and not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                group.append(item)
                rows += item.rows
            try:
                await self._flush(group, lane)
            except Exception:  # never let the writer die
                log.exception("writer flush failed")
                for pending in group:
                    _fail(pending, StorageUnavailable("internal error"))
            finally:
                self._load[lane] -= rows

    async def _flush(self, group: list[Pending], lane: int = 0, *, retried: bool = False) -> None:
        try:
            results = await self._write(group, lane)
        except Exception as exc:
            fault = classify(exc)
            if fault is Fault.LOST:
                # What the pool holds was made before the fault: the retry,
                # and every later checkout, gets a new connection.
                renew_connections(self._engine)
            if not retried and _retry(fault, exc):
                # Nothing of the group was committed (a connection found dead,
                # a server restarting, a transaction rolled back to break a
                # deadlock): once more, on a fresh connection.
                log.warning("database %s (%s); once more", fault.value, short(exc))
                await self._flush(group, lane, retried=True)
                return
            if fault.unavailable:
                log.warning("database unavailable: %s", short(exc))
                for pending in group:
                    _fail(pending, StorageUnavailable(short(exc)))
                return
            if len(group) == 1:
                if fault is Fault.DATA:
                    log.error("database refused a request: %s", short(exc))
                    _fail(group[0], Unstorable(short(exc)))
                else:
                    # Not the caller's data: never a 4xx, which SDKs drop.
                    log.error("database error writing a request: %s", short(exc), exc_info=exc)
                    _fail(group[0], StorageUnavailable(short(exc)))
                return
            # Find the culprit: every request alone, the good ones still commit.
            for pending in group:
                await self._flush([pending], lane)
            return
        for pending, written in zip(group, results):
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(written)

    async def _write(self, group: list[Pending], lane: int) -> list[Written]:
        results = [Written() for _ in group]
        if (self._sqlite_events is not None or self._pg_events) and all(
            not p.rejections and all(type(r) is Event for r in p.records) for p in group
        ):
            fresh, owner = plan_events(group, results)
            if fresh:
                if self._sqlite_events is not None:
                    stored = await self._sqlite_events.insert(sqlite_rows(fresh))
                else:
                    stored = await self._pg_events[lane].insert(json_text(fresh))
                settle_events(owner, stored, results)
            return results
        if self._pg_events and all(
            not p.rejections and all(type(r) is Event or is_touch(r) for r in p.records) for p in group
        ):
            # Events and the touches of their persons' profiles (the client
            # API's events): one statement inside a transaction of their own.
            fresh, owner = plan_events(group, results)
            touched: set[tuple[str, str]] = set()
            for pending, written in zip(group, results):
                for record in pending.records:
                    if type(record) is ProfileUpdate:
                        touched.add((record.project, clean(record.distinct_id)))  # type: ignore[arg-type]
                        written.applied += 1
            touches = [{"project": project, "id": id_} for project, id_ in sorted(touched)]
            stored = await self._pg_events[lane].insert_touching(
                json_text(fresh), json_text(touches), sorted({project for project, _ in touched}), self._clock()
            )
            settle_events(owner, stored, results)
            return results
        async with self._engine.begin() as conn:
            tx = Transaction(conn, self._backend, self._clock(), self._max_profile_bytes)
            identity = any(type(r) is not Event for p in group for r in p.records)
            if identity:
                if self._backend is Backend.POSTGRESQL:
                    tx.driver = (await conn.get_raw_connection()).driver_connection
                # Before the events: a transaction never waits for the lock
                # holding an insert id another one (holding it shared, with
                # touches) may be waiting for.
                await tx.lock_projects(group)
            await tx.events(group, results)
            if identity:
                # Under the lock, so what is read stays true until commit.
                await tx.prefetch(group)
                for pending, written in zip(group, results):
                    for record in pending.records:
                        kind = type(record)
                        if kind is ProfileUpdate:
                            await tx.profile(record)  # type: ignore[arg-type]
                            written.applied += 1
                        elif kind is Alias:
                            written.aliases.append(await tx.alias(record))  # type: ignore[arg-type]
                        elif kind is Device:
                            tx.device(record)  # type: ignore[arg-type]
                await tx.save_profiles()
                await tx.save_devices()
            rejections = [r for p in group for r in p.rejections]
            rejections += [r for r in tx.rejections if self._admit(r)]
            if rejections:
                await tx.rejections_insert(rejections)
        return results


def _fail(pending: Pending, exc: Exception) -> None:
    if pending.future is not None and not pending.future.done():
        pending.future.set_exception(exc)
        # Retrieved by the request; if the request is gone, don't warn.
        pending.future.exception()


def _retry(fault: Fault, exc: BaseException) -> bool:
    """Whether a failed group is tried once more at once: after a lost
    connection, and after a rollback to break a deadlock or a serialization
    failure. Not after a lock or statement timeout, nor SQLite's lock held
    past its wait: the same wait again would only double the answer's delay."""
    return fault is Fault.LOST or sqlstate(exc).startswith("40")
