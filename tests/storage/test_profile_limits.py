"""Profile work a public caller can ask for is bounded: list operations in
linear time without stalling the event loop, and a size cap past which an
update is quarantined (`profile_too_large`), through real HTTP, both backends."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from tests.support import gateway, props_of, rejections_of, settings_for

pytestmark = pytest.mark.anyio

COHORLY = {"X-Cohorly-Token": "tok_shop"}


async def _engage(client: httpx.AsyncClient, body: Any) -> httpx.Response:
    return await client.post("/engage", headers=COHORLY, content=json.dumps(body))


async def _timed_with_healthz(client: httpx.AsyncClient, body: Any) -> tuple[httpx.Response, float, float]:
    """The /engage answer, how long it took, and the slowest /healthz sent
    every 10 ms meanwhile (same process, same event loop)."""
    slowest = 0.0
    done = asyncio.Event()

    async def probe() -> None:
        nonlocal slowest
        while not done.is_set():
            started = time.perf_counter()
            assert (await client.get("/healthz")).status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
            await asyncio.sleep(0.01)

    prober = asyncio.create_task(probe())
    started = time.perf_counter()
    reply = await _engage(client, body)
    took = time.perf_counter() - started
    done.set()
    await prober
    return reply, took, slowest


async def test_list_operations_of_40000_items_are_quick_and_never_stall_the_loop(backend) -> None:
    """Before: one $union of 40,000 numbers took 10-13 s and /healthz as long."""
    numbers = list(range(40_000))
    async with gateway(settings_for(backend)) as client:
        cases = [
            ("$union", {"$distinct_id": "big", "$union": {"l": numbers}}),
            ("$union again", {"$distinct_id": "big", "$union": {"l": list(range(20_000, 60_000))}}),
            ("$append", {"$distinct_id": "big", "$append": {"l": numbers}}),
            # 500 operations each removing a present item from a 60,000-item list.
            ("$remove x500", [{"$distinct_id": "big", "$remove": {"l": n * 97}} for n in range(500)]),
            ("$union x500", [{"$distinct_id": "big", "$union": {"l": [10**6 + n]}} for n in range(500)]),
        ]
        for what, body in cases:
            reply, took, slowest = await _timed_with_healthz(client, body)
            assert reply.status_code == 200, (what, reply.text)
            assert took < 3.0, (what, took)
            assert slowest < 0.5, (what, slowest)
        props = await props_of(client, "big")
    assert props is not None
    removed = {n * 97 for n in range(500)}
    expected = [n for n in range(60_000) if n not in removed] + [numbers] + [10**6 + n for n in range(500)]
    assert props["l"] == expected


async def test_an_update_past_the_cap_is_quarantined_and_the_profile_unchanged(backend) -> None:
    settings = settings_for(backend, storage={"max_profile_bytes": 20_000})
    async with gateway(settings) as client:
        assert (await _engage(client, {"$distinct_id": "ann", "$set": {"name": "Ann"},
                                       "$union": {"l": list(range(1000))}})).status_code == 200
        before = await props_of(client, "ann")
        big = "x" * 6_000
        # Each alone would fit; the third would pass 20,000 bytes: not applied,
        # the request still succeeds, and the next update under the cap applies.
        batch = [{"$distinct_id": "ann", "$append": {"l": big}} for _ in range(3)]
        batch.append({"$distinct_id": "ann", "$set": {"after": 1}, "$append": {"l": "y" * 7_000}})
        batch.append({"$distinct_id": "ann", "$set": {"small": True}})
        reply = await _engage(client, batch)
        assert reply.status_code == 200 and reply.json() == {"status": 1, "applied": 5}, reply.text
        props = await props_of(client, "ann")
        # A new profile whose first update is already too large is not created.
        assert (await _engage(client, {"$distinct_id": "bob", "$set": {"x": "y" * 30_000}})).status_code == 200
        assert await props_of(client, "bob") is None
        rejected = await rejections_of(client, reason="profile_too_large")
    assert before is not None and props is not None
    assert props["l"] == before["l"] + [big, big]
    assert "after" not in props and props["small"] is True
    assert len(json.dumps(props, separators=(",", ":")).encode()) <= 20_000
    assert len(rejected) == 3, rejected
    assert all(r["project"] == "shop" and r["source"] == "cohorly" for r in rejected)
    assert rejected[0]["detail"].startswith("ann: ") and "20000" in rejected[0]["detail"]


async def test_eight_appends_of_900_kb_stop_at_the_default_cap(backend) -> None:
    """Before: 8 $append of 900 KB made a 7 MB profile."""
    chunk = "z" * 900_000
    async with gateway(settings_for(backend)) as client:
        for _ in range(8):
            reply = await _engage(client, {"$distinct_id": "fat", "$append": {"l": chunk}})
            assert reply.status_code == 200, reply.text
        props = await props_of(client, "fat")
        rejected = await rejections_of(client, reason="profile_too_large")
    assert props == {"l": [chunk]}
    assert len(rejected) >= 1  # the quarantine keeps a sample per minute
