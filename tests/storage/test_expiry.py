"""Quarantine rows expire after quarantine.keep_days, in bounded batches,
on both backends; newer rows stay."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from gateway.pipeline import now_ms
from storage import tables
from storage.engine import create_engine
from storage.expiry import DAY_MS, QuarantineExpiry, expire
from storage.migrate import upgrade
from tests.support import database_sink, gateway, rejections_of, settings_for

pytestmark = pytest.mark.anyio


async def _rows(engine, ages_days: list[float]) -> None:
    now = now_ms()
    async with engine.begin() as conn:
        await conn.execute(tables.rejections.insert(), [
            {"project": "shop", "source": "cohorly", "reason": "old" if age > 30 else "new",
             "detail": f"{age}", "excerpt": "", "received_at": now - int(age * DAY_MS)}
            for age in ages_days
        ])


async def _reasons(engine) -> dict[str, int]:
    r = tables.rejections
    async with engine.connect() as conn:
        rows = await conn.execute(select(r.c.reason, func.count()).group_by(r.c.reason))
        return dict(rows.all())  # type: ignore[arg-type]


async def test_rows_older_than_keep_days_are_deleted_in_batches(backend) -> None:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    try:
        await _rows(engine, [31 + n / 10 for n in range(25)] + [29.9, 1, 0])
        deleted = await expire(engine, now_ms() - 30 * DAY_MS, batch=4, pause=0)
        assert deleted == 25
        assert await _reasons(engine) == {"new": 3}
        assert await expire(engine, now_ms() - 30 * DAY_MS, batch=4, pause=0) == 0
        # The task the writer starts: one run soon after start.
        await _rows(engine, [40, 2])
        expiry = QuarantineExpiry(engine, 30, now_ms, interval=3600, first_after=0)
        assert await expiry.run_once() == 1
        assert await _reasons(engine) == {"new": 4}
    finally:
        await engine.dispose()


async def test_the_gateway_expires_the_quarantine_by_itself(backend) -> None:
    """keep_days from the config; the writer's task runs shortly after start
    (here at once) and leaves ingestion alone."""
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    await _rows(engine, [45, 3])
    writer = database_sink(engine, keep_days=10)
    writer._expiry._first_after = 0  # type: ignore[union-attr]
    writer.start()
    try:
        for _ in range(100):
            if (await _reasons(engine)).get("old") is None:
                break
            await asyncio.sleep(0.05)
    finally:
        await writer.close()
    assert await _reasons(engine) == {"new": 1}
    async with gateway(settings_for(backend, quarantine={"keep_days": 0})) as client:
        assert len(await rejections_of(client)) == 1
    await engine.dispose()
