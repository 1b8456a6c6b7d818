"""`dialgate load`: the stream drained into the database.

Two kinds of work, each on durable pull consumers of the stream:

- Events and rejections (`<stream>.*.ev`): one consumer, `<stream>_events`,
  shared by every loader process on every host. Their order does not matter
  (the unique key settles duplicates, storage order is only the admin API's
  paging order), so any loader takes any message. A batch is written in one
  transaction (storage.loadwrite) and acknowledged after its commit.
- Identity, profile, device and group records (`<stream>.<project>.id`):
  they must apply in stream order per project, which several loaders pulling
  one consumer would not keep (each takes a different part of the sequence,
  and commits in its own time). So each project is a partition with a
  holder: a lease in the database (`loader_progress`), taken by one loader
  at a time and renewed while it works. The holder (re)creates the
  partition's consumer, `<stream>_id_<project>`, to start right after the
  partition's `last_seq` in the database, so that it never sees a message a
  previous holder left pending (whose redelivery could come after newer
  ones). It applies messages in the order they come and checks that they
  come in order (consumer sequence contiguous, each delivered once);
  anything else (a fetch lost on the network, a redelivery) makes it
  recreate the consumer from `last_seq` again. Each transaction extends the
  lease and fails when another loader took the partition, so a holder that
  stalled past its lease writes nothing.

A database that cannot be reached stops the acknowledgements: the batch is
retried with growing pauses (marked in progress so the stream does not hand
it to another loader meanwhile), and loading resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from storage.faults import short
from storage.jetstream import connect, consumers_backlog, ensure_stream
from storage.loadwrite import LeaseLost, LoadStore, Prepared
from storage.logrecords import EVENTS, IDENTITY, BadMessage, Batch, decode, project_token, record_count, subject
from storage.sink import StreamOptions

log = logging.getLogger("dialgate.loader")

# Seconds between attempts once the database failed, growing to the last.
BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)
# Seconds a fetch waits for messages before the loop looks around.
FETCH_WAIT = 1.0
# Messages per fetch at most.
MAX_MESSAGES = 1000
# Bytes per fetch at most, by the largest messages seen lately. The server
# writes a fetch's messages to the loader's connection at once; far more
# than the loader reads in a few seconds (a first fetch of 1,000 batch-500
# messages is 100 MB) makes it drop the connection as a slow consumer, and
# the messages in flight then come back only after ack_wait.
FETCH_BYTES = 8 * 1024 * 1024

T = TypeVar("T")


@dataclass(frozen=True)
class LoadOptions:
    batch_max_records: int = 20_000
    lease_seconds: float = 15.0
    ack_wait_seconds: float = 60.0


class Progress(Protocol):
    """Where the loader reports (gateway.loadmetrics: Prometheus)."""

    def loaded(self, kind: str, count: int) -> None: ...

    def backlog(self, pending: dict[str, int]) -> None: ...


class _Quiet:
    def loaded(self, kind: str, count: int) -> None:
        pass

    def backlog(self, pending: dict[str, int]) -> None:
        pass


def events_consumer(stream: str) -> str:
    return f"{stream}_events"


def identity_consumer(stream: str, project: str) -> str:
    token = project_token(project)
    if token != project:  # not a valid consumer name as it is
        token = "h" + hashlib.blake2b(project.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{stream}_id_{token}"


class Loader:
    def __init__(self, options: StreamOptions, store: LoadStore, projects: Sequence[str],
                 load: LoadOptions = LoadOptions(), progress: Progress | None = None) -> None:
        self._options = options
        self._store = store
        self._projects = list(projects)
        self._load = load
        self._progress: Progress = progress or _Quiet()
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._stop = asyncio.Event()
        self._nc: Client | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Load until `stop`."""
        nc = await self._connect()
        if nc is None:
            return
        self._nc = nc
        js = nc.jetstream(timeout=5)
        try:
            tasks = [asyncio.create_task(self._events(js), name="events")]
            tasks += [asyncio.create_task(self._partition(js, p), name=f"identity {p}") for p in self._projects]
            tasks.append(asyncio.create_task(self._housekeeping(js), name="housekeeping"))
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            stopping.cancel()
        finally:
            for project in self._projects:
                with contextlib.suppress(Exception):
                    await self._store.release(_partition_name(self._options.stream, project), self.holder)
            with contextlib.suppress(Exception):
                await nc.close()

    async def _connect(self) -> Client | None:
        pause = 0
        while not self._stop.is_set():
            nc = None
            try:
                nc = await connect(self._options.servers, "dialgate-loader")
                await ensure_stream(nc.jetstream(timeout=5), self._options)
                return nc
            except Exception as exc:
                log.warning("stream %s not reachable (%s); trying again", self._options.stream, short(exc))
                if nc is not None:
                    with contextlib.suppress(Exception):
                        await nc.close()
                await self._pause(pause)
                pause += 1
        return None

    async def _pause(self, attempt: int) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), BACKOFF[min(attempt, len(BACKOFF) - 1)])

    async def _events(self, js: JetStreamContext) -> None:
        stream = self._options.stream
        durable = events_consumer(stream)
        config = ConsumerConfig(
            durable_name=durable, filter_subject=f"{stream}.*.{EVENTS}",
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self._load.ack_wait_seconds, max_ack_pending=-1,
        )
        await self._retry(lambda: js.add_consumer(stream, config))
        sub = await self._retry(lambda: js.pull_subscribe_bind(durable, stream))
        # The next batch is fetched and decoded while this one commits (the
        # database's time, when the process would idle): one batch waits at
        # most (the fetcher waits for it to be taken). Should it wait past
        # ack_wait (a database down that long), the stream hands it to
        # another loader too, and `loader_applied` keeps it from being
        # stored twice.
        ready: asyncio.Queue[tuple[list[Msg], Prepared]] = asyncio.Queue(maxsize=1)
        fetcher = asyncio.create_task(self._prefetch(sub, ready, FetchSize(self._load.batch_max_records)),
                                      name="events fetch")
        try:
            while not self._stop.is_set():
                msgs, prepared = await _next(ready, fetcher)
                inserted, rejected = await self._retry(functools.partial(self._store.write_events, prepared), msgs)
                await _ack(msgs)
                self._progress.loaded("events", inserted)
                if rejected:
                    self._progress.loaded("rejections", rejected)
        finally:
            fetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetcher

    async def _prefetch(self, sub: JetStreamContext.PullSubscription,
                        ready: asyncio.Queue[tuple[list[Msg], Prepared]], size: FetchSize) -> None:
        while not self._stop.is_set():
            msgs = await _fetch(sub, size())
            if not msgs:
                continue
            raw = [(msg.metadata.sequence.stream, msg.data) for msg in msgs]
            size.saw(sum(record_count(data) for _, data in raw), [len(data) for _, data in raw])
            await ready.put((msgs, self._store.prepare(raw)))
            await ready.join()

    async def _partition(self, js: JetStreamContext, project: str) -> None:
        """Hold the project's identity partition whenever it is free, and
        apply its messages in stream order while holding it."""
        stream = self._options.stream
        name = _partition_name(stream, project)
        lease_ms = int(self._load.lease_seconds * 1000)
        while not self._stop.is_set():
            if not await self._retry(lambda: self._store.acquire(name, self.holder, lease_ms)):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._load.lease_seconds / 3)
                continue
            try:
                await self._hold(js, project, name, lease_ms)
            except LeaseLost:
                log.info("partition %s moved to another loader", name)
            except (nats.errors.Error, OSError) as exc:
                # The stream's servers (a node restarting, a leader moving):
                # the consumer is made again from `last_seq` once they answer.
                log.warning("partition %s: stream unavailable (%s); starting again", name, short(exc))
                await self._pause(2)

    async def _hold(self, js: JetStreamContext, project: str, name: str, lease_ms: int) -> None:
        stream = self._options.stream
        durable = identity_consumer(stream, project)
        last = await self._retry(lambda: self._store.last_seq(name))
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, durable)
        config = ConsumerConfig(
            durable_name=durable, filter_subject=subject(stream, project, IDENTITY),
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if last else DeliverPolicy.ALL,
            opt_start_seq=last + 1 if last else None,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self._load.ack_wait_seconds, max_ack_pending=-1,
        )
        await js.add_consumer(stream, config)
        sub = await js.pull_subscribe_bind(durable, stream)
        expected = 1
        wait = min(FETCH_WAIT, self._load.lease_seconds / 3)
        size = FetchSize(self._load.batch_max_records)
        try:
            while not self._stop.is_set():
                msgs = await _fetch(sub, size(), wait)
                if not msgs:
                    if not await self._retry(lambda: self._store.acquire(name, self.holder, lease_ms)):
                        raise LeaseLost(name)
                    continue
                for msg in msgs:
                    meta = msg.metadata
                    if meta.num_delivered != 1 or meta.sequence.consumer != expected:
                        # Out of order: start again from what the database has.
                        log.warning("partition %s: delivery out of order; consumer recreated", name)
                        return
                    expected += 1
                messages = self._decoded(msgs, size)
                apply = functools.partial(self._store.apply_identity, name, self.holder, lease_ms, messages)
                applied = await self._retry(apply, msgs)
                await _ack(msgs)
                self._progress.loaded("identity", applied)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _decoded(self, msgs: list[Msg], size: FetchSize) -> list[tuple[int, Batch]]:
        messages = []
        records = 0
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            try:
                batch = decode(msg.data)
            except BadMessage as exc:
                # Not ours: kept out of the tables (acknowledged with the batch).
                log.error("message %d of %s is not a batch of records (%s); skipped", seq, msg.subject, exc)
                continue
            records += len(batch.order)
            messages.append((seq, batch))
        size.saw(records, [len(msg.data) for msg in msgs])
        return messages

    async def _retry(self, attempt: Callable[[], Any], msgs: Sequence[Msg] = ()) -> Any:
        """`attempt()` until it succeeds (LeaseLost goes through): the
        database may be down for a while, and loading waits for it."""
        failures = 0
        while True:
            try:
                return await attempt()
            except LeaseLost:
                raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stop.is_set():
                    raise
                log.warning("database or stream unavailable (%s); trying again", short(exc))
                for msg in msgs:
                    # Not handed to another loader meanwhile.
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                await self._pause(failures)
                failures += 1

    async def _housekeeping(self, js: JetStreamContext) -> None:
        """Every few seconds: the backlog for the metrics, and the
        bookkeeping of messages every loader is done with dropped."""
        stream = self._options.stream
        while not self._stop.is_set():
            try:
                self._progress.backlog(await consumers_backlog(js, stream))
                info = await js.consumer_info(stream, events_consumer(stream))
                floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
                if floor:
                    await self._store.forget(floor or 0)
            except Exception as exc:
                log.debug("housekeeping: %s", short(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 5.0)


class FetchSize:
    """How many messages the next fetch asks for: about `records` records
    (a batch) and at most FETCH_BYTES. Nothing known at first, it starts at
    one message, assumed full; the estimates follow the largest messages
    seen and come down by a quarter a fetch when messages are smaller."""

    def __init__(self, records: int) -> None:
        self._records = max(1, records)
        self._per_message = float(self._records)
        self._bytes = float(FETCH_BYTES)

    def __call__(self) -> int:
        fits = min(self._records / self._per_message, FETCH_BYTES / self._bytes)
        return max(1, min(MAX_MESSAGES, int(fits)))

    def saw(self, records: int, sizes: Sequence[int]) -> None:
        if sizes:
            self._per_message = max(1.0, records / len(sizes), self._per_message / 4)
            self._bytes = max(1.0, float(max(sizes)), self._bytes / 4)


def _partition_name(stream: str, project: str) -> str:
    return f"{stream}:{project}"


async def _fetch(sub: JetStreamContext.PullSubscription, count: int, wait: float = FETCH_WAIT) -> list[Msg]:
    try:
        return await sub.fetch(count, timeout=wait)
    except TimeoutError:
        return []
    except nats.errors.Error as exc:
        # Reconnecting to another server of the cluster: fetch again soon.
        log.warning("fetch failed (%s)", short(exc))
        await asyncio.sleep(0.5)
        return []


async def _next(ready: asyncio.Queue[T], fetcher: asyncio.Task[None]) -> T:
    """The next item of `ready`; the fetcher's failure if it ended instead."""
    getter = asyncio.ensure_future(ready.get())
    try:
        await asyncio.wait([getter, fetcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if getter.cancelled():
        fetcher.result()
        raise RuntimeError("the events fetcher stopped")
    ready.task_done()
    return getter.result()


async def _ack(msgs: Sequence[Msg]) -> None:
    try:
        for msg in msgs:
            await msg.ack()
    except nats.errors.Error as exc:
        # Committed already: the stream delivers them again after ack_wait,
        # and the loader recognises them (storage.loadwrite).
        log.warning("acknowledgement failed (%s); the batch will be delivered again", short(exc))
