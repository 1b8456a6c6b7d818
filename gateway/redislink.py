"""The shared Redis connection, its fallback switch and its last failure.

Redis is an accelerator, never the authority: when a call fails (Redis down,
slow, or full: an OOM refusal under `maxmemory` with `noeviction`), the
caller falls back (rate limits to the in-process limiter, dedup to the
database) and Redis is left alone for `retry_interval` seconds so an outage
does not cost every request a timeout. The link remembers the last failure
so `/readyz` can report it: a PING answers while every write is refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, ResponseError

log = logging.getLogger("dialgate.redis")

# Seconds a Channel call (its write and all its replies) may take: a slow
# Redis must not become a slow gateway.
CALL_TIMEOUT = 0.5


class Failure(msgspec.Struct, frozen=True):
    """A Redis call that failed: what the gateway was doing, the kind of
    failure, and what Redis said (its own words for an error reply; only
    the exception's type otherwise, so no address or password leaks)."""

    during: str
    reason: str  # "out_of_memory", "unreachable", "timeout" or "error"
    detail: str
    at: float  # time.monotonic()

    @classmethod
    def of(cls, during: str, exc: BaseException) -> Failure:
        if isinstance(exc, ResponseError):
            # Redis's error reply; inside a script it reads "... used memory >
            # 'maxmemory' ... script: <sha>", without the OOM prefix.
            text = str(exc)
            full = isinstance(exc, OutOfMemoryError) or "maxmemory" in text
            return cls(during, "out_of_memory" if full else "error", text[:200], time.monotonic())
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            return cls(during, "timeout", type(exc).__name__, time.monotonic())
        if isinstance(exc, (RedisConnectionError, OSError)):
            return cls(during, "unreachable", type(exc).__name__, time.monotonic())
        return cls(during, "error", type(exc).__name__, time.monotonic())


class RedisLink:
    def __init__(self, url: str, *, prefix: str, retry_interval: float, failure_window: float = 10.0) -> None:
        self.client = aioredis.from_url(
            url,
            # Short timeouts: a slow Redis must not become a slow gateway.
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry_on_timeout=False,
            decode_responses=False,
        )
        # The request path's calls (Channel) use connections of their own
        # pool, with no timeout per socket operation: redis-py runs every
        # write of a connection that has one in a task of its own
        # (asyncio.wait_for) and arms a timer for every reply. A Channel call
        # has one deadline for its whole round trip instead.
        self.channel_pool = aioredis.ConnectionPool.from_url(
            url, socket_timeout=None, socket_connect_timeout=0.5, retry_on_timeout=False,
        )
        self.prefix = prefix
        self._retry_interval = retry_interval
        self._failure_window = failure_window
        self._down_since: float | None = None
        self._next_try = 0.0
        self._flight: Flight | None = None
        self.last_failure: Failure | None = None

    @property
    def usable(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._next_try

    @property
    def healthy(self) -> bool:
        return self._down_since is None

    def failed(self, what: str, exc: BaseException) -> None:
        failure = self.last_failure = Failure.of(what, exc)
        if self._down_since is None:
            self._down_since = failure.at
            log.warning(
                "redis failed during %s (%s: %s): rate limits fall back to in-process limits and "
                "duplicates are checked by the database until it answers again",
                what, failure.reason, failure.detail,
            )
        self._next_try = failure.at + self._retry_interval

    def succeeded(self) -> None:
        if self._down_since is not None:
            log.warning("redis is back after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def flight(self) -> Flight:
        """The request path's shared round trip (see Flight)."""
        if self._flight is None:
            self._flight = Flight(self)
        return self._flight

    async def ping(self) -> bool:
        """Whether Redis answers a PING. An answer does not clear a failure:
        a full Redis answers PINGs while refusing every write."""
        try:
            await self.client.ping()
        except Exception as exc:
            self.failed("ping", exc)
            return False
        return True

    async def readiness(self) -> dict[str, Any] | None:
        """None when Redis takes writes and none failed in the last
        `failure_window` seconds; else what failed last, for `/readyz`.

        The probe is a write (a PING answers while a full Redis refuses
        every write); when it succeeds, the request path uses Redis again
        at once instead of after `retry_interval`."""
        try:
            await self.client.set(self.key("readyz"), b"1", px=10_000)
        except Exception as exc:
            self.failed("readiness probe", exc)
        else:
            self.succeeded()
        failure = self.last_failure
        if failure is None:
            return None
        ago = time.monotonic() - failure.at
        if self.healthy and ago > self._failure_window:
            return None
        return {"during": failure.during, "reason": failure.reason, "detail": failure.detail,
                "seconds_ago": round(ago, 3)}

    async def close(self) -> None:
        await self.client.aclose()
        await self.channel_pool.disconnect()


T = TypeVar("T")
R = TypeVar("R")


class Coalesce(Generic[T, R]):
    """Natural batching of Redis calls, as the writer batches commits.

    Calls made while a flush is in flight wait and go together in the next
    flush, so under load many requests share one round trip, and a lone
    request waits for nobody. `flush` gets the items in arrival order, returns
    one result per item, and must not raise (on a Redis failure it falls back).

    `linger` (seconds) holds the first item of a quiet spell that long
    before flushing, for calls nobody waits for: at moderate load, where
    calls rarely overlap, they still share round trips.
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], *, linger: float = 0.0) -> None:
        self._flush = flush
        self._linger = linger
        self._pending: list[tuple[T, asyncio.Future[R] | None]] = []
        self._running = False
        self._task: asyncio.Task[None] | None = None
        self._lingering = False

    def submit(self, item: T) -> asyncio.Future[R]:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._add(item, future)
        return future

    def submit_nowait(self, item: T) -> None:
        self._add(item, None)

    def _add(self, item: T, future: asyncio.Future[R] | None) -> None:
        self._pending.append((item, future))
        if not self._running:
            self._running = True
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def settle(self) -> None:
        """Flush what is pending now, without lingering (at shutdown)."""
        self._linger = 0.0
        task = self._task
        if task is not None and not task.done():
            if self._lingering:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._pending and not self._running:
            self._running = True
            await self._drain()

    async def _drain(self) -> None:
        try:
            if self._linger:
                self._lingering = True
                try:
                    await asyncio.sleep(self._linger)
                finally:
                    self._lingering = False
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._flush([item for item, _ in batch])
                except Exception as exc:
                    # A bug, not Redis (whose failures `flush` falls back from): fail
                    # the callers rather than leave them waiting forever.
                    log.exception("coalesced call failed")
                    for _, future in batch:
                        if future is not None and not future.done():
                            future.set_exception(exc)
                            future.exception()  # retrieved, even if the caller is gone
                    continue
                for (_, future), result in zip(batch, results, strict=False):  # one result per call (hot path)
                    if future is not None and not future.done():
                        future.set_result(result)
        finally:
            self._running = False


def pack(commands: list[tuple[Any, ...]]) -> bytes:
    """RESP for commands whose arguments are str, bytes, int or float:
    what the request path sends (the client's general encoder costs more
    than the round trip at a few dozen arguments a call)."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            kind = type(arg)
            if kind is str:
                data = arg.encode()
            elif kind is bytes:
                data = arg
            elif kind is int:
                data = b"%d" % arg
            elif kind is float:
                data = repr(arg).encode()
            else:
                raise TypeError(f"cannot send a {kind.__name__} to Redis")
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Channel:
    """A connection of the link's pool kept by one coalesced call kind (a
    Coalesce never has two flushes in flight, so it never shares it), with
    the commands written and read straight on it.

    Through the client every command checks a connection out and back in,
    runs in a retry wrapper and records pool metrics: twice the CPU of the
    round trip itself, on the calls made for every request. (Scripts go
    through a Flight, which loads them when Redis does not know them.)"""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._conn: Any = None

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies in order; an error reply is returned, not raised."""
        kept = self._conn is not None
        try:
            return await self._execute(commands)
        except RedisConnectionError:
            if not kept:
                raise
            # The connection kept from an earlier call was closed since
            # (Redis restarted, or dropped it idle): once more on a new one,
            # as the client itself retries. Should Redis have run a command
            # before the cut, a limit counts it twice: it errs on the side
            # of refusing, never of admitting.
            return await self._execute(commands)

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pool = self._link.channel_pool
        conn = self._conn
        if conn is None:
            conn = self._conn = await pool.get_connection()
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                await conn.send_packed_command(pack(commands), check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
            return replies
        except BaseException:
            # Timed out, cut off or cancelled half-way: the connection's
            # state is unknown, so it goes, and the next call connects anew.
            self._conn = None
            await conn.disconnect()
            await pool.release(conn)
            raise


def resolved(value: T) -> asyncio.Future[T]:
    """A future already holding `value` (an answer known without Redis)."""
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


class Kind(Generic[T, R]):
    """A kind of call that rides a Flight: how its items become commands
    (and a plan, handed back with the replies), and how their replies
    become one result per item. `results` gets the replies in order (error
    replies as exceptions), or the exception that failed the whole round
    trip, and must not raise (on a Redis failure it falls back)."""

    # Registered scripts its commands run by SHA (loaded on NOSCRIPT).
    scripts: tuple[Any, ...] = ()

    def commands(self, items: list[T]) -> tuple[list[tuple[Any, ...]], Any]:
        raise NotImplementedError

    def results(self, items: list[T], plan: Any, replies: list[Any] | Exception) -> list[R]:
        raise NotImplementedError


class Flight:
    """One round trip for the calls of several kinds: those made while the
    last flight was out (or during the same event-loop turn) go together,
    written at once and read back at once on one kept connection.

    A request asks its client's rate limit, reads and translates its body,
    then asks the dedup cache about its insert ids: both calls made in one
    turn, so they share one round trip instead of taking one each."""

    def __init__(self, link: RedisLink) -> None:
        self._channel = Channel(link)
        self._calls: Coalesce[tuple[Kind[Any, Any], Any], Any] = Coalesce(self._fly)

    def submit(self, kind: Kind[T, R], item: T) -> asyncio.Future[R]:
        return self._calls.submit((kind, item))

    async def _fly(self, calls: list[tuple[Kind[Any, Any], Any]]) -> list[Any]:
        by_kind: dict[Kind[Any, Any], list[int]] = {}
        for index, (kind, _) in enumerate(calls):
            by_kind.setdefault(kind, []).append(index)
        commands: list[tuple[Any, ...]] = []
        spans: list[tuple[Kind[Any, Any], list[int], list[Any], Any, int, int]] = []
        for kind, indexes in by_kind.items():
            items = [calls[i][1] for i in indexes]
            start = len(commands)
            more, plan = kind.commands(items)
            commands += more
            spans.append((kind, indexes, items, plan, start, len(commands)))
        replies: list[Any] | Exception
        try:
            replies = await self._channel.execute(commands)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                # Redis does not know a script (first call, or it restarted):
                # load them and run again the commands that did not run.
                scripts = {s.sha: s for kind in by_kind for s in kind.scripts}
                loads = [("SCRIPT", "LOAD", s.script) for s in scripts.values()]
                again = await self._channel.execute(loads + [commands[i] for i in missing])
                for i, reply in zip(missing, again[len(loads):], strict=True):
                    replies[i] = reply
        except Exception as exc:
            replies = exc
        results: list[Any] = [None] * len(calls)
        for kind, indexes, items, plan, start, end in spans:
            part = replies if isinstance(replies, Exception) else replies[start:end]
            for i, result in zip(indexes, kind.results(items, plan, part), strict=False):  # one per item (hot path)
                results[i] = result
        return results
