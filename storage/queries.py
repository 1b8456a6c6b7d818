"""Read-side queries for the admin API."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from storage import tables
from storage.engine import backend_of
from storage.export import project_is


async def person_of(conn: AsyncConnection, project: str, id_: str) -> tuple[str, list[str]]:
    """The person (root id) an id belongs to, and every id of that person."""
    id_ = id_.replace("\x00", "\ufffd")  # as the writer stores it
    a = tables.aliases
    root = (
        await conn.execute(select(a.c.person).where(a.c.project == project, a.c.alias == id_))
    ).scalar() or id_
    members = (
        await conn.execute(
            select(a.c.alias).where(a.c.project == project, a.c.person == root).order_by(a.c.alias)
        )
    ).scalars().all()
    return root, [root, *members]


def _event(row: Any) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "project": row.project,
        "source": row.source,
        "name": row.name,
        "distinct_id": row.distinct_id,
        "anonymous_id": row.anonymous_id,
        "user_id": row.user_id,
        "time": row.time,
        "received_at": row.received_at,
        "insert_id": row.insert_id,
        "session_id": row.session_id,
        "properties": row.properties,
        "context": row.context,
        "consent": row.consent,
    }


async def events(
    engine: AsyncEngine,
    project: str,
    *,
    distinct_id: str | None,
    name: str | None,
    source: str | None,
    limit: int,
    after: int | None,
    since: int | None = None,
    until: int | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of events; `since` (included) and `until` (excluded) bound
    their time (ms)."""
    e = tables.events
    # A page walks the ids unless a filter has an index of its own.
    indexed = distinct_id is not None or since is not None or until is not None
    async with engine.connect() as conn:
        query = select(e).where(project_is(backend_of(str(engine.url)), project, indexed=indexed))
        if distinct_id is not None:
            _, ids = await person_of(conn, project, distinct_id)
            query = query.where(e.c.distinct_id.in_(ids))
        if name is not None:
            query = query.where(e.c.name == name)
        if source is not None:
            query = query.where(e.c.source == source)
        if since is not None:
            query = query.where(e.c.time >= since)
        if until is not None:
            query = query.where(e.c.time < until)
        if after is not None:
            query = query.where(e.c.id > after)
        rows = (await conn.execute(query.order_by(e.c.id).limit(limit + 1))).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [_event(r) for r in rows], (str(rows[-1].id) if more else None)


async def profile(engine: AsyncEngine, project: str, id_: str) -> dict[str, Any] | None:
    p, d = tables.profiles, tables.devices
    async with engine.connect() as conn:
        root, ids = await person_of(conn, project, id_)
        props = (
            await conn.execute(
                select(p.c.properties).where(p.c.project == project, p.c.distinct_id == root)
            )
        ).scalar()
        if props is None:
            return None
        rows = (
            await conn.execute(
                select(d).where(d.c.project == project, d.c.distinct_id.in_(ids)).order_by(d.c.device_id)
            )
        ).all()
    return {
        "distinct_id": root,
        "properties": props,
        "ids": ids,
        "devices": [
            {
                "device_id": r.device_id,
                "token": r.push_token,
                "os": r.os,
                "os_version": r.os_version,
                "model": r.model,
                "app_build": r.app_build,
                "app_version": r.app_version,
            }
            for r in rows
        ],
    }


async def group(engine: AsyncEngine, project: str, group_key: str, group_id: str) -> dict[str, Any] | None:
    """A group profile, or None when there is none (or it was deleted)."""
    g = tables.groups
    # As the writer stores them.
    key, id_ = group_key.replace("\x00", "\ufffd"), group_id.replace("\x00", "\ufffd")
    async with engine.connect() as conn:
        props = (
            await conn.execute(
                select(g.c.properties).where(g.c.project == project, g.c.group_key == key, g.c.group_id == id_)
            )
        ).scalar()
    if props is None:
        return None
    return {"group_key": key, "group_id": id_, "properties": props}


async def rejections(
    engine: AsyncEngine,
    *,
    project: str | None,
    source: str | None,
    reason: str | None,
    limit: int,
    after: int | None,
) -> tuple[list[dict[str, Any]], str | None]:
    r = tables.rejections
    query = select(r)
    if project is not None:
        query = query.where(r.c.project == project)
    if source is not None:
        query = query.where(r.c.source == source)
    if reason is not None:
        query = query.where(r.c.reason == reason)
    if after is not None:
        query = query.where(r.c.id > after)
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(r.c.id).limit(limit + 1))).all()
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        {
            "id": str(row.id),
            "project": row.project,
            "source": row.source,
            "reason": row.reason,
            "detail": row.detail,
            "excerpt": row.excerpt,
            "received_at": row.received_at,
        }
        for row in rows
    ]
    return items, (str(rows[-1].id) if more else None)
