"""Run the Alembic migrations to head on a connection we hold."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.engine import Backend, backend_of

SCRIPT_LOCATION = "storage:migrations"
# Arbitrary constant: serialises concurrent `upgrade head` from several
# gateways starting at once against one PostgreSQL.
_LOCK_KEY = 0x6469616C67617465


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


async def upgrade(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        if backend_of(str(engine.url)) is Backend.POSTGRESQL:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        await conn.run_sync(lambda sync: command.upgrade(alembic_config(sync), "head"))
