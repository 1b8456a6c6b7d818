"""gateway.probes: the writer's backlog, the database pool, Redis's health,
sampled from the running app's own resources at every scrape."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.gateway.test_metrics import samples
from tests.gateway.test_pipeline import _write_lock
from tests.support import OwnRedis, gateway, settings_for

pytestmark = pytest.mark.anyio

SHOP = {"X-Cohorly-Token": "tok_shop"}
# The pool each engine keeps (storage.engine).
POOL_SIZE = {"sqlite": 4, "postgres": 5}


def _event(insert_id: str) -> dict[str, object]:
    return {"event": "E", "properties": {"distinct_id": "u", "$insert_id": insert_id}}


async def _scrape(client: httpx.AsyncClient) -> dict[str, float]:
    return samples((await client.get("/metrics")).content)


async def test_the_backlog_and_the_pool_while_a_commit_waits(backend: dict[str, str]) -> None:
    async with gateway(settings_for(backend)) as client:
        # The writer's connection made first (as tests/gateway/test_pipeline.py explains).
        assert (await client.post("/track", headers=SHOP, json=_event("first"))).status_code == 200
        idle = await _scrape(client)
        assert idle["dialgate_writer_backlog_rows"] == 0
        assert idle["dialgate_db_pool_size"] == POOL_SIZE[backend["name"]]
        assert idle["dialgate_commit_duration_seconds_count"] >= 1
        async with _write_lock(backend):
            answers = [asyncio.ensure_future(client.post("/track", headers=SHOP, json=[_event("a"), _event("b")]))]
            if backend["name"] == "sqlite":
                # SQLite's events go on a connection of their own; a profile's
                # transaction takes one from the pool (and waits for the lock too).
                answers.append(asyncio.ensure_future(
                    client.post("/engage", json={"$token": "tok_shop", "distinct_id": "u", "$set": {"n": 1}})))
            await asyncio.sleep(0.5)
            held = await _scrape(client)
            assert not any(answer.done() for answer in answers)
        assert [(await answer).status_code for answer in answers] == [200] * len(answers)
        after = await _scrape(client)
    # The requests' rows, queued or being written: two events (and one profile update).
    assert held["dialgate_writer_backlog_rows"] == 1 + len(answers)
    assert held["dialgate_db_pool_checked_out"] >= 1  # a writer's connection, waiting for the lock
    assert after["dialgate_writer_backlog_rows"] == 0
    commits = after["dialgate_commit_duration_seconds_count"] - idle["dialgate_commit_duration_seconds_count"]
    assert commits >= 1
    # The wait shows in the commit latency: no new commit under the half second the lock was held.
    slow = 'dialgate_commit_duration_seconds_bucket{le="0.25"}'
    assert after[slow] == idle[slow]


async def test_without_redis_there_is_no_redis_series(sqlite_backend: dict[str, str]) -> None:
    async with gateway(settings_for(sqlite_backend)) as client:
        found = await _scrape(client)
    assert not any(name.startswith("dialgate_redis") for name in found)


async def test_redis_up_then_its_failure_with_its_time(postgres_backend: dict[str, str],
                                                       own_redis: OwnRedis) -> None:
    settings = settings_for({**postgres_backend, "redis_url": own_redis.url})
    async with gateway(settings) as client:
        assert (await client.post("/track", headers=SHOP, json=_event("r1"))).status_code == 200
        up = await _scrape(client)
        own_redis.kill()
        before = time.time()
        # Answered all the same (Redis is an accelerator); the dedup call failed.
        assert (await client.post("/track", headers=SHOP, json=_event("r2"))).status_code == 200
        down = await _scrape(client)
    assert (up["dialgate_redis_up"], up["dialgate_redis_last_failure_timestamp_seconds"]) == (1, 0)
    assert down["dialgate_redis_up"] == 0
    assert before - 1 <= down["dialgate_redis_last_failure_timestamp_seconds"] <= time.time() + 1
