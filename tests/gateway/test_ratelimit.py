"""Rate limits under concurrency: never more than the limit admitted; the
sliding window's Redis script answering many asks of one call as if asked
one at a time (against a Redis of the test's own)."""

from __future__ import annotations

import asyncio
import time

import pytest

from dialects.base import SlidingWindow
from gateway.ratelimit import Limiter, LocalLimiter
from tests.support import ADMIN, gateway, settings_for

pytestmark = pytest.mark.anyio


async def test_concurrent_requests_of_two_gateways_share_one_exact_window(postgres_backend) -> None:
    # Many admissions go to Redis in one script call; the window stays exact.
    settings = settings_for(postgres_backend, dialects={"cohorly": {"rate_limit": {"requests": 10, "per_seconds": 60}}})
    body = {"event": "e", "properties": {"distinct_id": "u"}}
    async with gateway(settings, client_ip="10.1.1.1") as one, gateway(settings, client_ip="10.1.1.1") as two:
        replies = await asyncio.gather(
            *[c.post("/track", headers={"X-Cohorly-Token": "tok_shop"}, json=body) for c in (one, two) * 20]
        )
        again = [await one.post("/track", headers={"X-Cohorly-Token": "tok_shop"}, json=body)]
    codes = [r.status_code for r in replies]
    assert codes.count(200) == 10 and codes.count(429) == 30
    assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in replies if r.status_code == 429)
    assert again[0].status_code == 429  # the window is still full


async def test_concurrent_requests_in_process_stay_exact(sqlite_backend) -> None:
    settings = settings_for(sqlite_backend, dialects={"cohorly": {"rate_limit": {"requests": 7, "per_seconds": 60}}})
    body = {"event": "e", "properties": {"distinct_id": "u"}}
    async with gateway(settings, client_ip="10.2.2.2") as client:
        replies = await asyncio.gather(
            *[client.post("/engage" if i % 2 else "/track", headers={"X-Cohorly-Token": "tok_shop"},
                          json=body if i % 2 == 0 else {"distinct_id": "u", "$set": {"a": i}})
              for i in range(25)]
        )
    codes = [r.status_code for r in replies]
    assert codes.count(200) == 7 and codes.count(429) == 18


async def test_concurrent_inslytic_batches_of_two_gateways_take_one_exact_bucket(postgres_backend) -> None:
    # Concurrent takes go to Redis in one script call, in order: 100 tokens,
    # 30 batches of 10 from two gateways, exactly 10 batches get in whole.
    settings = settings_for(postgres_backend, dialects={"inslytic": {"events_per_minute": 100}})

    def batch(n: int) -> dict:
        return {"events": [{"eventName": f"b{n}-{i}", "timestamp": "2026-02-16T10:30:00.000Z",
                            "anonymousId": "anon-1", "sessionId": "s", "consentGiven": True} for i in range(10)]}

    headers = {"Authorization": "Bearer ins_shop"}
    async with gateway(settings) as one, gateway(settings) as two:
        replies = await asyncio.gather(
            *[c.post("/v1/ingest", headers=headers, json=batch(n)) for n, c in enumerate((one, two) * 15)]
        )
        events = (await one.get("/admin/v1/projects/shop/events?limit=1000", headers=ADMIN)).json()["events"]
    codes = [r.status_code for r in replies]
    assert codes.count(202) == 10 and codes.count(429) == 20
    accepted = {n for n, r in enumerate(replies) if r.status_code == 202}
    assert sorted(e["name"] for e in events) == sorted(f"b{n}-{i}" for n in accepted for i in range(10))


def test_in_process_windows_of_different_lengths_keep_their_own_admissions() -> None:
    # The in-process limiter also answers for a gateway whose Redis cannot:
    # a sweep made for a short window must not forget a long window's client.
    limiter = LocalLimiter()
    hour, second = SlidingWindow(requests=1, per_seconds=3600), SlidingWindow(requests=1, per_seconds=1)
    assert limiter.sliding("cohorly:10.0.0.1", hour) == 0
    time.sleep(1.1)
    assert limiter.sliding("per_ip:10.0.0.2", second) == 0  # sweeps what is idle for its 1 s
    wait = limiter.sliding("cohorly:10.0.0.1", hour)
    assert 3_590_000 <= wait <= 3_600_000


async def test_one_call_of_many_asks_answers_as_one_ask_at_a_time(link) -> None:
    limiter = Limiter(link)
    two = SlidingWindow(requests=2, per_seconds=10)
    three = SlidingWindow(requests=3, per_seconds=10)
    order = [("a", two), ("b", three), ("a", two), ("a", two),
             ("b", three), ("b", three), ("b", three), ("a", two)]
    waits = await asyncio.gather(*[limiter.sliding("cohorly", key, window) for key, window in order])
    assert [w == 0 for w in waits] == [True, True, True, False, True, True, False, False]
    assert all(9000 < w <= 10000 for w in waits if w)  # until the oldest admission leaves the window
    # Exactly the admissions are in the windows, expiring with them.
    assert await link.client.zcard("t:rl:{sliding}:cohorly:a") == 2
    assert await link.client.zcard("t:rl:{sliding}:cohorly:b") == 3
    assert 9000 < await link.client.pttl("t:rl:{sliding}:cohorly:a") <= 10000
    # A later call sees them.
    assert await limiter.sliding("cohorly", "a", two) > 0



async def test_two_gateways_asking_in_one_flight_each_add_their_own_admissions(link) -> None:
    # Two limiters are two gateways sharing one Redis (here in one process,
    # with the same pid): their admissions must never collide as members.
    first, second = Limiter(link), Limiter(link)
    four = SlidingWindow(requests=4, per_seconds=10)
    asks = [limiter.sliding("cohorly", "c", four) for limiter in (first, second, first, second)]
    assert await asyncio.gather(*asks) == [0, 0, 0, 0]
    assert await link.client.zcard("t:rl:{sliding}:cohorly:c") == 4
    assert await first.sliding("cohorly", "c", four) > 0



async def test_one_client_under_two_windows_in_one_call_is_held_to_each(link) -> None:
    # The same key asked with two windows (a configuration changed between
    # two workers): each group is counted against its own.
    limiter = Limiter(link)
    one, three = SlidingWindow(requests=1, per_seconds=10), SlidingWindow(requests=3, per_seconds=10)
    order = [("d", one), ("d", three), ("d", one), ("d", three), ("d", three)]
    waits = await asyncio.gather(*[limiter.sliding("cohorly", key, window) for key, window in order])
    assert [w == 0 for w in waits] == [True, True, False, True, False]
    assert await link.client.zcard("t:rl:{sliding}:cohorly:d") == 3
