"""The storage ceilings: one Python process inserting 500-event batches
straight into the database, with the same unique key as Dialgate.

    python bench/ceiling.py postgres DSN SECONDS
    python bench/ceiling.py sqlite PATH SECONDS

Prints one JSON line: {"events_per_s": ...}.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
import uuid

BATCH = 500
COLUMNS = "project, source, name, distinct_id, time, received_at, insert_id, properties, context"


def _rows(n: int) -> list[tuple]:
    prefix = uuid.uuid4().hex
    now = int(time.time() * 1000)
    props = json.dumps({"plan": "pro", "n": 1, "$lib": "bench"})
    context = json.dumps({"ip": "127.0.0.1"})
    return [("ceiling", "cohorly", "e", "u", now, now, f"{prefix}-{i}", props, context) for i in range(n)]


async def postgres(dsn: str, seconds: float) -> float:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS ceiling_events (
             id bigserial PRIMARY KEY, project varchar(200) NOT NULL, source varchar(50) NOT NULL,
             name text NOT NULL, distinct_id text, time bigint NOT NULL, received_at bigint NOT NULL,
             insert_id varchar(255), properties jsonb NOT NULL, context jsonb NOT NULL,
             UNIQUE (project, source, insert_id))"""
    )
    await conn.execute("TRUNCATE ceiling_events")
    sql = f"""INSERT INTO ceiling_events ({COLUMNS})
              SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::text[], $4::text[], $5::bigint[],
                                   $6::bigint[], $7::varchar[], $8::jsonb[], $9::jsonb[])
              ON CONFLICT (project, source, insert_id) DO NOTHING"""
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        columns = list(zip(*_rows(BATCH), strict=True))
        await conn.execute(sql, *columns)
        done += BATCH
    elapsed = time.perf_counter() - started
    await conn.execute("DROP TABLE ceiling_events")
    await conn.close()
    return done / elapsed


def sqlite(path: str, seconds: float) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # the gateway's own setting
    db.execute(
        """CREATE TABLE IF NOT EXISTS events (
             id INTEGER PRIMARY KEY, project TEXT NOT NULL, source TEXT NOT NULL, name TEXT NOT NULL,
             distinct_id TEXT, time INTEGER NOT NULL, received_at INTEGER NOT NULL, insert_id TEXT,
             properties TEXT NOT NULL, context TEXT NOT NULL, UNIQUE (project, source, insert_id))"""
    )
    sql = f"INSERT OR IGNORE INTO events ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(sql, _rows(BATCH))
        db.execute("COMMIT")
        done += BATCH
    elapsed = time.perf_counter() - started
    db.close()
    return done / elapsed


if __name__ == "__main__":
    kind, target, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
    rate = asyncio.run(postgres(target, secs)) if kind == "postgres" else sqlite(target, secs)
    print(json.dumps({"events_per_s": rate}))
