"""gateway.redislink against a real Redis of the test's own: Channel's
pipelined calls (error replies returned, a dropped connection replaced within
the call), Coalesce's shared flushes, Flight's one round trip for a turn's
rate-limit asks and dedup questions (scripts loaded and reloaded within it,
Redis away falling back to the in-process limiter), and RedisLink's failure
switch. The sliding window's Redis script: tests/gateway/test_ratelimit.py;
the dedup sets: tests/gateway/test_dedup.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from dialects.base import SlidingWindow
from gateway.dedup import Dedup
from gateway.ratelimit import Limiter
from gateway.redislink import Channel, Coalesce, Kind, RedisLink

pytestmark = pytest.mark.anyio


# -- Channel -------------------------------------------------------------------


async def test_replies_in_order_with_errors_returned(link) -> None:
    channel = Channel(link)
    await link.client.set("a", "1")
    replies = await channel.execute([("MGET", "a", "b"), ("INCR", "a"), ("LPUSH", "a", "x"), ("GET", "a")])
    assert replies[:2] == [[b"1", None], 2]
    assert isinstance(replies[2], redis.ResponseError) and "WRONGTYPE" in str(replies[2])
    assert replies[3] == b"2"



async def test_a_connection_redis_dropped_is_replaced_within_the_call(own_redis, link) -> None:
    channel = Channel(link)
    (first,) = await channel.execute([("CLIENT", "ID")])
    assert await link.client.client_kill_filter(_id=first) == 1
    (second,) = await channel.execute([("CLIENT", "ID")])  # retried on a new connection
    assert second != first
    own_redis.kill()
    with pytest.raises(redis.ConnectionError):
        await channel.execute([("PING",)])



def test_pack_writes_what_the_client_would() -> None:
    from redis.asyncio.connection import Connection

    from gateway.redislink import pack

    commands = [("EVALSHA", "f00", 2, "k1", b"k\xff2", 100, 1.5, "\u00e9"), ("MGET", "a"), ("PING",)]
    assert pack(commands) == b"".join(Connection().pack_commands(commands))
    with pytest.raises(TypeError):
        pack([("SET", "k", None)])



# -- Coalesce: calls made during a flush share the next one --------------------


async def test_calls_during_a_flush_go_together_in_the_next() -> None:
    flushes: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushes.append(items)
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]

    coalesce: Coalesce[int, int] = Coalesce(flush)
    first = coalesce.submit(1)
    await asyncio.sleep(0)  # the first flush is now in flight
    rest = [coalesce.submit(i) for i in (2, 3, 4)]
    assert await asyncio.gather(first, *rest) == [10, 20, 30, 40]
    assert flushes == [[1], [2, 3, 4]]



async def test_a_flush_that_raises_fails_its_callers_instead_of_hanging() -> None:
    calls = 0

    async def flush(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug")
        return items

    coalesce: Coalesce[int, int] = Coalesce(flush)
    failed = coalesce.submit(1)
    coalesce.submit_nowait(2)  # nobody waits on this one: no "never retrieved" warning either
    with pytest.raises(RuntimeError, match="bug"):
        await asyncio.wait_for(failed, 2)
    # The coalescer keeps working after the failure.
    assert await asyncio.wait_for(coalesce.submit(5), 2) == 5



def _recording(linger: float) -> tuple[Coalesce[int, int], list[list[int]]]:
    """A coalescer whose flushes are recorded (and answer each item with itself)."""
    flushes: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushes.append(items)
        return items

    return Coalesce(flush, linger=linger), flushes



async def test_a_lingering_flush_gathers_the_calls_of_its_linger() -> None:
    coalesce, flushes = _recording(linger=0.05)
    coalesce.submit_nowait(1)
    await asyncio.sleep(0.01)
    coalesce.submit_nowait(2)
    assert flushes == []  # still lingering
    await asyncio.sleep(0.1)
    assert flushes == [[1, 2]]



async def test_settle_flushes_a_lingering_batch_at_once() -> None:
    coalesce, flushes = _recording(linger=30)
    coalesce.submit_nowait(1)
    coalesce.submit_nowait(2)
    await asyncio.sleep(0)
    await asyncio.wait_for(coalesce.settle(), 1)
    assert flushes == [[1, 2]]



# -- Flight --------------------------------------------------------------------


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


# -- RedisLink: the failure switch --------------------------------------------


async def test_a_failed_link_rests_for_its_retry_interval_and_says_what_failed(own_redis, link) -> None:
    assert link.key("rl", "x") == "t:rl:x"
    assert await link.ping() and link.healthy and link.usable
    assert await link.readiness() is None
    own_redis.kill()
    assert not await link.ping()
    assert not link.healthy and not link.usable  # resting: the request path leaves Redis alone
    failure = link.last_failure
    assert failure is not None and (failure.during, failure.reason) == ("ping", "unreachable")
    # Only the exception's type: no address (or password) in what /readyz shows.
    assert "127.0.0.1" not in failure.detail and str(own_redis.port) not in failure.detail
    ready = await link.readiness()
    assert ready is not None and ready["during"] == "readiness probe" and ready["reason"] == "unreachable"
    # Usable again once retry_interval (1 s here) has passed, still unhealthy until a call succeeds.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not link.usable and loop.time() < deadline:  # noqa: ASYNC110 - no event signals the link
        await asyncio.sleep(0.05)
    assert link.usable and not link.healthy


async def test_a_readiness_probe_that_succeeds_brings_the_link_back_at_once(own_redis) -> None:
    link = RedisLink(own_redis.url, prefix="t", retry_interval=3600, failure_window=3600)
    try:
        link.failed("dedup lookup", ConnectionError("gone"))
        assert not link.usable
        ready = await link.readiness()  # Redis answers the write
        assert link.healthy and link.usable  # not after the hour of retry_interval
        # The last failure is still reported within its failure_window.
        assert ready is not None and ready["during"] == "dedup lookup"
        assert await link.client.get("t:readyz") == b"1"
    finally:
        await link.close()
