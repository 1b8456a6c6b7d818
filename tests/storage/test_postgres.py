"""PostgreSQL's one insert route for events, on each kind of group."""

from __future__ import annotations

import os

import asyncpg
import msgspec
import pytest

from gateway.model import Alias, Event, ProfileUpdate, Rejection
from gateway.pipeline import now_ms
from storage import queries
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.postgres import PostgresStore, insert_events
from tests.support import database_sink

pytestmark = pytest.mark.anyio


def _event(n: int, **overrides: object) -> Event:
    fields: dict = dict(project="shop", source="cohorly", name="e", distinct_id="anon", time=n,
                        received_at=now_ms(), insert_id=f"id-{n}", properties={"n": n})
    fields.update(overrides)
    return Event(**fields)


async def test_insert_events_with_and_without_touches(postgres_backend) -> None:
    engine = create_engine(postgres_backend["storage_url"])
    await upgrade(engine)
    await engine.dispose()
    conn = await asyncpg.connect(postgres_backend["storage_url"].replace("postgresql+asyncpg://", "postgresql://"))
    try:
        payload = msgspec.json.encode([_event(1), _event(2, insert_id=None)]).decode()
        assert await insert_events(conn, payload) == {("shop", "cohorly", "id-1")}
        payload = msgspec.json.encode([_event(1), _event(3)]).decode()
        touches = '[{"project": "shop", "id": "anon"}]'
        assert await insert_events(conn, payload, touches, 7, os.urandom(16)) == {("shop", "cohorly", "id-3")}
        profiles = await conn.fetch("SELECT distinct_id, properties::text, updated_at FROM profiles")
        count = await conn.fetchval("SELECT count(*) FROM events")
    finally:
        await conn.close()
    assert [tuple(r) for r in profiles] == [("anon", "{}", 7)]
    assert count == 3


async def test_every_kind_of_group_reports_its_new_events_alike(postgres_backend) -> None:
    """Events alone, with touches, with identity work, with rejections: the
    same statement on each path, the same counts."""
    engine = create_engine(postgres_backend["storage_url"])
    await upgrade(engine)
    sink = database_sink(engine, lanes=2)
    assert isinstance(sink._store, PostgresStore) and sink._store.lanes == 2  # type: ignore[attr-defined]
    touch = ProfileUpdate(project="shop", source="t", distinct_id="anon", time=1, touch=True)
    rejection = Rejection(project="shop", source="t", reason="r", detail="d", received_at=1)
    sink.start()
    try:
        alone = await sink.submit([_event(1), _event(2)])
        touching = await sink.submit([_event(2), _event(3), touch])
        identity = await sink.submit([_event(3), _event(4),
                                      Alias(project="shop", source="t", alias="anon", distinct_id="ann")])
        rejected = await sink.submit([_event(4), _event(5)], [rejection])
    finally:
        await sink.close()
    rows, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=10, after=None)
    stored_rejections, _ = await queries.rejections(engine, project="shop", source=None, reason=None, limit=10,
                                                    after=None)
    await engine.dispose()
    assert [(w.inserted, w.duplicates) for w in (alone, touching, identity, rejected)] == [(2, 0)] + [(1, 1)] * 3
    assert [w.new_keys for w in (touching, identity, rejected)] == [
        [("shop", "cohorly", f"id-{n}")] for n in (3, 4, 5)]
    assert identity.aliases == ["linked"]
    assert sorted(r["properties"]["n"] for r in rows) == [1, 2, 3, 4, 5]
    assert len(stored_rejections) == 1
