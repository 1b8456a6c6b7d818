"""Group commit: the part every sink shares.

Requests enqueue their records and wait on a future. One task per lane
takes whatever is queued (at most `max_rows` rows), has the backend's
`Store` write it in one transaction and resolves each request's future with
that request's own outcome. While a transaction runs, new requests queue up
and form the next group, so the group grows with load and a lone request
waits for nobody.

If a group's transaction fails for a reason other than the database being
unreachable, each request of the group is retried in a transaction of its
own, so one bad request never fails the others. Faults are classified once
(storage.faults), whatever the backend.

Identity and profile records keep one ordered lane (lane 0); events go to
the least loaded lane. How a backend serialises identity work across
processes is the store's business (storage.sqlite, storage.postgres).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.model import Event, Record, Rejection
from storage.expiry import QuarantineExpiry
from storage.faults import Fault, classify, short, sqlstate
from storage.groups import Attempt, Pending, is_touch
from storage.sink import Backlogged, SinkOptions, StorageUnavailable, Unstorable, Written

__all__ = ["GroupCommit", "Store"]

log = logging.getLogger("dialgate.writer")


class Store(Protocol):
    """A backend's writes, as the group commit drives them."""

    # How many lanes may write at once (1: one writer, as SQLite).
    lanes: int

    async def write(self, group: list[Pending], lane: int, attempt: Attempt) -> list[Written]:
        """Write the group in one transaction, or raise with nothing stored.
        `attempt` is the same when the group is tried again after a lost
        connection (a store that can tell whether the first commit happened
        uses it: storage.postgres)."""
        ...

    def lost(self) -> None:
        """A connection was found lost: none made before may be used again."""

    async def close(self) -> None: ...


# Rows queued or in flight on a lane before event requests overflow to the next.
_LANE_BACKLOG = 1000


class GroupCommit:
    """A sink (storage.sink.Sink) made of a store and the shared group commit."""

    def __init__(self, store: Store, options: SinkOptions, *, expiry: QuarantineExpiry | None = None,
                 on_commit: Callable[[float], None] | None = None) -> None:
        self._store = store
        # Told the seconds each committed transaction took (the gateway's metrics).
        self._on_commit = on_commit
        self._max_rows = options.max_rows
        self._delay = options.delay_ms / 1000.0
        # Rows queued or being written, all lanes: past this, submit refuses.
        self._max_backlog = options.max_backlog_rows
        self._expiry = expiry
        # Lanes write concurrently, each its own transactions. Lane 0 alone
        # takes identity and profile records, so they keep arrival order;
        # requests of events only (or events and touches of their profiles)
        # go to the least loaded lane (the unique key settles concurrent
        # duplicates).
        count = store.lanes
        self._queues: list[asyncio.Queue[Pending | None]] = [asyncio.Queue() for _ in range(count)]
        self._load = [0] * count  # rows queued or being written, per lane
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

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
        await self._store.close()

    @property
    def backlog(self) -> int:
        """Rows (records and rejections) queued or being written, all lanes."""
        return sum(self._load)

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
        order: list[int] = [*range(1, len(self._queues)), 0]
        for lane in order:
            if self._load[lane] < _LANE_BACKLOG:
                return lane
        return min(order, key=lambda i: self._load[i])

    async def submit(self, records: list[Record], rejections: Sequence[Rejection] = ()) -> Written:
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
        backlog = self.backlog
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

    async def _flush(self, group: list[Pending], lane: int = 0, *, retried: Attempt | None = None) -> None:
        started = time.perf_counter()
        attempt = retried or Attempt()
        try:
            results = await self._store.write(group, lane, attempt)
        except Exception as exc:
            fault = classify(exc)
            if fault is Fault.LOST:
                # What the pool holds was made before the fault: the retry,
                # and every later checkout, gets a new connection.
                self._store.lost()
            if retried is None and _retry(fault, exc):
                # A connection found dead, a server restarting, a transaction
                # rolled back to break a deadlock: once more, on a fresh
                # connection, as the same attempt. When the connection broke
                # while the commit was in flight, the store tells whether it
                # happened (PostgreSQL: the attempt's commit mark), so nothing
                # is applied twice (tests/storage/test_commit_uncertain.py).
                log.warning("database %s (%s); once more", fault.value, short(exc))
                await self._flush(group, lane, retried=attempt)
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
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - started)
        for pending, written in zip(group, results, strict=False):  # one Written per request (hot path)
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(written)


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
