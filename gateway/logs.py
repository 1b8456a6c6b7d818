"""Logging for the gateway process: the standard format, made cheap enough
for one line per rejected request (a flood of bad requests is a flood of
lines)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class Formatter(logging.Formatter):
    """The standard format, with the date and time formatted once a second
    rather than once a line."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._stamp = super().formatTime(record, "%Y-%m-%d %H:%M:%S")
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


class TurnHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines logged during one turn of the event loop are written together
    right after it: under load one write for many requests instead of a
    write (a system call) for each. Nothing waits longer than that turn;
    off the loop (threads, start-up, shutdown) a line is written at once."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            self._pending.append(line)
            if loop is None:
                self._write()
            elif len(self._pending) == 1:
                loop.call_soon(self._write_locked)
        except Exception:
            self.handleError(record)

    def _write_locked(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def _write(self) -> None:
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()
            super().flush()


def configure() -> None:
    # Skip the thread and process bookkeeping each record would otherwise
    # gather, and the caller lookup (a stack walk; the format names no file
    # or line), as the logging HOWTO's "Optimization" section describes.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = TurnHandler()
    handler.setFormatter(Formatter(FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("alembic").setLevel(logging.WARNING)
