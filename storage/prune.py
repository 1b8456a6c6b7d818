"""Retention: events and quarantine rows past their age are deleted in
bounded batches, each its own short transaction, with a pause between.

Events go by their own time (`time`, the client's), per project through
the (project, time) index: the rows of a batch are found by a read, which
never blocks a writer (SQLite in WAL mode), then deleted by primary key,
which holds SQLite's single write lock for the few milliseconds 1,000 rows
take; the pause lets the gateway's writer take it in between. Quarantine
rows go by receipt, as storage.expiry deletes them.
"""

from __future__ import annotations

import asyncio

import msgspec
from sqlalchemy import bindparam, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from storage import tables
from storage.expiry import expire

# Every project with events, one index probe each (a loose index scan over
# the index that starts with project), not a scan of the table.
_PROJECTS = text(
    "WITH RECURSIVE p(project) AS ("
    " SELECT MIN(project) FROM events"
    " UNION ALL"
    " SELECT (SELECT MIN(project) FROM events WHERE project > p.project) FROM p WHERE p.project IS NOT NULL"
    ") SELECT project FROM p WHERE project IS NOT NULL"
)
_OLD = text("SELECT id FROM events WHERE project = :project AND time < :cutoff LIMIT :batch")
_DELETE = text("DELETE FROM events WHERE id IN :ids").bindparams(bindparam("ids", expanding=True))


class Pruned(msgspec.Struct, kw_only=True):
    """What one prune removed: events per project, and quarantine rows."""

    events: dict[str, int] = {}
    rejections: int = 0

    @property
    def total_events(self) -> int:
        return sum(self.events.values())


async def prune(engine: AsyncEngine, *, events_before: int | None, rejections_before: int | None,
                batch: int = 1000, pause: float = 0.05) -> Pruned:
    """Delete events whose time is before `events_before` and quarantine
    rows received before `rejections_before` (None: keep them)."""
    pruned = Pruned()
    if events_before is not None:
        pruned.events = await prune_events(engine, events_before, batch=batch, pause=pause)
    if rejections_before is not None:
        pruned.rejections = await expire(engine, rejections_before, batch=batch, pause=pause)
    return pruned


async def prune_events(engine: AsyncEngine, cutoff_ms: int, *, batch: int = 1000,
                       pause: float = 0.05) -> dict[str, int]:
    async with engine.connect() as conn:
        projects = [row[0] for row in await conn.execute(_PROJECTS)]
    removed: dict[str, int] = {}
    for project in projects:
        while True:
            async with engine.connect() as conn:
                ids = [row[0] for row in await conn.execute(
                    _OLD, {"project": project, "cutoff": cutoff_ms, "batch": batch})]
            if not ids:
                break
            async with engine.begin() as conn:
                deleted = (await conn.execute(_DELETE, {"ids": ids})).rowcount or 0
            if deleted:
                removed[project] = removed.get(project, 0) + deleted
            if len(ids) < batch:
                break
            await asyncio.sleep(pause)
    return removed


async def claim(engine: AsyncEngine, name: str, day: int) -> bool:
    """Whether this caller runs task `name` on `day` (days since the epoch):
    true for exactly one of any number of callers, across processes and
    hosts sharing the database."""
    t = tables.maintenance
    async with engine.begin() as conn:
        moved = await conn.execute(update(t).where(t.c.name == name, t.c.day < day).values(day=day))
        if moved.rowcount:
            return True
        found = (await conn.execute(t.select().where(t.c.name == name))).first()
        if found is not None:
            return False
    # The first run ever: one insert wins, the others meet its key.
    try:
        async with engine.begin() as conn:
            await conn.execute(t.insert().values(name=name, day=day))
    except IntegrityError:
        return False
    return True
