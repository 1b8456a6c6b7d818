"""Quarantine rows expire after `quarantine.keep_days`.

A task beside the writer deletes rows received before the cutoff, a bounded
batch per statement (each its own short transaction), soon after start and
then every hour. Ingestion never waits for more than one batch: on SQLite a
batch holds the write lock a few milliseconds; on PostgreSQL rows other
transactions hold are skipped, not waited for. Several workers or gateways
may run it side by side: a row deleted twice is deleted once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import assert_never

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.background import BackgroundTask
from storage.engine import Backend, backend_of
from storage.faults import short

log = logging.getLogger("dialgate.expiry")

DAY_MS = 86_400_000

# The ids of one batch of old rows (the index on received_at finds them),
# then the rows. PostgreSQL: rows locked by another deleter are skipped.
_DELETE = {
    Backend.SQLITE: (
        "DELETE FROM rejections WHERE id IN "
        "(SELECT id FROM rejections WHERE received_at < :cutoff LIMIT :batch)"
    ),
    Backend.POSTGRESQL: (
        "DELETE FROM rejections WHERE id IN "
        "(SELECT id FROM rejections WHERE received_at < :cutoff LIMIT :batch FOR UPDATE SKIP LOCKED)"
    ),
}


async def expire(engine: AsyncEngine, cutoff_ms: int, *, batch: int = 1000, pause: float = 0.05) -> int:
    """Delete the rejections received before `cutoff_ms`, `batch` rows per
    statement with a pause between statements; the number deleted."""
    backend = backend_of(str(engine.url))
    if backend is Backend.SQLITE or backend is Backend.POSTGRESQL:
        statement = text(_DELETE[backend])
    else:
        assert_never(backend)
    total = 0
    while True:
        async with engine.begin() as conn:
            result = await conn.execute(statement, {"cutoff": cutoff_ms, "batch": batch})
        deleted = result.rowcount or 0
        total += deleted
        if deleted < batch:
            return total
        await asyncio.sleep(pause)


class QuarantineExpiry(BackgroundTask):
    def __init__(
        self,
        engine: AsyncEngine,
        keep_days: int,
        clock: Callable[[], int],
        *,
        interval: float = 3600.0,
        first_after: float = 60.0,
        batch: int = 1000,
    ) -> None:
        super().__init__("dialgate-quarantine-expiry")
        self._engine = engine
        self._keep_ms = keep_days * DAY_MS
        self._clock = clock
        self._interval = interval
        self._first_after = first_after
        self._batch = batch

    async def run_once(self) -> int:
        return await expire(self._engine, self._clock() - self._keep_ms, batch=self._batch)

    async def _run(self) -> None:
        await asyncio.sleep(self._first_after)
        while True:
            try:
                deleted = await self.run_once()
                if deleted:
                    log.info("quarantine: %d rows older than the keep period deleted", deleted)
            except Exception as exc:  # the database is down, say: next hour
                log.warning("quarantine expiry failed: %s", short(exc))
            await asyncio.sleep(self._interval)
