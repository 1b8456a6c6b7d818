"""PostgreSQL's commit marks (storage.postgres): every write transaction
inserts its group's token; the same attempt written again after its commit
happened applies nothing twice and is answered as the first time; old marks
are dropped. Real PostgreSQL; the lost answer itself is in
tests/storage/test_commit_uncertain.py."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from gateway.model import ProfileUpdate
from gateway.pipeline import now_ms
from storage import queries
from storage.engine import create_engine
from storage.groups import Attempt, Pending, mark_prefix
from storage.migrate import upgrade
from storage.postgres import MARKS_KEPT_MS, PostgresStore
from storage.sink import SinkOptions
from tests.storage.records import event

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def _touch(id_: str) -> ProfileUpdate:
    return ProfileUpdate(project="shop", source="cohorly", distinct_id=id_, time=1, touch=True)


def _add(id_: str, n: int) -> ProfileUpdate:
    return ProfileUpdate(project="shop", source="cohorly", distinct_id=id_, time=1, add={"n": n})


ROUTES = {
    # Events alone: one statement outside a block.
    "events": lambda: [Pending([event(1), event(2), event(3, insert_id=None)], [], None)],
    # Events touching their profiles: a short block on the lane's connection.
    "touching": lambda: [Pending([event(1), _touch("u")], [], None)],
    # Identity and profile work: a transaction through SQLAlchemy.
    "transaction": lambda: [Pending([event(1), _add("p", 1)], [], None), Pending([_add("p", 2)], [], None)],
}


async def _marks(engine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM commit_marks"))).scalar() or 0)


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_the_same_attempt_written_again_applies_nothing_twice(postgres_backend, route: str) -> None:
    engine = create_engine(postgres_backend["storage_url"])
    await upgrade(engine)
    store = PostgresStore(engine, SinkOptions(), clock=now_ms, admit=lambda r: True)
    try:
        before = await _marks(engine)
        attempt = Attempt()
        first = await store.write(ROUTES[route](), 0, attempt)
        assert await _marks(engine) == before + 1
        # As the writer's retry after a lost answer: the same attempt.
        again = await store.write(ROUTES[route](), 0, attempt)
        assert await _marks(engine) == before + 1
        assert [(w.inserted, w.duplicates, w.applied) for w in again] == \
            [(w.inserted, w.duplicates, w.applied) for w in first]
        rows, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=100,
                                       after=None)
        assert len(rows) == (3 if route == "events" else 1)
        if route == "transaction":
            profile = await queries.profile(engine, "shop", "p")
            assert profile is not None and profile["properties"] == {"n": 3}
        # A new attempt is a new write: the keyed events count as duplicates.
        other = await store.write(ROUTES[route](), 0, Attempt())
        assert other[0].duplicates >= 1
    finally:
        await store.close()
        await engine.dispose()


async def test_old_marks_are_dropped(postgres_backend) -> None:
    engine = create_engine(postgres_backend["storage_url"])
    await upgrade(engine)
    store = PostgresStore(engine, SinkOptions(), clock=now_ms, admit=lambda r: True)
    now = now_ms()
    made = {"old": now - MARKS_KEPT_MS - 1, "recent": now - MARKS_KEPT_MS + 60_000, "now": now}
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM commit_marks"))
            for name, at in made.items():
                await conn.execute(text("INSERT INTO commit_marks (token) VALUES (:t)"),
                                   {"t": mark_prefix(at) + name.encode().ljust(8, b"-")})
        await store._prune(now - MARKS_KEPT_MS)
        async with engine.connect() as conn:
            kept = (await conn.execute(text("SELECT token FROM commit_marks ORDER BY token"))).scalars().all()
        assert [bytes(t)[8:].rstrip(b"-").decode() for t in kept] == ["recent", "now"]
    finally:
        await store.close()
        await engine.dispose()


async def test_a_refused_write_asks_whether_its_mark_is_there(postgres_backend) -> None:
    """Before the writer splits or refuses a group that failed, the store
    asks whether its attempt committed all the same (an error classified
    wrongly must not have a committed group written again)."""
    engine = create_engine(postgres_backend["storage_url"])
    await upgrade(engine)
    store = PostgresStore(engine, SinkOptions(), clock=now_ms, admit=lambda r: True)
    try:
        async with engine.connect() as conn:
            with pytest.raises(Exception) as refused:  # a real DATA error of the server
                await conn.execute(text("SELECT 1 / 0"))
        attempt = Attempt()
        assert not await store._committed_despite(refused.value, attempt)
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO commit_marks (token) VALUES (:t)"), {"t": attempt.token})
        assert await store._committed_despite(refused.value, attempt)
        # A lost connection is retried as the same attempt instead: not asked.
        assert not await store._committed_despite(ConnectionResetError("gone"), attempt)
    finally:
        await store.close()
        await engine.dispose()
