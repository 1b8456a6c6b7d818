"""The batched writer against the real databases."""

from __future__ import annotations

import asyncio
import os

import msgspec
import pytest

from gateway.model import Alias, Device, ProfileUpdate
from gateway.pipeline import now_ms
from storage import queries
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.sink import Unstorable
from tests.storage.records import event as _event
from tests.support import ADMIN, database_sink, gateway, settings_for

pytestmark = pytest.mark.anyio


async def _writer(backend: dict[str, str], delay_ms: float = 0.0, *, lanes: int = 1, clock=now_ms):
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    writer = database_sink(engine, clock=clock, delay_ms=delay_ms, lanes=lanes)
    writer.start()
    return engine, writer


async def test_one_bad_request_in_a_group_fails_alone(backend) -> None:
    engine, writer = await _writer(backend, delay_ms=30)
    try:
        good = [writer.submit([_event(i)]) for i in range(20)]
        # Passes the model, but no BIGINT column can hold it.
        bad = writer.submit([_event(100, time=2**70)])
        results = await asyncio.gather(*good, bad, return_exceptions=True)
    finally:
        await writer.close()
    assert all(not isinstance(r, Exception) and r.inserted == 1 for r in results[:20])
    assert isinstance(results[20], Unstorable)
    rows, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=1000, after=None)
    await engine.dispose()
    assert sorted(r["properties"]["n"] for r in rows) == list(range(20))


async def test_duplicates_across_a_group_are_stored_once(backend) -> None:
    engine, writer = await _writer(backend, delay_ms=30)
    try:
        results = await asyncio.gather(*[writer.submit([_event(1), _event(2)]) for _ in range(5)])
        again = await writer.submit([_event(1, name="other name", time=5)])
    finally:
        await writer.close()
    assert sum(r.inserted for r in results) == 2
    assert sum(r.duplicates for r in results) == 8
    assert (again.inserted, again.duplicates) == (0, 1)
    rows, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=100, after=None)
    await engine.dispose()
    assert len(rows) == 2


async def test_aliases_merge_trees_and_profiles(backend) -> None:
    engine, writer = await _writer(backend)
    t = now_ms()
    try:
        await writer.submit([ProfileUpdate(project="shop", source="t", distinct_id="anon", time=t,
                                           set={"plan": "free", "color": "red"})])
        await writer.submit([ProfileUpdate(project="shop", source="t", distinct_id="user", time=t,
                                           set={"plan": "pro"})])
        # x -> anon first: anon's tree (anon, x) then joins user.
        first = await writer.submit([Alias(project="shop", source="t", alias="x", distinct_id="anon")])
        second = await writer.submit([Alias(project="shop", source="t", alias="anon", distinct_id="user")])
        again = await writer.submit([Alias(project="shop", source="t", alias="x", distinct_id="user")])
        conflict = await writer.submit([Alias(project="shop", source="t", alias="x", distinct_id="someone")])
        cycle = await writer.submit([Alias(project="shop", source="t", alias="user", distinct_id="x")])
    finally:
        await writer.close()
    assert first.aliases == ["linked"] and second.aliases == ["linked"]
    assert again.aliases == ["exists"]
    assert conflict.aliases == ["conflict"]
    assert cycle.aliases == ["cycle"]
    person = await queries.profile(engine, "shop", "x")
    rejections, _ = await queries.rejections(engine, project="shop", source=None, reason=None, limit=10, after=None)
    await engine.dispose()
    assert person is not None
    assert person["distinct_id"] == "user"
    assert sorted(person["ids"]) == ["anon", "user", "x"]
    # The known id's values win; the anonymous id's fill the gaps.
    assert person["properties"] == {"plan": "pro", "color": "red"}
    assert sorted(r["reason"] for r in rejections) == ["alias_conflict", "alias_cycle"]


async def test_concurrent_adds_on_one_profile(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        replies = await asyncio.gather(
            *[
                client.post("/engage", headers={"X-Cohorly-Token": "tok_shop"},
                            json={"distinct_id": "counter", "$add": {"n": 1}})
                for _ in range(100)
            ]
        )
        assert [r.status_code for r in replies] == [200] * 100
        profile = (await client.get("/admin/v1/projects/shop/profiles/counter", headers=ADMIN)).json()
    assert profile["properties"] == {"n": 100}


async def test_concurrent_adds_from_two_gateways(backend) -> None:
    # Two apps, two engines, two writers: what two worker processes do.
    settings = settings_for(backend)
    async with gateway(settings) as one, gateway(settings) as two:
        replies = await asyncio.gather(
            *[
                client.post("/engage", headers={"X-Cohorly-Token": "tok_shop"},
                            json={"distinct_id": "shared", "$add": {"n": 1}})
                for _ in range(50)
                for client in (one, two)
            ]
        )
        assert {r.status_code for r in replies} == {200}
        profile = (await one.get("/admin/v1/projects/shop/profiles/shared", headers=ADMIN)).json()
    assert profile["properties"] == {"n": 100}


def _device(person: str, os: str) -> Device:
    return Device(project="shop", source="t", distinct_id=person, device_id="phone", os=os)


def _touch(person: str) -> ProfileUpdate:
    return ProfileUpdate(project="shop", source="t", distinct_id=person, time=now_ms(), touch=True)


async def test_a_device_registered_twice_in_one_group_ends_with_the_last(backend) -> None:
    # Devices are written in one upsert per transaction: the same device
    # twice in it (within a request or across requests) must keep the last.
    engine, writer = await _writer(backend, delay_ms=30)
    try:
        await writer.submit([_touch("ann"), _device("ann", "ios"), _touch("bob"), _device("bob", "android")])
        bob = await queries.profile(engine, "shop", "bob")
        await asyncio.gather(
            writer.submit([_touch("cy"), _device("cy", "ios 18")]),
            writer.submit([_touch("dee"), _device("dee", "android 15")]),
        )
    finally:
        await writer.close()
    people = {name: await queries.profile(engine, "shop", name) for name in ("ann", "bob", "cy", "dee")}
    await engine.dispose()
    assert bob is not None and [(d["device_id"], d["os"]) for d in bob["devices"]] == [("phone", "android")]
    assert [d["device_id"] for p in people.values() if p for d in p["devices"]] == ["phone"]
    assert people["dee"] is not None and people["dee"]["devices"][0]["os"] == "android 15"


async def test_groups_larger_than_a_chunk(backend) -> None:
    # More ids than one IN list or one multi-row statement takes.
    engine, writer = await _writer(backend)
    t = now_ms()
    n = 1200

    def op(id_: str, **verbs: object) -> ProfileUpdate:
        return ProfileUpdate(
            project="shop", source="t", distinct_id=id_, time=t, **verbs  # type: ignore[arg-type]
        )

    try:
        await writer.submit(
            [op(f"p{i}", set={"n": i}) for i in range(n)]
            + [Alias(project="shop", source="t", alias=f"a{i}", distinct_id=f"p{i}") for i in range(n)]
        )
        written = await writer.submit(
            [op(f"a{i}", add={"n": 1}) for i in range(n)]
            + [op("a7", delete=True), op("a7", set={"back": True}), op("a8", delete=True),
               Alias(project="shop", source="t", alias="a9", distinct_id="p10")]
        )
    finally:
        await writer.close()
    profiles = {i: await queries.profile(engine, "shop", f"a{i}") for i in (0, 7, 8, 9, 10, 600, n - 1)}
    rejections, _ = await queries.rejections(
        engine, project="shop", source=None, reason=None, limit=10, after=None
    )
    await engine.dispose()
    assert written.applied == n + 3 and written.aliases == ["conflict"]
    assert [r["reason"] for r in rejections] == ["alias_conflict"]
    assert profiles[8] is None
    assert profiles[7] is not None and profiles[7]["properties"] == {"back": True}
    for i in (0, 9, 10, 600, n - 1):
        person = profiles[i]
        assert person is not None
        assert person["distinct_id"] == f"p{i}" and person["ids"] == [f"p{i}", f"a{i}"]
        assert person["properties"] == {"n": i + 1}


async def test_a_group_of_new_and_known_events_counts_each(backend) -> None:
    """Some of a group's events already stored: only the others are new
    (SQLite's events path reads back which ones only in this case)."""
    engine, writer = await _writer(backend, delay_ms=30)
    try:
        first = await writer.submit([_event(n) for n in range(10)])
        mixed = await asyncio.gather(
            writer.submit([_event(n) for n in range(5, 15)]),
            writer.submit([_event(n) for n in range(12, 20)] + [_event(99, insert_id=None)]),
        )
    finally:
        await writer.close()
    assert (first.inserted, first.duplicates) == (10, 0)
    assert [(r.inserted, r.duplicates) for r in mixed] == [(5, 5), (6, 3)]
    assert sorted(k[2] for k in mixed[0].new_keys) == sorted(f"id-{n}" for n in range(10, 15))
    assert sorted(k[2] for k in mixed[1].new_keys) == sorted(f"id-{n}" for n in range(15, 20))
    rows, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=1000, after=None)
    await engine.dispose()
    assert sorted(r["properties"]["n"] for r in rows) == [*range(20), 99]


async def test_two_writers_on_one_database_store_every_event_once(backend) -> None:
    """Two processes' writers take turns on the write lock (SQLite polls for
    it); every event lands once, the copies both sent count as duplicates."""
    (engine_a, a), (engine_b, b) = await _writer(backend), await _writer(backend)
    try:
        jobs = [w.submit([_event(n * 50 + i) for i in range(50)]) for n in range(20) for w in (a, b)]
        results = await asyncio.gather(*jobs)
    finally:
        await a.close()
        await b.close()
    assert sum(r.inserted for r in results) == 1000
    assert sum(r.duplicates for r in results) == 1000
    rows, _ = await queries.events(engine_a, "shop", distinct_id=None, name=None, source=None, limit=5000, after=None)
    await engine_a.dispose()
    await engine_b.dispose()
    assert sorted(r["properties"]["n"] for r in rows) == list(range(1000))


async def test_postgres_events_connection_killed_between_groups(postgres_backend) -> None:
    """The events path keeps a connection per lane; when the server ends it
    (here pg_terminate_backend, as a restart or an idle timeout would), the
    next group goes through on a fresh one, and nothing is stored twice."""
    engine, writer = await _writer(postgres_backend)
    try:
        first = await writer.submit([_event(n) for n in range(10)])
        async with engine.begin() as conn:
            killed = (await conn.exec_driver_sql(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'idle' "
                "AND query LIKE '%INSERT INTO events%') AS t")).scalar()
        second = await writer.submit([_event(n) for n in range(5, 20)])
    finally:
        await writer.close()
    assert killed == 1
    assert (first.inserted, first.duplicates) == (10, 0)
    assert (second.inserted, second.duplicates) == (10, 5)
    rows, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=1000, after=None)
    await engine.dispose()
    assert sorted(r["properties"]["n"] for r in rows) == list(range(20))


async def test_a_request_of_events_and_profile_work_is_stored_whole_or_not_at_all(backend) -> None:
    """The events of a request that also updates a profile go in the same
    transaction (on PostgreSQL straight on the driver, inside it): when the
    profile write is refused, the events are not stored either."""
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    # A clock no BIGINT can hold: the profile's created_at is refused, after
    # the events were inserted.
    writer = database_sink(engine, clock=lambda: 2**70)
    writer.start()
    update = ProfileUpdate(project="shop", source="cohorly", distinct_id="u", time=1, set={"a": 1})
    try:
        with pytest.raises(Unstorable):
            await writer.submit([_event(1), _event(2), update])
    finally:
        await writer.close()
    rows, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=100, after=None)
    await engine.dispose()
    assert rows == []


async def test_postgres_profile_statements_go_to_the_driver_only_inside_the_block(postgres_backend) -> None:
    """The lock, prefetch and profile upsert of a group may bypass SQLAlchemy
    only once its transaction block is open: before that, a statement on the
    driver would commit on its own (and an advisory lock taken so would be
    gone at once)."""
    import asyncpg

    from storage.engine import Backend
    from storage.groups import Pending
    from storage.sql import lock_key
    from storage.transaction import Transaction

    engine = create_engine(postgres_backend["storage_url"])
    await upgrade(engine)
    dsn = postgres_backend["storage_url"].replace("postgresql+asyncpg://", "postgresql://")
    other = await asyncpg.connect(dsn)
    touch = ProfileUpdate(project="shop", source="client", distinct_id="p-1", time=1, set={"plan": "pro"})
    try:
        async with engine.begin() as conn:
            tx = Transaction(conn, Backend.POSTGRESQL, now=1)
            tx.driver = (await conn.get_raw_connection()).driver_connection
            assert not tx.straight()  # nothing sent yet: no block open
            group = [Pending([touch], [], None)]
            await tx.lock_projects(group)  # through SQLAlchemy, which opens the block
            assert tx.straight()
            # The lock is this transaction's until it ends.
            assert not await other.fetchval("SELECT pg_try_advisory_xact_lock($1)", lock_key("shop"))
            await tx.prefetch(group)
            await tx.profiles.apply(touch)
            await tx.profiles.save()
            # Straight on the driver, yet not committed before the block is.
            assert await other.fetchval("SELECT count(*) FROM profiles WHERE distinct_id = 'p-1'") == 0
        assert await other.fetchval("SELECT properties::text FROM profiles WHERE distinct_id = 'p-1'") == (
            '{"plan": "pro"}')
        assert await other.fetchval("SELECT pg_try_advisory_xact_lock($1)", lock_key("shop"))
    finally:
        await other.close()
        await engine.dispose()


async def _profile_rows(engine) -> dict[str, tuple[dict, int, int]]:
    """distinct_id -> (properties, created_at, updated_at), straight from the table."""
    async with engine.connect() as conn:
        rows = (await conn.exec_driver_sql(
            "SELECT distinct_id, CAST(properties AS TEXT), created_at, updated_at FROM profiles "
            "WHERE project = 'shop'")).all()
    return {r[0]: (msgspec.json.decode(r[1]), r[2], r[3]) for r in rows}


async def test_events_touching_their_profiles_resolve_ids_and_change_nothing_but_updated_at(backend) -> None:
    """What the client API's events do to profiles, on either path (the
    events lanes' one statement on PostgreSQL, the general transaction on
    SQLite): a missing profile is created empty, an existing one keeps its
    properties and created_at and gets a new updated_at, and an id that is
    an alias touches its person's profile, never a row of its own."""
    clock = iter(range(1_000, 10_000, 1_000))
    engine, writer = await _writer(backend, lanes=3, clock=lambda: next(clock))
    try:
        await writer.submit([ProfileUpdate(project="shop", source="t", distinct_id="user", time=1,
                                           set={"plan": "pro"})])  # at 1000
        await writer.submit([Alias(project="shop", source="t", alias="anon", distinct_id="user")])  # 2000
        results = await asyncio.gather(  # one group at 3000: two requests, three touches
            writer.submit([_event(1, distinct_id="anon"), _touch("anon"), _event(2, distinct_id="anon")]),
            writer.submit([_touch("new\x00comer"), _event(3, distinct_id="new\x00comer"), _touch("user")]),
        )
    finally:
        await writer.close()
    rows = await _profile_rows(engine)
    events, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=10, after=None)
    await engine.dispose()
    assert [(r.inserted, r.applied) for r in results] == [(2, 1), (1, 2)]
    assert sorted(r["properties"]["n"] for r in events) == [1, 2, 3]
    assert set(rows) == {"user", "new\ufffdcomer"}  # none for the alias
    assert rows["user"] == ({"plan": "pro"}, 1_000, 3_000)
    assert rows["new\ufffdcomer"] == ({}, 3_000, 3_000)


async def test_postgres_events_touching_profiles_take_the_event_lanes(postgres_backend) -> None:
    """Requests of events and touches go to the event lanes, several
    transactions at once (their profile locks shared), and all commit."""
    engine, writer = await _writer(postgres_backend, lanes=3)
    try:
        requests = [
            asyncio.create_task(writer.submit(
                [_touch(f"p{i}"), *[_event(i * 1000 + k, distinct_id=f"p{i}") for k in range(700)]]))
            for i in range(6)
        ]
        await asyncio.sleep(0)  # all queued
        # 4,206 rows: past one lane's backlog, so the requests spread.
        assert writer._load[1] > 0 and writer._load[2] > 0
        results = await asyncio.gather(*requests)
    finally:
        await writer.close()
    rows = await _profile_rows(engine)
    await engine.dispose()
    assert all((r.inserted, r.applied) == (700, 1) for r in results)
    assert set(rows) == {f"p{i}" for i in range(6)}


async def test_postgres_touches_racing_alias_merges_never_leave_a_profile_behind_an_alias(postgres_backend) -> None:
    """A merge (the ordered lane, its lock exclusive) moves an anonymous
    id's profile to its person and deletes the old row; touches of that id
    on the event lanes (the lock shared) either come before and are moved
    with it, or after and touch the person. Were they to read the links
    outside the lock, a touch could recreate the row the merge deleted."""
    engine = create_engine(postgres_backend["storage_url"])
    await upgrade(engine)
    writers = [database_sink(engine, lanes=3) for _ in range(2)]  # two gateway processes
    for writer in writers:
        writer.start()
    try:
        work = []
        for i in range(150):
            anon = f"anon-{i}"
            work.append(writers[0].submit([_touch(anon), _event(i, distinct_id=anon)]))
            work.append(writers[1].submit([Alias(project="shop", source="t", alias=anon, distinct_id=f"user-{i}")]))
            work.append(writers[i % 2].submit([_touch(anon), _event(1000 + i, distinct_id=anon)]))
        results = await asyncio.gather(*work)
    finally:
        for writer in writers:
            await writer.close()
    rows = await _profile_rows(engine)
    await engine.dispose()
    assert [r.aliases for r in results[1::3]] == [["linked"]] * 150
    assert set(rows) == {f"user-{i}" for i in range(150)}


class _ProfileLock:
    """Another session holding a project's profile lock (exclusive), as the
    ordered lane of another gateway does during a merge."""

    def __init__(self, backend: dict[str, str]) -> None:
        self.dsn = backend["storage_url"].replace("postgresql+asyncpg://", "postgresql://")

    async def __aenter__(self):
        import asyncpg

        from storage.sql import lock_key

        self.conn = await asyncpg.connect(self.dsn)
        self.tx = self.conn.transaction()
        await self.tx.start()
        await self.conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key("shop"))
        return self

    async def waiters(self, wanted: int) -> list[int]:
        """The pids waiting for an advisory lock, once there are `wanted`."""
        for _ in range(200):
            # Inside its transaction the view is a snapshot, unless cleared.
            await self.conn.execute("SELECT pg_stat_clear_snapshot()")
            pids = await self.conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE wait_event = 'advisory' AND pid <> pg_backend_pid() "
                "AND datname = current_database() ORDER BY backend_start")
            if len(pids) >= wanted:
                return [r[0] for r in pids]
            await asyncio.sleep(0.02)
        raise AssertionError("nobody waits for the lock")

    async def release(self) -> None:
        await self.tx.commit()

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()  # a transaction still open ends with the session


async def test_postgres_a_touch_whose_lock_wait_is_cancelled_fails_alone_and_the_lane_goes_on(
        postgres_backend, caplog) -> None:
    """The server cancels a touch group while it waits for the profile lock
    (a lock or statement timeout, an operator): that request is told to
    retry (nothing of it stays), and the lane's connection is left clean
    for the next groups, of events alone or with touches."""
    from storage.sink import StorageUnavailable

    engine, writer = await _writer(postgres_backend, lanes=2)
    try:
        async with _ProfileLock(postgres_backend) as lock:
            waiting = asyncio.create_task(writer.submit([_touch("ann"), _event(1)]))
            [pid] = await lock.waiters(1)
            assert await lock.conn.fetchval("SELECT pg_cancel_backend($1)", pid)
            with pytest.raises(StorageUnavailable):
                await waiting
            await lock.release()
        after = [await writer.submit([_event(2)]), await writer.submit([_touch("bob"), _event(3)]),
                 await writer.submit([_event(4)])]
    finally:
        await writer.close()
    rows = await _profile_rows(engine)
    events, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=10, after=None)
    await engine.dispose()
    assert [r.inserted for r in after] == [1, 1, 1]
    # Rolled back at once, not found inside a transaction by the next group.
    assert not [r for r in caplog.records if "left inside a transaction" in r.getMessage()]
    assert sorted(r["properties"]["n"] for r in events) == [2, 3, 4]
    assert set(rows) == {"bob"}


async def test_postgres_a_touch_cancelled_in_its_lock_wait_leaves_no_transaction_behind(postgres_backend) -> None:
    """Cancelled on our side while it waits (the lock may still be granted
    to the backend afterwards): the connection is dropped, so no session is
    left holding the lock, and the next group gets a fresh one."""
    from storage.postgres import PgEvents
    from storage.sql import lock_key

    engine = create_engine(postgres_backend["storage_url"])
    await upgrade(engine)
    events = PgEvents(engine)
    try:
        async with _ProfileLock(postgres_backend) as lock:
            waiting = asyncio.create_task(events.insert_touching("[]", '[{"project":"shop","id":"ann"}]',
                                                                 ["shop"], 1, os.urandom(16)))
            await lock.waiters(1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await lock.release()
            # Nobody else holds or waits for it: an exclusive take succeeds at once.
            assert await lock.conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key("shop"))
            await lock.conn.execute("SELECT pg_advisory_unlock($1)", lock_key("shop"))
            await lock.conn.execute("SELECT pg_stat_clear_snapshot()")
            idle_in_tx = await lock.conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' "
                "AND datname = current_database() AND pid <> pg_backend_pid()")
        stored = await events.insert(msgspec.json.encode([_event(5)]).decode(), os.urandom(16))
    finally:
        await events.close()
    await engine.dispose()
    assert idle_in_tx == 0
    assert stored == {("shop", "cohorly", "id-5")}


async def test_postgres_a_touch_and_a_profile_update_naming_one_insert_id_both_commit(
        postgres_backend, caplog) -> None:
    """The ordered lane takes the profile lock before it inserts its events:
    a touch group holding the lock shared and waiting for an insert id the
    ordered lane holds (which waits for the lock) would be a deadlock, one
    of the two rolled back by the server (and tried again)."""
    engine, writer = await _writer(postgres_backend, lanes=2)
    try:
        async with _ProfileLock(postgres_backend) as lock:
            touching = asyncio.create_task(writer.submit([_touch("v"), _event(7)]))
            await lock.waiters(1)
            updating = asyncio.create_task(writer.submit(
                [_event(7), ProfileUpdate(project="shop", source="t", distinct_id="u", time=1, set={"a": 1})]))
            await lock.waiters(2)
            await lock.release()
        results = await asyncio.gather(touching, updating)
    finally:
        await writer.close()
    rows = await _profile_rows(engine)
    events, _ = await queries.events(engine, "shop", distinct_id=None, name=None, source=None, limit=10, after=None)
    await engine.dispose()
    assert sorted((r.inserted, r.duplicates) for r in results) == [(0, 1), (1, 0)]
    assert not [r for r in caplog.records if "rolled the group back" in r.getMessage()]
    assert [r["properties"]["n"] for r in events] == [7]
    assert set(rows) == {"u", "v"}


async def test_postgres_a_profile_write_stamped_earlier_keeps_the_later_updated_at(postgres_backend) -> None:
    # A transaction reads its clock before it waits for the profile lock, so
    # it may commit after one stamped later: updated_at must not go back.
    clock = iter([5_000, 3_000, 2_000])
    engine, writer = await _writer(postgres_backend, lanes=2, clock=lambda: next(clock))
    try:
        await writer.submit([ProfileUpdate(project="shop", source="t", distinct_id="ann", time=1, set={"a": 1})])
        await writer.submit([_touch("ann"), _event(1)])  # the event lanes' statement
        await writer.submit([ProfileUpdate(project="shop", source="t", distinct_id="ann", time=1, set={"b": 2})])
    finally:
        await writer.close()
    rows = await _profile_rows(engine)
    await engine.dispose()
    assert rows["ann"] == ({"a": 1, "b": 2}, 5_000, 5_000)
