"""The sink contract (storage/sink.py), run against every sink."""

from __future__ import annotations

import asyncio

import pytest

from gateway.model import Alias, ProfileUpdate, Rejection
from storage import queries
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.sink import StorageUnavailable, Unstorable
from tests.storage.records import event as _event
from tests.support import database_sink, free_port

pytestmark = pytest.mark.anyio


def _update(person: str, **ops: object) -> ProfileUpdate:
    return ProfileUpdate(project="shop", source="t", distinct_id=person, time=1, **ops)  # type: ignore[arg-type]


async def _stored(engine) -> list[int]:
    rows, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=1000, after=None)
    return sorted(r["properties"]["n"] for r in rows)


async def test_a_sink_says_which_events_were_new(backend) -> None:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    sink = database_sink(engine)
    sink.start()
    try:
        first = await sink.submit([_event(1), _event(2), _event(3, insert_id=None)])
        second = await sink.submit([_event(2), _event(4), _event(4), _event(5, insert_id=None)])
    finally:
        await sink.close()
    assert (first.inserted, first.duplicates) == (3, 0)
    assert sorted(first.new_keys) == [("shop", "cohorly", "id-1"), ("shop", "cohorly", "id-2")]
    # A key already stored, and one repeated inside the request: duplicates.
    assert (second.inserted, second.duplicates) == (2, 2)
    assert second.new_keys == [("shop", "cohorly", "id-4")]
    assert await _stored(engine) == [1, 2, 3, 4, 5]
    await engine.dispose()


async def test_a_refused_request_stores_nothing_and_fails_alone(backend) -> None:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    sink = database_sink(engine, delay_ms=30)  # one group for all of them
    sink.start()
    try:
        good = [sink.submit([_event(i), _update(f"p{i}", set={"a": i})]) for i in range(5)]
        # Its first event and its profile update are fine; its second event
        # passes the model but no BIGINT column can hold it.
        bad = sink.submit([_event(10), _update("bad", set={"a": 1}), _event(11, time=2**70)],
                          [Rejection(project="shop", source="t", reason="r", detail="d", received_at=1)])
        results = await asyncio.gather(*good, bad, return_exceptions=True)
    finally:
        await sink.close()
    assert [(r.inserted, r.applied) for r in results[:5]] == [(1, 1)] * 5  # type: ignore[union-attr]
    assert isinstance(results[5], Unstorable)
    assert await _stored(engine) == [0, 1, 2, 3, 4]
    assert await queries.profile(engine, "shop", "bad") is None
    assert (await queries.profile(engine, "shop", "p3"))["properties"] == {"a": 3}  # type: ignore[index]
    rows, _ = await queries.rejections(engine, project="shop", source=None, reason=None, limit=10, after=None)
    assert rows == []
    await engine.dispose()


async def test_profile_work_applies_in_the_order_it_was_submitted(backend) -> None:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    sink = database_sink(engine, lanes=3)
    sink.start()
    try:
        work = []
        for i in range(40):
            work.append(sink.submit([_update("ann", set={"last": i}, add={"n": 1})]))
            if i == 20:
                work.append(sink.submit([Alias(project="shop", source="t", alias="anon", distinct_id="ann")]))
                work.append(sink.submit([_update("anon", unset=["last"])]))  # the same person now
        results = await asyncio.gather(*work)
    finally:
        await sink.close()
    assert results[21].aliases == ["linked"]
    profile = await queries.profile(engine, "shop", "anon")
    await engine.dispose()
    assert profile is not None and profile["distinct_id"] == "ann"
    assert profile["properties"] == {"last": 39, "n": 40}


async def test_an_unreachable_database_is_unavailable_and_a_closed_sink_too(backend, tmp_path) -> None:
    if backend["name"] == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/missing/dir/dialgate.db"  # cannot be opened
    else:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/postgres"  # nobody listens
    engine = create_engine(url)
    sink = database_sink(engine)
    sink.start()
    try:
        with pytest.raises(StorageUnavailable):
            await sink.submit([_event(1)])
        with pytest.raises(StorageUnavailable):
            await sink.submit([_event(2), _update("ann", set={"a": 1})])
    finally:
        await sink.close()
    with pytest.raises(StorageUnavailable):
        await sink.submit([_event(3)])
    await engine.dispose()
