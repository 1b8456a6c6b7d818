"""storage.loadwrite: a loader's batch of event messages written once, on
both backends. PostgreSQL copies straight into `events` and falls back to
the conflict-checked path only when an insert id is stored already: what
either path stores must be the same."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.model import Event
from storage.engine import create_engine
from storage.loadwrite import LoadStore
from storage.logrecords import encode
from storage.migrate import upgrade

pytestmark = pytest.mark.anyio


def _event(name: str, insert_id: str | None) -> Event:
    return Event(project="shop", source="cohorly", name=name, distinct_id="u", time=1_700_000_000_000,
                 received_at=1_700_000_000_001, insert_id=insert_id, properties={"n": name})


@pytest.fixture
async def engine(backend) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    yield engine
    await engine.dispose()


def _store(engine: AsyncEngine, stream: str = "") -> LoadStore:
    # A stream of the test's own: its `loader_applied` rows are its own.
    return LoadStore(engine, stream or "t" + uuid.uuid4().hex[:10], clock=lambda: 1_700_000_000_000,
                     admit=lambda _: True)


async def _stored(engine: AsyncEngine) -> list[tuple[str, str | None]]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT name, insert_id FROM events ORDER BY name"))
        return [(r[0], r[1]) for r in rows]


async def test_new_events_are_stored_and_a_message_seen_before_is_skipped(engine) -> None:
    store = _store(engine)
    first = [(1, encode([_event("a", "i-a"), _event("b", None)])), (2, encode([_event("c", "i-c")]))]
    assert await store.write_events(first) == (3, 0)
    # Delivered again (a loader killed before its acknowledgement), prepared
    # ahead as the loader does: nothing twice, keyless events included.
    assert await store.write_events(store.prepare(first)) == (0, 0)
    assert await _stored(engine) == [("a", "i-a"), ("b", None), ("c", "i-c")]


async def test_an_insert_id_stored_before_leaves_the_rest_of_the_batch_stored(engine) -> None:
    stream = "t" + uuid.uuid4().hex[:10]
    store = _store(engine, stream)
    assert await store.write_events([(1, encode([_event("a", "i-a")]))]) == (1, 0)
    # A new message (a retry past the duplicate window, overlapping in
    # part), and within one batch two messages sharing an insert id.
    batch = [
        (2, encode([_event("a-again", "i-a"), _event("d", "i-d"), _event("e", None)])),
        (3, encode([_event("f", "i-f")])),
        (4, encode([_event("f-again", "i-f")])),
    ]
    assert await store.write_events(batch) == (3, 0)
    assert await _stored(engine) == [("a", "i-a"), ("d", "i-d"), ("e", None), ("f", "i-f")]
    # The messages are marked applied even so: delivered again, skipped.
    assert await store.write_events(batch) == (0, 0)
    async with engine.connect() as conn:
        marked = await conn.execute(text("SELECT seq FROM loader_applied WHERE stream = :s ORDER BY seq"),
                                    {"s": stream})
        assert [r[0] for r in marked] == [1, 2, 3, 4]


async def test_json_is_stored_as_the_sink_stores_it_and_a_bad_message_is_skipped(engine) -> None:
    store = _store(engine)
    # encode() writes U+0000 as U+FFFD already: a payload written by another
    # hand, with U+0000 escaped in a property and raw in a text column.
    strange = (b'["e",[{"project":"shop","source":"cohorly","name":"n\\u0000","distinct_id":"u","time":1,'
               b'"received_at":2,"properties":{"k":"a\\u0000b","\xc3\xa9":[1,{"x":null}]},"context":{}}]]')
    plain = encode([_event("p", "i-p")])
    messages = [(1, strange), (2, b'["e", 1]'), (3, b"not json"), (4, plain)]
    assert await store.write_events(messages) == (2, 0)
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT name, properties FROM events ORDER BY name"))
        stored = [(r[0], r[1] if isinstance(r[1], dict) else msgspec.json.decode(r[1])) for r in rows]
    assert stored == [("n\ufffd", {"k": "a\ufffdb", "\u00e9": [1, {"x": None}]}), ("p", {"n": "p"})]
