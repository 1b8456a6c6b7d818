"""The dedup fast path: a cache of committed insert ids.

Only ids whose events were committed are remembered, so a hit is always a
true duplicate; a miss (or Redis being away) sends the event to the database,
whose unique constraint decides. Losing the cache never loses or duplicates
data, it only costs the database a conflict check.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import Iterable
from typing import Any

from gateway.redislink import Channel, Coalesce, Kind, RedisLink, resolved

Key = tuple[str, str, str]  # project, source, insert_id
_Stream = tuple[str, str, list[str]]  # project, source, insert ids

# Seconds a remember waits for others to go with it.
REMEMBER_LINGER = 0.02

# In Redis, a project's and source's committed ids are members of one set
# per period of an eighth of the TTL (keys hash-tagged per project). A
# remember adds them to the current period's set (SADD) and renews its
# expiry; a lookup asks the sets of every period the TTL reaches back to.
# Compared with a key per id (SET ... EX), a remember costs Redis a tenth
# and the ids half the memory. A set the lookups no longer reach is
# UNLINKed by the gateways that wrote to it (freed off Redis's main thread:
# a big set left to expire would be freed on it, stalling Redis), and
# expires a period later otherwise; an id is known for the TTL, and at
# most half as long again.
PERIODS = 8

# The sets' name: "dd2" since members became digests (see member). The raw
# ids of "dd" sets written before are never asked again and expire; a retry
# of an id cached before the upgrade misses the cache once, and the
# database's unique key refuses it.
SETS = "dd2"


def member(project: str, source: str, insert_id: str) -> bytes:
    """What Redis keeps of a committed id: a 16-byte BLAKE2b digest of its
    project, source and insert id, so a member costs Redis the same memory
    whatever the caller sent (insert ids run to 255 characters). Two ids of
    one stream share a digest with odds near 2**-128 per pair: that event
    would be taken for a duplicate."""
    return members(project, source, [insert_id])[0]


# A hash already fed its stream's project and source, per stream (as many
# as projects times dialects): copying it costs less than hashing anew.
_heads: dict[tuple[str, str], Any] = {}


def members(project: str, source: str, ids: list[str]) -> list[bytes]:
    """`member` of each id of one stream."""
    head = _heads.get((project, source))
    if head is None:
        prefix = f"{len(project)}:{project}{len(source)}:{source}".encode("utf-8", "surrogatepass")
        head = _heads[(project, source)] = hashlib.blake2b(prefix, digest_size=16)
    out = []
    for insert_id in ids:
        digest = head.copy()
        digest.update(insert_id.encode("utf-8", "surrogatepass"))
        out.append(digest.digest())
    return out


# KEYS: a project's and source's period sets; ARGV: members (see member).
# Per member, 1 if any set has it, else 0.
_LOOKUP = """
local found = {}
for i = 1, #ARGV do found[i] = 0 end
for k = 1, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then
    for j = 1, #ARGV, 1000 do
      local hits = redis.call('SMISMEMBER', KEYS[k], unpack(ARGV, j, math.min(j + 999, #ARGV)))
      for i = 1, #hits do
        if hits[i] == 1 then found[j + i - 1] = 1 end
      end
    end
  end
end
return found
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

    def forget(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._young.pop(key, None)
            self._old.pop(key, None)


class Dedup:
    def __init__(self, link: RedisLink | None, ttl_seconds: int, max_local_entries: int) -> None:
        self._link = link
        self._ttl = ttl_seconds
        self._span = max(1, -(-ttl_seconds // PERIODS))  # seconds a period lasts
        self._local = LocalDedup(ttl_seconds, max_local_entries) if link is None else None
        self._lookups = _Lookups(self) if link else None
        self._store_channel = Channel(link) if link else None
        # Nobody waits for a remember: it lingers a little to share its
        # round trip with the next ones (a retry inside that time is still
        # caught, by the database's unique key).
        self._stores: Coalesce[list[Key], set[Key]] = Coalesce(self._store, linger=REMEMBER_LINGER)
        # The (project, source) streams this process has remembered ids of,
        # and the period it last unlinked their stale sets in.
        self._streams: dict[tuple[str, str], None] = {}
        self._swept = 0

    def _set(self, project: str, source: str, period: int) -> str:
        assert self._link is not None
        # Hash-tagged per project: a project's sets live in one cluster slot.
        return self._link.key(SETS, "{" + project + "}", source, str(period))

    def _sets(self, project: str, source: str) -> list[str]:
        """The sets a lookup asks: from the oldest period the TTL reaches to
        the next one (a gateway whose clock runs a little ahead may have
        started it)."""
        now = int(time.time()) // self._span
        return [self._set(project, source, p) for p in range(now - PERIODS - 1, now + 2)]

    def seen(self, keys: list[Key]) -> asyncio.Future[set[Key]]:
        """Asked now, answered by the future: the keys already committed (as
        far as the cache knows). In Redis the question rides the request
        path's flight (see Flight)."""
        if self._local is not None:
            return resolved(self._local.seen(keys))
        assert self._link is not None and self._lookups is not None
        if not keys or not self._link.usable:
            return resolved(set())
        return self._link.flight.submit(self._lookups, keys)

    async def remember(self, keys: list[Key]) -> None:
        """Cache newly committed keys; nobody waits for it."""
        if not keys:
            return
        if self._local is not None:
            self._local.remember(keys)
            return
        self._stores.submit_nowait(keys)

    async def forget(self, keys: list[Key]) -> bool:
        """Drop keys whose events were deleted (an erasure), so that a copy
        sent again is stored, as the database would have it. In Redis from
        every set a lookup asks; without Redis from this process's cache
        only. False when Redis could not be told."""
        if self._local is not None:
            self._local.forget(keys)
            return True
        assert self._link is not None and self._store_channel is not None
        if not keys:
            return True
        commands: list[tuple[Any, ...]] = []
        for (project, source), ids in _by_stream(keys).items():
            digests = members(project, source, ids)
            commands += [("SREM", name, *digests) for name in self._sets(project, source)]
        try:
            for reply in await self._store_channel.execute(commands):
                if isinstance(reply, Exception):
                    raise reply
        except Exception as exc:
            self._link.failed("dedup forget", exc)
            return False
        return True

    async def close(self) -> None:
        """Send the remembers still waiting (before the link closes)."""
        await self._stores.settle()

    async def _store(self, requests: list[list[Key]]) -> list[set[Key]]:
        assert self._link is not None and self._store_channel is not None
        done: list[set[Key]] = [set() for _ in requests]
        if not self._link.usable:
            return done
        period = int(time.time()) // self._span
        # Unlinked before this (see PERIODS), else gone after.
        expiry = self._ttl + 3 * self._span
        commands: list[tuple[Any, ...]] = []
        for (project, source), ids in _by_stream(key for request in requests for key in request).items():
            name = self._set(project, source, period)
            digests = members(project, source, ids)
            commands += [("SADD", name, *digests), ("EXPIRE", name, expiry)]
            self._streams[(project, source)] = None
        if period != self._swept:
            # A new period: the sets of the one the lookups just left behind go.
            self._swept = period
            stale = period - PERIODS - 2
            commands += [("UNLINK", self._set(project, source, stale)) for project, source in self._streams]
        try:
            for reply in await self._store_channel.execute(commands):
                if isinstance(reply, Exception):
                    raise reply
        except Exception as exc:
            self._link.failed("dedup remember", exc)
            return done
        self._link.succeeded()
        return done


class _Lookups(Kind[list[Key], set[Key]]):
    """Dedup lookups: one script call per project and source (its sets
    share a cluster slot) for a flight's questions."""

    def __init__(self, dedup: Dedup) -> None:
        self._dedup = dedup
        assert dedup._link is not None
        self._script = dedup._link.client.register_script(_LOOKUP)
        self.scripts = (self._script,)

    def commands(self, requests: list[list[Key]]) -> tuple[list[tuple[Any, ...]], list[_Stream]]:
        streams = [(project, source, ids) for (project, source), ids in
                   _by_stream(key for request in requests for key in request).items()]
        commands = []
        for project, source, ids in streams:
            sets = self._dedup._sets(project, source)
            digests = members(project, source, ids)
            commands.append(("EVALSHA", self._script.sha, len(sets), *sets, *digests))
        return commands, streams

    def results(self, requests: list[list[Key]], streams: list[_Stream],
                replies: list[Any] | Exception) -> list[set[Key]]:
        link = self._dedup._link
        assert link is not None
        failure = replies if isinstance(replies, Exception) else next(
            (r for r in replies if isinstance(r, Exception)), None)
        if failure is not None:
            link.failed("dedup lookup", failure)
            return [set() for _ in requests]
        # An answered read does not clear a failure: a full Redis answers
        # reads while refusing writes (see RedisLink.readiness).
        hits: set[Key] = set()
        # One reply per stream, one flag per id: equal lengths by construction,
        # and this is the request path, so no strict check.
        for (project, source, ids), found in zip(streams, replies, strict=False):  # type: ignore[arg-type]  # no failure: all lists
            hits.update((project, source, i) for i, f in zip(ids, found, strict=False) if f)
        return [hits.intersection(request) for request in requests]


def _by_stream(keys: Iterable[Key]) -> dict[tuple[str, str], list[str]]:
    """Insert ids by project and source, each once."""
    streams: dict[tuple[str, str], dict[str, None]] = collections.defaultdict(dict)
    for project, source, insert_id in keys:
        streams[(project, source)][insert_id] = None
    return {stream: list(ids) for stream, ids in streams.items()}
