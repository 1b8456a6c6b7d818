"""Logging for the gateway process: the standard format, made cheap enough
for one line per rejected request (a flood of bad requests is a flood of
lines)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class Formatter(logging.Formatter):
    """The standard format, with the date and time formatted once a second
    rather than once a line."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = super().formatTime(record, "%Y-%m-%d %H:%M:%S")
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"

    def line(self, name: str, level: str, message: str, created: float) -> str:
        """What `format` makes of such a record in FORMAT, without one."""
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(created))
            self._second = second
        return f"{self._stamp},{int((created - second) * 1000):03d} {level} {name} {message}"


class TurnHandler(logging.StreamHandler[TextIO]):
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

    def queue(self, line: str) -> None:
        """Write a line already formatted, as `emit` writes a record's."""
        self._pending.append(line + self.terminator)
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._write_locked)
            except RuntimeError:
                self._write_locked()

    def _write_locked(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # set by Handler.__init__
            self._write()

    def _write(self) -> None:
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # set by Handler.__init__
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


def _direct(logger: logging.Logger) -> TurnHandler | None:
    """The handler when an INFO record of `logger` would go to a TurnHandler
    in FORMAT alone (what `configure` sets up) and nothing could filter or
    see it on the way; else None."""
    if not logger.isEnabledFor(logging.INFO):
        return None
    found: TurnHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if (found is not None or type(handler) is not TurnHandler or handler.filters
                    or handler.level > logging.INFO or type(handler.formatter) is not Formatter
                    or handler.formatter._fmt != FORMAT):
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


def info(logger: logging.Logger, message: str, *args: Any) -> None:
    """`logger.info(message, *args)`: the same line, but when it goes to the
    handler `configure` installs and nowhere else, formatted straight into
    it (the record, the logger's dispatch and the formatter's lookups cost a
    rejected request more than the rest of its handling)."""
    handler = _direct(logger)
    if handler is None:
        logger.info(message, *args)
        return
    formatter: Formatter = handler.formatter  # type: ignore[assignment]  # configure() installs ours
    handler.queue(formatter.line(logger.name, "INFO", message % args, time.time()))
