"""SQLite's one insert route for events, through both of its connections."""

from __future__ import annotations

import sqlite3

import pytest

from gateway.model import Event, ProfileUpdate
from gateway.pipeline import now_ms
from storage import queries
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.sqlite import SqliteEvents, SqliteStore, insert_events, sqlite_rows, statements
from tests.support import database_sink

pytestmark = pytest.mark.anyio


def _event(n: int, insert_id: str | None = "") -> Event:
    return Event(project="shop", source="cohorly", name="e\x00", distinct_id="u", time=n, received_at=now_ms(),
                 insert_id=f"id-{n}" if insert_id == "" else insert_id, properties={"n": n})


async def test_insert_events_reads_back_only_when_some_were_duplicates(sqlite_backend) -> None:
    engine = create_engine(sqlite_backend["storage_url"])
    await upgrade(engine)
    await engine.dispose()
    conn = sqlite3.connect(sqlite_backend["storage_url"].split("///", 1)[1], isolation_level=None)
    try:
        rows = sqlite_rows([_event(1), _event(2), _event(3, None)])
        conn.execute("BEGIN IMMEDIATE")
        assert insert_events(conn.execute, statements(rows), len(rows)) is None  # all new
        rows = sqlite_rows([_event(2), _event(4), _event(5, None)])
        assert insert_events(conn.execute, statements(rows), len(rows)) == {("shop", "cohorly", "id-4")}
        conn.execute("COMMIT")
        names = {name for (name,) in conn.execute("SELECT name FROM events")}
    finally:
        conn.close()
    assert names == {"e\ufffd"}  # NUL cleaned, as on PostgreSQL


def test_statements_stay_under_the_bound_value_limit() -> None:
    planned = statements(sqlite_rows([_event(n) for n in range(4500)]))
    assert [len(params) // 13 for _sql, params in planned] == [2000, 2000, 500]
    assert all(len(params) <= 32766 for _sql, params in planned)


async def test_events_alone_and_with_profile_work_take_the_same_route(sqlite_backend) -> None:
    engine = create_engine(sqlite_backend["storage_url"])
    await upgrade(engine)
    sink = database_sink(engine)
    assert isinstance(sink._store, SqliteStore)  # type: ignore[attr-defined]
    assert isinstance(sink._store._direct, SqliteEvents)  # type: ignore[attr-defined]
    sink.start()
    try:
        alone = await sink.submit([_event(1), _event(2)])
        mixed = await sink.submit([_event(2), _event(3), ProfileUpdate(project="shop", source="t",
                                                                        distinct_id="u", time=1, set={"a": 1})])
    finally:
        await sink.close()
    rows, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=10, after=None)
    await engine.dispose()
    assert (alone.inserted, alone.duplicates) == (2, 0)
    assert (mixed.inserted, mixed.duplicates, mixed.applied) == (1, 1, 1)
    assert mixed.new_keys == [("shop", "cohorly", "id-3")]
    assert sorted(r["properties"]["n"] for r in rows) == [1, 2, 3]


def test_a_private_database_has_no_direct_connection() -> None:
    from sqlalchemy.engine import make_url

    assert SqliteEvents.for_url(make_url("sqlite+aiosqlite:///:memory:")) is None
    assert SqliteEvents.for_url(make_url("sqlite+aiosqlite:///x.db?mode=ro")) is None
    assert SqliteEvents.for_url(make_url("sqlite+aiosqlite:///x.db")) is not None
