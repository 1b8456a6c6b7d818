"""One engine factory per backend, each setting explained."""

from __future__ import annotations

import enum
import re
from typing import Any, assert_never

import msgspec
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from storage.faults import guard_pool


class Backend(enum.Enum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


def backend_of(url: str) -> Backend:
    name = make_url(url).get_backend_name()
    try:
        return Backend(name)
    except ValueError:
        raise ValueError(f"unsupported database {name!r}: use sqlite+aiosqlite or postgresql+asyncpg") from None


# A JSON-escaped U+0000 that is not itself an escaped backslash followed by
# "u0000" (an odd run of backslashes before "u0000" is an escape).
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def json_text(value: Any) -> str:
    text = msgspec.json.encode(value).decode()
    if "u0000" in text:
        # PostgreSQL's jsonb refuses U+0000; every backend stores U+FFFD in its
        # place so that both hold the same data.
        text = _NUL_ESCAPE.sub(r"\1\\ufffd", text)
    return text


# msgspec instead of the stdlib json module: JSON columns are on the hot path.
JSON_CODEC = {"json_serializer": json_text, "json_deserializer": msgspec.json.decode}


# Execution option of a connection that only reads, for a long time (export):
# on SQLite its transaction is deferred (see _sqlite); elsewhere it changes
# nothing.
READER_OPTION = "dialgate_reader"


def create_engine(url: str) -> AsyncEngine:
    backend = backend_of(url)
    if backend is Backend.SQLITE:
        return _sqlite(url)
    if backend is Backend.POSTGRESQL:
        return _postgresql(url)
    assert_never(backend)


def sqlite_pragmas() -> tuple[str, ...]:
    """Every SQLite connection's settings (the engine's and the writer's own)."""
    return (
        # Readers do not block the writer nor the writer readers.
        "PRAGMA journal_mode=WAL",
        # FULL: a commit is on disk before the 2xx, even across power loss;
        # group commit amortises the fsync.
        "PRAGMA synchronous=FULL",
        # Several processes (workers) may write: wait for the lock, not fail.
        "PRAGMA busy_timeout=30000",
    )


def _sqlite(url: str) -> AsyncEngine:
    engine = create_async_engine(
        url,
        # Readers (admin API) and the writer each hold a connection; WAL lets
        # them proceed side by side.
        pool_size=4,
        max_overflow=4,
        connect_args={"timeout": 30},
        **JSON_CODEC,
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (below) instead of pysqlite's implicit
        # deferred transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in sqlite_pragmas():
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Take the write lock up front so read-modify-write of profiles is
        # serialised across processes and never hits a deadlock on upgrade.
        # A long reader (export) asks for READER instead: a deferred
        # transaction takes no lock, and WAL keeps its snapshot meanwhile.
        reader = conn.get_execution_options().get(READER_OPTION, False)
        conn.exec_driver_sql("BEGIN" if reader else "BEGIN IMMEDIATE")

    return engine


def _postgresql(url: str) -> AsyncEngine:
    engine = create_async_engine(
        url,
        # The writer holds one connection per flush; the rest serve the admin
        # API and readiness checks.
        pool_size=5,
        max_overflow=5,
        # No pre-ping (a round trip per transaction on the hot path): a
        # connection the server closed while idle is replaced at checkout
        # (guard_pool), one that dies in use fails its flush, and the writer
        # retries the group once on a fresh one.
        connect_args={
            # Fail fast when the server is down so clients get a 503 quickly.
            "timeout": 5,
            "command_timeout": 30,
            # The jsonb codec is set by SQLAlchemy; keep statements cached.
            "server_settings": {"application_name": "dialgate"},
        },
        **JSON_CODEC,
    )
    guard_pool(engine)
    return engine
