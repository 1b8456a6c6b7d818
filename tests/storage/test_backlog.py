"""Each worker's writer backlog is bounded (storage.max_backlog_rows): past
it a request is refused at once as unavailable (503 with Retry-After), and
nothing of it is stored; a request alone always fits."""

from __future__ import annotations

import asyncio

import pytest

from gateway.model import Event
from gateway.pipeline import now_ms
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.sink import Backlogged, StorageUnavailable
from tests.support import database_sink, events_of, gateway, settings_for

pytestmark = pytest.mark.anyio


def _events(tag: str, count: int) -> list[Event]:
    return [
        Event(project="shop", source="cohorly", name="e", distinct_id="u", time=1, received_at=now_ms(),
              insert_id=f"{tag}-{n}", properties={})
        for n in range(count)
    ]


async def test_submit_past_the_backlog_is_refused_at_once(backend) -> None:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    # A group waits 300 ms to fill: the backlog builds up meanwhile.
    writer = database_sink(engine, delay_ms=300, max_backlog_rows=100)
    writer.start()
    try:
        first = asyncio.create_task(writer.submit(_events("a", 60)))
        second = asyncio.create_task(writer.submit(_events("b", 40)))
        await asyncio.sleep(0)
        with pytest.raises(Backlogged):
            await writer.submit(_events("c", 1))
        assert issubclass(Backlogged, StorageUnavailable)
        assert (await first).inserted == 60 and (await second).inserted == 40
        # Drained: a request larger than the whole backlog is still taken alone.
        assert (await writer.submit(_events("d", 500))).inserted == 500
    finally:
        await writer.close()
        await engine.dispose()


async def test_a_full_backlog_is_a_503_with_retry_after_through_http(backend) -> None:
    settings = settings_for(backend, storage={"max_backlog_rows": 10, "batch_delay_ms": 300})
    headers = {"X-Cohorly-Token": "tok_shop"}

    def body(n: int) -> list[dict]:
        return [{"event": f"b{n}", "properties": {"distinct_id": "u", "$insert_id": f"b{n}-{i}"}}
                for i in range(5)]

    async with gateway(settings) as client:
        replies = await asyncio.gather(*(client.post("/track", headers=headers, json=body(n)) for n in range(6)))
        statuses = [r.status_code for r in replies]
        assert set(statuses) == {200, 503}, statuses
        refused = [n for n, r in enumerate(replies) if r.status_code == 503]
        assert all(replies[n].headers.get("retry-after", "").isdigit() for n in refused)
        stored = {e["name"] for e in await events_of(client, limit="1000")}
        assert stored == {f"b{n}" for n, r in enumerate(replies) if r.status_code == 200}
        # Sent again once the backlog drained, as an SDK does: stored.
        for n in refused:
            assert (await client.post("/track", headers=headers, json=body(n))).status_code == 200
        assert len(await events_of(client, limit="1000")) == 30
