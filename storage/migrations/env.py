"""Alembic environment.

Two ways in: `dialgate migrate` / `serve` / the tests hand over a connection
they hold (`config.attributes["connection"]`); the plain `alembic` command
builds an engine from `sqlalchemy.url`, `DIALGATE_STORAGE__URL`, or the
`[storage] url` of the file named by `DIALGATE_CONFIG` (read directly: storage
does not import the gateway).
"""

from __future__ import annotations

import asyncio
import os
import tomllib

from alembic import context
from sqlalchemy.engine import Connection

from storage.tables import metadata

config = context.config


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode recreates the table.
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("DIALGATE_STORAGE__URL")
    if url:
        return url
    path = os.environ.get("DIALGATE_CONFIG")
    if path:
        with open(path, "rb") as file:
            url = tomllib.load(file).get("storage", {}).get("url")
    return url or "sqlite+aiosqlite:///./dialgate.db"


async def run_online() -> None:
    from storage.engine import create_engine

    url = _url()
    engine = create_engine(url)
    async with engine.connect() as connection:
        await connection.run_sync(run_with)
        await connection.commit()
    await engine.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    run_with(connection)
else:
    asyncio.run(run_online())
