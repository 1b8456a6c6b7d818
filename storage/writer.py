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
import functools
import logging
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, assert_never

import msgspec
from sqlalchemy import Text, any_, bindparam, delete, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.model import Alias, AliasOutcome, Device, Event, ProfileUpdate, Record, Rejection
from storage import tables
from storage.engine import Backend, backend_of, json_text, sqlite_pragmas
from storage.profiles import apply_update

log = logging.getLogger("dialgate.writer")


class StorageUnavailable(Exception):
    """The database could not be reached; nothing of the request was stored."""


class Unstorable(Exception):
    """The database refused this request's data; nothing of it was stored."""


class Written:
    """What one request's records did, as counted inside the transaction."""

    __slots__ = ("inserted", "duplicates", "applied", "aliases", "new_keys")

    def __init__(self) -> None:
        self.inserted = 0
        self.duplicates = 0
        self.applied = 0
        self.aliases: list[AliasOutcome] = []
        # (project, source, insert_id) of the events this request stored.
        self.new_keys: list[tuple[str, str, str]] = []


class _Pending:
    __slots__ = ("records", "rejections", "future", "rows")

    def __init__(
        self,
        records: list[Record],
        rejections: list[Rejection],
        future: asyncio.Future[Written] | None,
    ) -> None:
        self.records = records
        self.rejections = rejections
        self.future = future
        self.rows = len(records) + len(rejections)


# SQLSTATE classes that mean "not now", never "not this data": connection
# exceptions (08), a transaction rolled back for a deadlock or a
# serialization failure (40), insufficient resources (53, e.g. too many
# connections), a lock or statement timeout (55P03, 57014), operator
# intervention (57P01..57P05: shutting down, starting up...). Nothing of
# the statement stays: the request may be sent again.
_TRANSIENT_SQLSTATES = ("08", "40", "53", "55P03", "57014", "57P")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it wraps (SQLAlchemy's `orig`, `__cause__`)."""
    seen: BaseException | None = exc
    depth = 0
    while seen is not None and depth < 5:
        yield seen
        seen = getattr(seen, "orig", None) or seen.__cause__
        depth += 1


def _sqlstate(exc: BaseException) -> str:
    for seen in _causes(exc):
        state = getattr(seen, "sqlstate", None) or getattr(seen, "pgcode", None)
        if isinstance(state, str):
            return state
    return ""


def is_unavailable(exc: BaseException) -> bool:
    """True when the database could not be reached or cannot work right now."""
    for seen in _causes(exc):
        if isinstance(seen, (OSError, ConnectionError, asyncio.TimeoutError, sqlite3.OperationalError)):
            # sqlite3: locked past the busy timeout, disk full, I/O error.
            return True
        if isinstance(seen, DBAPIError) and (
            seen.connection_invalidated or isinstance(seen, (OperationalError, InterfaceError))
        ):
            return True
        if "connect" in type(seen).__name__.lower():
            return True
    return _sqlstate(exc).startswith(_TRANSIENT_SQLSTATES)


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
    ) -> None:
        self._engine = engine
        self._backend = backend_of(str(engine.url))
        self._max_rows = max_rows
        self._delay = delay_ms / 1000.0
        self._clock = clock
        # Quarantine sampling for rejections found while writing.
        self._admit = admit
        # Lanes write concurrently, each its own transactions. Lane 0 alone
        # takes identity and profile records, so they keep arrival order;
        # requests of events only (or events and touches of their profiles)
        # go to the least loaded lane (the unique key settles concurrent
        # duplicates). SQLite has one writer lock: 1 lane.
        count = 1 if self._backend is Backend.SQLITE else max(1, lanes)
        self._queues: list[asyncio.Queue[_Pending | None]] = [asyncio.Queue() for _ in range(count)]
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

    async def close(self) -> None:
        """Write everything already queued, then stop."""
        self._closed = True
        for queue in self._queues:
            queue.put_nowait(None)
        for task in self._tasks:
            await task
        self._tasks = []
        if self._sqlite_events is not None:
            await self._sqlite_events.close()
        for pg in self._pg_events:
            await pg.close()

    def _enqueue(self, pending: _Pending) -> None:
        if not pending.records or any(type(r) is not Event and not _is_touch(r) for r in pending.records):
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
        future: asyncio.Future[Written] = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(records, list(rejections), future))
        # Should the request be cancelled, so is this future, and the group
        # it is part of is written all the same (nobody is told).
        return await future

    def quarantine(self, rejections: list[Rejection]) -> None:
        """Store rejections without making anyone wait for them."""
        if rejections and not self._closed and self._tasks:
            self._enqueue(_Pending([], rejections, None))

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

    async def _flush(self, group: list[_Pending], lane: int = 0, *, retried: bool = False) -> None:
        try:
            results = await self._write(group, lane)
        except Exception as exc:
            rolled_back = _sqlstate(exc).startswith("40")
            if not retried and (rolled_back or (isinstance(exc, DBAPIError) and exc.connection_invalidated)):
                # A pooled connection died while idle (say, the server
                # restarted), or the transaction was chosen to break a
                # deadlock: nothing was written; try once more.
                if rolled_back:
                    log.warning("database rolled the group back (%s); once more", _short(exc))
                await self._flush(group, lane, retried=True)
                return
            if is_unavailable(exc):
                log.warning("database unavailable: %s", _short(exc))
                for pending in group:
                    _fail(pending, StorageUnavailable(_short(exc)))
                return
            if len(group) == 1:
                log.error("database refused a request: %s", _short(exc))
                _fail(group[0], Unstorable(_short(exc)))
                return
            # Find the culprit: every request alone, the good ones still commit.
            for pending in group:
                await self._flush([pending], lane)
            return
        for pending, written in zip(group, results):
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(written)

    async def _write(self, group: list[_Pending], lane: int) -> list[Written]:
        results = [Written() for _ in group]
        if (self._sqlite_events is not None or self._pg_events) and all(
            not p.rejections and all(type(r) is Event for r in p.records) for p in group
        ):
            fresh, owner = _plan_events(group, results)
            if fresh:
                if self._sqlite_events is not None:
                    stored = await self._sqlite_events.insert(_sqlite_rows(fresh))
                else:
                    stored = await self._pg_events[lane].insert(json_text(fresh))
                _settle_events(owner, stored, results)
            return results
        if self._pg_events and all(
            not p.rejections and all(type(r) is Event or _is_touch(r) for r in p.records) for p in group
        ):
            # Events and the touches of their persons' profiles (the client
            # API's events): one statement inside a transaction of their own.
            fresh, owner = _plan_events(group, results)
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
            _settle_events(owner, stored, results)
            return results
        async with self._engine.begin() as conn:
            tx = _Transaction(conn, self._backend, self._clock())
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


def _fail(pending: _Pending, exc: Exception) -> None:
    if pending.future is not None and not pending.future.done():
        pending.future.set_exception(exc)
        # Retrieved by the request; if the request is gone, don't warn.
        pending.future.exception()


def _short(exc: BaseException) -> str:
    text_ = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return (text_[0] if text_ else type(exc).__name__)[:300]


def _insert(backend: Backend, table: Any) -> Any:
    if backend is Backend.POSTGRESQL:
        return postgresql.insert(table)
    if backend is Backend.SQLITE:
        return sqlite.insert(table)
    assert_never(backend)


_EVENT_COLUMNS = (
    "project, source, name, distinct_id, anonymous_id, user_id, time, received_at, "
    "insert_id, session_id, properties, context, consent"
)
# One statement and one parameter for any batch: the events travel as one
# JSON array (encoded from the Event structs in one msgspec call) that the
# server unpacks, instead of per-element encoding of 13 arrays in Python.
_PG_INSERT = (
    f"INSERT INTO events ({_EVENT_COLUMNS}) "
    f"SELECT {_EVENT_COLUMNS} FROM json_to_recordset($1::json) AS e("
    "project varchar, source varchar, name text, distinct_id text, anonymous_id text, user_id text, "
    "time bigint, received_at bigint, insert_id varchar, session_id text, properties jsonb, "
    "context jsonb, consent boolean"
    ") ON CONFLICT (project, source, insert_id) DO NOTHING RETURNING project, source, insert_id"
)
# The events, and in the same statement the profiles they touch: each id
# resolved to its person, a missing profile created empty, an existing one
# only updated (in (project, person) order, as every profile write here).
_PG_INSERT_TOUCHING = (
    "WITH touched AS ("
    "INSERT INTO profiles (project, distinct_id, properties, created_at, updated_at) "
    "SELECT DISTINCT t.project, coalesce(a.person, t.id), '{}'::jsonb, $3::bigint, $3::bigint "
    "FROM json_to_recordset($2::json) AS t(project varchar, id text) "
    "LEFT JOIN aliases a ON a.project = t.project AND a.alias = t.id "
    "ORDER BY 1, 2 "
    "ON CONFLICT (project, distinct_id) DO UPDATE SET "
    "updated_at = greatest(profiles.updated_at, excluded.updated_at)) "
    + _PG_INSERT
)
_PG_LOCK = "SELECT pg_advisory_xact_lock($1)"
_PG_LINKS = "SELECT alias, person FROM aliases WHERE project = $1 AND alias = ANY($2::text[])"
_PG_PROFILES = (
    "SELECT distinct_id, properties::text FROM profiles WHERE project = $1 AND distinct_id = ANY($2::text[])"
)
# The rows as one JSON array, as the events go: a new profile gets its
# created_at, an existing one keeps its own.
_PG_PROFILES_UPSERT = (
    "INSERT INTO profiles (project, distinct_id, properties, created_at, updated_at) "
    "SELECT project, distinct_id, properties, created_at, updated_at FROM json_to_recordset($1::json) AS r("
    "project varchar, distinct_id text, properties jsonb, created_at bigint, updated_at bigint"
    ") ON CONFLICT (project, distinct_id) DO UPDATE SET properties = excluded.properties, "
    "updated_at = greatest(profiles.updated_at, excluded.updated_at)"
)
_SQLITE_ROW = "(" + ",".join("?" * 13) + ")"
_SQLITE_INSERT_PLAIN = (
    f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES {{values}} "
    "ON CONFLICT (project, source, insert_id) DO NOTHING"
)
_SQLITE_INSERT = _SQLITE_INSERT_PLAIN + " RETURNING project, source, insert_id"
# How long a group waits for SQLite's write lock held by another process.
_LOCK_WAIT = 30.0
# SQLite allows 32766 bound values per statement: 2000 rows of 13.
_SQLITE_ROWS = 2000
# Ids per IN list and rows per multi-row upsert in the identity, profile and
# device writes: 500 rows of at most 11 columns stay far under that limit.
_CHUNK = 500

_T = TypeVar("_T")


def _chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def clean(text_: str | None) -> str | None:
    """U+0000 -> U+FFFD in text columns: PostgreSQL's text type refuses NUL,
    and both backends must store the same thing."""
    if text_ is not None and "\x00" in text_:
        return text_.replace("\x00", "\ufffd")
    return text_


def _lock_key(project: str) -> int:
    # A stable signed 64-bit key per project for pg_advisory_xact_lock.
    return zlib.crc32(b"dialgate-profiles:" + project.encode()) - 2**31


def _sqlite_rows(events: list[Event]) -> list[tuple[Any, ...]]:
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


def _plan_events(group: list[_Pending], results: list[Written]) -> tuple[list[Event], dict[tuple[str, str, str], int]]:
    """The group's events to insert, and which request owns each insert id
    (the first to name it; a later copy in the same group is a duplicate)."""
    fresh: list[Event] = []
    owner: dict[tuple[str, str, str], int] = {}
    for index, (pending, written) in enumerate(zip(group, results)):
        for record in pending.records:
            if type(record) is not Event:
                continue
            event: Event = record  # type: ignore[assignment]
            if event.insert_id is not None:
                key = (event.project, event.source, clean(event.insert_id))
                if key in owner:
                    written.duplicates += 1
                    continue
                owner[key] = index
            else:
                written.inserted += 1
            fresh.append(event)
    return fresh, owner


def _settle_events(
    owner: dict[tuple[str, str, str], int], stored: set[tuple[str, str, str]] | None, results: list[Written]
) -> None:
    """Count each keyed event as inserted or duplicate; `stored` None: all new."""
    for key, index in owner.items():
        if stored is None or key in stored:
            results[index].inserted += 1
            results[index].new_keys.append(key)
        else:
            results[index].duplicates += 1


@functools.lru_cache(maxsize=64)
def _sqlite_insert(rows: int) -> str:
    return _SQLITE_INSERT_PLAIN.format(values=",".join([_SQLITE_ROW] * rows))


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
        deadline = time.monotonic() + _LOCK_WAIT
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
            (_sqlite_insert(len(chunk)), [value for row in chunk for value in row])
            for chunk in (rows[start : start + _SQLITE_ROWS] for start in range(0, len(rows), _SQLITE_ROWS))
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
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
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
        fresh = await self._ready()
        try:
            rows = await self._driver.fetch(_PG_INSERT, payload)
        except Exception:
            if not self._driver.is_closed():
                raise  # the data or the statement, not the connection
            # The connection died (say, while idle across a server restart):
            # once more on a fresh one, as the transaction path does.
            await self._discard()
            if fresh:
                raise
            return await self.insert(payload)
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
        fresh = await self._ready()
        driver = self._driver
        # Integers of our own making, so the statement may carry them: BEGIN
        # and the locks in one round trip (the simple protocol takes several).
        begin = "BEGIN;" + "".join(f"SELECT pg_advisory_xact_lock_shared({_lock_key(p)});" for p in projects)
        begun = False
        try:
            await driver.execute(begin)
            begun = True
            rows = await driver.fetch(_PG_INSERT_TOUCHING, payload, touches, now)
            await driver.execute("COMMIT")
        except BaseException as exc:
            died_idle = not begun and isinstance(exc, Exception) and driver.is_closed()
            await self._abandon(exc)
            if died_idle and not fresh:
                # Died while idle (say, across a server restart): nothing was
                # written; once more on a fresh one.
                return await self.insert_touching(payload, touches, projects, now)
            raise
        return {(p, s, i) for p, s, i in rows if i is not None}

    async def _ready(self) -> bool:
        """Check a connection out when the lane has none (True: just now).
        One left inside a transaction, which nothing should leave, is
        dropped rather than have the next group's statements join it."""
        if self._driver is not None and self._driver.is_in_transaction():
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
        if isinstance(exc, Exception) and not driver.is_closed():
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
                log.warning("closing the events connection: %s", _short(exc))


def _is_touch(record: Record) -> bool:
    """A profile update that only marks its person seen: created empty when
    missing, else only its updated_at moves."""
    return (
        type(record) is ProfileUpdate and record.touch  # type: ignore[union-attr]
        and not record.delete and not _changes(record)  # type: ignore[union-attr, arg-type]
    )


def _is_noop(update_: ProfileUpdate) -> bool:
    """`$delete: false` alone, say: nothing to apply, so nothing is created."""
    return not (update_.touch or _changes(update_))


def _changes(update_: ProfileUpdate) -> bool:
    return bool(
        update_.set_once or update_.set or update_.add or update_.append
        or update_.union or update_.remove or update_.unset
    )


class _Transaction:
    """Identity, profile and device work inside one transaction.

    Set-based, so a group costs a few round trips whatever its size: the
    links and profiles the group's records name are read up front in one
    query each (`prefetch`), records then apply one by one, in arrival order,
    against these caches, and profiles and devices are written once at the
    end, however many operations touched them, one statement for each kind of
    change. Only an alias merge may still read an id nobody named.
    """

    def __init__(self, conn: AsyncConnection, backend: Backend, now: int) -> None:
        self.conn = conn
        self.backend = backend
        self.now = now
        # PostgreSQL: the asyncpg connection under `conn`. Once SQLAlchemy
        # has opened the transaction block, the statements every group of
        # identity and profile work runs (the lock, the prefetch, the profile
        # upsert) go to it straight, in the same block: a third of the CPU
        # through SQLAlchemy, and no statement compiled per group.
        self.driver: Any = None
        self.rejections: list[Rejection] = []
        self._links: dict[tuple[str, str], str | None] = {}  # id -> person, None: no link
        self._profiles: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._loaded: set[tuple[str, str]] = set()  # rows that exist in the table
        self._dirty: set[tuple[str, str]] = set()
        # (project, device id) -> the row to upsert at the end of the transaction.
        self._devices: dict[tuple[str, str], dict[str, Any]] = {}

    async def events(self, group: list[_Pending], results: list[Written]) -> None:
        fresh, owner = _plan_events(group, results)
        if fresh:
            _settle_events(owner, await self._insert_events(fresh), results)

    async def _insert_events(self, events: list[Event]) -> set[tuple[str, str, str]]:
        """Bulk insert, skipping known insert ids; returns the keys stored.

        Driver-level SQL: the same statement for every batch, nothing for
        SQLAlchemy to compile per row (this is the hot path).
        """
        stored: set[tuple[str, str, str]] = set()
        if self.backend is Backend.POSTGRESQL and self._straight():
            rows = await self.driver.fetch(_PG_INSERT, json_text(events))
            stored.update((p, s, i) for p, s, i in rows if i is not None)
        elif self.backend is Backend.POSTGRESQL:
            # json_text also turns U+0000 into U+FFFD in every string at once.
            result = await self.conn.exec_driver_sql(_PG_INSERT, (json_text(events),))
            stored.update((p, s, i) for p, s, i in result.all() if i is not None)
        elif self.backend is Backend.SQLITE:
            rows = _sqlite_rows(events)
            for start in range(0, len(rows), _SQLITE_ROWS):
                chunk = rows[start : start + _SQLITE_ROWS]
                sql = _SQLITE_INSERT.format(values=",".join([_SQLITE_ROW] * len(chunk)))
                flat = tuple(value for row in chunk for value in row)
                result = await self.conn.exec_driver_sql(sql, flat)
                stored.update((p, s, i) for p, s, i in result.all() if i is not None)
        else:
            assert_never(self.backend)
        return stored

    async def lock_projects(self, group: list[_Pending]) -> None:
        if self.backend is not Backend.POSTGRESQL:
            return  # SQLite: BEGIN IMMEDIATE already holds the only write lock
        projects = sorted({r.project for p in group for r in p.records if type(r) is not Event})
        for project in projects:
            if self._straight():
                await self.driver.execute(_PG_LOCK, _lock_key(project))
            else:
                await self.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(project)})

    def _straight(self) -> bool:
        """Whether a statement may go to the driver: only inside the block
        SQLAlchemy opened (its first statement opens it; before that, a
        statement on the driver would run and commit on its own)."""
        return self.driver is not None and self.driver.is_in_transaction()

    def _among(self, column: Any, values: Sequence[str]) -> Any:
        """`column IN values`. PostgreSQL gets one array parameter instead,
        so the statement text, hence its prepared statement, is the same
        whatever the count."""
        if self.backend is Backend.POSTGRESQL:
            return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(Text)))
        return column.in_(values)

    async def prefetch(self, group: list[_Pending]) -> None:
        """Fill the link and profile caches for every id the group's identity
        and profile records name: one query for their links, then one for the
        profiles of the persons they resolve to (per project and chunk of
        ids), instead of a round trip per id and per person."""
        named: dict[str, set[str]] = {}
        for pending in group:
            for record in pending.records:
                if isinstance(record, ProfileUpdate):
                    ids = [record.distinct_id]
                elif isinstance(record, Alias):
                    ids = [record.alias, record.distinct_id]
                else:
                    continue
                named.setdefault(record.project, set()).update(clean(i) for i in ids)  # type: ignore[misc]
        for project, ids_ in sorted(named.items()):
            for chunk in _chunks(sorted(ids_)):
                found = await self._links_of(project, chunk)
                for id_ in chunk:
                    self._links[(project, id_)] = found.get(id_)  # None: no link yet
            persons = sorted({self._links[(project, i)] or i for i in ids_})
            for chunk in _chunks(persons):
                found = await self._profiles_of(project, chunk)
                for person in chunk:
                    self._profiles[(project, person)] = found.get(person)  # None: no profile
                    if person in found:
                        self._loaded.add((project, person))

    async def _links_of(self, project: str, ids: Sequence[str]) -> dict[str, str]:
        if self._straight():
            return dict(await self.driver.fetch(_PG_LINKS, project, ids))
        a = tables.aliases
        rows = await self.conn.execute(
            select(a.c.alias, a.c.person).where(a.c.project == project, self._among(a.c.alias, ids))
        )
        return dict(rows.all())  # type: ignore[arg-type]

    async def _profiles_of(self, project: str, persons: Sequence[str]) -> dict[str, dict[str, Any]]:
        if self._straight():
            rows = await self.driver.fetch(_PG_PROFILES, project, persons)
            return {person: msgspec.json.decode(props) for person, props in rows}
        p = tables.profiles
        result = await self.conn.execute(
            select(p.c.distinct_id, p.c.properties).where(
                p.c.project == project, self._among(p.c.distinct_id, persons)
            )
        )
        return dict(result.all())  # type: ignore[arg-type]

    async def _link(self, project: str, id_: str) -> str | None:
        key = (project, id_)
        if key not in self._links:
            a = tables.aliases
            row = await self.conn.execute(
                select(a.c.person).where(a.c.project == project, a.c.alias == id_)
            )
            self._links[key] = row.scalar()
        return self._links[key]

    async def resolve(self, project: str, id_: str) -> str:
        return await self._link(project, id_) or id_

    async def _profile(self, project: str, person: str) -> dict[str, Any] | None:
        key = (project, person)
        if key not in self._profiles:
            p = tables.profiles
            row = await self.conn.execute(
                select(p.c.properties).where(p.c.project == project, p.c.distinct_id == person)
            )
            props = row.scalar()
            self._profiles[key] = props
            if props is not None:
                self._loaded.add(key)
        return self._profiles[key]

    def _put_profile(self, project: str, person: str, props: dict[str, Any] | None) -> None:
        self._profiles[(project, person)] = props
        self._dirty.add((project, person))

    async def profile(self, update_: ProfileUpdate) -> None:
        person = await self.resolve(update_.project, clean(update_.distinct_id))  # type: ignore[arg-type]
        current = await self._profile(update_.project, person)
        if current is None and (update_.delete or _is_noop(update_)):
            return
        props, problems = apply_update(current, update_)
        self._put_profile(update_.project, person, props)
        for problem in problems:
            self.rejections.append(
                Rejection(
                    project=update_.project,
                    source=update_.source,
                    reason="profile_type_mismatch",
                    detail=f"{update_.distinct_id}: {problem}",
                    received_at=update_.time,
                )
            )

    async def alias(self, record: Alias) -> AliasOutcome:
        project = record.project
        a, d = clean(record.alias), clean(record.distinct_id)
        assert a is not None and d is not None
        if a == d:
            return "self"
        linked = await self._link(project, a)
        target = await self.resolve(project, d)
        if linked is not None:
            outcome: AliasOutcome = "exists" if linked == target else "conflict"
        elif target == a:
            outcome = "cycle"
        else:
            outcome = "linked"
        if outcome in ("conflict", "cycle"):
            if not record.strict:
                self.rejections.append(
                    Rejection(
                        project=project,
                        source=record.source,
                        reason=f"alias_{outcome}",
                        detail=f"{a} -> {d}: " + (
                            "already linked to another person" if outcome == "conflict" else "would make a cycle"
                        ),
                        received_at=self.now,
                    )
                )
            return outcome
        if outcome == "exists":
            return outcome
        t = tables.aliases
        # `a` was a root: its whole tree now belongs to `target`.
        await self.conn.execute(
            update(t).where(t.c.project == project, t.c.person == a).values(person=target)
        )
        await self.conn.execute(
            t.insert().values(
                project=project, alias=a, distinct_id=d, person=target,
                source=record.source, created_at=self.now,
            )
        )
        for key, person in self._links.items():
            if key[0] == project and person == a:
                self._links[key] = target
        self._links[(project, a)] = target
        absorbed = await self._profile(project, a)
        if absorbed is not None:
            kept = await self._profile(project, target) or {}
            self._put_profile(project, target, {**absorbed, **kept})
            self._put_profile(project, a, None)
        return outcome

    def device(self, record: Device) -> None:
        """Queue a registration; `save_devices` writes them all at the end."""
        values = {
            "project": record.project,
            "device_id": clean(record.device_id),
            "distinct_id": clean(record.distinct_id),
            "source": record.source,
            "push_token": clean(record.push_token),
            "os": clean(record.os),
            "os_version": clean(record.os_version),
            "model": clean(record.model),
            "app_build": clean(record.app_build),
            "app_version": clean(record.app_version),
            "updated_at": self.now,
        }
        # Keyed by device: the last registration in the group wins, as when
        # each was its own upsert (and one PostgreSQL upsert statement may not
        # update the same row twice).
        self._devices[(values["project"], values["device_id"])] = values

    async def save_devices(self) -> None:
        rows = [self._devices[k] for k in sorted(self._devices)]
        if rows:
            await self._upsert(tables.devices, rows, ("project", "device_id"))

    async def save_profiles(self) -> None:
        """One upsert for the profiles created or changed (a new row gets
        created_at, an existing one keeps its own), one DELETE for those
        deleted; sorted, so that rows are always taken in the same order."""
        upserts: list[dict[str, Any]] = []
        deletes: dict[str, list[str]] = {}
        for project, person in sorted(self._dirty):
            props = self._profiles[(project, person)]
            if props is not None:
                upserts.append(
                    {
                        "project": project, "distinct_id": person, "properties": props,
                        "created_at": self.now, "updated_at": self.now,
                    }
                )
            elif (project, person) in self._loaded:
                deletes.setdefault(project, []).append(person)
            # else: created and deleted within this transaction, no row to touch.
        p = tables.profiles
        for project, persons in deletes.items():
            for chunk in _chunks(persons):
                await self.conn.execute(
                    delete(p).where(p.c.project == project, self._among(p.c.distinct_id, chunk))
                )
        if upserts and self._straight():
            for chunk in _chunks(upserts):
                await self.driver.execute(_PG_PROFILES_UPSERT, json_text(chunk))
        elif upserts:
            await self._upsert(p, upserts, ("project", "distinct_id"), keep=("created_at",))

    async def _upsert(
        self, table: Any, rows: list[dict[str, Any]], key: tuple[str, ...], keep: tuple[str, ...] = ()
    ) -> None:
        """Multi-row INSERT ... ON CONFLICT (key) DO UPDATE of every column
        but the key and `keep`. Each key must appear once in `rows`:
        PostgreSQL refuses to update a row twice in one statement."""
        for chunk in _chunks(rows):
            stmt = _insert(self.backend, table).values(list(chunk))
            stmt = stmt.on_conflict_do_update(
                index_elements=list(key),
                set_={c: stmt.excluded[c] for c in chunk[0] if c not in key and c not in keep},
            )
            await self.conn.execute(stmt)

    async def rejections_insert(self, rows: list[Rejection]) -> None:
        await self.conn.execute(
            tables.rejections.insert(),
            [
                {
                    "project": r.project,
                    "source": r.source,
                    "reason": r.reason,
                    "detail": r.detail,
                    "excerpt": r.excerpt,
                    "received_at": r.received_at or self.now,
                }
                for r in rows
            ],
        )
