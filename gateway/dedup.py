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
from collections.abc import Awaitable, Callable, Iterable

from gateway.redislink import RedisLink

Key = tuple[str, str, str]  # project, source, insert_id

_REMEMBER = """
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], '1', 'EX', ttl)
end
return #KEYS
"""


class Coalesce:
    """Natural batching of cache calls, as the writer batches commits.

    Calls made while a flush is in flight wait and go together in the next
    flush, so under load many requests share one Redis round trip, and a lone
    request waits for nobody. `flush` must not raise (it fails open).
    """

    def __init__(self, flush: Callable[[list[list[Key]]], Awaitable[list[set[Key]]]]) -> None:
        self._flush = flush
        self._pending: list[tuple[list[Key], asyncio.Future[set[Key]] | None]] = []
        self._running = False

    def submit(self, keys: list[Key], wait: bool) -> asyncio.Future[set[Key]] | None:
        future = asyncio.get_running_loop().create_future() if wait else None
        self._pending.append((keys, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                results = await self._flush([keys for keys, _ in batch])
                for (_, future), result in zip(batch, results):
                    if future is not None and not future.done():
                        future.set_result(result)
        finally:
            self._running = False


class LocalDedup:
    """Bounded in-process cache (oldest entries go first)."""

    def __init__(self, ttl_seconds: int, max_entries: int) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._seen: collections.OrderedDict[Key, float] = collections.OrderedDict()

    def seen(self, keys: list[Key]) -> set[Key]:
        now = time.monotonic()
        return {k for k in keys if self._seen.get(k, 0.0) > now}

    def remember(self, keys: Iterable[Key]) -> None:
        expires = time.monotonic() + self._ttl
        for key in keys:
            self._seen[key] = expires
            self._seen.move_to_end(key)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)


class Dedup:
    def __init__(self, link: RedisLink | None, ttl_seconds: int, max_local_entries: int) -> None:
        self._link = link
        self._ttl = ttl_seconds
        self._local = LocalDedup(ttl_seconds, max_local_entries) if link is None else None
        self._remember = link.client.register_script(_REMEMBER) if link else None
        self._lookups = Coalesce(self._lookup)
        self._stores = Coalesce(self._store)

    def _key(self, key: Key) -> str:
        assert self._link is not None
        project, source, insert_id = key
        # Hash-tagged per project: a project's keys live in one cluster slot.
        return self._link.key("dd", "{" + project + "}", source, insert_id)

    async def seen(self, keys: list[Key]) -> set[Key]:
        """The keys already committed (as far as the cache knows)."""
        if not keys:
            return set()
        if self._local is not None:
            return self._local.seen(keys)
        future = self._lookups.submit(keys, wait=True)
        assert future is not None
        return await future

    async def remember(self, keys: list[Key]) -> None:
        """Cache newly committed keys; nobody waits for it."""
        if not keys:
            return
        if self._local is not None:
            self._local.remember(keys)
            return
        self._stores.submit(keys, wait=False)

    async def _lookup(self, requests: list[list[Key]]) -> list[set[Key]]:
        assert self._link is not None
        if not self._link.usable:
            return [set() for _ in requests]
        keys = [key for request in requests for key in request]
        by_project: dict[str, list[Key]] = collections.defaultdict(list)
        for key in keys:
            by_project[key[0]].append(key)
        try:
            async with self._link.client.pipeline(transaction=False) as pipe:
                for group in by_project.values():
                    pipe.mget([self._key(k) for k in group])
                replies = await pipe.execute()
        except Exception as exc:
            self._link.failed("dedup lookup", exc)
            return [set() for _ in requests]
        self._link.succeeded()
        hits: set[Key] = set()
        for group, values in zip(by_project.values(), replies):
            hits.update(k for k, v in zip(group, values) if v is not None)
        return [hits.intersection(request) for request in requests]

    async def _store(self, requests: list[list[Key]]) -> list[set[Key]]:
        assert self._link is not None and self._remember is not None
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
                await self._remember(keys=redis_keys, args=[self._ttl])
        except Exception as exc:
            self._link.failed("dedup remember", exc)
            return done
        self._link.succeeded()
        return done
