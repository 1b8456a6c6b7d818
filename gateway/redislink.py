"""The shared Redis connection and its fail-open switch.

Redis is an accelerator, never the authority: when a call fails, the caller
falls back (limits allow, dedup asks the database) and Redis is left alone for
`retry_interval` seconds so an outage does not cost every request a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import redis.asyncio as aioredis

log = logging.getLogger("dialgate.redis")


class RedisLink:
    def __init__(self, url: str, *, prefix: str, retry_interval: float) -> None:
        self.client = aioredis.from_url(
            url,
            # Short timeouts: a slow Redis must not become a slow gateway.
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry_on_timeout=False,
            decode_responses=False,
        )
        self.prefix = prefix
        self._retry_interval = retry_interval
        self._down_since: float | None = None
        self._next_try = 0.0

    @property
    def usable(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._next_try

    @property
    def healthy(self) -> bool:
        return self._down_since is None

    def failed(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "redis unavailable during %s (%s): rate limits fail open and "
                "duplicates are checked by the database until it returns",
                what,
                type(exc).__name__,
            )
        self._next_try = now + self._retry_interval

    def succeeded(self) -> None:
        if self._down_since is not None:
            log.warning("redis is back after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def ping(self) -> bool:
        try:
            await self.client.ping()
        except Exception as exc:
            self.failed("ping", exc)
            return False
        self.succeeded()
        return True

    async def close(self) -> None:
        await self.client.aclose()


T = TypeVar("T")
R = TypeVar("R")


class Coalesce(Generic[T, R]):
    """Natural batching of Redis calls, as the writer batches commits.

    Calls made while a flush is in flight wait and go together in the next
    flush, so under load many requests share one round trip, and a lone
    request waits for nobody. `flush` gets the items in arrival order, returns
    one result per item, and must not raise (Redis failures fail open).
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]]) -> None:
        self._flush = flush
        self._pending: list[tuple[T, asyncio.Future[R] | None]] = []
        self._running = False

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
            asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._flush([item for item, _ in batch])
                except Exception as exc:
                    # A bug, not Redis (that fails open inside `flush`): fail
                    # the callers rather than leave them waiting forever.
                    log.exception("coalesced call failed")
                    for _, future in batch:
                        if future is not None and not future.done():
                            future.set_exception(exc)
                            future.exception()  # retrieved, even if the caller is gone
                    continue
                for (_, future), result in zip(batch, results):
                    if future is not None and not future.done():
                        future.set_result(result)
        finally:
            self._running = False
