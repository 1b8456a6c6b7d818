"""Backends for the tests.

Every test that takes `backend` runs twice: on SQLite (a file under tmp_path,
in-process limits) and on PostgreSQL with Redis, both real servers. When they
are unreachable a test skips with the reason, except under CI=true, where it
fails: CI must never pass by skipping the servers it is meant to exercise.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Iterator

import pytest

CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_DSN = os.environ.get("DIALGATE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
# Not db 0: keep the tests' keys apart from a gateway or benchmark on the same server.
REDIS_URL = os.environ.get("DIALGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def unreachable(what: str, why: str) -> None:
    message = f"{what} is not reachable ({why})"
    if CI:
        pytest.fail(message + "; CI=true requires it", pytrace=False)
    pytest.skip(message + "; start it, or these tests are skipped outside CI")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _pg_dsn(database: str) -> str:
    base, _, _ = PG_ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A database of our own on the PostgreSQL server, migrated, dropped after."""
    import asyncpg

    name = f"dialgate_test_{os.getpid()}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}"'))
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        unreachable("PostgreSQL", f"{PG_ADMIN_DSN}: {exc}")
    url = "postgresql+asyncpg://" + _pg_dsn(name).removeprefix("postgresql://")

    async def migrate() -> None:
        from storage.engine import create_engine
        from storage.migrate import upgrade

        engine = create_engine(url)
        await upgrade(engine)
        await engine.dispose()

    asyncio.run(migrate())
    yield url
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_server() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        unreachable("Redis", f"{REDIS_URL}: {exc}")
    return REDIS_URL


def _clean_postgres(url: str) -> None:
    import asyncpg

    async def truncate() -> None:
        conn = await asyncpg.connect("postgresql://" + url.removeprefix("postgresql+asyncpg://"))
        try:
            await conn.execute("TRUNCATE events, aliases, profiles, devices, groups, rejections, maintenance, "
                               "loader_applied, loader_progress RESTART IDENTITY")
        finally:
            await conn.close()

    asyncio.run(truncate())


@pytest.fixture
def sqlite_backend(tmp_path) -> dict[str, str]:
    return {
        "name": "sqlite",
        "storage_url": f"sqlite+aiosqlite:///{tmp_path}/dialgate.db",
        "redis_url": "",
        "redis_prefix": "unused",
    }


@pytest.fixture
def postgres_backend(request) -> Iterator[dict[str, str]]:
    url = request.getfixturevalue("pg_database")
    redis_url = request.getfixturevalue("redis_server")
    _clean_postgres(url)
    prefix = f"dialgate-test:{uuid.uuid4().hex}"
    yield {"name": "postgres", "storage_url": url, "redis_url": redis_url, "redis_prefix": prefix}
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + ":*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> dict[str, str]:
    """SQLite without Redis, and PostgreSQL with Redis."""
    return request.getfixturevalue(f"{request.param}_backend")


def _dump_tasks(signum: int, frame: object) -> None:
    """`kill -USR1 <pytest>`: every asyncio task of the running loop with its
    stack, on stderr (a test that hangs waits in a task, which a thread dump
    does not show)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = asyncio.get_event_loop_policy().get_event_loop()
    for task in asyncio.all_tasks(loop):
        print(f"--- {task!r}", file=sys.__stderr__)
        task.print_stack(file=sys.__stderr__)
    sys.__stderr__.flush()


if hasattr(signal, "SIGUSR1"):
    signal.signal(signal.SIGUSR1, _dump_tasks)
