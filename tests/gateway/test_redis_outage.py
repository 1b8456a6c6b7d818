"""Redis going away while the gateway runs: it keeps serving, and its rate
limits keep refusing (in-process until Redis answers again).

The test starts a Redis of its own (the machine's shared one is never
stopped), kills it mid-run and brings it back on the same port.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis

from tests.support import ADMIN, gateway, settings_for

pytestmark = pytest.mark.anyio


def _batch(prefix: str, n: int) -> list[dict]:
    return [{"event": "e", "properties": {"distinct_id": "u", "$insert_id": f"{prefix}-{i}"}} for i in range(n)]


async def test_gateway_keeps_serving_and_limiting_without_redis(postgres_backend, own_redis, caplog) -> None:
    backend = dict(postgres_backend, redis_url=own_redis.url)
    settings = settings_for(
        backend,
        redis={"retry_interval": 0.2, "failure_window": 0.5},
        dialects={"cohorly": {"rate_limit": {"requests": 3, "per_seconds": 60}}},
    )
    token = {"X-Cohorly-Token": "tok_shop"}
    async with gateway(settings) as client:
        first = await client.post("/track", headers=token, json=_batch("a", 10))
        assert first.json() == {"status": 1, "inserted": 10}
        await client.post("/track", headers=token, json=_batch("a", 10))  # 2nd of 3 allowed
        await client.post("/alias", headers=token, json={"alias": "x", "distinct_id": "u"})  # not limited
        assert (await client.post("/track", headers=token, json=_batch("b", 1))).status_code == 200
        assert (await client.post("/track", headers=token, json=_batch("b", 1))).status_code == 429

        own_redis.kill()
        with caplog.at_level(logging.WARNING, logger="dialgate.redis"):
            # The in-process limiter takes over (its window of this client
            # starts empty: 3 more, then refused); duplicates are still
            # refused by the database.
            replies = [await client.post("/track", headers=token, json=_batch("a", 10)) for _ in range(2)]
            fresh = await client.post("/track", headers=token, json=_batch("c", 5))
            over = [await client.post("/track", headers=token, json=_batch("d", 1)) for _ in range(2)]
        assert [r.status_code for r in replies] == [200, 200]
        assert all(r.json()["inserted"] == 0 for r in replies)
        assert fresh.json() == {"status": 1, "inserted": 5}
        assert [r.status_code for r in over] == [429, 429]
        assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in over)
        # Whichever call met the outage first (a limit, or a remember) logs it once.
        failed = [r.getMessage() for r in caplog.records if "redis failed during" in r.getMessage()]
        assert len(failed) == 1 and "(unreachable: " in failed[0], failed
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["redis"] is False
        assert ready.json()["redis_failure"]["reason"] == "unreachable"
        assert ready.json()["database"] is True

        own_redis.start()  # same port, empty: its window of this client starts empty
        await asyncio.sleep(0.3)
        # 3 admitted, then refused: Redis's window (the in-process one is full).
        codes = [(await client.post("/engage", headers=token, json={"distinct_id": "u", "$set": {"a": 1}})).status_code
                 for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        await asyncio.sleep(0.6)  # past redis.failure_window
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert "redis_failure" not in ready.json()
        events = (await client.get("/admin/v1/projects/shop/events?limit=1000", headers=ADMIN)).json()["events"]
    ids = [e["insert_id"] for e in events]
    assert len(ids) == len(set(ids)) == 16
    restarted = aioredis.from_url(own_redis.url)
    try:
        windows = [k async for k in restarted.scan_iter(match=backend["redis_prefix"] + ":rl:*")]
        assert len(windows) == 1 and await restarted.zcard(windows[0]) == 3
    finally:
        await restarted.aclose()
