"""gateway.dedup: the cache of committed insert ids, in process (LocalDedup,
when there is no Redis) and in Redis (sets of 16-byte digests per project,
source and period, against a Redis of the test's own). Through the pipeline:
tests/gateway/test_pipeline.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.dedup import Dedup, LocalDedup, member, members

pytestmark = pytest.mark.anyio


# -- in process ------------------------------------------------------------------


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


async def test_without_redis_the_cache_is_in_process_and_answers_at_once() -> None:
    dedup = Dedup(None, ttl_seconds=60, max_local_entries=100)
    await dedup.remember([("shop", "cohorly", "a"), ("blog", "cohorly", "a")])
    found = dedup.seen([("shop", "cohorly", "a"), ("shop", "client", "a"), ("blog", "cohorly", "b")])
    assert found.done()  # no round trip to wait for
    assert await found == {("shop", "cohorly", "a")}
    await dedup.remember([])
    await dedup.close()


def test_members_are_the_digests_member_gives_one_at_a_time() -> None:
    ids = ["a", "b", "\ud800 lone surrogate", "é" * 255]
    assert members("shop", "cohorly", ids) == [member("shop", "cohorly", i) for i in ids]
    assert members("shop", "cohorly", []) == []
    # The same id of another stream is another member.
    assert member("shop", "cohorly", "a") != member("blog", "cohorly", "a")


# -- in Redis --------------------------------------------------------------------------


async def test_remembered_ids_are_seen_per_project_and_source_until_they_expire(link) -> None:
    dedup = Dedup(link, ttl_seconds=80, max_local_entries=10)
    await dedup.remember([("shop", "cohorly", "a"), ("shop", "cohorly", "b"), ("shop", "client", "c")])
    await dedup.remember([("other", "cohorly", "a")])
    await dedup.close()
    asked = [("shop", "cohorly", "a"), ("shop", "cohorly", "b"), ("shop", "cohorly", "c"),
             ("shop", "client", "a"), ("shop", "client", "c"),
             ("other", "cohorly", "a"), ("other", "cohorly", "b")]
    assert await dedup.seen(asked) == {("shop", "cohorly", "a"), ("shop", "cohorly", "b"),
                                       ("shop", "client", "c"), ("other", "cohorly", "a")}
    # One set per project, source and period of an eighth of the TTL, kept
    # for the TTL plus three periods after its last id (unlinked before).
    sets = sorted(k.decode() for k in await link.client.keys("t:dd2:*"))
    assert [s.rsplit(":", 1)[0] for s in sets] == [
        "t:dd2:{other}:cohorly", "t:dd2:{shop}:client", "t:dd2:{shop}:cohorly"]
    assert all(100 < ttl <= 110 for ttl in [await link.client.ttl(s) for s in sets])
    # Sets of periods the TTL no longer reaches are not asked.
    old = int(sets[0].rsplit(":", 1)[1]) - 10
    await link.client.sadd(f"t:dd2:{{other}}:cohorly:{old}", member("other", "cohorly", "b"))
    assert await dedup.seen([("other", "cohorly", "b")]) == set()
    await link.client.sadd(f"t:dd2:{{other}}:cohorly:{old + 2}", member("other", "cohorly", "b"))
    assert await dedup.seen([("other", "cohorly", "b")]) == {("other", "cohorly", "b")}



async def test_sets_the_lookups_no_longer_reach_are_unlinked_at_a_new_period(link) -> None:
    dedup = Dedup(link, ttl_seconds=8000, max_local_entries=10)  # periods of 1000 s
    now = int(time.time()) // 1000
    stale, oldest_asked = now - 10, now - 9
    for period in (stale, oldest_asked):
        await link.client.sadd(f"t:dd2:{{shop}}:cohorly:{period}", member("shop", "cohorly", "old"))
    # The first remember of a process (a new period for it) sweeps.
    await dedup.remember([("shop", "cohorly", "new")])
    await dedup.close()
    assert not await link.client.exists(f"t:dd2:{{shop}}:cohorly:{stale}")
    assert await dedup.seen([("shop", "cohorly", "old"), ("shop", "cohorly", "new")]) == {
        ("shop", "cohorly", "old"), ("shop", "cohorly", "new")}



async def test_redis_keeps_a_16_byte_digest_of_each_id_whatever_its_length(link) -> None:
    dedup = Dedup(link, ttl_seconds=80, max_local_entries=10)
    ids = ["a", "é" * 255, "x" * 255, "x" * 254]
    await dedup.remember([("shop", "cohorly", i) for i in ids])
    await dedup.close()
    [name] = await link.client.keys("t:dd2:*")
    stored = await link.client.smembers(name)
    assert {len(m) for m in stored} == {16}
    assert stored == {member("shop", "cohorly", i) for i in ids}
    # The digest covers the project and source too, and ids that only look alike differ.
    assert len({member("shop", "cohorly", "a"), member("shop", "client", "a"), member("shopc", "ohorly", "a"),
                member("shop", "cohorly", "a ")}) == 4
    assert await dedup.seen([("shop", "cohorly", i) for i in [*ids, "x" * 253]]) == {
        ("shop", "cohorly", i) for i in ids}


async def test_redis_away_is_a_miss_and_a_lost_remember_not_an_error(own_redis, link) -> None:
    dedup = Dedup(link, ttl_seconds=60, max_local_entries=10)
    await dedup.remember([("shop", "cohorly", "kept")])
    await dedup.close()
    assert await dedup.seen([("shop", "cohorly", "kept")]) == {("shop", "cohorly", "kept")}
    own_redis.kill()
    # A miss sends the event to the database, whose unique key decides.
    assert await asyncio.wait_for(dedup.seen([("shop", "cohorly", "kept")]), 5) == set()
    assert not link.healthy
    await dedup.remember([("shop", "cohorly", "lost")])
    await asyncio.wait_for(dedup.close(), 5)
    # While the link rests, no question goes to Redis at all.
    assert not link.usable
    assert await dedup.seen([("shop", "cohorly", "kept")]) == set()


async def test_no_keys_no_round_trip(link) -> None:
    dedup = Dedup(link, ttl_seconds=60, max_local_entries=10)
    assert await dedup.seen([]) == set()
    await dedup.remember([])
    await dedup.close()
    assert await link.client.keys("t:*") == []


# -- forgetting (an erasure) -------------------------------------------------------


async def test_forgotten_ids_are_no_longer_seen_in_process() -> None:
    dedup = Dedup(None, ttl_seconds=60, max_local_entries=6)
    await dedup.remember(_keys(0, 3))  # the old generation now
    await dedup.remember(_keys(3, 1))  # the young one
    assert await dedup.forget([_keys(0, 1)[0], _keys(3, 1)[0]]) is True
    assert await dedup.seen(_keys(0, 4)) == {_keys(1, 1)[0], _keys(2, 1)[0]}


async def test_forgotten_ids_leave_every_set_a_lookup_asks_in_redis(link) -> None:
    dedup = Dedup(link, ttl_seconds=80, max_local_entries=10)
    await dedup.remember(_keys(0, 3))
    await dedup.close()
    # One more in an older period's set, still within the TTL.
    sets = sorted(k.decode() for k in await link.client.keys("t:dd2:*"))
    older = f"{sets[0].rsplit(':', 1)[0]}:{int(sets[0].rsplit(':', 1)[1]) - 3}"
    await link.client.sadd(older, member("shop", "cohorly", "id-0"))
    assert await dedup.forget(_keys(0, 2)) is True
    assert await dedup.seen(_keys(0, 3)) == set(_keys(2, 1))
    assert await link.client.scard(older) == 0
