"""Fixtures of the gateway tests: a Redis server of the test's own (the
shared one is never stopped) and a link to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.redislink import RedisLink
from tests.support import OwnRedis


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    server.start()
    yield server
    if server.process and server.process.poll() is None:
        server.kill()


@pytest.fixture
async def link(own_redis: OwnRedis) -> AsyncIterator[RedisLink]:
    link = RedisLink(own_redis.url, prefix="t", retry_interval=1)
    yield link
    await link.close()
