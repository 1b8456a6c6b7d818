"""Retention: how long events and quarantine rows are kept, `dialgate
prune`, and the daily prune inside `serve`.

Every worker of every gateway starts the daily task; at the hour, the one
that claims the day in the database (storage.prune.claim) prunes, the
others sleep until the next day. The task sleeps in between: the request
path never sees it, and its deletes are the bounded batches of
storage.prune.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.checks import ConfigError
from storage.background import BackgroundTask
from storage.expiry import DAY_MS
from storage.prune import Pruned, claim, prune

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from gateway.config import Settings

log = logging.getLogger("dialgate.retention")

# Quarantine rows are kept this many days unless configured.
QUARANTINE_DAYS = 30
# `daily = true`: minutes after midnight UTC.
DEFAULT_AT = 3 * 60
_CLOCK = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


def quarantine_days(settings: Settings) -> int:
    """`[retention] quarantine_days`, else the deprecated `[quarantine]
    keep_days`, else 30."""
    given = settings.retention.quarantine_days
    if given is not None:
        return given
    old = settings.quarantine.keep_days
    return old if old is not None else QUARANTINE_DAYS


def daily_at(settings: Settings) -> int | None:
    """Minutes after midnight UTC of the daily prune; None: no daily prune."""
    daily = settings.retention.daily
    if daily is False or daily == "":
        return None
    if daily is True:
        return DEFAULT_AT
    found = _CLOCK.fullmatch(daily)
    if found is None:
        raise ConfigError(f'retention.daily: expected true, false or "HH:MM" (UTC), got {daily!r}')
    return int(found[1]) * 60 + int(found[2])


def check(settings: Settings) -> None:
    daily_at(settings)
    old, new = settings.quarantine.keep_days, settings.retention.quarantine_days
    if old is None:
        return
    if new is not None and new != old:
        raise ConfigError(f"quarantine.keep_days ({old}) and retention.quarantine_days ({new}) disagree; "
                          "keep retention.quarantine_days only")
    log.warning("quarantine.keep_days is deprecated: write retention.quarantine_days = %d instead", old)


def cutoffs(settings: Settings, now_ms: int) -> tuple[int | None, int | None]:
    """The times before which events and quarantine rows go (None: kept)."""
    events, quarantine = settings.retention.events_days, quarantine_days(settings)
    return (now_ms - events * DAY_MS if events else None,
            now_ms - quarantine * DAY_MS if quarantine else None)


class DailyPrune(BackgroundTask):
    def __init__(self, engine: AsyncEngine, settings: Settings, at_minute: int, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__("dialgate-daily-prune")
        self._engine = engine
        self._settings = settings
        self._at = at_minute
        self._clock = clock

    def seconds_to_next(self) -> float:
        now = self._clock()
        at = (now // 86400) * 86400 + self._at * 60
        return at - now if at > now else at + 86400 - now

    async def run_once(self) -> Pruned | None:
        """Prune, if this process claims today's run; None if another did."""
        now_ms = int(self._clock() * 1000)
        if not await claim(self._engine, "prune", now_ms // DAY_MS):
            return None
        events_before, rejections_before = cutoffs(self._settings, now_ms)
        return await prune(self._engine, events_before=events_before, rejections_before=rejections_before)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.seconds_to_next())
            try:
                pruned = await self.run_once()
                if pruned is not None:
                    log.info("daily prune: %d events and %d quarantine rows deleted",
                             pruned.total_events, pruned.rejections)
            except Exception as exc:  # the database is down, say: tomorrow
                log.warning("daily prune failed: %s: %s", type(exc).__name__, str(exc)[:200])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`dialgate prune`: no options beyond --config."""


async def command(settings: Settings, args: argparse.Namespace) -> int:
    from storage.engine import create_engine

    events_before, rejections_before = cutoffs(settings, time.time_ns() // 1_000_000)
    if events_before is None and rejections_before is None:
        print("nothing to prune: retention.events_days and retention.quarantine_days are 0 (keep forever)")
        return 0
    engine = create_engine(settings.storage.url)
    try:
        pruned = await prune(engine, events_before=events_before, rejections_before=rejections_before)
    finally:
        await engine.dispose()
    if events_before is None:
        print("events: kept (retention.events_days = 0)")
    else:
        print(f"events: {pruned.total_events} deleted (time older than {settings.retention.events_days} days)")
        for project, count in sorted(pruned.events.items()):
            print(f"  {project}: {count}")
    if rejections_before is None:
        print("quarantine: kept (retention.quarantine_days = 0)")
    else:
        print(f"quarantine: {pruned.rejections} deleted (received more than {quarantine_days(settings)} days ago)")
    return 0
