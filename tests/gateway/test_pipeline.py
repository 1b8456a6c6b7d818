"""A client trickling its body is cut off after `server.read_timeout` seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.support import events_of, gateway, settings_for

pytestmark = pytest.mark.anyio


async def _trickle(seconds: float) -> AsyncIterator[bytes]:
    yield b'[{"event":"slow","properties":{"distinct_id":"u"'
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        yield b" "
    yield b"}}]"


async def test_a_trickling_body_is_refused_in_time_and_stores_nothing(backend) -> None:
    async with gateway(settings_for(backend, server={"read_timeout": 1})) as client:
        started = time.monotonic()
        reply = await client.post("/track", headers={"X-Cohorly-Token": "tok_shop"}, content=_trickle(4))
        elapsed = time.monotonic() - started
        assert reply.status_code == 400
        assert reply.json() == {"status": 0, "error": "request body not received within 1 s"}
        assert elapsed < 3.5, elapsed
        # A prompt client is served as usual meanwhile and after.
        ok = await client.post("/track", headers={"X-Cohorly-Token": "tok_shop"},
                               json={"event": "fast", "properties": {"distinct_id": "u"}})
        assert ok.status_code == 200
        assert [e["name"] for e in await events_of(client)] == ["fast"]
