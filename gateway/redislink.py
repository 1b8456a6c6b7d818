"""The shared Redis connection and its fail-open switch.

Redis is an accelerator, never the authority: when a call fails, the caller
falls back (limits allow, dedup asks the database) and Redis is left alone for
`retry_interval` seconds so an outage does not cost every request a timeout.
"""

from __future__ import annotations

import logging
import time

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
