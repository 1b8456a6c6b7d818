"""A gateway's first write on SQLite waits for the write lock another
process holds, as every later write does, on both of SQLite's routes."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest

from storage.engine import create_engine
from storage.migrate import upgrade
from tests.support import events_of, gateway, props_of, settings_for

pytestmark = pytest.mark.anyio

COHORLY = {"X-Cohorly-Token": "tok_shop"}


def _hold_write_lock(path: str, seconds: float, taken: threading.Event) -> threading.Thread:
    """Another process's writer: BEGIN IMMEDIATE held for `seconds`."""

    def hold() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            taken.set()
            time.sleep(seconds)
            conn.execute("COMMIT")
        finally:
            conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    return thread


@pytest.mark.parametrize("route", ["events", "profile"])
async def test_the_first_write_waits_for_a_write_lock_held_elsewhere(sqlite_backend, route: str) -> None:
    path = sqlite_backend["storage_url"].split("///", 1)[1]
    # Migrated beforehand, as `dialgate serve` does before its workers start:
    # the worker's gateway opens its first connections for its first write.
    engine = create_engine(sqlite_backend["storage_url"])
    await upgrade(engine)
    await engine.dispose()
    async with gateway(settings_for(sqlite_backend, storage={"migrate_on_start": False})) as client:
        taken = threading.Event()
        holder = _hold_write_lock(path, 1.0, taken)
        try:
            assert await asyncio.to_thread(taken.wait, 5)
            started = time.monotonic()
            if route == "events":
                reply = await client.post("/track", headers=COHORLY,
                                          json=[{"event": "first", "properties": {"distinct_id": "u1"}}])
            else:
                reply = await client.post("/engage", headers=COHORLY, json={"$distinct_id": "u1", "$set": {"a": 1}})
            waited = time.monotonic() - started
        finally:
            await asyncio.to_thread(holder.join)
        assert reply.status_code == 200, reply.text
        assert waited > 0.5  # it waited for the lock, not failed or skipped it
        if route == "events":
            assert [e["name"] for e in await events_of(client)] == ["first"]
        else:
            assert await props_of(client, "u1") == {"a": 1}
