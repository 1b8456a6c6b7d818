"""gateway.redislink.Flight against a real Redis of the test's own: a
request's rate-limit ask and dedup question in one round trip, the sliding
window's answers when one call carries many asks, scripts reloaded within
the flight, Redis away falling back to the in-process limiter, and the
dedup members being fixed-size digests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from dialects.base import SlidingWindow
from gateway.dedup import Dedup, member
from gateway.ratelimit import Limiter
from gateway.redislink import Channel, Kind, RedisLink

pytestmark = pytest.mark.anyio


def _count_round_trips(link: RedisLink) -> list[int]:
    """How many commands each round trip of the link's flight carried."""
    trips: list[int] = []
    channel: Channel = link.flight._channel
    execute = channel.execute

    async def counted(commands):  # type: ignore[no-untyped-def]
        trips.append(len(commands))
        return await execute(commands)

    channel.execute = counted  # type: ignore[method-assign]
    return trips


async def test_the_asks_and_questions_of_one_turn_share_one_round_trip(link) -> None:
    limiter, dedup = Limiter(link), Dedup(link, ttl_seconds=60, max_local_entries=10)
    window = SlidingWindow(requests=100, per_seconds=10)
    await dedup.remember([("shop", "cohorly", "seen-1")])
    await dedup.close()  # sent now
    # The scripts loaded.
    assert await limiter.sliding("cohorly", "10.0.0.9", window) == 0
    assert await dedup.seen([("shop", "cohorly", "warm")]) == set()
    trips = _count_round_trips(link)
    # Three requests in one turn, as the pipeline makes them: its client's
    # window first, then (body read and translated) its insert ids.
    asks = [limiter.sliding("cohorly", "10.0.0.1", window) for _ in range(3)]
    questions = [dedup.seen([("shop", "cohorly", f"seen-{n}"), ("other", "cohorly", "x")]) for n in (1, 2, 3)]
    assert await asyncio.gather(*asks) == [0, 0, 0]
    assert await asyncio.gather(*questions) == [{("shop", "cohorly", "seen-1")}, set(), set()]
    # One script call for the three asks, one per project (and source) for the questions.
    assert trips == [3]


async def test_one_call_of_many_asks_answers_as_one_ask_at_a_time(link) -> None:
    limiter = Limiter(link)
    two = SlidingWindow(requests=2, per_seconds=10)
    three = SlidingWindow(requests=3, per_seconds=10)
    order = [("a", two), ("b", three), ("a", two), ("a", two),
             ("b", three), ("b", three), ("b", three), ("a", two)]
    waits = await asyncio.gather(*[limiter.sliding("cohorly", key, window) for key, window in order])
    assert [w == 0 for w in waits] == [True, True, True, False, True, True, False, False]
    assert all(9000 < w <= 10000 for w in waits if w)  # until the oldest admission leaves the window
    # Exactly the admissions are in the windows, expiring with them.
    assert await link.client.zcard("t:rl:{sliding}:cohorly:a") == 2
    assert await link.client.zcard("t:rl:{sliding}:cohorly:b") == 3
    assert 9000 < await link.client.pttl("t:rl:{sliding}:cohorly:a") <= 10000
    # A later call sees them.
    assert await limiter.sliding("cohorly", "a", two) > 0


async def test_two_gateways_asking_in_one_flight_each_add_their_own_admissions(link) -> None:
    # Two limiters are two gateways sharing one Redis (here in one process,
    # with the same pid): their admissions must never collide as members.
    first, second = Limiter(link), Limiter(link)
    four = SlidingWindow(requests=4, per_seconds=10)
    asks = [limiter.sliding("cohorly", "c", four) for limiter in (first, second, first, second)]
    assert await asyncio.gather(*asks) == [0, 0, 0, 0]
    assert await link.client.zcard("t:rl:{sliding}:cohorly:c") == 4
    assert await first.sliding("cohorly", "c", four) > 0


async def test_one_client_under_two_windows_in_one_call_is_held_to_each(link) -> None:
    # The same key asked with two windows (a configuration changed between
    # two workers): each group is counted against its own.
    limiter = Limiter(link)
    one, three = SlidingWindow(requests=1, per_seconds=10), SlidingWindow(requests=3, per_seconds=10)
    order = [("d", one), ("d", three), ("d", one), ("d", three), ("d", three)]
    waits = await asyncio.gather(*[limiter.sliding("cohorly", key, window) for key, window in order])
    assert [w == 0 for w in waits] == [True, True, False, True, False]
    assert await link.client.zcard("t:rl:{sliding}:cohorly:d") == 3


_SCRIPT = "redis.call('INCR', KEYS[1]); return tonumber(redis.call('GET', KEYS[1])) * tonumber(ARGV[1])"


class _Counter(Kind[int, int]):
    """Each item: INCR n by script, answered n times the item."""

    def __init__(self, link: RedisLink) -> None:
        self._script = link.client.register_script(_SCRIPT)
        self.scripts = (self._script,)

    def commands(self, items: list[int]) -> tuple[list[tuple[Any, ...]], None]:
        return [("EVALSHA", self._script.sha, 1, "n", item) for item in items], None

    def results(self, items: list[int], plan: None, replies: list[Any] | Exception) -> list[int]:
        assert not isinstance(replies, Exception)
        return list(replies)


async def test_a_script_unknown_to_redis_is_loaded_and_runs_once(link) -> None:
    counter = _Counter(link)
    assert await link.flight.submit(counter, 10) == 10  # first call: NOSCRIPT, loaded
    assert await link.flight.submit(counter, 10) == 20
    await link.client.script_flush()  # as a restart would
    assert await link.flight.submit(counter, 10) == 30
    # Once per call, never twice: the counter moved by one each time.
    assert await link.client.get("n") == b"3"


async def test_a_flight_reloads_the_scripts_redis_lost_and_runs_each_command_once(link) -> None:
    limiter, dedup = Limiter(link), Dedup(link, ttl_seconds=60, max_local_entries=10)
    window = SlidingWindow(requests=5, per_seconds=10)
    assert await limiter.sliding("cohorly", "ip", window) == 0  # first call: NOSCRIPT, loaded
    await link.client.script_flush()  # as a restart would
    ask = limiter.sliding("cohorly", "ip", window)
    question = dedup.seen([("shop", "cohorly", "i")])
    assert (await ask, await question) == (0, set())
    assert await link.client.zcard("t:rl:{sliding}:cohorly:ip") == 2  # each ask counted once
    assert link.healthy


async def test_redis_away_falls_back_for_every_kind_in_the_flight(own_redis, link) -> None:
    limiter, dedup = Limiter(link), Dedup(link, ttl_seconds=60, max_local_entries=10)
    window = SlidingWindow(requests=1, per_seconds=10)
    assert await limiter.sliding("cohorly", "ip", window) == 0
    own_redis.kill()
    # The failed call's asks go to the in-process limiter (which has not
    # seen this client yet: one admitted, the next refused); the question
    # goes to the database (no hit).
    asks = [limiter.sliding("cohorly", "ip", window), limiter.sliding("cohorly", "ip", window)]
    question = dedup.seen([("shop", "cohorly", "i")])
    first, second = await asyncio.gather(*asks)
    assert (first, await question) == (0, set())
    assert 9000 <= second <= 10000
    assert not link.healthy
    # Skipped while down (no Redis call): still in-process, still refused.
    assert not link.usable
    assert await limiter.sliding("cohorly", "ip", window) > 0


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
