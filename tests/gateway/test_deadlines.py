"""gateway.http.Deadlines: one timer for every body read in flight."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.http import BodyReader, Deadlines

pytestmark = pytest.mark.anyio


def _never() -> object:
    async def receive() -> dict[str, object]:
        await asyncio.sleep(3600)
        raise AssertionError

    return receive


async def test_a_read_past_its_deadline_ends_in_timeout_and_the_task_is_not_left_cancelled() -> None:
    deadlines = Deadlines(0.2)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await BodyReader(_never()).read({}, 1000, deadlines)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 0.5, elapsed
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.01)  # no cancellation left pending for the next await
    assert deadlines._reads == {} and deadlines._expired == set()


async def test_reads_within_their_deadline_are_untouched_and_leave_nothing_behind() -> None:
    deadlines = Deadlines(1.0)  # the slowest read below takes 0.3 s

    async def slowly(delay: float) -> bytes:
        parts = [{"type": "http.request", "body": b"ab", "more_body": True},
                 {"type": "http.request", "body": b"cd", "more_body": False}]

        async def receive() -> dict[str, object]:
            await asyncio.sleep(delay)
            return parts.pop(0)

        return await BodyReader(receive).read({}, 1000, deadlines)

    assert await asyncio.gather(*(slowly(0.05 * n) for n in range(1, 4))) == [b"abcd"] * 3
    await asyncio.sleep(1.0)  # past where a leftover deadline would have fired
    assert deadlines._reads == {} and deadlines._expired == set()


async def test_a_cancellation_from_elsewhere_is_still_a_cancellation() -> None:
    deadlines = Deadlines(10)
    reader = asyncio.ensure_future(BodyReader(_never()).read({}, 1000, deadlines))
    await asyncio.sleep(0.01)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert deadlines._reads == {}
