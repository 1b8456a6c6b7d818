"""Bulk reads for export, both backends: every kind in the admin API's
shapes, storage order, time ranges at their edges, one snapshot however
long the export, and the time index of migration 0004."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa

from gateway.model import Alias, Device, GroupUpdate, ProfileUpdate
from storage import export, queries
from storage.engine import create_engine
from storage.export import Kind, Span
from tests.storage.records import event

pytestmark = pytest.mark.anyio


async def _all(engine: Any, kind: Kind, span: Span = export.EVERYTHING, **options: Any) -> list[Any]:
    found: list[Any] = []
    async with contextlib.aclosing(export.batches(engine, "shop", kind, span, **options)) as batches:
        async for batch in batches:
            found += msgspec.json.decode(msgspec.json.encode(batch))
    return found


async def _admin_events(engine: Any, **filters: Any) -> list[dict[str, Any]]:
    items, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=1000,
                                    after=None, **filters)
    return items


async def test_events_come_as_the_admin_api_gives_them_in_storage_order(store) -> None:
    engine, sink = store
    await sink.submit([
        event(1, properties={"nested": {"a": [1, 2.5, None, "é"]}, "$lib": "x"}, context={"ip": "1.2.3.4"},
              consent=True, anonymous_id="anon", session_id="s1"),
        event(2, consent=False, distinct_id=None, user_id="u"),
        event(3, properties={"nul": "a\x00b"}),
    ])
    await sink.submit([event(0, name="later, lower time")])
    exported = await _all(engine, Kind.EVENTS, rows=2)
    assert exported == await _admin_events(engine)
    assert [e["name"] for e in exported] == ["e", "e", "e", "later, lower time"]
    assert exported[0]["consent"] is True and exported[1]["consent"] is False and exported[2]["consent"] is None
    assert exported[2]["properties"] == {"nul": "a\ufffdb"}
    assert all(isinstance(e["id"], str) and e["received_at"] > 0 for e in exported)


async def test_time_ranges_are_half_open_at_the_millisecond(store) -> None:
    engine, sink = store
    since, until = 1_700_000_000_100, 1_700_000_000_200
    times = [since - 1, since, since + 1, until - 1, until, until + 1]
    await sink.submit([event(i, time=t) for i, t in enumerate(times)])
    span = Span(since, until)
    inside = [since, since + 1, until - 1]
    assert [e["time"] for e in await _all(engine, Kind.EVENTS, span)] == inside
    assert [e["time"] for e in await _admin_events(engine, since=since, until=until)] == inside
    assert [e["time"] for e in await _all(engine, Kind.EVENTS, Span(since=until))] == [until, until + 1]
    assert [e["time"] for e in await _all(engine, Kind.EVENTS, Span(until=since))] == [since - 1]
    assert await export.count(engine, "shop", Kind.EVENTS, span) == 3
    assert await export.count(engine, "shop", Kind.EVENTS) == 6


async def test_a_range_must_not_be_empty_and_bounds_events_only(sqlite_backend) -> None:
    with pytest.raises(ValueError, match="until must be after since"):
        Span(5, 5)
    with pytest.raises(ValueError, match="until must be after since"):
        Span(6, 5)
    engine = create_engine(sqlite_backend["storage_url"])
    for kind in (Kind.PROFILES, Kind.ALIASES, Kind.GROUPS):
        with pytest.raises(ValueError, match="exported whole"):
            await anext(export.batches(engine, "shop", kind, Span(since=1)))
        with pytest.raises(ValueError, match="exported whole"):
            await export.count(engine, "shop", kind, Span(until=1))
    await engine.dispose()


async def test_an_export_is_one_snapshot(store) -> None:
    engine, sink = store
    await sink.submit([event(i) for i in range(10)])
    seen = 0
    async with contextlib.aclosing(export.batches(engine, "shop", Kind.EVENTS, rows=3)) as batches:
        async for batch in batches:
            if seen == 0:
                # Written (and committed) while the export is under way.
                await sink.submit([event(i) for i in range(10, 15)])
            seen += len(batch)
    assert seen == 10
    assert len(await _all(engine, Kind.EVENTS)) == 15


async def test_leaving_early_gives_the_connection_back(store) -> None:
    engine, sink = store
    await sink.submit([event(i) for i in range(10)])
    for _ in range(12):  # more than the pool holds
        async with contextlib.aclosing(export.batches(engine, "shop", Kind.EVENTS, rows=2)) as batches:
            async for _batch in batches:
                break
    assert len(await _all(engine, Kind.EVENTS)) == 10


async def test_profiles_aliases_and_groups_in_the_admin_api_shapes(store) -> None:
    engine, sink = store
    await sink.submit([
        ProfileUpdate(project="shop", source="cohorly", distinct_id="ada", time=1, set={"plan": "pro", "n": [1]}),
        ProfileUpdate(project="shop", source="cohorly", distinct_id="bob", time=1, set={"plan": "free"}),
        Alias(project="shop", source="cohorly", alias="anon-2", distinct_id="ada"),
        Alias(project="shop", source="cohorly", alias="anon-1", distinct_id="ada"),
        Device(project="shop", source="client", distinct_id="anon-1", device_id="d2", os="iOS", push_token="t"),
        Device(project="shop", source="client", distinct_id="ada", device_id="d1", os="Android"),
        Device(project="shop", source="client", distinct_id="bob", device_id="d3"),
        GroupUpdate(project="shop", source="mixpanel", group_key="company", group_id="acme", time=1,
                    set={"size": 10}),
        GroupUpdate(project="shop", source="mixpanel", group_key="company", group_id="a/b", time=1,
                    set={"size": 1}),
    ])
    await sink.submit([event(1, distinct_id="carl")])  # events alone make no profile
    profiles = await _all(engine, Kind.PROFILES, rows=1)
    assert [p["distinct_id"] for p in profiles] == ["ada", "bob"]
    for found in profiles:
        assert found == await queries.profile(engine, "shop", found["distinct_id"])
    assert profiles[0]["ids"] == ["ada", "anon-1", "anon-2"]
    assert [d["device_id"] for d in profiles[0]["devices"]] == ["d1", "d2"]
    aliases = await _all(engine, Kind.ALIASES)
    assert [(a["alias"], a["distinct_id"], a["person"], a["source"]) for a in aliases] == [
        ("anon-1", "ada", "ada", "cohorly"), ("anon-2", "ada", "ada", "cohorly")]
    assert all(isinstance(a["created_at"], int) for a in aliases)
    groups = await _all(engine, Kind.GROUPS)
    assert groups == [await queries.group(engine, "shop", "company", "a/b"),
                      await queries.group(engine, "shop", "company", "acme")]


async def test_another_project_is_not_exported(store) -> None:
    engine, sink = store
    await sink.submit([event(1), event(2, project="blog")])
    assert [e["project"] for e in await _all(engine, Kind.EVENTS)] == ["shop"]


async def test_the_time_index_is_there(store) -> None:
    engine, _ = store
    async with engine.connect() as conn:
        indexes = await conn.run_sync(lambda sync: sa.inspect(sync).get_indexes("events"))
    assert {"name": "ix_events_project_time", "columns": ["project", "time"]} in [
        {"name": i["name"], "columns": i["column_names"]} for i in indexes]
