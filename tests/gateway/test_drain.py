"""The shutdown drain (gateway.http.Drain) in front of a real ASGI app."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway.http import Drain

pytestmark = pytest.mark.anyio


class Gated:
    """Answers 200 once `gate` is set; keeps the request in flight until then."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.entered.set()
        await self.gate.wait()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"connection", b"keep-alive")]})
        await send({"type": "http.response.body", "body": b"ok"})


async def test_answers_ask_for_close_only_once_draining() -> None:
    inner = Gated()
    inner.gate.set()
    drain = Drain(inner)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=drain), base_url="http://t") as client:
        before = await client.get("/x")
        drain.begin()
        after = await client.get("/x")
    assert before.status_code == after.status_code == 200
    assert before.headers["connection"] == "keep-alive"
    assert after.headers.get_list("connection") == ["close"]


async def test_idle_waits_for_requests_in_flight_and_a_quiet_moment() -> None:
    inner = Gated()
    drain = Drain(inner)
    assert await drain.idle(quiet=0.01, timeout=1) is True  # nothing ever came
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=drain), base_url="http://t") as client:
        request = asyncio.ensure_future(client.get("/x"))
        await inner.entered.wait()
        assert drain.in_flight == 1
        assert await drain.idle(quiet=0.01, timeout=0.2) is False  # still in flight
        waiting = asyncio.ensure_future(drain.idle(quiet=0.05, timeout=2))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        inner.gate.set()
        assert (await request).status_code == 200
        assert await waiting is True
    assert drain.in_flight == 0


async def test_a_request_during_the_quiet_moment_restarts_it() -> None:
    inner = Gated()
    inner.gate.set()
    drain = Drain(inner)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=drain), base_url="http://t") as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiting = asyncio.ensure_future(drain.idle(quiet=0.2, timeout=5))
        await asyncio.sleep(0.1)
        assert (await client.get("/x")).status_code == 200  # inside the quiet window
        assert await waiting is True
        # Quiet had to be seen again after that request: more than 0.2 s in all.
        assert loop.time() - started >= 0.25
