"""Logging for the gateway process (`[logging]`): the standard text format
or one JSON object a line, at the level configured, made cheap enough for
one line per rejected request (a flood of bad requests is a flood of
lines) and, when asked for, one per request (the access log).

A structured line (`Line`) is an event and named values: `event name=value
...` in text, an object of those names in JSON. No line carries a
credential: the callers pass names, addresses, statuses and the dialects'
messages (which name fields, never values), never a header, query or body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import msgspec

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
# The access log's logger: written at INFO whatever the level once asked for.
ACCESS = "dialgate.access"


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


class JsonFormatter(logging.Formatter):
    """One JSON object a line: `time` (UTC, ISO 8601 with milliseconds),
    `level`, `logger`, `message`, a structured line's values under their
    names, and a traceback as `exception`. The date and time are formatted
    once a second."""

    _second = -1
    _stamp = ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            self._second = second
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        message = record.__dict__.get("event") if fields is not None else None
        data: dict[str, Any] = {
            "time": self.stamp(record.created), "level": record.levelname, "logger": record.name,
            "message": message if message is not None else record.getMessage(),
        }
        if fields:
            data.update(fields)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return msgspec.json.encode(data).decode()

    def line(self, name: str, level: str, event: str, fields: Mapping[str, Any], created: float) -> str:
        """What `format` makes of a structured line, without a record."""
        return msgspec.json.encode({"time": self.stamp(created), "level": level, "logger": name,
                                    "message": event, **fields}).decode()


class TurnHandler(logging.StreamHandler[TextIO]):
    """Lines logged during one turn of the event loop are written together
    right after it: under load one write for many requests instead of a
    write (a system call) for each. Nothing waits longer than that turn;
    off the loop (threads, start-up, shutdown) a line is written at once."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        # No stream given: whatever sys.stderr is when a line is written (an
        # embedding program or a test may swap it and close the old one).
        self._follow = stream is None

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
            stream = sys.stderr if self._follow else self.stream
            try:
                stream.write(text)
                stream.flush()
            except (ValueError, OSError):
                # A closed or broken stream: the lines are lost, never the
                # request (this runs in the event loop's callbacks).
                pass

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # set by Handler.__init__
            self._write()


def configure(format: LogFormat = "text", level: LogLevel = "info", *, access_log: bool = False) -> None:
    """Log to standard error in `format` from `level` up; with `access_log`
    the access log's lines are written whatever the level. Called again
    (once the configuration is read), it replaces the handler it installed
    before, writing what that one held."""
    # Skip the thread and process bookkeeping each record would otherwise
    # gather, and the caller lookup (a stack walk; the format names no file
    # or line), as the logging HOWTO's "Optimization" section describes.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, TurnHandler)]:
        # Its stream may be gone (an embedding program, a test, closed it).
        with contextlib.suppress(ValueError, OSError):
            old.flush()
        root.removeHandler(old)
    handler = TurnHandler()
    handler.setFormatter(JsonFormatter() if format == "json" else Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    logging.getLogger("alembic").setLevel(max(logging.WARNING, LEVELS[level]))
    # aiosqlite logs every operation at DEBUG, with its arguments: the rows
    # written. "debug" is the gateway's own.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, LEVELS[level]))
    logging.getLogger(ACCESS).setLevel(logging.INFO if access_log else logging.NOTSET)


def _direct(logger: logging.Logger) -> TurnHandler | None:
    """The handler when an INFO record of `logger` would go to a TurnHandler
    with one of our formatters (what `configure` sets up) and nothing could
    filter or see it on the way; else None."""
    if not logger.isEnabledFor(logging.INFO):
        return None
    found: TurnHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None or type(handler) is not TurnHandler or handler.filters or handler.level > logging.INFO:
                return None
            formatter = handler.formatter
            if not (type(formatter) is JsonFormatter or (type(formatter) is Formatter and formatter._fmt == FORMAT)):
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


class Line:
    """One kind of structured INFO line of `logger`: `event`, then the
    values named in `spec` (`name=%s name=%d name=%r ...`, the text line's
    format). In JSON each value goes under its name (or the one `renamed`
    gives it), unformatted. When the line goes to the handler `configure`
    installs and nowhere else, it is formatted straight into it (the
    record, the logger's dispatch and the formatter's lookups cost a
    rejected request more than the rest of its handling); else it goes
    through logging."""

    def __init__(self, logger: logging.Logger, event: str, spec: str, *,
                 renamed: Mapping[str, str] | None = None) -> None:
        self.logger = logger
        self.event = event
        self.template = f"{event} {spec}"
        renamed = renamed or {}
        self.names = tuple(renamed.get(name, name) for name in re.findall(r"(\w+)=%", spec))

    def __call__(self, *values: Any) -> None:
        logger = self.logger
        handler = _direct(logger)
        if handler is None:
            fields = dict(zip(self.names, values, strict=True))
            logger.info(self.template, *values, extra={"event": self.event, "fields": fields})
            return
        formatter = handler.formatter
        if type(formatter) is JsonFormatter:
            fields = dict(zip(self.names, values, strict=True))
            line = formatter.line(logger.name, "INFO", self.event, fields, time.time())
        else:
            assert type(formatter) is Formatter  # as _direct found it
            line = formatter.line(logger.name, "INFO", self.template % values, time.time())
        handler.queue(line)
