"""The collect quarantine bound under a flood (README, "Collect quarantine
bound"): 10,000 requests with an unknown token all get 200 and leave at most
`quarantine.per_minute` rejection rows per minute window the flood touched,
while the valid events sent in between are all stored. Through the
in-process gateway; checks through the admin API only."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.support import ADMIN, gateway, settings_for

pytestmark = pytest.mark.anyio

FLOOD = 10_000
CHUNK = 500
VALID_EVERY = 50  # one valid event per 50 requests: 200 of them


def minute() -> int:
    return int(time.time() // 60)


async def test_a_flood_with_an_unknown_token_leaves_a_bounded_quarantine(sqlite_backend) -> None:
    # SQLite only, to stay fast: the sampler is in-process on every backend,
    # and the per-key test below runs on both.
    async with gateway(settings_for(sqlite_backend)) as client:

        async def send(i: int) -> tuple[int, httpx.Response]:
            if i % VALID_EVERY == 0:
                body = json.dumps({"event_name": "valid", "context": {"event_id": f"v{i}"}, "i": i})
                return i, await client.post("/events?tc_s=1234&token=src_shop", content=body)
            body = json.dumps({"event_name": "flood", "i": i})
            if i % 2:
                return i, await client.post("/events?tc_s=1234&token=src_flood", content=body)
            return i, await client.post(
                "/cdp/events/batch?tc_s=1234&token=src_flood", content=f'{{"batch":[{body}]}}'
            )

        first_minute, started = minute(), time.monotonic()
        statuses: dict[int, int] = {}
        for start in range(0, FLOOD, CHUNK):
            for i, reply in await asyncio.gather(*(send(i) for i in range(start, start + CHUNK))):
                statuses[i] = reply.status_code
                assert reply.json() == {"status": "ok"}, (i, reply.text)
        # Every rejection queued so far is committed once an event sent after
        # them is (the writer takes its queue in order).
        reply = await client.post("/events?tc_s=99&token=src_blog", content='{"event_name":"barrier"}')
        assert reply.status_code == 200
        last_minute, elapsed = minute(), time.monotonic() - started
        assert statuses == dict.fromkeys(range(FLOOD), 200)
        assert elapsed < 60, f"the flood took {elapsed:.1f}s"

        reply = await client.get(
            "/admin/v1/rejections", headers=ADMIN, params={"reason": "unknown_source", "limit": "1000"}
        )
        assert reply.status_code == 200
        rows = reply.json()["rejections"]
        windows = last_minute - first_minute + 1  # minute windows the flood touched
        assert 1 <= len(rows) <= 10 * windows, (len(rows), windows)
        assert {(r["project"], r["source"]) for r in rows} == {(None, "collect")}
        assert all('"event_name":"flood"' in r["excerpt"].replace(" ", "") for r in rows)
        reply = await client.get("/admin/v1/rejections", headers=ADMIN, params={"limit": "1000"})
        assert len(reply.json()["rejections"]) == len(rows)  # nothing else was quarantined

        reply = await client.get(
            "/admin/v1/projects/shop/events", headers=ADMIN, params={"name": "valid", "limit": "1000"}
        )
        valid = reply.json()["events"]
        assert sorted(e["properties"]["i"] for e in valid) == list(range(0, FLOOD, VALID_EVERY))
        reply = await client.get("/admin/v1/projects/shop/events", headers=ADMIN, params={"name": "flood"})
        assert reply.json()["events"] == []


async def test_the_bound_is_per_project_and_reason(backend) -> None:
    """Sampling of one key leaves the others alone: each (project, reason)
    keeps its own first rows of the minute."""
    async with gateway(settings_for(backend, quarantine={"per_minute": 3})) as client:
        first_minute = minute()
        sends = [
            ("/events?tc_s=1234&token=src_flood", '{"event_name":"x"}'),  # unknown_source, no project
            ("/events?tc_s=1234&token=src_shop", "[]"),  # shop, not_an_event
            ("/events?tc_s=99&token=src_blog", "[]"),  # blog, not_an_event
            ("/events/batch?tc_s=1234&token=src_shop", "{}"),  # shop, not_a_batch
            ("/events?tc_s=1234&token=src_shop", "{}"),  # shop, no_event_name
        ]
        replies = await asyncio.gather(*(client.post(path, content=body) for path, body in sends * 20))
        assert {r.status_code for r in replies} == {200}
        reply = await client.post("/events?tc_s=99&token=src_blog", content='{"event_name":"barrier"}')
        assert reply.status_code == 200
        windows = minute() - first_minute + 1
        reply = await client.get("/admin/v1/rejections", headers=ADMIN, params={"limit": "1000"})
        counts: dict[tuple[str | None, str], int] = {}
        for row in reply.json()["rejections"]:
            key = (row["project"], row["reason"])
            counts[key] = counts.get(key, 0) + 1
        assert set(counts) == {
            (None, "unknown_source"),
            ("shop", "not_an_event"),
            ("blog", "not_an_event"),
            ("shop", "not_a_batch"),
            ("shop", "no_event_name"),
        }
        for key, count in counts.items():
            assert 3 <= count <= 3 * windows, (key, count, windows)
