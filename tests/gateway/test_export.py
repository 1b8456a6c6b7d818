"""Exports end to end, both backends: 100,000 events through `dialgate
export` in a process of its own (peak memory, and every event equal to the
admin API's), read back from Parquet and CSV, and the admin API's streamed
NDJSON export, cut short when the database fails midway."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncpg
import httpx
import pyarrow.parquet as pq
import pytest

from gateway.export import Format, ndjson_lines
from storage.export import COLUMNS, Kind
from tests.export_support import admin_pages, config_file, run_cli, seed
from tests.support import ADMIN, gateway, live_server, settings_for

pytestmark = pytest.mark.anyio

EVENTS = 100_000
MAX_RSS_KB = 150 * 1024


async def test_100k_events_export_in_bounded_memory_and_round_trip(backend, tmp_path: Path) -> None:
    await seed(backend["storage_url"], EVENTS)
    await seed(backend["storage_url"], 50, project="blog")
    config = config_file(tmp_path, backend)
    out = tmp_path / "events.ndjson"
    status, _, err, rss = run_cli("export", "--config", str(config), "--project", "shop", "-o", str(out))
    print(f"{backend['name']}: ndjson export peak RSS {rss / 1024:.0f} MB")
    assert status == 0, err
    assert err == b""  # stderr is not a terminal: quiet
    assert rss < MAX_RSS_KB, f"peak RSS {rss / 1024:.0f} MB"
    async with gateway(settings_for(backend)) as client:
        with out.open("rb") as lines:
            count = 0
            async for expected in admin_pages(client):
                assert json.loads(lines.readline()) == expected
                count += 1
            assert lines.readline() == b""
    assert count == EVENTS

    parquet = tmp_path / "events.parquet"
    status, _, err, rss = run_cli("export", "--config", str(config), "--project", "shop", "--format", "parquet",
                                  "-o", str(parquet))
    print(f"{backend['name']}: parquet export peak RSS {rss / 1024:.0f} MB")
    assert status == 0, err
    assert rss < MAX_RSS_KB, f"peak RSS {rss / 1024:.0f} MB"
    table = pq.ParquetFile(parquet)
    assert table.schema_arrow.names == list(COLUMNS[Kind.EVENTS])
    assert str(table.schema_arrow.field("time").type) == "int64"
    assert str(table.schema_arrow.field("consent").type) == "bool"
    with out.open("rb") as lines:
        for batch in table.iter_batches(batch_size=5000):
            for row in batch.to_pylist():
                expected = json.loads(lines.readline())
                row["properties"], row["context"] = json.loads(row["properties"]), json.loads(row["context"])
                assert row == expected
        assert lines.readline() == b""


async def test_csv_has_its_columns_with_nested_values_as_json(backend, tmp_path: Path) -> None:
    await seed(backend["storage_url"], 300)
    config = config_file(tmp_path, backend)
    status, out, err, _ = run_cli("export", "--config", str(config), "--project", "shop", "--format", "csv")
    assert status == 0, err
    rows = list(csv.reader(io.StringIO(out.decode("utf-8"), newline="")))
    assert rows[0] == list(COLUMNS[Kind.EVENTS])
    async with gateway(settings_for(backend)) as client:
        expected = [e async for e in admin_pages(client)]
    assert len(rows) == 1 + len(expected) == 301
    for row, event in zip(rows[1:], expected, strict=True):
        got = dict(zip(rows[0], row, strict=True))
        assert json.loads(got["properties"]) == event["properties"]
        assert json.loads(got["context"]) == event["context"]
        assert got["consent"] == {None: "", True: "true", False: "false"}[event["consent"]]
        assert got["distinct_id"] == (event["distinct_id"] or "")
        assert int(got["time"]) == event["time"] and int(got["received_at"]) == event["received_at"]
        assert got["id"] == event["id"] and got["name"] == event["name"]


async def test_other_kinds_in_every_format(backend, tmp_path: Path) -> None:
    async with gateway(settings_for(backend)) as client:
        for who, plan in (("ada", "pro"), ("bob", "free")):
            reply = await client.post("/engage", headers={"X-Cohorly-Token": "tok_shop"},
                                      json={"$distinct_id": who, "$set": {"plan": plan}})
            assert reply.status_code == 200
        assert (await client.post("/alias", headers={"X-Cohorly-Token": "tok_shop"},
                                  json={"alias": "anon", "distinct_id": "ada"})).status_code == 200
        profiles = [(await client.get(f"/admin/v1/projects/shop/profiles/{who}", headers=ADMIN)).json()
                    for who in ("ada", "bob")]
    config = config_file(tmp_path, backend)
    status, out, err, _ = run_cli("export", "--config", str(config), "--project", "shop", "--kind", "profiles")
    assert status == 0, err
    assert [json.loads(line) for line in out.splitlines()] == profiles
    status, out, err, _ = run_cli("export", "--config", str(config), "--project", "shop", "--kind", "aliases",
                                  "--format", "csv")
    assert status == 0, err
    rows = list(csv.reader(io.StringIO(out.decode(), newline="")))
    assert rows[0] == list(COLUMNS[Kind.ALIASES])
    assert [r[:4] for r in rows[1:]] == [["anon", "ada", "ada", "cohorly"]]
    parquet = tmp_path / "profiles.parquet"
    status, _, err, _ = run_cli("export", "--config", str(config), "--project", "shop", "--kind", "profiles",
                                "--format", "parquet", "-o", str(parquet))
    assert status == 0, err
    read = pq.read_table(parquet).to_pylist()
    assert [{k: json.loads(v) if k != "distinct_id" else v for k, v in r.items()} for r in read] == profiles


async def test_the_admin_export_is_streamed_ndjson(backend) -> None:
    await seed(backend["storage_url"], 5000)
    settings = settings_for(backend)
    with live_server(settings) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with client.stream("GET", "/admin/v1/projects/shop/export", headers=ADMIN,
                                     params={"kind": "events", "since": "1765000000010", "until": "1765000049990"}
                                     ) as reply:
                assert reply.status_code == 200
                assert reply.headers["content-type"] == "application/x-ndjson"
                assert reply.headers["transfer-encoding"] == "chunked"
                assert "content-length" not in reply.headers
                body = b"".join([chunk async for chunk in reply.aiter_raw()])
            expected = [e async for e in admin_pages(client, since="1765000000010", until="1765000049990")]
            assert [json.loads(line) for line in body.splitlines()] == expected
            assert len(expected) == 4998  # events 1 to 4998 (time = base + 10 i)
            empty = await client.get("/admin/v1/projects/blog/export", headers=ADMIN)
            assert empty.status_code == 200 and empty.content == b""
            for query, message in (("kind=people", "kind must be one of events, profiles, aliases, groups"),
                                   ("kind=profiles&since=1", "since/until select events"),
                                   ("since=yesterday", "since must be epoch milliseconds or an ISO 8601"),
                                   ("since=5&until=5", "until must be after since"),
                                   ("format=csv", "unknown parameter 'format'")):
                reply = await client.get(f"/admin/v1/projects/shop/export?{query}", headers=ADMIN)
                assert reply.status_code == 400 and message in reply.json()["error"], (query, reply.text)
            assert (await client.get("/admin/v1/projects/nope/export", headers=ADMIN)).status_code == 404
            assert (await client.get("/admin/v1/projects/shop/export")).status_code == 401


def test_ndjson_lines_are_one_record_a_line() -> None:
    from storage.export import AliasRecord

    lines = ndjson_lines([AliasRecord("a\nb", "d", "p", "cohorly", 1), AliasRecord("c", "d", "p", "client", 2)])
    assert lines.count(b"\n") == 2 and lines.endswith(b"\n")
    assert json.loads(lines.splitlines()[0])["alias"] == "a\nb"
    assert [f.value for f in Format] == ["ndjson", "csv", "parquet"]


async def _terminate_export(dsn: str) -> int:
    """Terminate the server process running the export's statement; how many."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(200):
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND query LIKE '%CAST(events.properties AS TEXT)%'")
            if killed:
                return int(killed)
            await asyncio.sleep(0.05)
        return 0
    finally:
        await conn.close()


def _dsn(url: str) -> str:
    return "postgresql://" + url.removeprefix("postgresql+asyncpg://")


async def test_a_database_failure_midway_cuts_the_http_stream(postgres_backend) -> None:
    await seed(postgres_backend["storage_url"], 30_000)
    with live_server(settings_for(postgres_backend)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with client.stream("GET", "/admin/v1/projects/shop/export", headers=ADMIN) as reply:
                assert reply.status_code == 200
                chunks = reply.aiter_raw()
                received = len(await anext(chunks))
                # The server is held by this client's pace, its statement open.
                assert await _terminate_export(_dsn(postgres_backend["storage_url"])) == 1
                with pytest.raises(httpx.RemoteProtocolError):
                    async for chunk in chunks:
                        received += len(chunk)
            assert received > 0
            # The gateway goes on serving, on a fresh connection.
            reply = await client.get("/admin/v1/projects/shop/events?limit=1", headers=ADMIN)
            assert reply.status_code == 200 and len(reply.json()["events"]) == 1


async def test_a_client_going_away_ends_the_export(postgres_backend) -> None:
    await seed(postgres_backend["storage_url"], 30_000)
    with live_server(settings_for(postgres_backend)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with client.stream("GET", "/admin/v1/projects/shop/export", headers=ADMIN) as reply:
                assert reply.status_code == 200
                chunks = reply.aiter_raw()  # kept: a dropped iterator would close the answer at once
                assert len(await anext(chunks)) > 0
                assert await _exporting(_dsn(postgres_backend["storage_url"])) == 1
            # Gone after one chunk: the statement ends, its connection is let go.
            for _ in range(200):
                if await _exporting(_dsn(postgres_backend["storage_url"])) == 0:
                    break
                await asyncio.sleep(0.05)
            assert await _exporting(_dsn(postgres_backend["storage_url"])) == 0


async def _exporting(dsn: str) -> int:
    """Server processes inside the export's statement (not idle)."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state <> 'idle' "
            "AND pid <> pg_backend_pid() AND query LIKE '%CAST(events.properties AS TEXT)%'"))
    finally:
        await conn.close()


async def test_a_database_failure_midway_fails_the_cli(postgres_backend, tmp_path: Path) -> None:
    await seed(postgres_backend["storage_url"], 5000)
    config = config_file(tmp_path, postgres_backend)
    with _start(["export", "--config", str(config), "--project", "shop"]) as process:
        # Nothing reads stdout yet: the export stalls on a full pipe, mid-statement.
        assert await _terminate_export(_dsn(postgres_backend["storage_url"])) == 1
        drained: list[bytes] = []
        reader = threading.Thread(target=lambda: drained.append(process.stdout.read()))  # type: ignore[union-attr]
        reader.start()
        assert process.wait(timeout=60) == 1
        reader.join()
        err = process.stderr.read().decode()  # type: ignore[union-attr]
    assert "export failed, nothing complete was written" in err
    assert drained[0].count(b"\n") < 5000


async def test_a_failed_export_to_a_file_leaves_no_file(tmp_path: Path) -> None:
    config = config_file(tmp_path, {"storage_url": "postgresql+asyncpg://postgres@127.0.0.1:1/none"})
    target = tmp_path / "out.ndjson"
    started = time.monotonic()
    status, _, err, _ = run_cli("export", "--config", str(config), "--project", "shop", "-o", str(target))
    assert status == 1 and b"export failed" in err
    assert time.monotonic() - started < 60
    assert sorted(os.listdir(tmp_path)) == ["dialgate.toml"]


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
