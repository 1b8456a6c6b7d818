"""[retention]: the settings (and the deprecated quarantine.keep_days), the
daily prune's schedule and its one run a day, inside a running gateway."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.checks import ConfigError
from gateway.config import from_dict
from gateway.pipeline import now_ms
from gateway.retention import DailyPrune, cutoffs, daily_at, quarantine_days
from storage import tables
from storage.engine import create_engine
from storage.expiry import DAY_MS
from storage.migrate import upgrade
from tests.support import events_of, gateway, settings_for

pytestmark = pytest.mark.anyio


def test_quarantine_days_come_from_retention_then_the_old_key_then_30(caplog) -> None:
    assert quarantine_days(from_dict({}, {})) == 30
    assert quarantine_days(from_dict({"retention": {"quarantine_days": 0}}, {})) == 0
    with caplog.at_level(logging.WARNING, "dialgate.retention"):
        old = from_dict({"quarantine": {"keep_days": 12}}, {})
    assert quarantine_days(old) == 12
    assert "quarantine.keep_days is deprecated" in caplog.text
    both = from_dict({"quarantine": {"keep_days": 12}, "retention": {"quarantine_days": 12}}, {})
    assert quarantine_days(both) == 12
    with pytest.raises(ConfigError, match="disagree"):
        from_dict({"quarantine": {"keep_days": 12}, "retention": {"quarantine_days": 7}}, {})
    with pytest.raises(ConfigError, match=r"retention\.events_days: must be 0 or more"):
        from_dict({"retention": {"events_days": -1}}, {})


@pytest.mark.parametrize(("daily", "minutes"), [(False, None), (True, 180), ("00:00", 0), ("23:59", 1439)])
def test_daily_is_off_true_or_a_utc_time(daily, minutes) -> None:
    assert daily_at(from_dict({"retention": {"daily": daily}}, {})) == minutes


@pytest.mark.parametrize("daily", ["24:00", "3:00", "03:60", "noon"])
def test_a_bad_daily_time_is_a_config_error(daily) -> None:
    with pytest.raises(ConfigError, match=r"retention\.daily"):
        from_dict({"retention": {"daily": daily}}, {})


def test_cutoffs_are_none_for_kept_data() -> None:
    now = 100 * DAY_MS
    assert cutoffs(from_dict({"retention": {"quarantine_days": 0}}, {}), now) == (None, None)
    assert cutoffs(from_dict({"retention": {"events_days": 7}}, {}), now) == (93 * DAY_MS, 70 * DAY_MS)


def test_the_next_run_is_today_at_the_hour_or_tomorrow() -> None:
    settings = from_dict({}, {})
    day = 20_000 * 86400.0
    early = DailyPrune(None, settings, 180, clock=lambda: day + 3600)  # type: ignore[arg-type]
    assert early.seconds_to_next() == 2 * 3600
    late = DailyPrune(None, settings, 180, clock=lambda: day + 4 * 3600)  # type: ignore[arg-type]
    assert late.seconds_to_next() == 23 * 3600


async def test_the_daily_prune_runs_once_a_day_across_workers(backend) -> None:
    settings = settings_for(backend, retention={"events_days": 30, "daily": True})
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    now = now_ms()
    async with engine.begin() as conn:
        await conn.execute(tables.events.insert(), [
            {"project": "shop", "source": "cohorly", "name": "e", "distinct_id": "u", "time": now - age * DAY_MS,
             "received_at": now, "properties": {}, "context": {}} for age in (45, 45, 1)
        ])
    clock = [now / 1000]
    try:
        workers = [DailyPrune(engine, settings, 180, clock=lambda: clock[0]) for _ in range(2)]
        first = await workers[0].run_once()
        assert first is not None and first.events == {"shop": 2}
        assert await workers[1].run_once() is None  # the day is taken
        clock[0] += 86400
        assert await workers[1].run_once() is not None  # the next day's is anyone's
        async with engine.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(tables.events))).scalar() == 1
    finally:
        await engine.dispose()


async def test_a_gateway_with_the_daily_prune_serves_as_before(backend) -> None:
    settings = settings_for(backend, retention={"events_days": 30, "daily": "04:30"})
    async with gateway(settings) as client:
        reply = await client.post("/track", headers={"X-Cohorly-Token": "tok_shop"},
                                  json=[{"event": "kept", "properties": {"distinct_id": "u1"}}])
        assert reply.status_code == 200
        assert [e["name"] for e in await events_of(client)] == ["kept"]
        assert "dialgate-daily-prune" in _tasks()
    assert "dialgate-daily-prune" not in _tasks()  # stopped with the gateway


def _tasks() -> set[str]:
    return {task.get_name() for task in asyncio.all_tasks()}


async def test_dialgate_prune_says_what_it_kept_and_a_database_error_in_one_line(tmp_path) -> None:
    dialgate = str(Path(sys.executable).parent / "dialgate")
    env = {**os.environ, "DIALGATE_CONFIG": "", "DIALGATE_STORAGE__URL": f"sqlite+aiosqlite:///{tmp_path}/d.db"}

    async def run(**extra: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(dialgate, "prune", stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE, env={**env, **extra})
        out, err = await process.communicate()
        return process.returncode or 0, out.decode(), err.decode()

    code, out, _ = await run(DIALGATE_RETENTION__QUARANTINE_DAYS="0")
    assert code == 0 and "nothing to prune" in out
    code, _, err = await run(DIALGATE_RETENTION__EVENTS_DAYS="3")  # not migrated
    assert code == 1 and "prune: database error: no such table" in err and "Traceback" not in err
