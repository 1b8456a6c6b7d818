"""Mixpanel's identity operations as canonical alias links, through the sink,
both backends: `$create_alias` and `$identify` are plain links (an id already
linked elsewhere is a conflict, as Cohorly's `/alias`); a `$merge` joins the
two persons whatever they already are (`Alias.merge`)."""

from __future__ import annotations

import pytest

from gateway.model import Alias, Event, ProfileUpdate
from storage import queries

pytestmark = pytest.mark.anyio


def _link(alias: str, to: str, *, merge: bool = False, source: str = "mixpanel") -> Alias:
    return Alias(project="shop", source=source, alias=alias, distinct_id=to, merge=merge)


def _set(id_: str, source: str = "mixpanel", **props: object) -> ProfileUpdate:
    return ProfileUpdate(project="shop", source=source, distinct_id=id_, time=1, set=props)


def _event(name: str, id_: str, source: str) -> Event:
    return Event(project="shop", source=source, name=name, distinct_id=id_, time=1, received_at=1)


async def test_a_merge_joins_two_persons_each_already_linked(store) -> None:
    engine, sink = store
    written = await sink.submit([
        _link("anon-1", "ann"), _link("anon-2", "bob"),  # two $identify
        _set("ann", plan="pro", name="Ann"), _set("bob", name="Bob", city="Oslo"),
        _event("view", "anon-1", "mixpanel"), _event("buy", "bob", "cohorly"),
    ])
    assert written.aliases == ["linked", "linked"]
    # A plain link of an id already linked elsewhere stays a conflict.
    refused = await sink.submit([_link("anon-1", "anon-2")])
    assert refused.aliases == ["conflict"]
    merged = await sink.submit([_link("anon-1", "anon-2", merge=True)])
    assert merged.aliases == ["linked"]
    for id_ in ("anon-1", "ann", "anon-2", "bob"):
        person = await queries.profile(engine, "shop", id_)
        assert person is not None, id_
        assert person["distinct_id"] == "bob"
        assert person["ids"] == ["bob", "ann", "anon-1", "anon-2"]
        # The joining person's properties fill in; the person joined keeps its own.
        assert person["properties"] == {"plan": "pro", "name": "Bob", "city": "Oslo"}
    assert await queries.profile(engine, "shop", "ann") == await queries.profile(engine, "shop", "anon-2")
    # The events of every id and every dialect meet in the one person.
    events, _ = await queries.events(engine, "shop", distinct_id="anon-1", name=None, source=None, limit=10,
                                     after=None)
    assert [(e["name"], e["source"]) for e in events] == [("view", "mixpanel"), ("buy", "cohorly")]
    rejections, _ = await queries.rejections(engine, project="shop", source=None, reason=None, limit=10,
                                             after=None)
    assert [r["reason"] for r in rejections] == ["alias_conflict"]


async def test_a_merge_of_one_person_or_of_an_id_with_itself_changes_nothing(store) -> None:
    engine, sink = store
    await sink.submit([_link("anon", "ann")])
    again = await sink.submit([
        _link("anon", "ann", merge=True), _link("ann", "anon", merge=True), _link("ann", "ann", merge=True),
    ])
    assert again.aliases == ["exists", "exists", "self"]
    # Two ids nobody has seen: a plain link, either way round.
    fresh = await sink.submit([_link("x", "y", merge=True), _link("z", "x", merge=True)])
    assert fresh.aliases == ["linked", "linked"]
    async with engine.connect() as conn:
        root, ids = await queries.person_of(conn, "shop", "z")
    assert (root, ids) == ("y", ["y", "x", "z"])
    async with engine.connect() as conn:
        root, ids = await queries.person_of(conn, "shop", "ann")
    assert (root, ids) == ("ann", ["ann", "anon"])


async def test_merged_in_the_same_request_as_the_links_it_joins(store) -> None:
    """In arrival order within one transaction: the links, then the merge,
    then a profile update through the id merged last."""
    engine, sink = store
    written = await sink.submit([
        _link("a1", "ann", source="cohorly"), _link("b1", "bob"), _set("ann", a=1),
        _link("a1", "b1", merge=True), _set("a1", b=2),
    ])
    assert written.aliases == ["linked", "linked", "linked"]
    person = await queries.profile(engine, "shop", "ann")
    assert person is not None
    assert person["distinct_id"] == "bob" and person["properties"] == {"a": 1, "b": 2}
    assert sorted(person["ids"]) == ["a1", "ann", "b1", "bob"]
