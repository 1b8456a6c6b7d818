"""gateway.logs: the standard line, written once per event-loop turn."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time

import pytest

from gateway.logs import FORMAT, Formatter, TurnHandler, _direct, info

pytestmark = pytest.mark.anyio


class Recording(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _record(message: str, created: float) -> logging.LogRecord:
    record = logging.LogRecord("dialgate.ingest", logging.INFO, "", 0, message, (), None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return record


def test_the_cached_time_formats_as_the_standard_formatter() -> None:
    ours, standard = Formatter(FORMAT), logging.Formatter(FORMAT)
    start = int(time.time())
    for created in (start + 0.001, start + 0.999, start + 1.0, start + 1.5, start + 61.25, start + 0.5):
        record = _record("rejected dialect=cohorly", created)
        assert ours.format(record) == standard.format(record)


def _logger(stream: Recording) -> tuple[logging.Logger, TurnHandler]:
    handler = TurnHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger, handler


async def test_lines_of_one_loop_turn_are_written_together_right_after_it() -> None:
    stream = Recording()
    logger, handler = _logger(stream)
    for n in range(50):
        logger.info("line %d", n)
    assert stream.writes == 0  # still this turn
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert stream.writes == 1
    assert stream.getvalue() == "".join(f"line {n}\n" for n in range(50))
    logger.info("next turn")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert stream.getvalue().endswith("line 49\nnext turn\n") and stream.writes == 2
    logger.removeHandler(handler)


async def test_flush_writes_what_is_pending() -> None:
    stream = Recording()
    logger, handler = _logger(stream)
    logger.info("before shutdown")
    handler.flush()
    assert stream.getvalue() == "before shutdown\n"
    logger.removeHandler(handler)


def test_off_the_loop_a_line_is_written_at_once() -> None:
    stream = Recording()
    logger, handler = _logger(stream)
    logger.info("from a thread or start-up")
    assert stream.getvalue() == "from a thread or start-up\n" and stream.writes == 1
    logger.removeHandler(handler)


def test_a_direct_line_is_what_the_formatter_makes_of_the_record() -> None:
    formatter = Formatter(FORMAT)
    start = int(time.time())
    for created in (start + 0.001, start + 0.999, start + 1.0, start + 61.25, start + 0.5):
        record = _record("rejected dialect=cohorly status=401 message='invalid token'", created)
        line = formatter.line("dialgate.ingest", "INFO", record.getMessage(), created)
        assert line == logging.Formatter(FORMAT).format(record)


def _configured(stream: Recording) -> tuple[logging.Logger, TurnHandler]:
    """What `configure` sets up, on a logger tree of the test's own."""
    parent = logging.getLogger(f"test.direct.{id(stream)}")
    parent.propagate = False
    handler = TurnHandler(stream)
    handler.setFormatter(Formatter(FORMAT))
    parent.addHandler(handler)
    parent.setLevel(logging.INFO)
    return logging.getLogger(parent.name + ".ingest"), handler


async def test_info_writes_the_standard_line_straight_to_the_configured_handler() -> None:
    stream = Recording()
    logger, handler = _configured(stream)
    assert _direct(logger) is handler
    info(logger, "rejected dialect=%s status=%d message=%r", "cohorly", 401, "invalid token")
    info(logger, "second")
    assert stream.writes == 0
    await asyncio.sleep(0)
    assert stream.writes == 1
    first, second = stream.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(stamp + rf" INFO {re.escape(logger.name)} rejected dialect=cohorly status=401 "
                        r"message='invalid token'", first)
    assert second.endswith(f" INFO {logger.name} second")


def test_info_goes_through_logging_when_anything_else_could_see_the_record() -> None:
    stream = Recording()
    logger, handler = _configured(stream)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    extra = Keep()
    logger.addHandler(extra)  # as pytest's caplog or an embedding application does
    assert _direct(logger) is None
    info(logger, "rejected ip=%s", "10.0.0.1")
    assert [r.getMessage() for r in seen] == ["rejected ip=10.0.0.1"]
    logger.removeHandler(extra)

    logger.addFilter(lambda record: False)
    assert _direct(logger) is None
    info(logger, "filtered")
    logger.filters.clear()

    logger.setLevel(logging.WARNING)
    assert _direct(logger) is None
    info(logger, "below the level")
    logger.setLevel(logging.NOTSET)

    handler.setFormatter(logging.Formatter("%(message)s"))
    assert _direct(logger) is None
    info(logger, "plain")
    handler.flush()
    # The filtered line and the one below the level were never written.
    through_logging, plain = stream.getvalue().splitlines()
    assert through_logging.endswith(f" INFO {logger.name} rejected ip=10.0.0.1") and plain == "plain"
