"""Group profiles (GroupUpdate) through the sink, both backends: the verbs,
delete, the size cap, the rejections, and their independence from person
profiles and aliases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from gateway.model import Alias, Event, GroupUpdate, ProfileUpdate
from storage import queries, tables
from storage.engine import create_engine
from storage.migrate import alembic_config, upgrade
from storage.sink import Sink, Unstorable
from tests.support import database_sink

pytestmark = pytest.mark.anyio


def _group(group_id: str = "acme", key: str = "company", project: str = "shop", **verbs: Any) -> GroupUpdate:
    return GroupUpdate(project=project, source="mixpanel", group_key=key, group_id=group_id, time=1_700_000_000_000,
                       **verbs)


@pytest.fixture
async def store(backend) -> AsyncIterator[tuple[Any, Sink]]:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    sink = database_sink(engine, max_profile_bytes=2_000)
    sink.start()
    try:
        yield engine, sink
    finally:
        await sink.close()
        await engine.dispose()


async def _props(engine: Any, group_id: str = "acme", key: str = "company", project: str = "shop") -> Any:
    found = await queries.group(engine, project, key, group_id)
    return None if found is None else found["properties"]


async def _rejections(engine: Any) -> list[tuple[str, str]]:
    items, _ = await queries.rejections(engine, project=None, source=None, reason=None, limit=100, after=None)
    return [(r["reason"], r["detail"]) for r in items]


async def test_the_verbs_apply_in_order_within_and_across_requests(store) -> None:
    engine, sink = store
    written = await sink.submit([
        _group(set={"name": "Acme", "plan": "free"}, set_once={"plan": "trial", "founded": 1999}),
        _group(union={"tags": ["b2b", "eu"]}, set={"plan": "pro"}),
        _group(union={"tags": ["eu", "us"]}, remove={"tags": "b2b"}, unset=["founded", "absent"]),
    ])
    assert written.applied == 3
    found = await queries.group(engine, "shop", "company", "acme")
    assert found == {"group_key": "company", "group_id": "acme",
                     "properties": {"name": "Acme", "plan": "pro", "tags": ["eu", "us"]}}
    await sink.submit([_group(set_once={"name": "Other", "size": 10})])
    assert await _props(engine) == {"name": "Acme", "plan": "pro", "tags": ["eu", "us"], "size": 10}
    assert await _rejections(engine) == []


async def test_delete_removes_the_group_and_a_later_set_makes_it_anew(store) -> None:
    engine, sink = store
    await sink.submit([_group(set={"a": 1}), _group("other", set={"b": 2})])
    await sink.submit([_group(delete=True, set={"ignored": True})])
    assert await _props(engine) is None
    assert await _props(engine, "other") == {"b": 2}
    # Deleting a group that is not there, or an update without a verb, makes nothing.
    await sink.submit([_group("ghost", delete=True), _group("empty")])
    assert await _props(engine, "ghost") is None
    assert await _props(engine, "empty") is None
    # Within one request: set, delete, set again.
    await sink.submit([_group(set={"a": 1}), _group(delete=True), _group(set={"c": 3})])
    assert await _props(engine) == {"c": 3}
    # Created and deleted within one request: no row.
    await sink.submit([_group("brief", set={"x": 1}), _group("brief", delete=True)])
    assert await _props(engine, "brief") is None


async def test_a_group_is_not_a_person_and_keys_and_projects_are_apart(store) -> None:
    engine, sink = store
    await sink.submit([
        ProfileUpdate(project="shop", source="mixpanel", distinct_id="acme", time=1, set={"person": True}),
        Alias(project="shop", source="mixpanel", alias="acme", distinct_id="someone"),
        _group(set={"kind": "company"}),
        _group(key="team", set={"kind": "team"}),
        _group(project="blog", set={"kind": "blog company"}),
    ])
    assert await _props(engine) == {"kind": "company"}
    assert await _props(engine, key="team") == {"kind": "team"}
    assert await _props(engine, project="blog") == {"kind": "blog company"}
    # The person's profile moved to the person the alias named; the group did not.
    person = await queries.profile(engine, "shop", "acme")
    assert person is not None and person["distinct_id"] == "someone"
    assert person["properties"] == {"person": True}
    await sink.submit([_group(delete=True)])
    assert await _props(engine, key="team") == {"kind": "team"}
    assert (await queries.profile(engine, "shop", "someone")) is not None


async def test_wrong_types_are_left_alone_and_quarantined(store) -> None:
    engine, sink = store
    await sink.submit([_group(set={"name": "Acme", "tags": ["a"]})])
    written = await sink.submit([_group(union={"name": ["x"], "tags": ["b"]}, remove={"name": "Acme"})])
    assert written.applied == 1
    assert await _props(engine) == {"name": "Acme", "tags": ["a", "b"]}
    assert await _rejections(engine) == [
        ("profile_type_mismatch", "group company/acme: $union.name: profile value is not a list"),
        ("profile_type_mismatch", "group company/acme: $remove.name: profile value is not a list"),
    ]


async def test_an_update_past_the_size_cap_is_quarantined_and_the_group_unchanged(store) -> None:
    engine, sink = store
    await sink.submit([_group(set={"name": "Acme", "l": list(range(100))})])
    before = await _props(engine)
    await sink.submit([
        _group(set={"big": "x" * 1_800}),  # over the cap of 2,000 bytes: refused whole
        _group(set={"small": 1}),  # still fits: applied
    ])
    after = await _props(engine)
    assert after == {**before, "small": 1}
    (reason, detail), = await _rejections(engine)
    assert reason == "profile_too_large"
    assert detail.startswith("group company/acme: the update would make the profile ")
    assert detail.endswith("over the limit of 2000; not applied")
    # An update that makes a group smaller is always applied.
    await sink.submit([_group(unset=["l"])])
    assert await _props(engine) == {"name": "Acme", "small": 1}


async def test_many_groups_in_one_request_and_events_beside_them(store) -> None:
    """More groups than one chunk of the prefetch and the writes (500)."""
    engine, sink = store
    event = Event(project="shop", source="mixpanel", name="e", distinct_id="u", time=1, received_at=1,
                  insert_id="i-1")
    written = await sink.submit([event, *(_group(f"g{n}", set={"n": n}) for n in range(1_200))])
    assert (written.inserted, written.applied) == (1, 1_200)
    written = await sink.submit(
        [*(_group(f"g{n}", delete=True) for n in range(0, 1_200, 2)),
         *(_group(f"g{n}", union={"l": [n]}) for n in range(1, 1_200, 2))]
    )
    assert written.applied == 1_200
    for n in (0, 498, 500, 1_198):
        assert await _props(engine, f"g{n}") is None
    for n in (1, 499, 501, 1_199):
        assert await _props(engine, f"g{n}") == {"n": n, "l": [n]}
    async with engine.connect() as conn:
        count = (await conn.execute(sa.select(sa.func.count()).select_from(tables.groups))).scalar()
    assert count == 600


async def test_ids_are_kept_as_sent_a_nul_as_the_replacement_character(store) -> None:
    engine, sink = store
    await sink.submit([_group("a/b c\x00é", key="k\x00", set={"v": 1})])
    found = await queries.group(engine, "shop", "k\x00", "a/b c\x00é")
    assert found == {"group_key": "k\ufffd", "group_id": "a/b c\ufffdé", "properties": {"v": 1}}
    assert await _props(engine, "a/b c\ufffdé", key="k\ufffd") == {"v": 1}


async def test_a_database_at_0002_is_upgraded_and_keeps_its_rows(tmp_path) -> None:
    """A gateway of the previous release, its database migrated by the new one."""
    url = f"sqlite+aiosqlite:///{tmp_path}/old.db"
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: command.upgrade(alembic_config(sync), "0002"))
        await conn.execute(tables.profiles.insert().values(project="shop", distinct_id="u", properties={"a": 1},
                                                           created_at=1, updated_at=1))
        names = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
    assert "groups" not in names
    await upgrade(engine)
    sink = database_sink(engine)
    sink.start()
    try:
        await sink.submit([_group(set={"b": 2})])
    finally:
        await sink.close()
    assert await _props(engine) == {"b": 2}
    assert (await queries.profile(engine, "shop", "u")) is not None
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: command.downgrade(alembic_config(sync), "0002"))
        names = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
    assert "groups" not in names and "profiles" in names
    await engine.dispose()


async def test_group_work_applies_in_submitted_order_and_a_refused_request_stores_none(backend) -> None:
    engine = create_engine(backend["storage_url"])
    await upgrade(engine)
    sink = database_sink(engine, delay_ms=30, lanes=3)  # one group of requests, several lanes
    sink.start()
    try:
        work = [sink.submit([_group(set={"last": n}, union={"seen": [n]})]) for n in range(10)]
        work.append(sink.submit([_group(delete=True)]))
        work.append(sink.submit([_group(set_once={"after": "delete"})]))
        # Its group update is fine; its event passes the model but no BIGINT column can hold it.
        bad = Event(project="shop", source="mixpanel", name="e", distinct_id="u", time=2**70, received_at=1)
        work.append(sink.submit([_group("refused", set={"a": 1}), bad]))
        results = await asyncio.gather(*work, return_exceptions=True)
    finally:
        await sink.close()
    assert [r.applied for r in results[:12]] == [1] * 12  # type: ignore[union-attr]
    assert isinstance(results[12], Unstorable)
    assert await _props(engine) == {"after": "delete"}
    assert await _props(engine, "refused") is None
    await engine.dispose()
