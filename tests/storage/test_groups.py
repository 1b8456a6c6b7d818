"""Planning and settling a group's events, and sorting groups by kind."""

from __future__ import annotations

from gateway.model import Alias, Event, ProfileUpdate, Rejection
from storage.groups import Pending, events_and_touches, events_only, plan_events, settle_events, touched
from storage.sink import Written


def _event(insert_id: str | None) -> Event:
    return Event(project="shop", source="s", name="e", distinct_id="u", time=1, received_at=1, insert_id=insert_id)


def _touch(id_: str) -> ProfileUpdate:
    return ProfileUpdate(project="shop", source="s", distinct_id=id_, time=1, touch=True)


def test_the_first_request_naming_an_insert_id_owns_it() -> None:
    group = [Pending([_event("a"), _event("a\x00"), _event(None)], [], None),
             Pending([_event("a"), _event("b")], [], None)]
    results = [Written(), Written()]
    fresh, owner = plan_events(group, results)
    assert [e.insert_id for e in fresh] == ["a", "a\x00", None, "b"]
    assert owner == {("shop", "s", "a"): 0, ("shop", "s", "a\ufffd"): 0, ("shop", "s", "b"): 1}
    assert [(w.inserted, w.duplicates) for w in results] == [(1, 0), (0, 1)]  # no key: new at once
    settle_events(owner, {("shop", "s", "a"), ("shop", "s", "b")}, results)
    assert [(w.inserted, w.duplicates) for w in results] == [(2, 1), (1, 1)]
    assert results[1].new_keys == [("shop", "s", "b")]
    settle_events({("shop", "s", "c"): 1}, None, results)  # None: every one stored
    assert results[1].new_keys == [("shop", "s", "b"), ("shop", "s", "c")]


def test_groups_by_kind_and_their_touches() -> None:
    rejection = Rejection(project="shop", source="s", reason="r", detail="d")
    events = Pending([_event("a")], [], None)
    touching = Pending([_event("b"), _touch("v"), _touch("u"), _touch("v")], [], None)
    assert events_only([events]) and events_and_touches([events])
    assert not events_only([events, touching]) and events_and_touches([events, touching])
    assert not events_and_touches([events, Pending([_event("c")], [rejection], None)])
    assert not events_and_touches([Pending([Alias(project="shop", source="s", alias="a", distinct_id="b")], [],
                                           None)])
    set_ = ProfileUpdate(project="shop", source="s", distinct_id="u", time=1, touch=True, set={"a": 1})
    assert not events_and_touches([Pending([set_], [], None)])
    results = [Written(), Written()]
    assert touched([events, touching], results) == [("shop", "u"), ("shop", "v")]
    assert [w.applied for w in results] == [0, 3]
