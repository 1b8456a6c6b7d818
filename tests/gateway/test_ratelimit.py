"""Rate limits under concurrency: never more than the limit admitted."""

from __future__ import annotations

import asyncio
import time

import pytest

from dialects.base import SlidingWindow
from gateway.ratelimit import LocalLimiter
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
