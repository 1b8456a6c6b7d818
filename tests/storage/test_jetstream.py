"""storage.jetstream: the gateway answers once the stream has the records,
`dialgate load` (storage.loader) puts them in the database, exactly once,
against a real nats-server of the test's own and both database backends."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from tests.natsserver import NatsServer, free_port
from tests.storage.streams import SHOP, loading, stream_settings, tracked, until
from tests.support import events_of, gateway, live_server, props_of

pytestmark = pytest.mark.anyio


@pytest.fixture
def nats(tmp_path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path) as server:
        yield server


async def test_events_are_acknowledged_then_loaded_once(backend, nats) -> None:
    settings = stream_settings(backend, [nats.url])
    async with gateway(settings) as client:
        first = await client.post("/track", headers=SHOP, json=tracked(("a", "id-a"), ("b", "id-b")))
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["sink"] is True, ready.text
        assert first.status_code == 200, first.text
        assert first.json() == {"status": 1, "inserted": 2}
        # Sent again (an SDK's retry): the stream has a message of these
        # keys (and the dedup cache may have them too).
        again = await client.post("/track", headers=SHOP, json=tracked(("a", "id-a"), ("b", "id-b")))
        assert again.json() == {"status": 1, "inserted": 0}
        # A partial overlap: the database's unique key keeps "b" once.
        more = await client.post("/track", headers=SHOP, json=tracked(("b", "id-b"), ("c", None)))
        assert more.status_code == 200
        async with loading(settings, 2):
            await until(lambda: _count(client, 3))
        names = sorted(e["name"] for e in await events_of(client))
        assert names == ["a", "b", "c"]


async def test_through_http_profiles_apply_in_order(backend, nats) -> None:
    settings = stream_settings(backend, [nats.url])
    async with gateway(settings) as admin:
        with live_server(settings) as url:
            async with httpx.AsyncClient(base_url=url) as client:
                for _ in range(30):
                    reply = await client.post("/engage", headers=SHOP, json={"distinct_id": "p1", "$add": {"n": 1}})
                    assert reply.status_code == 200, reply.text
                reply = await client.post("/engage", headers=SHOP, json={"distinct_id": "p1", "$set": {"last": 30}})
                assert reply.json() == {"status": 1, "applied": 1}
        async with loading(settings, 2):
            await until(lambda: _props(admin, "p1", {"n": 30, "last": 30}))


async def test_stream_unreachable_is_503_with_retry_after(backend) -> None:
    settings = stream_settings(backend, [f"nats://127.0.0.1:{free_port()}"])
    async with gateway(settings) as client:
        reply = await client.post("/track", headers=SHOP, json=tracked(("a", "id-a")))
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == str(settings.storage.unavailable_retry_after)
        assert await events_of(client) == []
        # Not ready either: a load balancer sends its traffic elsewhere.
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["sink"] is False, ready.text


async def test_a_gateway_closes_at_once_while_the_stream_is_unreachable(backend) -> None:
    # nats-py, reconnecting from the first attempt, kept trying inside its
    # connect and could swallow the cancellation: the gateway's shutdown
    # then waited for ever (seen once in a full run).
    settings = stream_settings(backend, [f"nats://127.0.0.1:{free_port()}"])
    for pause in (0, 0.3, 1.1):
        async def run_and_close(pause: float = pause) -> None:
            async with gateway(settings) as client:
                await asyncio.sleep(pause)  # caught at another point of its retries
                assert (await client.post("/track", headers=SHOP, json=tracked(("a", None)))).status_code == 503

        await asyncio.wait_for(run_and_close(), 10)


async def test_a_gateway_reconnects_when_its_server_comes_back(backend, nats) -> None:
    settings = stream_settings(backend, [nats.url])
    async with gateway(settings) as client:
        async def send(n: int) -> int:
            body = tracked((f"e{n}", f"id-{n}"))
            return (await client.post("/track", headers=SHOP, json=body)).status_code

        assert await send(0) == 200
        nats.stop()
        assert await send(1) == 503
        nats.start()  # same port, same store

        async def accepted() -> bool:
            return await send(2) == 200

        await until(accepted)
        async with loading(settings):
            await until(lambda: _count(client, 2))


async def _count(client: httpx.AsyncClient, expected: int) -> bool:
    found = len(await events_of(client))
    assert found <= expected, f"{found} events stored, {expected} sent"
    return found == expected


async def _props(client: httpx.AsyncClient, id_: str, expected: dict) -> bool:
    return await props_of(client, id_) == expected
