"""The limits that keep one caller from hurting others (DIALECTS.md,
"Limits"), per dialect, through real HTTP on both backends: nesting, error
body size, the client API's event count, credentials and limits answered
before the body is inflated, bytes in flight, the per-IP limit, and no 500
from a body, a query string or a header. Each asserts its bound and that
nothing half-stored remains."""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.dialects.test_collect import rejections_of  # waits for the quarantine writes
from tests.hostile.helpers import (
    COLLECT_QUERY,
    KB,
    check_shape,
    count_events,
    dialect_of,
    profile_exists,
    request_args,
    settings,
)
from tests.support import ADMIN, events_of, gateway, props_of

pytestmark = pytest.mark.anyio

MAX_ERROR_BYTES = 64 * KB
# Generous, for a busy 2-core machine: the cost before these limits was
# seconds (problem lists) or tens of ms (a refused gzip bomb).
SECONDS = 5.0


def nested(levels: int) -> Any:
    """A value of exactly `levels` levels of objects and arrays, alternating."""
    value: Any = {"leaf": 1}
    for level in range(levels - 1):
        value = [value] if level % 2 == 0 else {"d": value}
    return value


def shaped(path: str, deep: Any) -> Any:
    """A valid payload for `path` carrying `deep` where a record keeps it
    (ignored on /alias and /v1/ingest, whose records have no such place)."""
    if path == "/track":
        return {"event": "E", "properties": {"distinct_id": "p1", "deep": deep}}
    if path == "/engage":
        return {"distinct_id": "p1", "$set": {"deep": deep}}
    if path == "/alias":
        return {"alias": "anon-p1", "distinct_id": "p1", "deep": deep}
    if path == "/api/client/events":
        return [{"name": "E", "external_id": "p1", "data": {"deep": deep}}]
    if path == "/api/client/identify":
        return {"external_id": "p1", "data": {"deep": deep}}
    if path == "/v1/ingest":
        return {"events": [{"eventName": "E", "timestamp": "2026-01-02T03:04:05Z", "anonymousId": "p1",
                            "sessionId": "s", "consentGiven": True, "deep": deep}]}
    if path == "/events":
        return {"event_name": "E", "user": {"id": "p1"}, "deep": deep}
    if path == "/events/batch":
        return {"batch": [{"event_name": "Kept", "user": {"id": "p2"}},
                          {"event_name": "E", "user": {"id": "p1"}, "deep": deep}]}
    raise KeyError(path)


# Levels above the deep value inside its record (the record is level 1).
ABOVE = {"/track": 2, "/engage": 2, "/api/client/events": 2, "/api/client/identify": 2}


def nested_json(levels: int) -> bytes:
    """`nested(levels)` as JSON, built without recursion (json.dumps would
    need the stack for 970 levels)."""
    text = b'{"leaf":1}'
    for level in range(levels - 1):
        text = b"[" + text + b"]" if level % 2 == 0 else b'{"d":' + text + b"}"
    return text


def deep_body(path: str, depth: int) -> bytes:
    """The payload whose record is exactly `depth` levels deep."""
    raw = json.dumps(shaped(path, "DEEP")).encode()
    return raw.replace(b'"DEEP"', nested_json(depth - ABOVE.get(path, 1)))


PATHS = ["/track", "/engage", "/alias", "/api/client/events", "/api/client/identify", "/v1/ingest",
         "/events", "/events/batch"]
# The too-deep answer, and the record it must name.
TOO_DEEP = {
    "/track": (400, None), "/engage": (400, None), "/alias": (400, None),
    "/api/client/events": (422, "0: "), "/api/client/identify": (422, "body: "),
    "/v1/ingest": (400, "Event 0: "), "/events": (200, None), "/events/batch": (200, "batch[1]: "),
}


async def post(client: httpx.AsyncClient, path: str, body: bytes, **headers: str) -> httpx.Response:
    args = request_args(dialect_of(path))
    args["headers"].update(headers)
    return await client.post(path, content=body, **args)


async def stored_nothing(client: httpx.AsyncClient, before: int) -> None:
    assert await count_events(client) == before
    assert not await profile_exists(client, "p1")


def error_text(reply: httpx.Response) -> str:
    body = reply.json()
    if "details" in body:
        return " ".join(body["details"])
    return str(body["error"])


# -- nesting ---------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_nesting_at_the_limit_is_stored_and_read_back(backend: dict[str, str], path: str) -> None:
    """64 levels are accepted, and the admin API reads back whatever an
    ingestion endpoint accepted (it answered 500 for 970 levels)."""
    async with gateway(settings(backend)) as client:
        reply = await post(client, path, deep_body(path, 64))
        check_shape(dialect_of(path), reply)
        assert reply.status_code in (200, 202, 204), reply.text
        if path in ("/engage", "/api/client/identify"):
            assert (await props_of(client, "p1") or {}).get("deep") == nested(62)
        elif path in ("/track", "/api/client/events", "/events", "/events/batch"):
            events = {e["name"]: e for e in await events_of(client)}
            stored = events["E"]["properties"]["deep"]
            assert stored == nested(64 - ABOVE.get(path, 1))
        assert (await client.get("/admin/v1/rejections", headers=ADMIN)).status_code == 200


@pytest.mark.parametrize(("path", "depth"), [
    # 970 levels were accepted, and broke the admin API. A collect batch that
    # deep may be past what the decoder follows (see the 100,000-level test).
    (path, depth) for path in PATHS for depth in (65, 970) if (path, depth) != ("/events/batch", 970)
])
async def test_nesting_past_the_limit_is_invalid_naming_the_record(
    backend: dict[str, str], path: str, depth: int
) -> None:
    status, record = TOO_DEEP[path]
    async with gateway(settings(backend)) as client:
        before = await count_events(client)
        started = time.monotonic()
        reply = await post(client, path, deep_body(path, depth))
        assert time.monotonic() - started < SECONDS
        check_shape(dialect_of(path), reply)
        assert reply.status_code == status, reply.text
        if dialect_of(path) == "collect":
            # 200-always: the event is quarantined, a batch's others stored.
            quarantined = await rejections_of(client, reason="too_deep")
            assert len(quarantined) == 1 and quarantined[0]["project"] == "shop", quarantined
            assert quarantined[0]["detail"].startswith(record or "nested too deeply"), quarantined
            names = [e["name"] for e in await events_of(client)]
            assert names == (["Kept"] if path == "/events/batch" else [])
            assert not await profile_exists(client, "p1")
        else:
            said = error_text(reply)
            assert "nested too deeply (more than 64 levels)" in said, said
            if record is not None:
                assert said.startswith(record), said
            await stored_nothing(client, before)


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("path", PATHS)
async def test_nesting_of_100000_levels_in_a_record(backend: dict[str, str], path: str, gzipped: bool) -> None:
    """Deeper than the decoder follows (RecursionError inside msgspec): the
    same answer, naming the record found in the raw bytes."""
    status, record = TOO_DEEP[path]
    deep = b"[" * 100_000 + b"]" * 100_000
    raw = json.dumps(shaped(path, "DEEP")).encode().replace(b'"DEEP"', deep)
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    async with gateway(settings(backend, dialects={"collect": {"max_request_bytes": 512 * KB}})) as client:
        before = await count_events(client)
        started = time.monotonic()
        reply = await post(client, path, gzip.compress(raw) if gzipped else raw, **headers)
        assert time.monotonic() - started < SECONDS
        check_shape(dialect_of(path), reply)
        assert reply.status_code == status, reply.text
        if dialect_of(path) == "collect":
            quarantined = await rejections_of(client, reason="too_deep")
            assert len(quarantined) == 1, quarantined
            # Not decodable: a batch is quarantined whole (its "Kept" event
            # too), naming the record.
            assert quarantined[0]["detail"].startswith(record or "nested too deeply"), quarantined
            assert await count_events(client) == before
        else:
            said = error_text(reply)
            assert "nested too deeply" in said, said
            if record is not None:
                assert said.startswith(record), said
            await stored_nothing(client, before)


async def test_pixel_with_1200_nested_brackets_is_quarantined(backend: dict[str, str]) -> None:
    key = "a" + "[b]" * 1200
    async with gateway(settings(backend)) as client:
        reply = await client.get("/events", params={**COLLECT_QUERY, "event_name": "E", key: "1"})
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/gif", reply.text
        quarantined = await rejections_of(client, reason="too_deep")
        assert len(quarantined) == 1 and "tc_s" not in quarantined[0]["excerpt"], quarantined
        assert await count_events(client) == 0
        # 63 bracket levels (64 with the event) are stored.
        ok = "a" + "[b]" * 62
        reply = await client.get("/events", params={**COLLECT_QUERY, "event_name": "E", ok: "1"})
        assert reply.status_code == 200
        assert await count_events(client) == 1


# -- error bodies ------------------------------------------------------------------


def capped(reply: httpx.Response) -> list[str]:
    assert len(reply.content) <= MAX_ERROR_BYTES, len(reply.content)
    details = reply.json()["details"]
    assert len(details) <= 100
    return details  # type: ignore[no-any-return]


async def test_a_1kb_gzip_body_of_empty_events_is_a_small_quick_answer(backend: dict[str, str]) -> None:
    """The issue's case: 30 MB of 422 after seconds of CPU, now a 413 over
    the event count; with the count raised, the problem list is capped."""
    bomb = gzip.compress(b"[" + b"{}," * 349_000 + b"{}]", 9)
    assert len(bomb) < 2 * KB
    for max_events, status in ((1000, 413), (1_000_000, 422)):
        custom = settings(backend, dialects={"client": {"max_events": max_events}})
        async with gateway(custom) as client:
            started = time.process_time()
            reply = await post(client, "/api/client/events", bomb, **{"Content-Encoding": "gzip"})
            assert time.process_time() - started < SECONDS
            check_shape("client", reply)
            assert reply.status_code == status, reply.text[:300]
            details = capped(reply)
            if status == 422:
                assert len(details) == 100 and details[-1].startswith("... and ") and details[-1].endswith(" more")
                assert int(details[-1].split()[2]) == 2 * 349_001 - 99  # name and an id, per event
            else:
                assert "349001 events, at most 1000" in details[0]
            assert await count_events(client) == 0


@pytest.mark.parametrize("path", ["/v1/ingest", "/api/client/identify", "/engage"])
async def test_error_bodies_stay_under_64_kb(backend: dict[str, str], path: str) -> None:
    """Many problems quoting long keys (escaped six-fold in JSON): at most
    100 listed, each text cut, 64 KB in all."""
    keys = {("\x01" * 300) + str(i): 1 for i in range(200)}
    body: Any = {
        "/v1/ingest": {"events": [{"eventName": 1, "properties": keys}] * 10},
        "/api/client/identify": {"external_id": "p1", **dict.fromkeys(keys, 1)},
        "/engage": {"distinct_id": "p1", "$add": dict.fromkeys(keys, "x")},
    }[path]
    async with gateway(settings(backend)) as client:
        reply = await post(client, path, json.dumps(body).encode())
        check_shape(dialect_of(path), reply)
        assert len(reply.content) <= MAX_ERROR_BYTES
        if path == "/v1/ingest":
            details = capped(reply)
            # Every problem counted: 5 fields and 200 properties, in 10 events.
            assert details[-1].startswith("... and ")
            assert len(details) - 1 + int(details[-1].split()[2]) == 10 * 205, details[-1]
        elif path == "/api/client/identify":
            details = capped(reply)
            assert all(len(d) <= 300 for d in details[:-1])
        assert await count_events(client) == 0
        assert not await profile_exists(client, "p1")


async def test_a_collect_batch_of_170000_empty_events_costs_a_check_each(backend: dict[str, str]) -> None:
    """Batches are not atomic and have no count limit: each empty event is
    dropped, counted rather than recorded past the first 100 of a request
    (320 ms of CPU for a 0.5 KB gzip body before)."""
    bomb = gzip.compress(b'{"batch":[' + b"{}," * 170_000 + b"{}]}", 9)
    assert len(bomb) < KB
    async with gateway(settings(backend)) as client:
        await post(client, "/events/batch", gzip.compress(b'{"batch":[{}]}'), **{"Content-Encoding": "gzip"})
        started = time.process_time()
        reply = await post(client, "/events/batch", bomb, **{"Content-Encoding": "gzip"})
        assert time.process_time() - started < 0.25
        assert reply.status_code == 200, reply.text
        assert await count_events(client) == 0
        found = await rejections_of(client, reason="no_event_name")
        summary = f"{170_001 - 100} more events of this batch dropped for this reason"
        assert any(r["detail"] == summary for r in found), [r["detail"] for r in found]
        assert len(found) <= 10 + 1  # the quarantine's sampling: 10 a minute per reason


# -- the client API's event count --------------------------------------------------


async def test_client_events_at_most_1000_per_request(backend: dict[str, str]) -> None:
    def events(n: int) -> bytes:
        return json.dumps([{"name": "E", "external_id": f"u{i}"} for i in range(n)]).encode()

    async with gateway(settings(backend)) as client:
        reply = await post(client, "/api/client/events", events(1001))
        check_shape("client", reply)
        assert reply.status_code == 413
        assert reply.json() == {"status": "error", "error": "body: 1001 events, at most 1000 per request",
                                "details": ["body: 1001 events, at most 1000 per request"]}
        assert await count_events(client) == 0
        reply = await post(client, "/api/client/events", events(1000))
        assert reply.status_code == 204, reply.text
        assert await count_events(client) == 1000


# -- refused before the body is read or inflated ----------------------------------

# Not gzip at all: a request whose body were inflated would be a 400.
CORRUPT = b"\x1f\x8b" + b"\x00" * 2000
BOMB = gzip.compress(b"[" + b"{}," * 349_000 + b"{}]", 9)


@pytest.mark.parametrize(("path", "headers"), [
    ("/api/client/events", {"Authorization": "Bearer nope"}),
    ("/api/client/events", {}),
    ("/v1/ingest", {"Authorization": "Bearer nope"}),
    ("/v1/ingest", {"Authorization": "Basic x"}),
])
async def test_unknown_header_credential_is_refused_before_the_body(
    backend: dict[str, str], path: str, headers: dict[str, str]
) -> None:
    async with gateway(settings(backend)) as client:
        reply = await client.post(path, content=CORRUPT, headers={**headers, "Content-Encoding": "gzip"})
        check_shape(dialect_of(path), reply)
        assert reply.status_code == 401, reply.text
        # Cheap whatever the body: a 1 KB bomb costs what an empty body does.
        await client.post(path, content=BOMB, headers={**headers, "Content-Encoding": "gzip"})
        started = time.process_time()
        for _ in range(20):
            reply = await client.post(path, content=BOMB, headers={**headers, "Content-Encoding": "gzip"})
            assert reply.status_code == 401
        assert (time.process_time() - started) / 20 < 0.005  # it was 15-40 ms inflated and parsed
        # A body that is never read still gets its answer (the client streams it).
        async def slow() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b" " * (64 * KB)

        reply = await client.post(path, content=slow(), headers=headers)
        assert reply.status_code == 401
        # Declaring more than is worth draining: answered at once, not read.
        request = client.build_request("POST", path, content=b"{}", headers=headers)
        request.headers["content-length"] = str(1 << 30)
        started = time.monotonic()
        reply = await client.send(request)
        assert reply.status_code == 401 and time.monotonic() - started < SECONDS
        assert await count_events(client) == 0


@pytest.mark.parametrize("path", ["/track", "/engage", "/api/client/events", "/v1/ingest"])
async def test_a_rate_limited_request_is_never_inflated(backend: dict[str, str], path: str) -> None:
    window = {"requests": 1, "per_seconds": 3600}
    custom = settings(backend, dialects={"cohorly": {"rate_limit": window}}, limits={"per_ip": window})
    async with gateway(custom) as client:
        first = await post(client, path, b"{}")
        assert first.status_code != 429
        reply = await post(client, path, CORRUPT, **{"Content-Encoding": "gzip"})
        check_shape(dialect_of(path), reply)
        assert reply.status_code == 429, reply.text
        assert int(reply.headers["retry-after"]) >= 1
        # Inflating and parsing the bomb costs 15-20 ms; a refusal about 0.3 ms
        # (bench/hostile.py). The best of five rounds, the collector held
        # back: a collection of the whole suite's heap once cost a round 14 ms
        # a request.
        rounds = []
        for _ in range(5):
            gc.collect()
            gc.disable()
            try:
                started = time.process_time()
                for _ in range(20):
                    reply = await post(client, path, BOMB, **{"Content-Encoding": "gzip"})
                    assert reply.status_code == 429
                rounds.append((time.process_time() - started) / 20)
            finally:
                gc.enable()
        assert min(rounds) < 0.012, rounds
        assert await count_events(client) == 0


# -- bytes in flight ------------------------------------------------------------------

OVERLOAD_PATHS = ["/track", "/api/client/events", "/v1/ingest", "/events/batch"]


def padded(path: str, size: int) -> bytes:
    from tests.hostile.test_explicit import valid_body

    payload = json.dumps(valid_body(path)).encode()
    return payload[:-1] + b" " * (size - len(payload)) + payload[-1:]


def assert_overloaded(path: str, reply: httpx.Response) -> None:
    assert reply.status_code == 503, reply.text
    assert int(reply.headers["retry-after"]) >= 1
    body = reply.json()
    shape = {"cohorly": {"status", "error"}, "client": {"status", "error", "details"},
             "inslytic": {"error"}, "collect": {"error"}}[dialect_of(path)]
    assert set(body) == shape, body


@pytest.mark.parametrize("path", OVERLOAD_PATHS)
async def test_bytes_in_flight_are_bounded_per_worker(backend: dict[str, str], path: str) -> None:
    custom = settings(backend, server={"max_inflight_bytes": 48 * KB})
    async with gateway(custom) as client:
        # Declared up front: refused before a byte is read.
        reply = await post(client, path, padded(path, 64 * KB))
        assert_overloaded(path, reply)
        # Chunked: counted as read.
        async def chunks() -> AsyncIterator[bytes]:
            body = padded(path, 64 * KB)
            for start in range(0, len(body), 8 * KB):
                yield body[start:start + 8 * KB]

        reply = await client.post(path, content=chunks(), **request_args(dialect_of(path)))
        assert_overloaded(path, reply)
        assert await count_events(client) == 0
        # Two at once: the second waits for nothing and is told to retry;
        # once the first is answered its bytes are given back.
        release = asyncio.Event()

        async def held() -> AsyncIterator[bytes]:
            body = padded(path, 40 * KB)
            yield body[:-10]
            await release.wait()
            yield body[-10:]

        first = asyncio.create_task(client.post(path, content=held(), **request_args(dialect_of(path))))
        await asyncio.sleep(0.2)
        second = await post(client, path, padded(path, 20 * KB))
        assert_overloaded(path, second)
        release.set()
        assert (await first).status_code in (200, 202, 204), (await first).text
        third = await post(client, path, padded(path, 40 * KB))
        assert third.status_code in (200, 202, 204), third.text
        assert await count_events(client) == 2


# -- the per-IP limit ------------------------------------------------------------------


async def test_per_ip_limit_on_every_endpoint_that_may_answer_429(backend: dict[str, str]) -> None:
    custom = settings(backend, limits={"per_ip": {"requests": 4, "per_seconds": 3600}},
                      dialects={"cohorly": {"rate_limit": {"requests": 2, "per_seconds": 3600}}})
    async with gateway(custom, client_ip="198.51.100.7") as client:
        track = json.dumps({"event": "E", "properties": {"distinct_id": "p1"}}).encode()
        # Cohorly's own window (2) refuses first; it is a window of its own.
        assert [(await post(client, "/track", track)).status_code for _ in range(3)] == [200, 200, 429]
        # The per-IP window counted those 3: one more request, whatever the dialect.
        events = json.dumps([{"name": "E", "external_id": "p1"}]).encode()
        assert (await post(client, "/api/client/events", events)).status_code == 204
        for path in ("/api/client/events", "/v1/ingest", "/alias", "/api/client/identify"):
            reply = await post(client, path, b"{}")
            check_shape(dialect_of(path), reply)
            assert reply.status_code == 429, (path, reply.text)
            assert int(reply.headers["retry-after"]) >= 1
        # Unknown credentials too: the limit comes first.
        reply = await client.post("/v1/ingest", content=b"{}", headers={"Authorization": "Bearer nope"})
        assert reply.status_code == 429
        # Collect never answers 429 (its contract): not under the limit.
        for _ in range(6):
            reply = await post(client, "/events", json.dumps({"event_name": "C", "user": {"id": "c"}}).encode())
            assert reply.status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert [e["name"] for e in await events_of(client)].count("C") == 6
        assert await count_events(client) == 2 + 1 + 6
    # Another client IP has its own budget.
    async with gateway(custom, client_ip="198.51.100.8") as client:
        assert (await post(client, "/api/client/events", events)).status_code == 204


# -- no 500 ------------------------------------------------------------------------------


@pytest.mark.parametrize("query", [
    {"tc_s": "\u00b2", "token": "x", "event_name": "e"},
    {"tc_s": "1" * 5000, "token": "x", "event_name": "e"},
    {"tc_s": "\u0661\u0662", "token": "src_shop", "event_name": "e"},
    {"tc_s": "1234", "token": "src_shop", "event_name": "e", "items[99999999999999999999]": "x"},
])
async def test_odd_collect_query_strings_get_the_pixel(backend: dict[str, str], query: dict[str, str]) -> None:
    async with gateway(settings(backend)) as client:
        reply = await client.get("/events", params=query)
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/gif", reply.text
        assert await count_events(client) == (1 if query["tc_s"] == "1234" else 0)


@pytest.mark.parametrize("value", ["\u00b2", "1" * 5000, "-1", "1e3", " 12 ", "\u0661"])
@pytest.mark.parametrize("path", ["/track", "/api/client/events", "/v1/ingest", "/events"])
async def test_odd_content_length_headers(backend: dict[str, str], path: str, value: str) -> None:
    """What the server passes on (a proxy or the ASGI app in a test may)."""
    from tests.hostile.test_explicit import valid_body

    body = json.dumps(valid_body(path)).encode()
    async with gateway(settings(backend)) as client:
        args = request_args(dialect_of(path))
        request = client.build_request("POST", path, content=body, **args)
        request.headers["content-length"] = value  # sent as UTF-8 bytes
        reply = await client.send(request)
        check_shape(dialect_of(path), reply)


@pytest.mark.parametrize("path", PATHS)
async def test_an_unexpected_error_is_answered_in_the_dialect_shape_and_logged_once(
    backend: dict[str, str], path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.registry import discover

    dialect = dialect_of(path)
    cls = next(d for d in discover() if d.name == dialect)

    def broken(self: Any, request: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cls, "translate", broken)
    from tests.hostile.test_explicit import valid_body

    body = json.dumps(valid_body(path)).encode()
    caplog.set_level(logging.ERROR, logger="dialgate.ingest")
    async with gateway(settings(backend)) as client:
        replies = [await post(client, path, body) for _ in range(3)]
    for reply in replies:
        assert reply.status_code == 500, reply.text
        shape = {"cohorly": {"status": 0, "error": "internal error"},
                 "inslytic": {"error": "Internal server error"},
                 "collect": {"error": "internal error"},
                 "client": {"status": "error", "error": "internal error", "details": ["internal error"]}}
        assert reply.json() == shape[dialect]
    logged = [r for r in caplog.records if r.name == "dialgate.ingest" and r.exc_info]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert "ZeroDivisionError" in logged[0].getMessage() and logged[0].exc_info[0] is ZeroDivisionError
