"""gateway.replay on both backends: quarantined records re-run through the
current dialect code and pipeline; what a fixed limit now admits is
stored, what is still refused is counted again; replaying twice stores
once; rows without a payload are reported, not replayed."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from gateway.pipeline import now_ms
from gateway.replay import parse_time, replay
from storage import tables
from storage.engine import create_engine
from tests.support import events_of, gateway, rejections_of, settings_for

pytestmark = pytest.mark.anyio

DIALGATE = Path(sys.executable).parent / "dialgate"
COLLECT = "tc_s=1234&token=src_shop"
SMALL = {"collect": {"max_event_bytes": 300}}


def _batch() -> dict[str, object]:
    user = {"id": "u1", "consistent_anonymous_id": "a1"}
    return {"batch": [
        {"event_name": "small", "user": user, "context": {"event_id": "s-1"}},
        {"event_name": "big", "user": user, "note": "x" * 400},  # no event_id: no insert id of its own
        {"user": user},  # no event name: refused by any version of the dialect
    ]}


async def _names(settings) -> list[str]:
    async with gateway(settings) as client:
        return sorted(e["name"] for e in await events_of(client))


async def test_replay_stores_what_the_current_pipeline_admits_once(backend) -> None:
    small = settings_for(backend, dialects=SMALL)
    async with gateway(small) as client:
        reply = await client.post(f"/events/batch?{COLLECT}", json=_batch(), headers={"User-Agent": "agent/1"})
        assert reply.status_code == 200, reply.text
        reasons = sorted(r["reason"] for r in await rejections_of(client, project="shop"))
        assert reasons == ["event_too_large", "no_event_name"]
    # A row from before payloads were kept.
    engine = create_engine(backend["storage_url"])
    async with engine.begin() as conn:
        await conn.execute(tables.rejections.insert().values(
            project="shop", source="collect", reason="event_too_large", detail="old", excerpt="{}",
            received_at=now_ms()))
    await engine.dispose()

    # Under the same limit: refused again, nothing stored.
    report = await replay(small, "shop", "event_too_large")
    assert (report.rows, report.replayed, report.stored, report.not_replayable) == (2, 1, 0, 1)
    assert report.quarantined_again == 1 and report.again == {"event_too_large": 1}
    assert await _names(small) == ["small"]

    # The limit raised (the fix): stored, with its request's context.
    fixed = settings_for(backend)
    report = await replay(fixed, "shop", "event_too_large")
    assert (report.replayed, report.stored, report.duplicates, report.quarantined_again) == (1, 1, 0, 0)
    async with gateway(fixed) as client:
        big = [e for e in await events_of(client) if e["name"] == "big"]
        assert len(big) == 1 and big[0]["distinct_id"] == "u1"
        assert big[0]["context"]["user_agent"] == "agent/1"
        assert big[0]["insert_id"].startswith("replay:")
        # Still in the quarantine (retention removes it), not quarantined twice.
        assert len(await rejections_of(client, project="shop")) == 3

    # Twice: stored once.
    report = await replay(fixed, "shop", "event_too_large")
    assert (report.replayed, report.stored, report.duplicates) == (1, 0, 1)
    assert await _names(fixed) == ["big", "small"]

    # What no version admits is counted again, every time.
    report = await replay(fixed, "shop", "no_event_name")
    assert (report.replayed, report.stored, report.again) == (1, 0, {"no_event_name": 1})


async def test_since_limits_the_rows_and_the_cli_reports_json(backend, tmp_path) -> None:
    settings = settings_for(backend, dialects=SMALL)
    async with gateway(settings) as client:
        assert (await client.post(f"/events/batch?{COLLECT}", json=_batch())).status_code == 200
    later = now_ms() + 60_000
    report = await replay(settings_for(backend), "shop", "event_too_large", since_ms=later)
    assert report.rows == 0
    config = tmp_path / "dialgate.toml"
    config.write_text("\n".join([
        "[storage]", f'url = "{backend["storage_url"]}"',
        "[redis]", f'url = "{backend["redis_url"]}"', f'key_prefix = "{backend["redis_prefix"]}"',
        "[[projects]]", 'name = "shop"', 'collect_sources = [{ site = 1234, token = "src_shop" }]', "",
    ]))

    async def cli(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            str(DIALGATE), "replay", "--config", str(config), *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "DIALGATE_CONFIG": ""})
        out, err = await process.communicate()
        return process.returncode or 0, out.decode(), err.decode()

    code, out, err = await cli("--project", "shop", "--reason", "event_too_large", "--since", "2026-01-01")
    assert code == 0, err
    assert json.loads(out)["stored"] == 1
    code, out, err = await cli("--project", "shop", "--reason", "event_too_large")
    assert code == 0 and json.loads(out)["duplicates"] == 1, err
    code, _, err = await cli("--project", "nope", "--reason", "x")
    assert code == 2 and "unknown project" in err
    code, _, err = await cli("--project", "shop", "--reason", "x", "--since", "yesterday")
    assert code == 2 and "not a time" in err


async def test_a_mixpanel_import_record_replays_through_import(backend) -> None:
    settings = settings_for(backend)
    async with gateway(settings) as client:
        reply = await client.post("/import", auth=("mp_shop", ""), json=[
            {"event": "ok", "properties": {"distinct_id": "m1", "time": 1_700_000_000, "$insert_id": "i-1"}},
            {"event": "bad", "properties": {"distinct_id": "m1", "time": "later"}},
        ])
        assert reply.status_code == 200, reply.text
        assert [r["reason"] for r in await rejections_of(client, project="shop")] == ["invalid"]
    report = await replay(settings, "shop", "invalid")
    assert (report.replayed, report.stored, report.not_replayable) == (1, 0, 0)
    assert report.again == {"invalid": 1}
    assert await _names(settings) == ["ok"]


def test_times_are_unix_ms_or_iso_8601() -> None:
    assert parse_time("1700000000000") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000_000  # UTC unless it says
    assert parse_time("2023-11-15T00:13:20+02:00") == 1_700_000_000_000
    with pytest.raises(ValueError, match="not a time"):
        parse_time("soon")
