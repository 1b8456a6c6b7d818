"""Export throughput against a plain read of the same rows, in one run.

    .venv/bin/python bench/export.py                      # both backends, 200,000 events
    .venv/bin/python bench/export.py --backend postgres --events 500000

Seeds a fresh database (a SQLite file in a temporary folder; the PostgreSQL
database `dialgate_bench_export` on --pg-dsn, dropped after) with N events
of a typical size (~400 bytes of JSON each), then times, alternating, --rounds
times each:
- driver: the export's own statement (`storage.export`) run straight
  through the backend's driver (asyncpg cursor / aiosqlite), rows fetched
  and dropped, nothing decoded;
- cli: `dialgate export --project shop -o /dev/null` (NDJSON), the whole
  process, start-up included;
- in-process: `gateway.export.export` to /dev/null, without the start-up;
- cli - start: the cli's time less that of the same command exporting an
  empty project (the interpreter's start, imports, connecting), measured
  right after it: the export's own rate.
Prints events/s (the median round) and each against the driver.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert  # noqa: E402

from gateway.export import Format, export  # noqa: E402
from storage import tables  # noqa: E402
from storage.engine import Backend, backend_of, create_engine  # noqa: E402
from storage.export import EVERYTHING, Kind, _query  # noqa: E402
from storage.migrate import upgrade  # noqa: E402

DB = "dialgate_bench_export"


def event_row(i: int) -> dict[str, object]:
    return {
        "project": "shop", "source": "cohorly", "name": f"Event {i % 13}", "distinct_id": f"user-{i % 5000}",
        "anonymous_id": f"anon-{i % 7000}", "user_id": f"user-{i % 5000}", "time": 1_765_000_000_000 + i * 37,
        "received_at": 1_765_000_000_000 + i * 37 + 120, "insert_id": f"ins-{i}", "session_id": f"s-{i // 50}",
        "properties": {"plan": "pro", "n": i, "price": 49.99, "$lib": "python", "$lib_version": "0.2.0",
                       "tags": ["a", "b"], "page": {"path": f"/p/{i % 300}", "title": "Catalogue"}},
        "context": {"ip": "203.0.113.7", "user_agent": "Mozilla/5.0 (X11; Linux x86_64)", "lib": {"name": "python"}},
        "consent": (None, True, False)[i % 3],
    }


async def seed(url: str, n: int) -> None:
    engine = create_engine(url)
    await upgrade(engine)
    async with engine.begin() as conn:
        for start in range(0, n, 5000):
            await conn.execute(insert(tables.events), [event_row(i) for i in range(start, min(n, start + 5000))])
    await engine.dispose()


def plain_sql(url: str) -> str:
    """The export's statement, with the columns as stored (no casts)."""
    engine = create_engine(url)
    query = _query(Kind.EVENTS, "shop", EVERYTHING, backend_of(url))
    sql = str(query.compile(engine.sync_engine, compile_kwargs={"literal_binds": True}))
    for column in ("id", "properties", "context"):
        sql = sql.replace(f"CAST(events.{column} AS TEXT) AS {column}", f"events.{column}")
    return sql


async def driver_read(url: str, sql: str) -> int:
    rows = 0
    if backend_of(url) is Backend.POSTGRESQL:
        import asyncpg

        conn = await asyncpg.connect("postgresql://" + url.split("://", 1)[1])
        try:
            async with conn.transaction(isolation="repeatable_read"):
                cursor = await conn.cursor(sql)
                while batch := await cursor.fetch(1000):
                    rows += len(batch)
        finally:
            await conn.close()
        return rows
    import aiosqlite

    async with aiosqlite.connect(url.split(":///", 1)[1]) as db, db.execute(sql) as cursor:
        while batch := await cursor.fetchmany(1000):
            rows += len(batch)
    return rows


async def in_process(url: str, out: BinaryIO) -> int:
    engine = create_engine(url)
    try:
        return await export(engine, "shop", Kind.EVENTS, Format.NDJSON, out)
    finally:
        await engine.dispose()


def cli(config: Path, project: str = "shop") -> int:
    subprocess.run([sys.executable, "-m", "gateway.cli", "export", "--config", str(config), "--project", project,
                    "-o", os.devnull], check=True, cwd=ROOT)
    return -1


def timed(run: Callable[[], int]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bench(url: str, n: int, rounds: int, folder: Path) -> None:
    config = folder / "bench.toml"
    config.write_text(f'[storage]\nurl = "{url}"\n[[projects]]\nname = "shop"\ncohorly_tokens = ["tok"]\n'
                      '[[projects]]\nname = "empty"\ncohorly_tokens = ["tok2"]\n')
    start = time.perf_counter()
    asyncio.run(seed(url, n))
    print(f"  seeded {n:,} events in {time.perf_counter() - start:.1f} s")
    sql = plain_sql(url)
    print(f"  statement: {sql}".replace("\n", " "))
    times: dict[str, list[float]] = {"driver": [], "cli": [], "in-process": [], "cli - start": []}
    for _ in range(rounds):
        times["driver"].append(timed(lambda: asyncio.run(driver_read(url, sql))))
        times["cli"].append(timed(lambda: cli(config)))
        # The same process exporting an empty project: start-up, imports,
        # connection, nothing read.
        times["cli - start"].append(times["cli"][-1] - timed(lambda: cli(config, "empty")))
        with open(os.devnull, "wb") as out:
            times["in-process"].append(timed(lambda: asyncio.run(in_process(url, out))))
    base = n / statistics.median(times["driver"])
    for name, seconds in times.items():
        rate = n / statistics.median(seconds)
        print(f"  {name:<11} {rate:>10,.0f} events/s  {rate / base:4.2f}x driver"
              f"  (rounds: {', '.join(f'{s:.2f}' for s in seconds)} s)")


async def pg_admin(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.backend in ("sqlite", "both"):
            print("sqlite")
            bench(f"sqlite+aiosqlite:///{folder}/bench.db", args.events, args.rounds, folder)
        if args.backend in ("postgres", "both"):
            print("postgres")
            base = args.pg_dsn.rsplit("/", 1)[0]
            asyncio.run(pg_admin(args.pg_dsn, f'DROP DATABASE IF EXISTS "{DB}"'))
            asyncio.run(pg_admin(args.pg_dsn, f'CREATE DATABASE "{DB}"'))
            try:
                bench("postgresql+asyncpg://" + f"{base}/{DB}".split("://", 1)[1], args.events, args.rounds, folder)
            finally:
                asyncio.run(pg_admin(args.pg_dsn, f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)'))
    return 0


if __name__ == "__main__":
    sys.exit(main())
