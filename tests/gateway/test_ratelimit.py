"""Rate limits under concurrency: never more than the limit admitted."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import gateway, settings_for

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
