"""The multi-row upsert, both backends: new rows inserted, existing rows'
columns replaced except the key and the kept ones."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from storage import tables
from storage.engine import Backend, create_engine
from storage.migrate import upgrade
from storage.upsert import upsert

pytestmark = pytest.mark.anyio


async def test_upsert_inserts_and_replaces_but_keeps_what_it_is_told(backend) -> None:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    kind = Backend.POSTGRESQL if backend["name"] == "postgres" else Backend.SQLITE
    p = tables.profiles
    key = ("project", "distinct_id")
    first = {"project": "shop", "distinct_id": "anna", "properties": {"a": 1}, "created_at": 1, "updated_at": 1}
    try:
        async with engine.begin() as conn:
            await upsert(conn, kind, p, [first], key, keep=("created_at",))
        again = {**first, "properties": {"b": 2}, "created_at": 9, "updated_at": 9}
        other = {**first, "distinct_id": "bob", "created_at": 5, "updated_at": 5}
        async with engine.begin() as conn:
            await upsert(conn, kind, p, [again, other], key, keep=("created_at",))
        async with engine.connect() as conn:
            rows = (await conn.execute(
                sa.select(p.c.distinct_id, p.c.properties, p.c.created_at, p.c.updated_at)
                .where(p.c.project == "shop").order_by(p.c.distinct_id)
            )).all()
        assert [tuple(r) for r in rows] == [("anna", {"b": 2}, 1, 9), ("bob", {"a": 1}, 5, 5)]
    finally:
        await engine.dispose()
