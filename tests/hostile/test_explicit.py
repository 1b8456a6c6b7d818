"""Explicit hostile inputs, per dialect: bombs, endless bodies, deep nesting,
huge and odd values, NUL, invalid UTF-8, huge ids and slow clients."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from tests.hostile.helpers import (
    KB,
    MB,
    check_shape,
    count_events,
    profile_exists,
    request_args,
    settings,
)
from tests.support import events_of, gateway, live_server, props_of, rejections_of

pytestmark = pytest.mark.anyio

# (path, the endpoint's body limit, the too-large status)
LIMITS = [
    ("/track", MB, 413),
    ("/engage", MB, 413),
    ("/alias", MB, 413),
    ("/api/client/events", MB, 413),
    ("/api/client/identify", MB, 413),
    ("/v1/ingest", 5 * MB, 413),
    ("/events", 32 * KB, 400),
    ("/events/batch", 500 * KB, 400),
]


def dialect(path: str) -> str:
    from tests.hostile.helpers import dialect_of

    return dialect_of(path)


async def post(client: httpx.AsyncClient, path: str, body: bytes | Any, **extra_headers: str) -> httpx.Response:
    args = request_args(dialect(path))
    args["headers"].update(extra_headers)
    if isinstance(body, (bytes, bytearray)):
        return await client.post(path, content=bytes(body), **args)
    return await client.post(path, content=body, **args)


def valid_body(path: str, **extra: Any) -> Any:
    """A small valid payload for the endpoint, with `extra` as event properties."""
    if path == "/track":
        return {"event": "E", "properties": {"distinct_id": "p1", **extra}}
    if path == "/engage":
        return {"distinct_id": "p1", "$set": dict(extra)}
    if path == "/alias":
        return {"alias": "anon-p1", "distinct_id": "p1", **extra}  # extra keys are ignored
    if path == "/api/client/events":
        return [{"name": "E", "external_id": "p1", "data": dict(extra)}]
    if path == "/api/client/identify":
        return {"external_id": "p1", "data": dict(extra)}
    if path == "/v1/ingest":
        return {"events": [{"eventName": "E", "timestamp": "2026-01-02T03:04:05Z", "anonymousId": "p1",
                            "sessionId": "s", "consentGiven": True,
                            "properties": {k: str(v) for k, v in extra.items()}}]}
    if path == "/events":
        return {"event_name": "E", "user": {"id": "p1"}, **extra}
    if path == "/events/batch":
        return {"batch": [{"event_name": "E", "user": {"id": "p1"}, **extra}]}
    raise KeyError(path)


async def assert_nothing_stored(client: httpx.AsyncClient, before: int) -> None:
    assert await count_events(client) == before
    assert not await profile_exists(client, "p1")


# -- size limits -------------------------------------------------------------------


@pytest.mark.parametrize(("path", "limit", "status"), LIMITS)
async def test_gzip_bomb_is_too_large(backend: dict[str, str], path: str, limit: int, status: int) -> None:
    # A valid payload padded with whitespace so it inflates just past the limit.
    payload = json.dumps(valid_body(path)).encode()
    bomb = gzip.compress(payload[:-1] + b" " * (limit + 10) + payload[-1:], compresslevel=9)
    assert len(bomb) < limit // 100
    async with gateway(settings(backend)) as client:
        before = await count_events(client)
        reply = await post(client, path, bomb, **{"Content-Encoding": "gzip"})
        assert reply.status_code == status, reply.text
        check_shape(dialect(path), reply)
        if dialect(path) == "collect":
            assert reply.json() == {"error": "request too large"}
        await assert_nothing_stored(client, before)


@pytest.mark.parametrize(("path", "limit", "status"), LIMITS)
async def test_chunked_body_over_the_limit(backend: dict[str, str], path: str, limit: int, status: int) -> None:
    payload = json.dumps(valid_body(path)).encode()
    sent = {"bytes": 0}

    async def chunks() -> AsyncIterator[bytes]:
        yield payload[:-1]
        piece = b" " * (64 * KB)
        for _ in range(limit // len(piece) + 2):
            sent["bytes"] += len(piece)
            yield piece
        yield payload[-1:]

    async with gateway(settings(backend)) as client:
        before = await count_events(client)
        args = request_args(dialect(path))
        reply = await client.post(path, content=chunks(), **args)
        assert "content-length" not in reply.request.headers
        assert reply.request.headers.get("transfer-encoding") == "chunked"
        assert reply.status_code == status, reply.text
        check_shape(dialect(path), reply)
        await assert_nothing_stored(client, before)


# -- structure -----------------------------------------------------------------------


# Nested deeper than the decoder follows: the too-deep answer of each
# dialect (DIALECTS.md, "Limits"); collect's batch is quarantined (200).
DEEP_STATUS = {"/track": 400, "/engage": 400, "/alias": 400, "/api/client/events": 422,
               "/api/client/identify": 422, "/v1/ingest": 400, "/events": 400, "/events/batch": 200}


@pytest.mark.parametrize("path", [p for p, _, _ in LIMITS if p != "/events"] + ["/events"])
async def test_deeply_nested_json(backend: dict[str, str], path: str) -> None:
    depth = 100_000
    deep = b"[" * depth + b"]" * depth
    body = deep if path != "/events/batch" else b'{"batch":' + deep + b"}"
    async with gateway(settings(backend)) as client:
        before = await count_events(client)
        reply = await post(client, path, body)
        check_shape(dialect(path), reply)
        # /events: 200 KB is over its 32 KB limit, a 400.
        assert reply.status_code == DEEP_STATUS[path], reply.text
        if path in ("/track", "/engage", "/alias"):
            assert "nested too deeply" in reply.json()["error"]
        await assert_nothing_stored(client, before)


@pytest.mark.parametrize(("path", "count"), [
    ("/track", 30_000), ("/engage", 30_000), ("/api/client/events", 30_000),
    ("/api/client/identify", 30_000), ("/v1/ingest", 30_000), ("/events", 1_500), ("/events/batch", 1_500),
])
async def test_tens_of_thousands_of_properties(backend: dict[str, str], path: str, count: int) -> None:
    extra = {f"p{i}": i for i in range(count)}
    body = json.dumps(valid_body(path, **extra)).encode()
    async with gateway(settings(backend)) as client:
        reply = await post(client, path, body)
        check_shape(dialect(path), reply)
        assert reply.status_code in (200, 202, 204, 413), reply.text
        if path in ("/engage", "/api/client/identify"):
            props = await props_of(client, "p1")
            assert props is not None
            assert all(props.get(k) == v for k, v in extra.items()), "profile not stored whole"
        else:
            events = await events_of(client)
            assert len(events) == 1
            stored = events[0]["properties"]
            expected = {k: str(v) for k, v in extra.items()} if path == "/v1/ingest" else extra
            assert {k: stored.get(k) for k in expected} == expected


@pytest.mark.parametrize("path", [p for p, _, _ in LIMITS])
async def test_invalid_utf8(backend: dict[str, str], path: str) -> None:
    body = json.dumps(valid_body(path, note="MARK")).encode().replace(b"MARK", b"\xff\xc3(\xed\xa0\x80")
    async with gateway(settings(backend)) as client:
        before = await count_events(client)
        reply = await post(client, path, body)
        check_shape(dialect(path), reply)
        assert 400 <= reply.status_code < 500, reply.text
        await assert_nothing_stored(client, before)


# -- NUL -------------------------------------------------------------------------------

NUL_CASES = ["/track", "/api/client/events", "/v1/ingest", "/events", "/events/batch"]


@pytest.mark.parametrize("path", NUL_CASES)
async def test_nul_is_stored_as_replacement_character(backend: dict[str, str], path: str) -> None:
    nul = {"k\x00ey": "va\x00lue", "nested": {"\x00": ["\x00x"]}}
    body = valid_body(path, **nul)
    # The name and the id carry a NUL too.
    text = json.dumps(body).replace('"E"', '"E\\u0000v"').replace('"p1"', '"p\\u00001"')
    async with gateway(settings(backend)) as client:
        reply = await post(client, path, text.encode())
        check_shape(dialect(path), reply)
        assert reply.status_code in (200, 202, 204), reply.text
        events = await events_of(client)
        assert len(events) == 1, events
        event = events[0]
        assert event["name"] == "E\ufffdv"
        assert event["distinct_id"] == "p\ufffd1"
        stored = event["properties"]
        if path == "/v1/ingest":
            assert stored["k\ufffdey"] == "va\ufffdlue"
        else:
            assert stored["k\ufffdey"] == "va\ufffdlue"
            assert stored["nested"] == {"\ufffd": ["\ufffdx"]}
        assert "\x00" not in json.dumps(event, ensure_ascii=False)


async def test_nul_in_profile_keys_and_values(backend: dict[str, str]) -> None:
    async with gateway(settings(backend)) as client:
        reply = await post(client, "/engage", {"distinct_id": "p\x001", "$set": {"k\x00": "v\x00"}} and
                           json.dumps({"distinct_id": "p\x001", "$set": {"k\x00": "v\x00"}}).encode())
        assert reply.status_code == 200, reply.text
        props = await props_of(client, "p\ufffd1")
        assert props is not None and props.get("k\ufffd") == "v\ufffd", props


# -- numbers and times -------------------------------------------------------------------


@pytest.mark.parametrize("value", [2**64, 2**63, -(2**63) - 1, 10**40, -1, -(2**70), "1700000000000", 1e300])
async def test_cohorly_time_out_of_range(backend: dict[str, str], value: Any) -> None:
    async with gateway(settings(backend)) as client:
        reply = await post(client, "/track", json.dumps(valid_body("/track", time=value)).encode())
        assert reply.status_code == 400, reply.text
        check_shape("cohorly", reply)
        assert "time" in reply.json()["error"]
        await assert_nothing_stored(client, 0)


@pytest.mark.parametrize("value", [2**64, 10**40, -1, -(2**70), "-5", "1" * 30, "99999999999999999999"])
async def test_collect_bad_event_timestamp_means_receipt_time(backend: dict[str, str], value: Any) -> None:
    async with gateway(settings(backend)) as client:
        started = int(time.time() * 1000)
        reply = await post(client, "/events", json.dumps(
            {"event_name": "E", "user": {"id": "p1"}, "context": {"event_timestamp": value}}).encode())
        assert reply.status_code == 200, reply.text
        events = await events_of(client)
        assert len(events) == 1
        assert started - 1000 <= events[0]["time"] <= int(time.time() * 1000) + 1000


@pytest.mark.parametrize(("stamp", "ms"), [
    ("1969-12-31T23:59:59Z", -1000),
    ("1900-01-01T00:00:00Z", -2208988800000),
    ("0001-01-01T00:00:00Z", -62135596800000),
    ("0001-01-01T00:00:00+14:00", -62135647200000),
    ("9999-12-31T23:59:59-12:00", 253402343999000),
])
async def test_inslytic_extreme_timestamps_are_stored(backend: dict[str, str], stamp: str, ms: int) -> None:
    # Before the epoch is accepted and stored as negative unix ms: a deliberate
    # choice, see tests/dialects/test_inslytic.py (before-epoch -> -1).
    body = valid_body("/v1/ingest")
    body["events"][0]["timestamp"] = stamp
    async with gateway(settings(backend)) as client:
        reply = await post(client, "/v1/ingest", json.dumps(body).encode())
        assert reply.status_code == 202, reply.text
        assert [e["time"] for e in await events_of(client)] == [ms]


@pytest.mark.parametrize("stamp", [
    "-0001-01-01T00:00:00Z", "99999-01-01T00:00:00Z", "2026-01-02T03:04:05+99:00", "2026-13-01T00:00:00Z",
    "1" * 40, "2026-01-02T03:04:05Z" + "9" * 5000, "+002026-01-02T03:04:05Z",
])
async def test_inslytic_timestamp_out_of_range(backend: dict[str, str], stamp: str) -> None:
    body = valid_body("/v1/ingest")
    body["events"][0]["timestamp"] = stamp
    async with gateway(settings(backend)) as client:
        reply = await post(client, "/v1/ingest", json.dumps(body).encode())
        check_shape("inslytic", reply)
        assert reply.status_code == 400, reply.text
        assert any("timestamp" in d for d in reply.json()["details"]), reply.text
        await assert_nothing_stored(client, 0)


@pytest.mark.parametrize("path", ["/track", "/engage", "/api/client/events", "/api/client/identify",
                                  "/events", "/events/batch"])
async def test_integers_beyond_64_bits_in_properties(backend: dict[str, str], path: str) -> None:
    big = {"big": 2**70, "neg": -(2**65), "huge": 10**300}
    async with gateway(settings(backend)) as client:
        reply = await post(client, path, json.dumps(valid_body(path, **big)).encode())
        check_shape(dialect(path), reply)
        if reply.status_code in (200, 204):
            if path in ("/engage", "/api/client/identify"):
                stored = await props_of(client, "p1")
            else:
                events = await events_of(client)
                assert len(events) == 1
                stored = events[0]["properties"]
            assert stored is not None
            assert {k: stored[k] for k in big} == big, "stored, but not as sent"
        else:
            await assert_nothing_stored(client, 0)


# -- long strings and ids -------------------------------------------------------------------


@pytest.mark.parametrize(("path", "size"), [
    ("/track", 900 * KB), ("/api/client/events", 900 * KB), ("/v1/ingest", 4 * MB), ("/events", 30 * KB),
    ("/events/batch", 30 * KB),
])
async def test_very_long_string_is_stored(backend: dict[str, str], path: str, size: int) -> None:
    value = "x" * (size - 3) + "é\u20ac"
    async with gateway(settings(backend)) as client:
        reply = await post(client, path, json.dumps(valid_body(path, long=value), ensure_ascii=False).encode())
        assert reply.status_code in (200, 202, 204), reply.text
        events = await events_of(client)
        assert len(events) == 1
        assert events[0]["properties"]["long"] == value


HUGE = "i" * 1025
HUGE_ID_CASES = [
    ("/track", {"event": "E", "properties": {"distinct_id": HUGE}}, 400),
    ("/track", {"event": "E", "properties": {"distinct_id": "p1", "$insert_id": "x" * 256}}, 400),
    ("/engage", {"distinct_id": HUGE, "$set": {"a": 1}}, 400),
    ("/alias", {"alias": HUGE, "distinct_id": "p1"}, 400),
    ("/alias", {"alias": "p1", "distinct_id": "\u20ac" * 342}, 400),
    ("/api/client/events", [{"name": "E", "external_id": HUGE}], 422),
    ("/api/client/identify", {"anonymous_id": HUGE, "external_id": "p1"}, 422),
    ("/api/client/devices", {"device_id": HUGE, "os": "a", "model": "m", "app_build": "1", "app_version": "1",
                             "external_id": "p1"}, 422),
    ("/api/client/alias", {"anonymous_id": "p1", "external_id": HUGE}, 422),
    ("/v1/ingest", {"events": [{"eventName": "E", "timestamp": "2026-01-02T03:04:05Z", "anonymousId": HUGE,
                                "sessionId": "s", "consentGiven": True}]}, 400),
    ("/v1/ingest", {"events": [{"eventName": "E", "timestamp": "2026-01-02T03:04:05Z", "anonymousId": "p1",
                                "userId": HUGE, "sessionId": "s", "consentGiven": True}]}, 400),
]


@pytest.mark.parametrize(("path", "body", "status"), HUGE_ID_CASES)
async def test_huge_ids_are_refused(backend: dict[str, str], path: str, body: Any, status: int) -> None:
    async with gateway(settings(backend)) as client:
        reply = await post(client, path, json.dumps(body).encode())
        assert reply.status_code == status, reply.text
        check_shape(dialect(path), reply)
        await assert_nothing_stored(client, 0)


@pytest.mark.parametrize("path", ["/events", "/events/batch"])
@pytest.mark.parametrize("where", ["user_id", "anonymous_id", "event_id"])
async def test_collect_huge_ids_are_quarantined(backend: dict[str, str], path: str, where: str) -> None:
    event: dict[str, Any] = {"event_name": "E", "user": {"id": "p1"}}
    if where == "user_id":
        event["user"]["id"] = HUGE
    elif where == "anonymous_id":
        event["user"]["consistent_anonymous_id"] = HUGE
    else:
        event["context"] = {"event_id": "e" * 256}
    body = event if path == "/events" else {"batch": [event, {"event_name": "ok", "user": {"id": "p2"}}]}
    async with gateway(settings(backend)) as client:
        reply = await post(client, path, json.dumps(body).encode())
        assert reply.status_code == 200, reply.text
        events = await events_of(client)
        assert [e["name"] for e in events] == ([] if path == "/events" else ["ok"])
        # A request with nothing to store queues its rejection without waiting.
        for _ in range(100):
            reasons = [r["reason"] for r in await rejections_of(client)]
            if reasons:
                break
            await anyio.sleep(0.02)
        assert reasons == ["id_too_long"]


# -- slow clients ---------------------------------------------------------------------------------


async def test_slow_client_does_not_block_others(postgres_backend: dict[str, str]) -> None:
    with live_server(settings(postgres_backend)) as url:
        host, port = url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)), timeout=10)
        stop = threading.Event()
        trickled = {"bytes": 0, "error": None}

        def trickle() -> None:
            try:
                slow.sendall(
                    b"POST /track HTTP/1.1\r\nHost: x\r\nX-Cohorly-Token: tok_shop\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                )
                while not stop.wait(1.0):
                    slow.sendall(b" ")
                    trickled["bytes"] += 1
            except OSError as exc:  # the server may time the connection out
                trickled["error"] = exc

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            await anyio.sleep(1.5)
            # Several slow clients' worth of waiting: others are served at once.
            async with httpx.AsyncClient(base_url=url, timeout=3) as other:
                for i in range(5):
                    t0 = time.monotonic()
                    reply = await other.post("/track", headers={"X-Cohorly-Token": "tok_shop"},
                                             json={"event": "E", "properties": {"distinct_id": f"u{i}"}})
                    assert reply.status_code == 200, reply.text
                    assert time.monotonic() - t0 < 1.0
                    health = await other.get("/healthz")
                    assert health.status_code == 200
            assert thread.is_alive() and trickled["bytes"] >= 1, trickled
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer adm_test_key"}) as adm:
                stored = (await adm.get("/admin/v1/projects/shop/events")).json()["events"]
                assert len(stored) == 5
        finally:
            stop.set()
            thread.join(timeout=5)
            slow.close()
