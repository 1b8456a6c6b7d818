"""Erasure of a person: every id linked to it, its events, devices,
profile, and the quarantine rows that name any of its ids.

In steps, none holding the database long: the person's events are found by
reads and deleted by primary key in batches of 1,000 (each its own short
transaction, as storage.prune does), then one transaction deletes its
links, profile, devices and quarantine rows, then a last pass deletes the
events committed meanwhile. What is committed after that last pass (a
sender still sending) is a new person's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import msgspec
from sqlalchemy import bindparam, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage import tables
from storage.engine import Backend, backend_of

# Ids per IN list: far under every backend's limit on bound parameters.
_CHUNK = 500
_DELETE_EVENTS = text("DELETE FROM events WHERE id IN :ids").bindparams(bindparam("ids", expanding=True))


class Receipt(msgspec.Struct, kw_only=True):
    """What an erasure removed: rows per table, and the ids erased."""

    project: str
    id: str
    person: str
    ids: list[str]
    removed: dict[str, int]
    # (source, insert id) of the events deleted: for the dedup cache, not
    # for the receipt a caller is shown.
    insert_ids: list[tuple[str, str]] = msgspec.field(default_factory=list)

    def shown(self) -> dict[str, Any]:
        return {"project": self.project, "id": self.id, "person": self.person, "ids": self.ids,
                "removed": self.removed}


async def erase(engine: AsyncEngine, project: str, id_: str, *, batch: int = 1000, pause: float = 0.01) -> Receipt:
    async with engine.connect() as conn:
        person, ids = await _linked(conn, project, id_)
    receipt = Receipt(project=project, id=id_, person=person, ids=sorted(ids),
                      removed={"events": 0, "aliases": 0, "profiles": 0, "devices": 0, "rejections": 0})
    await _events(engine, project, ids, receipt, batch=batch, pause=pause)
    async with engine.begin() as conn:
        await _identity(conn, backend_of(str(engine.url)), project, ids, receipt)
    # The events committed while the rest went.
    await _events(engine, project, ids, receipt, batch=batch, pause=pause)
    return receipt


async def _linked(conn: AsyncConnection, project: str, id_: str) -> tuple[str, set[str]]:
    """The person of `id_` (the root of its tree) and every id of it."""
    a = tables.aliases
    person = (await conn.execute(select(a.c.person).where(a.c.project == project, a.c.alias == id_))).scalar()
    person = person if person is not None else id_
    ids = {id_, person}
    for alias, target in await conn.execute(select(a.c.alias, a.c.distinct_id).where(
            a.c.project == project, a.c.person == person)):
        ids.update((alias, target))
    return person, ids


async def _events(engine: AsyncEngine, project: str, ids: set[str], receipt: Receipt, *, batch: int,
                  pause: float) -> None:
    e = tables.events
    found: list[int] = []
    async with engine.connect() as conn:
        for chunk in _chunks(ids):
            named = or_(e.c.distinct_id.in_(chunk), e.c.anonymous_id.in_(chunk), e.c.user_id.in_(chunk))
            rows = await conn.execute(select(e.c.id, e.c.source, e.c.insert_id).where(e.c.project == project, named))
            for row_id, source, insert_id in rows:
                found.append(row_id)
                if insert_id is not None:
                    receipt.insert_ids.append((source, insert_id))
    for start in range(0, len(found), batch):
        async with engine.begin() as conn:
            deleted = await conn.execute(_DELETE_EVENTS, {"ids": found[start:start + batch]})
        receipt.removed["events"] += deleted.rowcount or 0
        await asyncio.sleep(pause)


async def _identity(conn: AsyncConnection, backend: Backend, project: str, ids: set[str], receipt: Receipt) -> None:
    a, p, d = tables.aliases, tables.profiles, tables.devices
    for chunk in _chunks(ids):
        gone = await conn.execute(a.delete().where(a.c.project == project, or_(
            a.c.alias.in_(chunk), a.c.distinct_id.in_(chunk), a.c.person.in_(chunk))))
        receipt.removed["aliases"] += gone.rowcount or 0
        gone = await conn.execute(p.delete().where(p.c.project == project, p.c.distinct_id.in_(chunk)))
        receipt.removed["profiles"] += gone.rowcount or 0
        gone = await conn.execute(d.delete().where(d.c.project == project, or_(
            d.c.distinct_id.in_(chunk), d.c.device_id.in_(chunk))))
        receipt.removed["devices"] += gone.rowcount or 0
    receipt.removed["rejections"] += await _rejections(conn, backend, project, ids)


async def _rejections(conn: AsyncConnection, backend: Backend, project: str, ids: set[str]) -> int:
    """Quarantine rows of the project (or of none: an unknown credential)
    whose detail, excerpt or payload contains an id, as given or as JSON
    escapes it. An exact, case-sensitive substring test (instr / strpos),
    so no LIKE wildcard in an id matters."""
    r = tables.rejections
    find = "instr" if backend is Backend.SQLITE else "strpos"
    needles = sorted({form for id_ in ids for form in (id_, msgspec.json.encode(id_).decode()[1:-1]) if form})
    removed = 0
    for chunk in _chunks(needles, 50):
        named = [
            text(f"{find}(coalesce({column}, ''), :n{i}) > 0").bindparams(**{f"n{i}": needle})
            for i, needle in enumerate(chunk) for column in ("detail", "excerpt", "payload")
        ]
        gone = await conn.execute(r.delete().where(or_(r.c.project == project, r.c.project.is_(None)), or_(*named)))
        removed += gone.rowcount or 0
    return removed


def _chunks(values: Iterable[str], size: int = _CHUNK) -> list[list[str]]:
    items = sorted(values)
    return [items[i:i + size] for i in range(0, len(items), size)]
