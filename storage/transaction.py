"""Identity, profile and device work inside one transaction."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy import Text, any_, bindparam, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.model import Alias, AliasOutcome, Device, Event, GroupUpdate, ProfileUpdate, Rejection
from storage import tables
from storage.devices import Devices
from storage.engine import Backend
from storage.group_profiles import GroupProfiles
from storage.groups import Pending, chunks, clean, plan_events, settle_events
from storage.person_profiles import PersonProfiles
from storage.sink import Written
from storage.sql import PG_LINKS, PG_LOCK, lock_key
from storage.upsert import upsert

InsertEvents = Callable[[list[Event]], Awaitable[set[tuple[str, str, str]] | None]]


# Seconds of profile work between two chances for the event loop.
_SLICE = 0.005
# Alias outcomes that link nothing: quarantined (or, strict, refused) as `alias_<outcome>`.
REFUSED_ALIASES = ("conflict", "cycle")


class Transaction:
    """Identity, profile and device work inside one transaction.

    Set-based, so a group costs a few round trips whatever its size: the
    links and profiles the group's records name are read up front in one
    query each (`prefetch`), records then apply one by one, in arrival order,
    against these caches, and profiles and devices are written once at the
    end, however many operations touched them, one statement for each kind of
    change. Only an alias merge may still read an id nobody named.
    """

    def __init__(self, conn: AsyncConnection, backend: Backend, now: int, max_profile_bytes: int = 1_048_576,
                 insert: InsertEvents | None = None) -> None:
        self.conn = conn
        # The backend's route for events (storage.sqlite, storage.postgres):
        # the keys stored, None if all were.
        self.insert: InsertEvents | None = insert
        self.backend = backend
        self.now = now
        self.max_profile_bytes = max_profile_bytes
        # When the event loop was last let go (`breathe`).
        self._since_yield = time.perf_counter()
        # PostgreSQL: the asyncpg connection under `conn`. Once SQLAlchemy
        # has opened the transaction block, the statements every group of
        # identity and profile work runs (the lock, the prefetch, the profile
        # upsert) go to it straight, in the same block: a third of the CPU
        # through SQLAlchemy, and no statement compiled per group.
        self.driver: Any = None
        self.rejections: list[Rejection] = []
        self._links: dict[tuple[str, str], str | None] = {}  # id -> person, None: no link
        self.profiles = PersonProfiles(self)
        self.devices = Devices(now)
        # Group profiles, only when the group has GroupUpdate records.
        self.groups: GroupProfiles | None = None

    async def write(self, group: list[Pending], admit: Callable[[Rejection], bool]) -> list[Written]:
        """The whole group in this transaction: its events (through the
        backend's one insert route, `insert`), then its identity, profile and
        device records in arrival order, then its rejections."""
        results = [Written() for _ in group]
        identity = any(type(r) is not Event for p in group for r in p.records)
        rejections = [r for p in group for r in p.rejections]
        if identity:
            # Before the events: a transaction never waits for the lock
            # holding an insert id another one (holding it shared, with
            # touches) may be waiting for. Through SQLAlchemy, which opens
            # the transaction block (PostgreSQL: `straight` from here on).
            await self.lock_projects(group)
        elif rejections:
            # The first statement through SQLAlchemy opens the block, so the
            # events may go to the driver after it.
            await self.rejections_insert(rejections)
            rejections = []
        fresh, owner = plan_events(group, results)
        if fresh:
            assert self.insert is not None, "a transaction writing events needs the backend's route"
            settle_events(owner, await self.insert(fresh), results)
        if identity:
            # Under the lock, so what is read stays true until commit.
            await self.prefetch(group)
            for pending, written in zip(group, results, strict=False):  # one Written per request (hot path)
                before = len(self.rejections)
                refused: list[str] = []
                for record in pending.records:
                    kind = type(record)
                    if kind is ProfileUpdate:
                        # `kind is X` (one type() call per record) narrows nothing for mypy.
                        await self.profiles.apply(record)  # type: ignore[arg-type]
                        written.applied += 1
                    elif kind is Alias:
                        outcome = await self.alias(record)  # type: ignore[arg-type]
                        written.aliases.append(outcome)
                        if outcome in REFUSED_ALIASES and record.strict:  # type: ignore[union-attr]
                            # Answered to the client, not quarantined: counted all the same.
                            refused.append(f"alias_{outcome}")
                    elif kind is Device:
                        self.devices.add(record)  # type: ignore[arg-type]
                    elif kind is GroupUpdate:
                        assert self.groups is not None  # made by prefetch
                        await self.groups.apply(record)  # type: ignore[arg-type]
                        written.applied += 1
                if refused or len(self.rejections) > before:
                    written.refused = [*(r.reason for r in self.rejections[before:]), *refused]
            await self.profiles.save()
            await self.devices.save(self)
            if self.groups is not None:
                await self.groups.save()
        rejections += [r for r in self.rejections if admit(r)]
        if rejections:
            await self.rejections_insert(rejections)
        return results

    async def lock_projects(self, group: list[Pending]) -> None:
        if self.backend is not Backend.POSTGRESQL:
            return  # SQLite: BEGIN IMMEDIATE already holds the only write lock
        projects = sorted({r.project for p in group for r in p.records if type(r) is not Event})
        for project in projects:
            if self.straight():
                await self.driver.execute(PG_LOCK, lock_key(project))
            else:
                await self.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key(project)})

    def straight(self) -> bool:
        """Whether a statement may go to the driver: only inside the block
        SQLAlchemy opened (its first statement opens it; before that, a
        statement on the driver would run and commit on its own)."""
        return self.driver is not None and self.driver.is_in_transaction()

    def among(self, column: Any, values: Sequence[str]) -> Any:
        """`column IN values`. PostgreSQL gets one array parameter instead,
        so the statement text, hence its prepared statement, is the same
        whatever the count."""
        if self.backend is Backend.POSTGRESQL:
            return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(Text)))
        return column.in_(values)

    async def prefetch(self, group: list[Pending]) -> None:
        """Fill the link and profile caches for every id the group's identity
        and profile records name: one query for their links, then one for the
        profiles of the persons they resolve to (per project and chunk of
        ids), instead of a round trip per id and per person."""
        named: dict[str, set[str]] = {}
        groups: dict[str, set[tuple[str, str]]] = {}
        for pending in group:
            for record in pending.records:
                if isinstance(record, ProfileUpdate):
                    ids = [record.distinct_id]
                elif isinstance(record, Alias):
                    ids = [record.alias, record.distinct_id]
                else:
                    if isinstance(record, GroupUpdate):
                        groups.setdefault(record.project, set()).add(
                            (clean(record.group_key), clean(record.group_id))
                        )
                    continue
                named.setdefault(record.project, set()).update(clean(i) for i in ids)
        for project, ids_ in sorted(named.items()):
            for chunk in chunks(sorted(ids_)):
                found = await self._links_of(project, chunk)
                for id_ in chunk:
                    self._links[(project, id_)] = found.get(id_)  # None: no link yet
            await self.profiles.prefetch(project, sorted({self._links[(project, i)] or i for i in ids_}))
        if groups:
            self.groups = GroupProfiles(self)
            await self.groups.prefetch(groups)

    async def _links_of(self, project: str, ids: Sequence[str]) -> dict[str, str]:
        if self.straight():
            return dict(await self.driver.fetch(PG_LINKS, project, ids))
        a = tables.aliases
        rows = await self.conn.execute(
            select(a.c.alias, a.c.person).where(a.c.project == project, self.among(a.c.alias, ids))
        )
        return dict(rows.all())

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

    async def breathe(self) -> None:
        """Let the event loop serve other requests every few milliseconds of
        profile work: a request of many operations on large lists takes
        time linear in them, but never holds the loop for all of it."""
        if time.perf_counter() - self._since_yield > _SLICE:
            await asyncio.sleep(0)
            self._since_yield = time.perf_counter()

    async def alias(self, record: Alias) -> AliasOutcome:
        project = record.project
        a, d = clean(record.alias), clean(record.distinct_id)
        assert a is not None and d is not None
        if a == d:
            return "self"
        if record.merge:
            # Link the root of `a`'s person instead: a root is never a
            # conflict, and the whole tree follows it.
            a = await self.resolve(project, a)
            if a == await self.resolve(project, d):
                return "exists"
        linked = await self._link(project, a)
        target = await self.resolve(project, d)
        if linked is not None:
            outcome: AliasOutcome = "exists" if linked == target else "conflict"
        elif target == a:
            outcome = "cycle"
        else:
            outcome = "linked"
        if outcome in REFUSED_ALIASES:
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
        absorbed = await self.profiles.get(project, a)
        if absorbed is not None:
            kept = await self.profiles.get(project, target) or {}
            self.profiles.put(project, target, {**absorbed, **kept})
            self.profiles.put(project, a, None)
        return outcome

    async def upsert(
        self, table: Any, rows: list[dict[str, Any]], key: tuple[str, ...], keep: tuple[str, ...] = ()
    ) -> None:
        await upsert(self.conn, self.backend, table, rows, key, keep)

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
                    "payload": r.payload,
                    "endpoint": r.endpoint,
                }
                for r in rows
            ],
        )

