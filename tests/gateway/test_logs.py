"""gateway.logs: the standard line or a JSON object, written once per
event-loop turn; `[logging]` of a real gateway."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.logs import ACCESS, FORMAT, Formatter, JsonFormatter, Line, TurnHandler, _direct, configure
from tests.support import config_file, dialgate_serve, free_port

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


async def test_a_line_writes_the_standard_line_straight_to_the_configured_handler() -> None:
    stream = Recording()
    logger, handler = _configured(stream)
    assert _direct(logger) is handler
    Line(logger, "rejected", "dialect=%s status=%d message=%r")("cohorly", 401, "invalid token")
    Line(logger, "second", "n=%d")(2)
    assert stream.writes == 0
    await asyncio.sleep(0)
    assert stream.writes == 1
    first, second = stream.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(stamp + rf" INFO {re.escape(logger.name)} rejected dialect=cohorly status=401 "
                        r"message='invalid token'", first)
    assert second.endswith(f" INFO {logger.name} second n=2")


def test_a_line_goes_through_logging_when_anything_else_could_see_the_record() -> None:
    stream = Recording()
    logger, handler = _configured(stream)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    extra = Keep()
    logger.addHandler(extra)  # as pytest's caplog or an embedding application does
    assert _direct(logger) is None
    Line(logger, "rejected", "ip=%s")("10.0.0.1")
    assert [r.getMessage() for r in seen] == ["rejected ip=10.0.0.1"]
    logger.removeHandler(extra)

    logger.addFilter(lambda record: False)
    assert _direct(logger) is None
    Line(logger, "filtered", "n=%d")(1)
    logger.filters.clear()

    logger.setLevel(logging.WARNING)
    assert _direct(logger) is None
    Line(logger, "below", "level=%s")("info")
    logger.setLevel(logging.NOTSET)

    handler.setFormatter(logging.Formatter("%(message)s"))
    assert _direct(logger) is None
    Line(logger, "plain", "n=%d")(1)
    handler.flush()
    # The filtered line and the one below the level were never written.
    through_logging, plain = stream.getvalue().splitlines()
    assert through_logging.endswith(f" INFO {logger.name} rejected ip=10.0.0.1") and plain == "plain n=1"


# -- JSON, structured lines, configure -------------------------------------------

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
REJECTED_SPEC = "dialect=%s endpoint=%s status=%d reason=%s ip=%s message=%r"


def test_a_json_line_is_one_object_with_the_record_and_its_traceback() -> None:
    formatter = JsonFormatter()
    record = _record("rejected ip=%s\nnext", time.time())
    record.args = ("10.0.0.1",)
    line = formatter.format(record)
    assert "\n" not in line
    found = json.loads(line)
    assert re.fullmatch(STAMP, found.pop("time"))
    assert found == {"level": "INFO", "logger": "dialgate.ingest", "message": "rejected ip=10.0.0.1\nnext"}
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    found = json.loads(formatter.format(record))
    assert found["exception"].startswith("Traceback") and "ValueError: boom" in found["exception"]


def test_the_json_time_is_utc_with_milliseconds() -> None:
    formatter = JsonFormatter()
    assert formatter.stamp(0.25) == "1970-01-01T00:00:00.250Z"
    assert formatter.stamp(86400 + 3661.75) == "1970-01-02T01:01:01.750Z"
    assert formatter.stamp(0.5) == "1970-01-01T00:00:00.500Z"  # the second cached is another one


async def test_a_structured_line_is_the_standard_line_in_text_and_an_object_in_json() -> None:
    for formatter in (Formatter(FORMAT), JsonFormatter()):
        stream = Recording()
        logger, handler = _configured(stream)
        handler.setFormatter(formatter)
        line = Line(logger, "rejected", REJECTED_SPEC, renamed={"message": "detail"})
        assert _direct(logger) is handler
        line("cohorly", "track", 401, "unauthorized", "10.0.0.1", "invalid token")
        handler.flush()
        [written] = stream.getvalue().splitlines()
        if isinstance(formatter, JsonFormatter):
            found = json.loads(written)
            assert re.fullmatch(STAMP, found.pop("time"))
            assert found == {"level": "INFO", "logger": logger.name, "message": "rejected", "dialect": "cohorly",
                             "endpoint": "track", "status": 401, "reason": "unauthorized", "ip": "10.0.0.1",
                             "detail": "invalid token"}
        else:
            assert written.endswith(f" INFO {logger.name} rejected dialect=cohorly endpoint=track status=401 "
                                    "reason=unauthorized ip=10.0.0.1 message='invalid token'")


def test_a_structured_line_through_logging_keeps_its_fields() -> None:
    stream = Recording()
    logger, handler = _configured(stream)
    handler.setFormatter(JsonFormatter())
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger.addHandler(Keep())  # as pytest's caplog does: the record goes through logging
    assert _direct(logger) is None
    Line(logger, "request", "method=%s status=%d")("GET", 204)
    handler.flush()
    [record] = seen
    assert record.getMessage() == "request method=GET status=204"
    found = json.loads(stream.getvalue())
    assert (found["message"], found["method"], found["status"]) == ("request", "GET", 204)


@pytest.fixture
def restored() -> Iterator[None]:
    """The logging set-up as it was before the test's `configure`."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in (ACCESS, "alembic", "aiosqlite")}
    flags = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing, logging._srcfile)
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)
    logging.logThreads, logging.logProcesses, logging.logMultiprocessing, logging._srcfile = flags


def _ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, TurnHandler)]


def test_configure_sets_the_format_and_level_and_replaces_its_own_handler(
        restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure("text", "warning")
    logger = logging.getLogger("dialgate.test")
    logger.info("not at warning")
    logger.warning("shown")
    assert capsys.readouterr().err.endswith(" WARNING dialgate.test shown\n")
    configure("json", "debug")
    assert len(_ours()) == 1
    logger.debug("debugging")
    found = json.loads(capsys.readouterr().err)
    assert (found["level"], found["message"]) == ("DEBUG", "debugging")
    # The access log is written whatever the level, once asked for.
    configure("text", "error", access_log=True)
    logging.getLogger(ACCESS).info("request method=GET")
    logging.getLogger("dialgate.ingest").info("rejected dialect=x")
    assert capsys.readouterr().err.endswith(f" INFO {ACCESS} request method=GET\n")
    configure("text", "error")
    logging.getLogger(ACCESS).info("request method=GET")
    assert capsys.readouterr().err == ""


# -- a real gateway ----------------------------------------------------------------

MIXPANEL_BOGUS = "mps_bogus_Zq81xk"


def _basic(user: str, password: str = "") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def _mixpanel_credentials(client: httpx.AsyncClient) -> None:
    """Mixpanel's secrets: Basic auth (user, or password of a service
    account), `api_key` in the query; its tokens in the body and the query."""
    rows = [{"event": "Old", "properties": {"token": "mp_shop", "distinct_id": "m", "time": 1700000000,
                                            "$insert_id": "imp-1"}}]
    assert (await client.post("/import", json=rows, headers=_basic("mps_shop"))).status_code == 200
    assert (await client.post("/import", params={"project_id": "shop"}, json=rows,
                              headers=_basic("svc", "mps_shop"))).status_code == 200
    assert (await client.post("/import", json=rows, headers=_basic(MIXPANEL_BOGUS))).status_code == 401
    data = base64.b64encode(json.dumps(rows[0]).encode()).decode()
    assert (await client.get("/import", params={"verbose": "0", "api_key": "mps_shop", "data": data})).text == "1"
    assert (await client.get("/import", params={"api_key": MIXPANEL_BOGUS, "data": data})).status_code == 401


def _serve_and_send(tmp_path: Path, sqlite_backend: dict[str, str], logging_: dict[str, Any]) -> list[str]:
    """A real `dialgate serve` with `[logging]` as given, sent every kind of
    credential every way; its standard error, once stopped, as lines."""
    from tests.gateway.test_isolation import send_every_kind_of_credential

    port = free_port()
    config = config_file(tmp_path / "dialgate.toml", sqlite_backend, port, logging=logging_,
                         quarantine={"per_minute": 100_000})

    async def send() -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as client:
            await send_every_kind_of_credential(client)
            await _mixpanel_credentials(client)
            # Query strings of a path of nobody: answered 404, logged without them.
            assert (await client.get("/nowhere", params={"token": "src_shop"})).status_code == 404

    with dialgate_serve(config, port, stderr=str(tmp_path / "err.log")):
        asyncio.run(send())
    return (tmp_path / "err.log").read_text(encoding="utf-8").splitlines()


def test_json_lines_parse_and_carry_no_credential(tmp_path: Path, sqlite_backend: dict[str, str]) -> None:
    from tests.gateway.test_isolation import leaks, secrets

    lines = _serve_and_send(tmp_path, sqlite_backend, {"format": "json", "level": "debug", "access_log": True})
    found = [json.loads(line) for line in lines]  # every line, or this fails
    everything = [*secrets(), "mps_shop", "mps_blog", "mp_shop", "mp_blog", MIXPANEL_BOGUS]
    for line in lines:
        assert not [s for s in everything if s in line], line
        assert not leaks(line)
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in found)
    # "debug" is the gateway's: not the database driver's line per operation, with its data.
    assert not [e for e in found if e["logger"] == "aiosqlite"]
    rejected = [e for e in found if e["message"] == "rejected"]
    requests = [e for e in found if e["logger"] == ACCESS]
    expected = {"logger": "dialgate.ingest", "level": "INFO", "message": "rejected", "dialect": "cohorly",
                "endpoint": "track", "status": 401, "reason": "unauthorized", "ip": "127.0.0.1",
                "detail": "invalid token"}
    assert any(set(e) == {"time", *expected} and expected.items() <= e.items() for e in rejected)
    assert {e["dialect"] for e in rejected} >= {"cohorly", "client", "inslytic", "collect", "mixpanel"}
    # One access line per request, none with a query string.
    assert len(requests) >= 60
    assert all(set(e) == {"time", "level", "logger", "message", "method", "path", "status", "duration_ms", "peer"}
               for e in requests)
    assert all("?" not in e["path"] and e["peer"] == "127.0.0.1" and e["duration_ms"] >= 0 for e in requests)
    paths = {(e["method"], e["path"], e["status"]) for e in requests}
    assert {("POST", "/events/batch", 200), ("GET", "/import", 401), ("GET", "/nowhere", 404),
            ("GET", "/admin/v1/rejections", 401), ("POST", "/track", 401)} <= paths


def test_a_level_above_info_keeps_the_access_log_alone(tmp_path: Path, sqlite_backend: dict[str, str]) -> None:
    lines = _serve_and_send(tmp_path, sqlite_backend, {"level": "warning", "access_log": True})
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert lines and all(re.match(stamp + " ", line) for line in lines)
    # No banner, no rejected line: INFO is below the level. The access log is there.
    assert not [line for line in lines if " INFO " in line and f" {ACCESS} " not in line]
    access = [line for line in lines if f" INFO {ACCESS} request " in line]
    assert len(access) >= 60
    assert any(re.search(r" request method=GET path=/nowhere status=404 duration_ms=\d+\.\d\d peer=127\.0\.0\.1$",
                         line) for line in access)
