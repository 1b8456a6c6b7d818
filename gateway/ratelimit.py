"""Rate limits: Lua scripts in Redis (the calls of concurrent requests
coalesced into one), or in-process.

Without Redis, and whenever a configured Redis cannot answer (down, slow,
or full), the in-process limiter answers: a limit never switches off. Each
process then holds a client to the limit on its own, so with N workers (or
gateways) a client gets up to N times the limit until Redis answers again.

The sliding window is a log of admission times: at most `requests` admitted
in any window of `per_seconds`. The Redis script takes its clock from Redis
(TIME), so several gateways sharing one Redis share one budget and one clock.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import secrets
import time
from typing import Any, TypeVar

from dialects.base import SlidingWindow, TokenBucket
from gateway.redislink import Kind, RedisLink, resolved

# Admissions, one group per key (the asks of one client in a flight, in
# order). KEYS[i]: a window's sorted set; ARGV[1]: a prefix unique to this
# call (members are the prefix and a running number); ARGV[3i-1..3i+1]:
# limit, window ms, how many ask. Returns per key {admitted, wait}: the
# first `admitted` asks of the group are admitted, the rest wait `wait` ms
# until a slot frees up. Concurrent requests share one call (see Flight);
# the keys share a hash tag, so the script stays in one Redis Cluster slot.
# A key's window is counted once and its admissions added in one ZADD: the
# same answers as one ask at a time, at a fraction of the commands.
#
# Counts and admissions first, trims last: when Redis is full (maxmemory
# with noeviction) it refuses a script whose first write is a ZADD, but
# lets one that already wrote anything (a trim) go on past maxmemory. So a
# full Redis refuses the call whole, nothing written, and the gateway falls
# back to its in-process limiter; a call that only refuses writes nothing
# before its trims and is answered. Each set is trimmed to its longest
# window (the same key asked with two windows: a configuration changed
# between two workers).
_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
local made = 0
local out = {}
local longest = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local limit = tonumber(ARGV[3 * i - 1])
  local window = tonumber(ARGV[3 * i])
  local asks = tonumber(ARGV[3 * i + 1])
  local after = '(' .. (now - window)
  local admitted = math.max(0, math.min(asks, limit - redis.call('ZCOUNT', key, after, '+inf')))
  local members = {}
  for j = 1, admitted do
    made = made + 1
    members[2 * j - 1] = now
    members[2 * j] = prefix .. made
  end
  for j = 1, #members, 1000 do
    redis.call('ZADD', key, unpack(members, j, math.min(j + 999, #members)))
  end
  local wait = 0
  if admitted < asks then
    local oldest = redis.call('ZRANGEBYSCORE', key, after, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    wait = window
    if oldest[2] then wait = math.max(1, tonumber(oldest[2]) + window - now) end
  end
  out[i] = {admitted, wait}
  if not longest[key] or longest[key] < window then longest[key] = window end
end
for key, window in pairs(longest) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  redis.call('PEXPIRE', key, window)
end
return out
"""


# One take per key, in order (a key may repeat: two requests of one
# project). KEYS[i]: a bucket's counter; ARGV[3i-2..3i]: capacity, cost,
# window ms. A missing key is a full bucket; taking from it opens a window
# that ends when the key expires, and the bucket is full again for the next
# request. Returns per key 0 when the cost was taken, else the milliseconds
# until the refill. Like the sliding window, concurrent requests share one
# call, and the keys share a hash tag.
_TOKEN_BUCKET = """
local out = {}
for i = 1, #KEYS do
  local capacity = tonumber(ARGV[3 * i - 2])
  local cost = tonumber(ARGV[3 * i - 1])
  local left = redis.call('GET', KEYS[i])
  if not left then
    redis.call('SET', KEYS[i], capacity - cost, 'PX', tonumber(ARGV[3 * i]))
    out[i] = 0
  elseif tonumber(left) >= cost then
    redis.call('DECRBY', KEYS[i], cost)
    out[i] = 0
  else
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl < 1 then ttl = 1 end
    out[i] = ttl
  end
end
return out
"""


T = TypeVar("T")


class _Scripted(Kind[T, int]):
    """Asks answered by one script call for all of a flight's: 0, or the
    milliseconds to wait."""

    def __init__(self, link: RedisLink, local: LocalLimiter, script: str, *prefix: str) -> None:
        self._link = link
        self._local = local
        self._script = link.client.register_script(script)
        self.scripts = (self._script,)
        self._head = link.key(*prefix, "")

    def _call(self, keys: list[str], args: list[object]) -> list[tuple[Any, ...]]:
        return [("EVALSHA", self._script.sha, len(keys), *keys, *args)]

    def _reply(self, replies: list[Any] | Exception) -> list[Any] | None:
        """The script's reply, or None when Redis failed (the asks then go
        to the in-process limiter)."""
        reply = replies if isinstance(replies, Exception) else replies[0]
        if isinstance(reply, Exception):
            self._link.failed("rate limiting", reply)
            return None
        self._link.succeeded()
        answer: list[Any] = reply  # the script answers with an array
        return answer


class _Admissions(_Scripted[tuple[str, SlidingWindow]]):
    """Sliding-window admissions: a flight's asks grouped per client and
    window, one group per key of the script."""

    def __init__(self, link: RedisLink, local: LocalLimiter) -> None:
        super().__init__(link, local, _SLIDING_WINDOW, "rl", "{sliding}")
        # Members must be unique across every gateway sharing the Redis:
        # a random origin per process, and a number per call.
        self._origin = secrets.token_hex(6)
        self._calls = itertools.count()

    def commands(self, asks: list[tuple[str, SlidingWindow]]) -> tuple[list[tuple[Any, ...]], list[list[int]]]:
        groups: dict[tuple[str, SlidingWindow], list[int]] = {}
        for index, ask in enumerate(asks):
            group = groups.get(ask)
            if group is None:
                groups[ask] = [index]
            else:
                group.append(index)
        keys: list[str] = []
        args: list[object] = [f"{self._origin}:{next(self._calls)}:"]
        for (subject, window), indexes in groups.items():
            keys.append(self._head + subject)
            args += (window.requests, window.per_seconds * 1000, len(indexes))
        return self._call(keys, args), list(groups.values())

    def results(self, asks: list[tuple[str, SlidingWindow]], plan: list[list[int]],
                replies: list[Any] | Exception) -> list[int]:
        reply = self._reply(replies)
        if reply is None:
            return [self._local.sliding(key, window) for key, window in asks]
        waits = [0] * len(asks)
        for indexes, (admitted, wait) in zip(plan, reply, strict=False):  # one reply per group (hot path)
            for index in indexes[admitted:]:
                waits[index] = wait
        return waits


class _Takes(_Scripted[tuple[str, TokenBucket, int]]):
    """Token-bucket takes, one key per ask."""

    def __init__(self, link: RedisLink, local: LocalLimiter) -> None:
        super().__init__(link, local, _TOKEN_BUCKET, "tb", "{bucket}")

    def commands(self, asks: list[tuple[str, TokenBucket, int]]) -> tuple[list[tuple[Any, ...]], None]:
        keys: list[str] = []
        args: list[object] = []
        for subject, bucket, cost in asks:
            keys.append(self._head + subject)
            args += (bucket.capacity, cost, bucket.per_seconds * 1000)
        return self._call(keys, args), None

    def results(self, asks: list[tuple[str, TokenBucket, int]], plan: None,
                replies: list[Any] | Exception) -> list[int]:
        reply = self._reply(replies)
        if reply is None:
            return [self._local.take(key, bucket, cost) for key, bucket, cost in asks]
        return [int(w) for w in reply]


def retry_after_seconds(wait_ms: int) -> int:
    return max(1, math.ceil(wait_ms / 1000))


class LocalLimiter:
    """In-process sliding windows and buckets: the limits of a gateway
    without Redis, and of one whose Redis cannot answer."""

    def __init__(self) -> None:
        # (key, window length in ms) -> admission times in monotonic ms.
        self._logs: dict[tuple[str, float], collections.deque[float]] = {}
        self._next_sweep = 0.0
        # key -> (window end in monotonic ms, tokens left); one per project.
        self._buckets: dict[str, tuple[float, int]] = {}

    def sliding(self, key: str, window: SlidingWindow) -> int:
        now = time.monotonic() * 1000
        length = window.per_seconds * 1000
        # Sweep before taking this key's log, so the sweep cannot orphan it.
        self._sweep(now, length)
        log = self._logs.get((key, length))
        if log is None:
            log = self._logs[(key, length)] = collections.deque()
        while log and log[0] <= now - length:
            log.popleft()
        if len(log) < window.requests:
            log.append(now)
            return 0
        return max(1, math.ceil(log[0] + length - now))

    def take(self, key: str, bucket: TokenBucket, cost: int) -> int:
        now = time.monotonic() * 1000
        ends, left = self._buckets.get(key, (0.0, 0))
        if now >= ends:
            ends, left = now + bucket.per_seconds * 1000, bucket.capacity
        if left < cost:
            self._buckets[key] = (ends, left)
            return max(1, math.ceil(ends - now))
        self._buckets[key] = (ends, left - cost)
        return 0

    def _sweep(self, now: float, length: float) -> None:
        # Forget idle clients so the table does not grow with every IP seen;
        # each log by its own window (limits of several lengths share it).
        if now < self._next_sweep:
            return
        self._next_sweep = now + length
        idle = [k for k, log in self._logs.items() if not log or log[-1] <= now - k[1]]
        for key in idle:
            del self._logs[key]


class Limiter:
    """Redis when configured and answering; the in-process limiter when it
    is not configured, skipped after a failure (see RedisLink.usable), or
    failing this very call."""

    def __init__(self, link: RedisLink | None) -> None:
        self._link = link
        self._local = LocalLimiter()
        self._admissions = _Admissions(link, self._local) if link else None
        self._takes = _Takes(link, self._local) if link else None

    def sliding(self, name: str, subject: str, window: SlidingWindow) -> asyncio.Future[int]:
        """Asked now, answered by the future: 0 if admitted, else
        milliseconds until the next admission. In Redis the ask rides the
        request path's flight (see Flight), with what the request asks
        next in the same turn."""
        key = f"{name}:{subject}"
        if self._link is None or self._admissions is None or not self._link.usable:
            return resolved(self._local.sliding(key, window))
        return self._link.flight.submit(self._admissions, (key, window))

    async def bucket(self, name: str, subject: str, bucket: TokenBucket, cost: int) -> int:
        """Take `cost` tokens (capped at the capacity): 0, or ms until the refill."""
        cost = min(cost, bucket.capacity)
        key = f"{name}:{subject}"
        if self._link is None or self._takes is None or not self._link.usable:
            return self._local.take(key, bucket, cost)
        return await self._link.flight.submit(self._takes, (key, bucket, cost))
