"""A task of its own beside the server, from start to shutdown: the
quarantine expiry (storage.expiry) and the gateway's daily prune
(gateway.retention)."""

from __future__ import annotations

import abc
import asyncio
import contextlib


class BackgroundTask(abc.ABC):
    """`_run` as a task named `name`: `start` creates it, `stop` cancels it
    and waits for it to end."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @abc.abstractmethod
    async def _run(self) -> None:
        """The work, until cancelled."""
