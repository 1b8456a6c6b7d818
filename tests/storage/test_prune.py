"""Retention on both backends: old events and quarantine rows go in
batches, newer ones stay; the daily run is claimed once a day; and a prune
of 50,000 rows never holds an ingestion request for a second."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from gateway.pipeline import now_ms
from storage import tables
from storage.engine import create_engine
from storage.expiry import DAY_MS
from storage.migrate import upgrade
from storage.prune import claim, prune
from tests.support import live_server, settings_for

pytestmark = pytest.mark.anyio

DIALGATE = Path(sys.executable).parent / "dialgate"


def _event(project: str, n: int, age_days: float, now: int) -> dict[str, object]:
    return {"project": project, "source": "cohorly", "name": "old" if age_days > 30 else "new",
            "distinct_id": f"u{n % 50}", "time": now - int(age_days * DAY_MS), "received_at": now,
            "insert_id": f"{project}-{n}", "properties": {"n": n}, "context": {}}


async def _insert_events(engine, rows: list[dict[str, object]]) -> None:
    for start in range(0, len(rows), 5000):
        async with engine.begin() as conn:
            await conn.execute(tables.events.insert(), rows[start:start + 5000])


async def _names(engine) -> dict[tuple[str, str], int]:
    e = tables.events
    async with engine.connect() as conn:
        rows = await conn.execute(select(e.c.project, e.c.name, func.count()).group_by(e.c.project, e.c.name))
        return {(project, name): count for project, name, count in rows}


async def test_old_events_and_quarantine_rows_go_per_project_newer_ones_stay(backend) -> None:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    now = now_ms()
    rows = [_event("shop", n, 40 if n < 2500 else 5, now) for n in range(3000)]
    rows += [_event("blog", n, 31 if n < 7 else 29, now) for n in range(10)]
    await _insert_events(engine, rows)
    async with engine.begin() as conn:
        await conn.execute(tables.rejections.insert(), [
            {"project": "shop", "source": "collect", "reason": "x", "detail": "", "excerpt": "",
             "received_at": now - age * DAY_MS} for age in (100, 40, 2)
        ])
    try:
        pruned = await prune(engine, events_before=now - 30 * DAY_MS, rejections_before=now - 30 * DAY_MS,
                             batch=1000, pause=0)
        assert pruned.events == {"shop": 2500, "blog": 7}
        assert pruned.rejections == 2
        assert await _names(engine) == {("shop", "new"): 500, ("blog", "new"): 3}
        async with engine.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(tables.rejections))).scalar() == 1
        # Nothing older is left: a second run removes nothing.
        again = await prune(engine, events_before=now - 30 * DAY_MS, rejections_before=None, pause=0)
        assert again.events == {} and again.rejections == 0
    finally:
        await engine.dispose()


async def test_the_day_is_claimed_by_one_caller_only(backend) -> None:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    try:
        # Five at once on a fresh table: one wins the insert.
        first = await asyncio.gather(*[claim(engine, "prune", 20_000) for _ in range(5)])
        assert sorted(first) == [False, False, False, False, True]
        assert await claim(engine, "prune", 20_000) is False
        later = await asyncio.gather(*[claim(engine, "prune", 20_001) for _ in range(5)])
        assert sorted(later) == [False, False, False, False, True]
        # Another task's day is its own.
        assert await claim(engine, "other", 20_001) is True
    finally:
        await engine.dispose()


def _toml(backend: dict[str, str]) -> str:
    return "\n".join([
        "[storage]", f'url = "{backend["storage_url"]}"',
        "[redis]", f'url = "{backend["redis_url"]}"', f'key_prefix = "{backend["redis_prefix"]}"',
        "[retention]", "events_days = 30",
        "[[projects]]", 'name = "shop"', 'cohorly_tokens = ["tok_shop"]', "",
    ])


async def test_a_prune_of_50000_rows_never_holds_ingestion_for_a_second(backend, tmp_path) -> None:
    """`dialgate prune` in a process of its own deletes 50,000 old events
    while a gateway ingests; every ingestion request is timed."""
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    now = now_ms()
    await _insert_events(engine, [_event("shop", n, 60, now) for n in range(50_000)])
    config = tmp_path / "dialgate.toml"
    config.write_text(_toml(backend))
    latencies: list[float] = []
    unlimited = {"cohorly": {"rate_limit": {"requests": 1_000_000, "per_seconds": 1}}}
    with live_server(settings_for(backend, dialects=unlimited)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            pruner = await asyncio.create_subprocess_exec(
                str(DIALGATE), "prune", "--config", str(config), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, "DIALGATE_CONFIG": ""})
            finished = asyncio.ensure_future(pruner.communicate())
            n = 0
            while not finished.done() or n < 20:
                started = time.perf_counter()
                reply = await client.post("/track", headers={"X-Cohorly-Token": "tok_shop"},
                                          json=[{"event": "live", "properties": {"distinct_id": f"v{n}",
                                                                                 "$insert_id": f"live-{n}"}}])
                latencies.append(time.perf_counter() - started)
                assert reply.status_code == 200, reply.text
                n += 1
            out, err = (part.decode() for part in await asyncio.wait_for(finished, 60))
    try:
        assert pruner.returncode == 0, err
        assert "events: 50000 deleted" in out
        counts = await _names(engine)
        assert counts == {("shop", "live"): n}  # every old row gone, every live one stored
    finally:
        await engine.dispose()
    # The prune ran long enough to overlap many requests, and none waited.
    assert n >= 20
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
