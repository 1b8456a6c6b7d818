"""Bulk reads for export: a project's events, profiles, aliases or groups,
batch by batch, in constant memory.

One read transaction per export, so an export is one consistent snapshot
however long it takes and whatever is written meanwhile: REPEATABLE READ on
PostgreSQL, a deferred transaction on SQLite (it takes no lock; WAL keeps
the snapshot). Each kind is one statement on a server-side cursor
(`yield_per`): events in storage order (as the admin API pages them),
profiles, aliases and groups in key order, each batch of profiles with its
ids and devices looked up for the batch.

JSON columns are passed on as stored (`msgspec.Raw`), never decoded and
encoded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, assert_never

import msgspec
from sqlalchemy import ColumnElement, Select, String, Text, cast, func, literal_column, select, union
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage import tables
from storage.engine import READER_OPTION, Backend, backend_of


class Kind(enum.Enum):
    EVENTS = "events"
    PROFILES = "profiles"
    ALIASES = "aliases"
    GROUPS = "groups"


class EventRecord(msgspec.Struct):
    """The canonical event JSON of the admin API (storage.queries)."""

    id: str
    project: str
    source: str
    name: str
    distinct_id: str | None
    anonymous_id: str | None
    user_id: str | None
    time: int
    received_at: int
    insert_id: str | None
    session_id: str | None
    properties: msgspec.Raw
    context: msgspec.Raw
    consent: bool | None


class ProfileRecord(msgspec.Struct):
    """As GET profiles/{id}."""

    distinct_id: str
    properties: msgspec.Raw
    ids: list[str]
    devices: list[dict[str, str | None]]


class AliasRecord(msgspec.Struct):
    """One id linked to a person: the id it was linked to, and the person
    (root) it resolves to now."""

    alias: str
    distinct_id: str
    person: str
    source: str
    created_at: int


class GroupRecord(msgspec.Struct):
    """As GET groups/{group_key}/{group_id}."""

    group_key: str
    group_id: str
    properties: msgspec.Raw


Record = EventRecord | ProfileRecord | AliasRecord | GroupRecord
RECORDS: dict[Kind, type[Record]] = {
    Kind.EVENTS: EventRecord, Kind.PROFILES: ProfileRecord, Kind.ALIASES: AliasRecord, Kind.GROUPS: GroupRecord,
}
COLUMNS: dict[Kind, tuple[str, ...]] = {kind: record.__struct_fields__ for kind, record in RECORDS.items()}

# Rows a batch holds: enough to keep round trips few, few enough that a
# batch of the largest records (events and profiles up to a MB or so, as
# the body and profile limits allow) stays far under the memory it may use.
BATCH_ROWS = {Kind.EVENTS: 1000, Kind.PROFILES: 100, Kind.ALIASES: 2000, Kind.GROUPS: 100}

@dataclass(frozen=True)
class Span:
    """Event time (ms) from `since` included to `until` excluded; None: open."""

    since: int | None = None
    until: int | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ValueError("until must be after since (the range is [since, until))")

    def where(self, column: Any) -> list[ColumnElement[bool]]:
        found: list[ColumnElement[bool]] = []
        if self.since is not None:
            found.append(column >= self.since)
        if self.until is not None:
            found.append(column < self.until)
        return found

    @property
    def open(self) -> bool:
        return self.since is None and self.until is None


EVERYTHING = Span()


def _check(kind: Kind, span: Span) -> None:
    if kind is not Kind.EVENTS and not span.open:
        raise ValueError("since/until select events by their time; profiles, aliases and groups are "
                         "exported whole")


async def count(engine: AsyncEngine, project: str, kind: Kind, span: Span = EVERYTHING) -> int:
    """How many records `batches` would give now (for a progress bar)."""
    _check(kind, span)
    query = _query(kind, project, span, backend_of(str(engine.url)))
    async with engine.connect() as conn:
        await conn.execution_options(**{READER_OPTION: True})
        return int((await conn.execute(select(func.count()).select_from(query.subquery()))).scalar_one())


async def batches(engine: AsyncEngine, project: str, kind: Kind, span: Span = EVERYTHING,
                  *, rows: int | None = None) -> AsyncGenerator[list[Any]]:
    """The records of `kind` (`RECORDS[kind]`), a batch at a time. Close it
    (`contextlib.aclosing`) when leaving early."""
    _check(kind, span)
    backend = backend_of(str(engine.url))
    size = rows or BATCH_ROWS[kind]
    query = _query(kind, project, span, backend)
    async with engine.connect() as conn:
        if kind is Kind.EVENTS:
            async with contextlib.aclosing(_driver_rows(conn, backend, query, size)) as parts:
                async for part in parts:
                    yield [_event(r) for r in part]
            return
        await conn.execution_options(**_snapshot(backend))
        async with conn.begin():
            stream = await conn.stream(query.execution_options(yield_per=size))
            async for part in stream.partitions(size):
                yield await _profiles(conn, project, part) if kind is Kind.PROFILES else _records(kind, part)


async def _driver_rows(conn: AsyncConnection, backend: Backend, query: Select[Any],
                       size: int) -> AsyncGenerator[Sequence[Any]]:
    """The query's rows straight from the driver (SQLAlchemy's result rows
    cost more than the rest of an event export together), in a read
    transaction of its own, asking for each batch before the one before is
    worked on so that the database reads meanwhile."""
    compiled = query.compile(dialect=conn.dialect)
    sql, params = str(compiled), [compiled.params[name] for name in compiled.positiontup or ()]
    driver: Any = (await conn.get_raw_connection()).driver_connection
    fetch: Callable[[], Awaitable[Sequence[Any]]]
    clean = False
    try:
        if backend is Backend.POSTGRESQL:
            await driver.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cursor = await driver.cursor(sql, *params)
            fetch = functools.partial(cursor.fetch, size)
        elif backend is Backend.SQLITE:
            # Deferred: no lock is taken, and WAL keeps the snapshot.
            await driver.execute("BEGIN")
            cursor = await driver.execute(sql, params)
            fetch = functools.partial(cursor.fetchmany, size)
        else:
            assert_never(backend)
        ahead = asyncio.ensure_future(fetch())
        try:
            while rows := await ahead:
                ahead = asyncio.ensure_future(fetch())
                await asyncio.sleep(0)  # the request is out before the batch is worked on
                yield rows
        finally:
            if not ahead.done():
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ahead
        await driver.execute("ROLLBACK")  # it only read
        clean = True
    finally:
        if not clean:
            # Left mid-read (a failure, a reader gone): the connection's
            # state is unknown, so the pool drops it.
            await conn.invalidate()


def _event(r: Any) -> EventRecord:
    return EventRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                       msgspec.Raw(r[11]), msgspec.Raw(r[12]), None if r[13] is None else bool(r[13]))


def _snapshot(backend: Backend) -> dict[str, Any]:
    if backend is Backend.POSTGRESQL:
        return {"isolation_level": "REPEATABLE READ"}
    if backend is Backend.SQLITE:
        return {READER_OPTION: True}
    assert_never(backend)


def _query(kind: Kind, project: str, span: Span, backend: Backend) -> Select[Any]:
    if kind is Kind.EVENTS:
        e = tables.events
        return (
            # The id as text (the admin API's opaque string), made by the database.
            select(*[_text(c) if c.name in ("id", "properties", "context") else c for c in e.columns])
            .where(project_is(backend, project, indexed=not span.open), *span.where(e.c.time))
            .order_by(e.c.id)
        )
    if kind is Kind.PROFILES:
        p = tables.profiles
        return select(p.c.distinct_id, _text(p.c.properties)).where(p.c.project == project).order_by(p.c.distinct_id)
    if kind is Kind.ALIASES:
        a = tables.aliases
        return (select(a.c.alias, a.c.distinct_id, a.c.person, a.c.source, a.c.created_at)
                .where(a.c.project == project).order_by(a.c.alias))
    if kind is Kind.GROUPS:
        g = tables.groups
        return (select(g.c.group_key, g.c.group_id, _text(g.c.properties))
                .where(g.c.project == project).order_by(g.c.group_key, g.c.group_id))
    assert_never(kind)


def _text(column: Any) -> Any:
    # JSON: the stored text (jsonb's text form on PostgreSQL), passed on as is.
    return cast(column, Text).label(column.name)


def project_is(backend: Backend, project: str, *, indexed: bool) -> ColumnElement[bool]:
    """`events.project == project`; with `indexed` False, kept off the
    indexes on SQLite for a walk in id order."""
    if backend is Backend.SQLITE and not indexed:
        # Unary plus keeps SQLite off the (project, ...) indexes: without
        # statistics it would take one and sort all the project's rows
        # before the first came out; walking the rowid order streams at once.
        return literal_column("+events.project", String) == project
    return tables.events.c.project == project


def _records(kind: Kind, part: Sequence[Any]) -> list[Any]:
    if kind is Kind.GROUPS:
        return [GroupRecord(r[0], r[1], msgspec.Raw(r[2])) for r in part]
    return [AliasRecord(*r) for r in part]


async def _profiles(conn: AsyncConnection, project: str, part: Sequence[Any]) -> list[Any]:
    """The batch's profiles as GET profiles/{id} gives them: every id of the
    person (root first, then its aliases in order) and its devices."""
    roots = [r[0] for r in part]
    a, d = tables.aliases, tables.devices
    ids: dict[str, list[str]] = {root: [root] for root in roots}
    for person, alias in await conn.execute(
        select(a.c.person, a.c.alias).where(a.c.project == project, a.c.person.in_(roots))
        .order_by(a.c.person, a.c.alias)
    ):
        ids[person].append(alias)
    fields = (d.c.device_id, d.c.push_token, d.c.os, d.c.os_version, d.c.model, d.c.app_build, d.c.app_version)
    # A device belongs to the person of the id it was registered with: a
    # root itself, or one of its aliases.
    owned = union(
        select(d.c.distinct_id.label("person"), *fields).where(d.c.project == project, d.c.distinct_id.in_(roots)),
        select(a.c.person, *fields).join(d, (d.c.project == a.c.project) & (d.c.distinct_id == a.c.alias))
        .where(a.c.project == project, a.c.person.in_(roots)),
    ).subquery()
    devices: dict[str, list[dict[str, Any]]] = {root: [] for root in roots}
    for row in await conn.execute(select(owned).order_by(owned.c.person, owned.c.device_id)):
        devices[row.person].append({
            "device_id": row.device_id, "token": row.push_token, "os": row.os, "os_version": row.os_version,
            "model": row.model, "app_build": row.app_build, "app_version": row.app_version,
        })
    return [ProfileRecord(root, msgspec.Raw(props), ids[root], devices[root]) for root, props in part]
