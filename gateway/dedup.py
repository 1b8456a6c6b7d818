"""The dedup fast path: a cache of committed insert ids.

Only ids whose events were committed are remembered, so a hit is always a
true duplicate; a miss (or Redis being away) sends the event to the database,
whose unique constraint decides. Losing the cache never loses or duplicates
data, it only costs the database a conflict check.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterable
from typing import Any

from gateway.redislink import Channel, Coalesce, Kind, RedisLink

Key = tuple[str, str, str]  # project, source, insert_id

# Seconds a remember waits for others to go with it.
REMEMBER_LINGER = 0.02

_REMEMBER = """
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], '1', 'EX', ttl)
end
return #KEYS
"""


class LocalDedup:
    """Bounded in-process cache, in two generations: ids are remembered in
    the young one; when it holds half the bound, it becomes the old one and
    the previous old one is dropped whole. Between half the bound and the
    bound of the most recent ids are kept, and forgetting costs nothing per
    id (evicting the oldest ids one by one from a dict walks over the slots
    of those evicted before, which grows slower as it fills)."""

    def __init__(self, ttl_seconds: int, max_entries: int) -> None:
        self._ttl = ttl_seconds
        self._half = max(1, max_entries // 2)
        self._young: dict[Key, float] = {}
        self._old: dict[Key, float] = {}

    def seen(self, keys: list[Key]) -> set[Key]:
        hits = self._young.keys() & keys
        if self._old:
            hits |= self._old.keys() & keys
        if hits:
            now = time.monotonic()
            young, old = self._young, self._old
            hits = {k for k in hits if young.get(k, 0.0) > now or old.get(k, 0.0) > now}
        return hits

    def remember(self, keys: Iterable[Key]) -> None:
        self._young.update(dict.fromkeys(keys, time.monotonic() + self._ttl))
        if len(self._young) >= self._half:
            self._old, self._young = self._young, {}


class Dedup:
    def __init__(self, link: RedisLink | None, ttl_seconds: int, max_local_entries: int) -> None:
        self._link = link
        self._ttl = ttl_seconds
        self._local = LocalDedup(ttl_seconds, max_local_entries) if link is None else None
        self._remember = link.client.register_script(_REMEMBER) if link else None
        self._lookups = _Lookups(self) if link else None
        self._store_channel = Channel(link) if link else None
        # Nobody waits for a remember: it lingers a little to share its
        # round trip with the next ones (a retry inside that time is still
        # caught, by the database's unique key).
        self._stores: Coalesce[list[Key], set[Key]] = Coalesce(self._store, linger=REMEMBER_LINGER)

    def _key(self, key: Key) -> str:
        assert self._link is not None
        project, source, insert_id = key
        # Hash-tagged per project: a project's keys live in one cluster slot.
        return self._link.key("dd", "{" + project + "}", source, insert_id)

    def seen(self, keys: list[Key]) -> asyncio.Future[set[Key]]:
        """Asked now, answered by the future: the keys already committed (as
        far as the cache knows). In Redis the question rides the request
        path's flight (see Flight)."""
        if self._local is not None:
            return _now(self._local.seen(keys))
        assert self._link is not None and self._lookups is not None
        if not keys or not self._link.usable:
            return _now(set())
        return self._link.flight.submit(self._lookups, keys)

    async def remember(self, keys: list[Key]) -> None:
        """Cache newly committed keys; nobody waits for it."""
        if not keys:
            return
        if self._local is not None:
            self._local.remember(keys)
            return
        self._stores.submit_nowait(keys)

    async def close(self) -> None:
        """Send the remembers still waiting (before the link closes)."""
        await self._stores.settle()

    async def _store(self, requests: list[list[Key]]) -> list[set[Key]]:
        assert self._link is not None and self._remember is not None and self._store_channel is not None
        done: list[set[Key]] = [set() for _ in requests]
        if not self._link.usable:
            return done
        by_project: dict[str, list[str]] = collections.defaultdict(list)
        for request in requests:
            for key in request:
                by_project[key[0]].append(self._key(key))
        try:
            # One script call per project (its keys share a cluster slot).
            for redis_keys in by_project.values():
                await self._store_channel.script(self._remember, redis_keys, [self._ttl])
        except Exception as exc:
            self._link.failed("dedup remember", exc)
            return done
        self._link.succeeded()
        return done


def _now(result: set[Key]) -> asyncio.Future[set[Key]]:
    future: asyncio.Future[set[Key]] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


class _Lookups(Kind[list[Key], set[Key]]):
    """Dedup lookups: one MGET per project (its keys share a cluster slot)
    for a flight's questions."""

    def __init__(self, dedup: Dedup) -> None:
        self._dedup = dedup

    def commands(self, requests: list[list[Key]]) -> tuple[list[tuple[Any, ...]], list[list[Key]]]:
        groups = _by_project(key for request in requests for key in request)
        return [("MGET", *[self._dedup._key(k) for k in group]) for group in groups], groups

    def results(self, requests: list[list[Key]], groups: list[list[Key]],
                replies: list[Any] | Exception) -> list[set[Key]]:
        link = self._dedup._link
        assert link is not None
        failure = replies if isinstance(replies, Exception) else next(
            (r for r in replies if isinstance(r, Exception)), None)
        if failure is not None:
            link.failed("dedup lookup", failure)
            return [set() for _ in requests]
        link.succeeded()
        hits: set[Key] = set()
        for group, values in zip(groups, replies):
            hits.update(k for k, v in zip(group, values) if v is not None)
        return [hits.intersection(request) for request in requests]


def _by_project(keys: Iterable[Key]) -> list[list[Key]]:
    groups: dict[str, list[Key]] = collections.defaultdict(list)
    for key in keys:
        groups[key[0]].append(key)
    return list(groups.values())
