"""The multi-row upsert of the identity, profile, device and group writes."""

from __future__ import annotations

from typing import Any, assert_never

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.engine import Backend
from storage.groups import chunks


def _insert(backend: Backend, table: Any) -> Any:
    if backend is Backend.POSTGRESQL:
        return postgresql.insert(table)
    if backend is Backend.SQLITE:
        return sqlite.insert(table)
    assert_never(backend)


async def upsert(
    conn: AsyncConnection, backend: Backend, table: Any, rows: list[dict[str, Any]], key: tuple[str, ...],
    keep: tuple[str, ...] = (),
) -> None:
    """Multi-row INSERT ... ON CONFLICT (key) DO UPDATE of every column
    but the key and `keep`. Each key must appear once in `rows`:
    PostgreSQL refuses to update a row twice in one statement."""
    for chunk in chunks(rows):
        stmt = _insert(backend, table).values(list(chunk))
        stmt = stmt.on_conflict_do_update(
            index_elements=list(key),
            set_={c: stmt.excluded[c] for c in chunk[0] if c not in key and c not in keep},
        )
        await conn.execute(stmt)
