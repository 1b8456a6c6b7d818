"""Database errors classified by what they are, taken from the real servers:
only a data error may become a 4xx; a lost connection, a server going away
or read-only after a failover, a timeout, a lock are "unavailable"."""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from storage.engine import create_engine
from storage.faults import Fault, classify, is_unavailable

pytestmark = pytest.mark.anyio


async def _pg_error(dsn: str, *statements: str) -> BaseException:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    except Exception as exc:
        return exc
    finally:
        await conn.close()
    raise AssertionError("no error")


async def test_postgres_errors(postgres_backend) -> None:
    url = make_url(postgres_backend["storage_url"])
    dsn = f"postgresql://{url.username}@{url.host}:{url.port}/{url.database}"
    read_only = await _pg_error(dsn, "BEGIN READ ONLY", "CREATE TEMP TABLE t (x int)")
    assert classify(read_only) is Fault.LOST  # 25006: a standby now
    timeout = await _pg_error(dsn, "SET statement_timeout = 10", "SELECT pg_sleep(1)")
    assert classify(timeout) is Fault.BUSY
    out_of_range = await _pg_error(dsn, "SELECT 99999999999999999999::bigint")
    assert classify(out_of_range) is Fault.DATA
    nul = await _pg_error(dsn, "SELECT '{\"a\": \"\\u0000\"}'::jsonb")
    assert classify(nul) is Fault.DATA

    victim = await asyncpg.connect(dsn)
    admin = await asyncpg.connect(dsn)
    pid = victim.get_server_pid()
    assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    await admin.close()
    await asyncio.sleep(0.2)
    try:
        await victim.execute("SELECT 1")
    except Exception as exc:
        assert classify(exc) is Fault.LOST and is_unavailable(exc), repr(exc)
    else:
        raise AssertionError("a terminated connection answered")
    finally:
        victim.terminate()

    refused = None
    try:
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{_closed_port()}/x", timeout=2)
    except Exception as exc:
        refused = exc
    assert refused is not None and classify(refused) is Fault.LOST

    # Through SQLAlchemy: the same answers, wrapped.
    engine = create_engine(postgres_backend["storage_url"])
    try:
        async with engine.connect() as conn:
            with pytest.raises(Exception) as caught:
                await conn.execute(text("SELECT 99999999999999999999::bigint"))
        assert classify(caught.value) is Fault.DATA and not is_unavailable(caught.value)
    finally:
        await engine.dispose()


async def test_a_checkout_racing_a_renewal_is_lost_not_a_bug(postgres_backend) -> None:
    """Lanes renewing the pool one after another can leave a checkout with no
    connection at all (SQLAlchemy gives up after two invalidations: "This
    connection is closed"); nothing was sent, so it is a lost connection to
    retry, not an unexpected error logged with a traceback."""
    from sqlalchemy import event

    from storage.faults import renew_connections

    engine = create_engine(postgres_backend["storage_url"])
    # Another lane renews again while this checkout is being retried.
    event.listen(engine.sync_engine, "checkout", lambda *_: renew_connections(engine), insert=True)
    try:
        renew_connections(engine)
        with pytest.raises(Exception) as caught:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        assert "connection is closed" in str(caught.value), repr(caught.value)
        assert classify(caught.value) is Fault.LOST and is_unavailable(caught.value)
    finally:
        await engine.dispose()


def _closed_port() -> int:
    from tests.support import free_port

    return free_port()


def test_sqlite_errors(tmp_path) -> None:
    path = str(tmp_path / "x.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER PRIMARY KEY, y TEXT NOT NULL)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, isolation_level=None, timeout=0.05)
    with pytest.raises(sqlite3.OperationalError) as locked:
        other.execute("BEGIN IMMEDIATE")
    assert classify(locked.value) is Fault.BUSY and is_unavailable(locked.value)
    holder.execute("ROLLBACK")
    with pytest.raises(sqlite3.IntegrityError) as constraint:
        other.execute("INSERT INTO t (x, y) VALUES (1, NULL)")
    assert classify(constraint.value) is Fault.DATA
    with pytest.raises(OverflowError) as overflow:
        other.execute("INSERT INTO t (x, y) VALUES (?, 'a')", (2**70,))
    assert classify(overflow.value) is Fault.DATA
    (tmp_path / "not.db").write_bytes(b"this is not a database file, not at all" * 200)
    garbage = sqlite3.connect(str(tmp_path / "not.db"))
    with pytest.raises(sqlite3.DatabaseError) as notadb:
        garbage.execute("SELECT * FROM sqlite_master")
    assert classify(notadb.value) is Fault.LOST
    for conn in (holder, other, garbage):
        conn.close()
    assert classify(RuntimeError("a bug of ours")) is Fault.OTHER and not is_unavailable(RuntimeError())
