"""A full Redis (`maxmemory` with `noeviction`: every write refused with
OOM, PING still answered): rate limits keep refusing through the in-process
limiter, duplicates are refused by the database, `/readyz` says what is
wrong, and Redis is used again once memory is freed.

The Redis is the test's own, on a free loopback port (tests/gateway/conftest.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tests.support import events_of, gateway, settings_for

pytestmark = pytest.mark.anyio

TOKEN = {"X-Cohorly-Token": "tok_shop"}
INSLYTIC = {"Authorization": "Bearer ins_shop"}


def _batch(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"event": "e", "properties": {"distinct_id": "u", "$insert_id": f"{prefix}-{i}"}}
            for i in range(n)]


def _inslytic(prefix: str, n: int) -> dict[str, Any]:
    return {"events": [{"eventName": f"{prefix}-{i}", "timestamp": "2026-02-16T10:30:00.000Z",
                        "anonymousId": "anon-1", "sessionId": "s", "consentGiven": True} for i in range(n)]}


async def _track(client: httpx.AsyncClient, ip: str, prefix: str, n: int = 1) -> httpx.Response:
    return await client.post("/track", headers={**TOKEN, "X-Forwarded-For": ip}, json=_batch(prefix, n))


async def _ingest(client: httpx.AsyncClient, prefix: str) -> httpx.Response:
    """Three Inslytic events (the project's bucket holds 5 a minute)."""
    return await client.post("/v1/ingest", headers=INSLYTIC, json=_inslytic(prefix, 3))


async def _fill(redis: aioredis.Redis) -> list[str]:
    """Writes values until Redis refuses even a tiny one with OOM (a big
    write refused only says its own arguments did not fit); the keys."""
    keys: list[str] = []
    for size in (65536, 4096, 256, 1):
        value = b"x" * size
        while len(keys) < 10_000:
            try:
                await redis.set(f"filler:{len(keys)}", value)
            except ResponseError as exc:
                assert "maxmemory" in str(exc)
                break
            keys.append(f"filler:{len(keys)}")
    assert len(keys) < 10_000, "redis never filled up"
    return keys


async def test_a_full_redis_keeps_limits_on_and_readyz_says_so(postgres_backend, own_redis) -> None:
    backend = dict(postgres_backend, redis_url=own_redis.url)
    settings = settings_for(
        backend,
        server={"trusted_proxies": ["127.0.0.1/32"]},
        redis={"retry_interval": 0.2, "failure_window": 0.5},
        dialects={"cohorly": {"rate_limit": {"requests": 3, "per_seconds": 60}},
                  "inslytic": {"events_per_minute": 5}},
    )
    prefix = backend["redis_prefix"]
    redis = aioredis.from_url(own_redis.url)
    try:
        await redis.config_set("maxmemory-policy", "noeviction")
        used = (await redis.info("memory"))["used_memory"]
        await redis.config_set("maxmemory", used + 4 * 1024 * 1024)
        async with gateway(settings) as client:
            # Redis answering: its window and bucket decide.
            codes = [(await _track(client, "10.0.0.1", f"a{i}")).status_code for i in range(4)]
            assert codes == [200, 200, 200, 429]
            assert await redis.zcard(f"{prefix}:rl:{{sliding}}:cohorly:10.0.0.1") == 3
            assert (await _ingest(client, "i")).status_code == 202
            assert (await client.get("/readyz")).status_code == 200

            filled = await _fill(redis)
            assert filled
            # Hold it full: at the edge, Redis frees a few bytes now and then
            # (buffers, an expiry) and takes a write or two; this test wants
            # every write refused, the bytes freed later well below the bound.
            used = (await redis.info("memory"))["used_memory"]
            await redis.config_set("maxmemory", used - 1024 * 1024)
            assert await redis.ping()  # what /readyz asked before: it answers
            # Full: the in-process limiter decides, for a new client too.
            codes = [(await _track(client, "10.0.0.2", f"b{i}")).status_code for i in range(5)]
            assert codes == [200, 200, 200, 429, 429]
            refused = await _track(client, "10.0.0.2", "b9")
            assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
            assert not await redis.exists(f"{prefix}:rl:{{sliding}}:cohorly:10.0.0.2")  # Redis took nothing
            # The bucket too (in-process: its own full bucket of 5, then refused).
            takes = [(await _ingest(client, f"j{n}")).status_code for n in range(2)]
            assert takes == [202, 429]
            # A retry of a stored batch: the database refuses the duplicate.
            again = await _track(client, "10.0.0.3", "b0")
            assert again.json() == {"status": 1, "inserted": 0}

            ready = await client.get("/readyz")
            assert ready.status_code == 503, ready.text
            body = ready.json()
            assert body["redis"] is False and body["database"] is True and body["status"] == "unavailable"
            assert body["redis_failure"]["reason"] == "out_of_memory"
            assert "maxmemory" in body["redis_failure"]["detail"]

            # Memory freed: Redis is used again, and /readyz is 200 once the
            # failure is older than redis.failure_window.
            await redis.delete(*filled)
            await asyncio.sleep(0.6)
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            codes = [(await _track(client, "10.0.0.4", f"c{i}")).status_code for i in range(4)]
            assert codes == [200, 200, 200, 429]
            assert await redis.zcard(f"{prefix}:rl:{{sliding}}:cohorly:10.0.0.4") == 3
            events = await events_of(client, limit="1000")
    finally:
        await redis.aclose()
    names = sorted(e["insert_id"] or e["name"] for e in events)
    assert len(names) == len(set(names)) == 3 + 3 + 3 + 3 + 3  # a, b, c; inslytic i and j0
