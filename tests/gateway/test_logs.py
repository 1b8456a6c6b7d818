"""gateway.logs: the standard line, written once per event-loop turn."""

from __future__ import annotations

import asyncio
import io
import logging
import time

import pytest

from gateway.logs import FORMAT, Formatter, TurnHandler

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
