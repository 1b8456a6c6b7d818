"""gateway.dedup.LocalDedup: the in-process cache of committed insert ids."""

from __future__ import annotations

import time

import pytest

from gateway.dedup import LocalDedup


def _keys(start: int, count: int) -> list[tuple[str, str, str]]:
    return [("shop", "cohorly", f"id-{n}") for n in range(start, start + count)]


def test_remembered_ids_are_seen_and_others_are_not() -> None:
    cache = LocalDedup(ttl_seconds=60, max_entries=100)
    cache.remember(_keys(0, 10))
    assert cache.seen(_keys(5, 10)) == set(_keys(5, 5))
    assert cache.seen([("other", "cohorly", "id-1"), ("shop", "client", "id-1")]) == set()


def test_it_keeps_the_most_recent_ids_and_never_more_than_its_bound() -> None:
    cache = LocalDedup(ttl_seconds=60, max_entries=100)
    for start in range(0, 1000, 10):
        cache.remember(_keys(start, 10))
        assert len(cache._young) + len(cache._old) <= 100
    # At least the most recent half of the bound is still known ...
    assert cache.seen(_keys(950, 50)) == set(_keys(950, 50))
    # ... and the oldest are gone.
    assert cache.seen(_keys(0, 500)) == set()


def test_an_id_past_its_time_is_not_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = LocalDedup(ttl_seconds=60, max_entries=100)
    cache.remember(_keys(0, 3))
    cache.remember(_keys(60, 50))  # the first ones move to the old generation
    later = time.monotonic() + 61
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert cache.seen(_keys(0, 3)) == set()
    cache.remember(_keys(1, 1))  # remembered again: a fresh time
    assert cache.seen(_keys(0, 3)) == {("shop", "cohorly", "id-1")}
