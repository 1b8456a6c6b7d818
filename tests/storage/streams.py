"""Helpers of the stream sink's tests: settings with `[sink] kind =
"jetstream"` on a nats-server of the test's own, and loaders run in-process
until the admin API shows what a test waits for."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.config import Settings
from gateway.loader import build
from storage.loader import Loader
from tests.support import settings_for

SHOP = {"X-Cohorly-Token": "tok_shop"}
UNLIMITED = {"cohorly": {"rate_limit": {"requests": 1_000_000, "per_seconds": 1}}}


def stream_settings(backend: dict[str, str], servers: list[str], **sections: Any) -> Settings:
    """A stream of the test's own name (its bookkeeping rows are its own too)."""
    sink = {"kind": "jetstream", "servers": servers, "stream": "t" + uuid.uuid4().hex[:10],
            "ack_timeout_seconds": 2.0, **sections.pop("sink", {})}
    loader = {"lease_seconds": 3.0, "ack_wait_seconds": 2.0, **sections.pop("loader", {})}
    return settings_for(backend, sink=sink, loader=loader, dialects=UNLIMITED, **sections)


@contextlib.asynccontextmanager
async def loading(settings: Settings, count: int = 1) -> AsyncIterator[list[Loader]]:
    """`count` loaders of these settings, running until the block ends."""
    built = [build(settings) for _ in range(count)]
    tasks = [asyncio.create_task(loader.run()) for loader, _, _ in built]
    try:
        yield [loader for loader, _, _ in built]
    finally:
        for loader, _, _ in built:
            loader.stop()
        for task in tasks:
            await asyncio.wait_for(task, 15)
        for _, _, engine in built:
            await engine.dispose()


async def until(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Wait for `check()` to hold (the loader's lag), failing after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("not loaded in time")
        await asyncio.sleep(0.1)


def tracked(*events: tuple[str, str | None], distinct_id: str = "u") -> list[dict[str, Any]]:
    """Cohorly /track events of (name, insert id)."""
    return [{"event": name, "properties": {"distinct_id": distinct_id, **({"$insert_id": i} if i else {})}}
            for name, i in events]
