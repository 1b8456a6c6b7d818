"""gateway.redislink.Coalesce: calls made during a flush share the next one."""

from __future__ import annotations

import asyncio

import pytest

from gateway.redislink import Coalesce

pytestmark = pytest.mark.anyio


async def test_calls_during_a_flush_go_together_in_the_next() -> None:
    flushes: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushes.append(items)
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]

    coalesce: Coalesce[int, int] = Coalesce(flush)
    first = coalesce.submit(1)
    await asyncio.sleep(0)  # the first flush is now in flight
    rest = [coalesce.submit(i) for i in (2, 3, 4)]
    assert await asyncio.gather(first, *rest) == [10, 20, 30, 40]
    assert flushes == [[1], [2, 3, 4]]


async def test_a_flush_that_raises_fails_its_callers_instead_of_hanging() -> None:
    calls = 0

    async def flush(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug")
        return items

    coalesce: Coalesce[int, int] = Coalesce(flush)
    failed = coalesce.submit(1)
    coalesce.submit_nowait(2)  # nobody waits on this one: no "never retrieved" warning either
    with pytest.raises(RuntimeError, match="bug"):
        await asyncio.wait_for(failed, 2)
    # The coalescer keeps working after the failure.
    assert await asyncio.wait_for(coalesce.submit(5), 2) == 5


def _recording(linger: float) -> tuple[Coalesce[int, int], list[list[int]]]:
    """A coalescer whose flushes are recorded (and answer each item with itself)."""
    flushes: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushes.append(items)
        return items

    return Coalesce(flush, linger=linger), flushes


async def test_a_lingering_flush_gathers_the_calls_of_its_linger() -> None:
    coalesce, flushes = _recording(linger=0.05)
    coalesce.submit_nowait(1)
    await asyncio.sleep(0.01)
    coalesce.submit_nowait(2)
    assert flushes == []  # still lingering
    await asyncio.sleep(0.1)
    assert flushes == [[1, 2]]


async def test_settle_flushes_a_lingering_batch_at_once() -> None:
    coalesce, flushes = _recording(linger=30)
    coalesce.submit_nowait(1)
    coalesce.submit_nowait(2)
    await asyncio.sleep(0)
    await asyncio.wait_for(coalesce.settle(), 1)
    assert flushes == [[1, 2]]
