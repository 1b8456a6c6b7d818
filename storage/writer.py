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
import zlib
from collections.abc import Callable
from typing import Any, assert_never

from sqlalchemy import and_, delete, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.model import Alias, AliasOutcome, Device, Event, ProfileUpdate, Record, Rejection
from storage import tables
from storage.engine import Backend, backend_of, json_text
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


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, ConnectionError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError)):
            return True
        return isinstance(exc.orig, (OSError, ConnectionError)) or "connection" in type(exc.orig).__name__.lower()
    return False


class Writer:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_rows: int = 5000,
        delay_ms: float = 0.0,
        clock: Callable[[], int],
        admit: Callable[[Rejection], bool] = lambda _r: True,
    ) -> None:
        self._engine = engine
        self._backend = backend_of(str(engine.url))
        self._max_rows = max_rows
        self._delay = delay_ms / 1000.0
        self._clock = clock
        # Quarantine sampling for rejections found while writing.
        self._admit = admit
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dialgate-writer")

    async def close(self) -> None:
        """Write everything already queued, then stop."""
        self._closed = True
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
            self._task = None

    async def submit(self, records: list[Record], rejections: list[Rejection] = []) -> Written:
        if self._closed or self._task is None:
            raise StorageUnavailable("writer is shut down")
        future: asyncio.Future[Written] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(records, list(rejections), future))
        return await asyncio.shield(future)

    def quarantine(self, rejections: list[Rejection]) -> None:
        """Store rejections without making anyone wait for them."""
        if rejections and not self._closed and self._task is not None:
            self._queue.put_nowait(_Pending([], rejections, None))

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            if self._delay:
                await asyncio.sleep(self._delay)
            group = [first]
            rows = first.rows
            while rows < self._max_rows and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                group.append(item)
                rows += item.rows
            try:
                await self._flush(group)
            except Exception:  # never let the writer die
                log.exception("writer flush failed")
                for pending in group:
                    _fail(pending, StorageUnavailable("internal error"))

    async def _flush(self, group: list[_Pending], *, retried: bool = False) -> None:
        try:
            results = await self._write(group)
        except Exception as exc:
            if isinstance(exc, DBAPIError) and exc.connection_invalidated and not retried:
                # A pooled connection died while idle (say, the server
                # restarted): nothing was written; try once on a fresh one.
                await self._flush(group, retried=True)
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
                await self._flush([pending])
            return
        for pending, written in zip(group, results):
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(written)

    async def _write(self, group: list[_Pending]) -> list[Written]:
        results = [Written() for _ in group]
        async with self._engine.begin() as conn:
            tx = _Transaction(conn, self._backend, self._clock())
            await tx.events(group, results)
            if any(type(r) is not Event for p in group for r in p.records):
                await tx.lock_projects(group)
                for pending, written in zip(group, results):
                    for record in pending.records:
                        kind = type(record)
                        if kind is ProfileUpdate:
                            await tx.profile(record)  # type: ignore[arg-type]
                            written.applied += 1
                        elif kind is Alias:
                            written.aliases.append(await tx.alias(record))  # type: ignore[arg-type]
                        elif kind is Device:
                            await tx.device(record)  # type: ignore[arg-type]
                await tx.save_profiles()
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
# One statement for any batch size: the columns travel as arrays.
_PG_INSERT = (
    f"INSERT INTO events ({_EVENT_COLUMNS}) "
    "SELECT p, s, n, d, a, u, t, r, i, ss, props::jsonb, ctx::jsonb, c FROM unnest("
    "$1::varchar[], $2::varchar[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], "
    "$8::bigint[], $9::varchar[], $10::text[], $11::text[], $12::text[], $13::boolean[]"
    ") AS t(p, s, n, d, a, u, t, r, i, ss, props, ctx, c) "
    "ON CONFLICT (project, source, insert_id) DO NOTHING RETURNING project, source, insert_id"
)
_SQLITE_ROW = "(" + ",".join("?" * 13) + ")"
_SQLITE_INSERT = (
    f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES {{values}} "
    "ON CONFLICT (project, source, insert_id) DO NOTHING RETURNING project, source, insert_id"
)
# SQLite allows 32766 bound values per statement: 2000 rows of 13.
_SQLITE_ROWS = 2000


def clean(text_: str | None) -> str | None:
    """U+0000 -> U+FFFD in text columns: PostgreSQL's text type refuses NUL,
    and both backends must store the same thing."""
    if text_ is not None and "\x00" in text_:
        return text_.replace("\x00", "\ufffd")
    return text_


def _lock_key(project: str) -> int:
    # A stable signed 64-bit key per project for pg_advisory_xact_lock.
    return zlib.crc32(b"dialgate-profiles:" + project.encode()) - 2**31


def _is_noop(update_: ProfileUpdate) -> bool:
    """`$delete: false` alone, say: nothing to apply, so nothing is created."""
    return not (
        update_.touch or update_.set_once or update_.set or update_.add or update_.append
        or update_.union or update_.remove or update_.unset
    )


class _Transaction:
    """Identity, profile and device work inside one transaction.

    Resolutions and profiles are cached for the transaction and profiles are
    written once at the end, however many operations touched them.
    """

    def __init__(self, conn: AsyncConnection, backend: Backend, now: int) -> None:
        self.conn = conn
        self.backend = backend
        self.now = now
        self.rejections: list[Rejection] = []
        self._links: dict[tuple[str, str], str | None] = {}  # id -> person, None: no link
        self._profiles: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._loaded: set[tuple[str, str]] = set()  # rows that exist in the table
        self._dirty: set[tuple[str, str]] = set()

    async def events(self, group: list[_Pending], results: list[Written]) -> None:
        rows: list[tuple[Any, ...]] = []
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
                rows.append(
                    (
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
                        json_text(event.context),
                        event.consent,
                    )
                )
        if not rows:
            return
        stored = await self._insert_events(rows)
        for key, index in owner.items():
            if key in stored:
                results[index].inserted += 1
                results[index].new_keys.append(key)
            else:
                results[index].duplicates += 1

    async def _insert_events(self, rows: list[tuple[Any, ...]]) -> set[tuple[str, str, str]]:
        """Bulk insert, skipping known insert ids; returns the keys stored.

        Driver-level SQL: the same statement for every batch, nothing for
        SQLAlchemy to compile per row (this is the hot path).
        """
        stored: set[tuple[str, str, str]] = set()
        if self.backend is Backend.POSTGRESQL:
            columns = list(zip(*rows))
            result = await self.conn.exec_driver_sql(_PG_INSERT, tuple(columns))
            stored.update((p, s, i) for p, s, i in result.all() if i is not None)
        elif self.backend is Backend.SQLITE:
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
            await self.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(project)})

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

    async def device(self, record: Device) -> None:
        d = tables.devices
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
        stmt = _insert(self.backend, d).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["project", "device_id"],
            set_={k: stmt.excluded[k] for k in values if k not in ("project", "device_id")},
        )
        await self.conn.execute(stmt)

    async def save_profiles(self) -> None:
        p = tables.profiles
        for project, person in sorted(self._dirty):
            props = self._profiles[(project, person)]
            where = and_(p.c.project == project, p.c.distinct_id == person)
            if props is None:
                if (project, person) in self._loaded:
                    await self.conn.execute(delete(p).where(where))
            elif (project, person) in self._loaded:
                await self.conn.execute(update(p).where(where).values(properties=props, updated_at=self.now))
            else:
                await self.conn.execute(
                    p.insert().values(
                        project=project, distinct_id=person, properties=props,
                        created_at=self.now, updated_at=self.now,
                    )
                )

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
