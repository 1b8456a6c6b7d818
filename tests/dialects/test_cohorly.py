"""Cohorly over real HTTP (the ASGI app), one test per rule of DIALECTS.md's
cohorly section and of the shared rules as they apply to it. Every check
goes through the admin API; no test reads a table."""

from __future__ import annotations

import contextlib
import gzip
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from gateway.app import build_app
from gateway.config import Settings
from tests.support import PROJECTS, events_of, gateway, lifespan, profile_of, props_of, rejections_of, settings_for

pytestmark = pytest.mark.anyio

MB = 1024 * 1024
SHOP = {"X-Cohorly-Token": "tok_shop"}
BLOG = {"X-Cohorly-Token": "tok_blog"}
ORIGIN = "https://shop.example"
OK = {"status": 1}
INVALID_TOKEN = {"status": 0, "error": "invalid token"}


def event(name: str = "Viewed", distinct_id: str = "u1", insert_id: str | None = None, **props: Any) -> dict:
    properties: dict[str, Any] = {"distinct_id": distinct_id, **props}
    if insert_id is not None:
        properties["$insert_id"] = insert_id
    return {"event": name, "properties": properties}


def limited(backend: dict[str, str], requests: int, per_seconds: int, **sections: Any) -> Settings:
    return settings_for(
        backend,
        dialects={"cohorly": {"rate_limit": {"requests": requests, "per_seconds": per_seconds}}},
        **sections,
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def assert_error(reply: httpx.Response, status: int, *fragments: str) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"status", "error"} and body["status"] == 0, body
    assert type(body["error"]) is str and body["error"]
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body["error"])
    return body["error"]


def retry_after(reply: httpx.Response) -> int:
    value = reply.headers["retry-after"]
    assert value.isdigit(), value
    return int(value)


@contextlib.asynccontextmanager
async def clients(settings: Settings, *ips: str) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One running app, one client per peer address (so budgets are compared
    within one limiter, with or without Redis)."""
    app = build_app(settings)
    async with lifespan(app), contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app, client=(ip, 50000)), base_url="http://gateway"
                )
            )
            for ip in ips
        ]


# -- tokens -------------------------------------------------------------------


async def test_header_token_covers_the_whole_batch(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post("/track", headers=SHOP, json=[event("A"), event("B", "u2")])
        assert (reply.status_code, reply.json()) == (200, {"status": 1, "inserted": 2})
        assert [(e["name"], e["distinct_id"], e["project"]) for e in await events_of(client)] == [
            ("A", "u1", "shop"),
            ("B", "u2", "shop"),
        ]
        assert await events_of(client, "blog") == []


async def test_per_record_token_wins_over_the_header_and_is_never_stored(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post(
            "/track",
            headers=SHOP,
            json=[event("ToBlog", token="tok_blog", plan="pro"), event("ToShop", plan="free")],
        )
        assert reply.json() == {"status": 1, "inserted": 2}
        # No header at all: each record's own token decides its project.
        reply = await client.post(
            "/track", json=[event("Shop2", token="tok_shop_2"), event("Blog2", token="tok_blog")]
        )
        assert reply.json() == {"status": 1, "inserted": 2}
        shop, blog = await events_of(client, "shop"), await events_of(client, "blog")
        assert [e["name"] for e in shop] == ["ToShop", "Shop2"]
        assert [e["name"] for e in blog] == ["ToBlog", "Blog2"]
        assert blog[0]["properties"] == {"plan": "pro"}
        for stored in shop + blog:
            assert "token" not in stored["properties"]
            assert "tok_" not in str(stored)


async def test_engage_and_alias_per_record_token_wins(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post(
            "/engage",
            headers=SHOP,
            json=[
                {"token": "tok_blog", "distinct_id": "u1", "$set": {"a": 1}},
                {"distinct_id": "u2", "$set": {"b": 2}},
            ],
        )
        assert reply.json() == {"status": 1, "applied": 2}
        assert await props_of(client, "u1", "blog") == {"a": 1}
        assert await props_of(client, "u1", "shop") is None
        assert await props_of(client, "u2", "shop") == {"b": 2}
        assert await props_of(client, "u2", "blog") is None

        await client.post("/track", json=[event("E", "anon", token="tok_blog")])
        reply = await client.post(
            "/alias", headers=SHOP, json={"alias": "anon", "distinct_id": "u1", "token": "tok_blog"}
        )
        assert (reply.status_code, reply.json()) == (200, OK)
        assert [e["name"] for e in await events_of(client, "blog", distinct_id="u1")] == ["E"]
        assert (await profile_of(client, "anon", "blog"))["ids"] == ["u1", "anon"]


UNAUTHORIZED = [
    pytest.param("/track", {}, event(), id="track-no-token"),
    pytest.param("/track", {"X-Cohorly-Token": "tok_nope"}, [event()], id="track-unknown-header"),
    pytest.param("/track", {"X-Cohorly-Token": ""}, [event()], id="track-empty-header"),
    pytest.param(
        "/track",
        {},
        [event(token="tok_shop"), event(token="tok_blog"), event()],
        id="track-one-record-without-token",
    ),
    pytest.param(
        "/track", SHOP, [event(), event(token="tok_nope")], id="track-bad-record-token-beats-good-header"
    ),
    pytest.param("/track", SHOP, [event(token=1234)], id="track-record-token-not-a-string"),
    pytest.param("/engage", {}, {"distinct_id": "u1", "$set": {"a": 1}}, id="engage-no-token"),
    pytest.param(
        "/engage",
        {},
        [
            {"token": "tok_shop", "distinct_id": "u1", "$set": {"a": 1}},
            {"distinct_id": "u2", "$set": {"a": 1}},
        ],
        id="engage-one-op-without-token",
    ),
    pytest.param(
        "/engage",
        SHOP,
        [
            {"distinct_id": "u1", "$set": {"a": 1}},
            {"token": "tok_nope", "distinct_id": "u2", "$set": {"a": 1}},
        ],
        id="engage-bad-record-token-beats-good-header",
    ),
    pytest.param("/alias", {}, {"alias": "anon", "distinct_id": "u1"}, id="alias-no-token"),
    pytest.param(
        "/alias",
        SHOP,
        {"alias": "anon", "distinct_id": "u1", "token": "tok_nope"},
        id="alias-bad-token-beats-header",
    ),
]


@pytest.mark.parametrize(("path", "headers", "body"), UNAUTHORIZED)
async def test_any_record_without_a_valid_token_is_401_and_nothing_is_stored(
    backend, path, headers, body
) -> None:
    async with gateway(settings_for(backend)) as client:
        for token in ("tok_shop", "tok_blog"):
            assert (await client.post("/track", json=event("Before", "anon", token=token))).status_code == 200
        reply = await client.post(path, headers=headers, json=body)
        assert (reply.status_code, reply.json()) == (401, INVALID_TOKEN)
        for project in ("shop", "blog"):
            assert [e["name"] for e in await events_of(client, project)] == ["Before"]
            # An alias stored by mistake would show anon's event under u1.
            assert await events_of(client, project, distinct_id="u1") == []
            assert await profile_of(client, "u1", project) is None
            assert await profile_of(client, "u2", project) is None


# -- /track -------------------------------------------------------------------

FIELDS = ("event", "distinct_id", "time", "$insert_id")

BAD_EVENTS = [
    pytest.param({"properties": {"distinct_id": "u1"}}, "event", id="event-missing"),
    pytest.param({"event": "", "properties": {"distinct_id": "u1"}}, "event", id="event-empty"),
    pytest.param({"event": 7, "properties": {"distinct_id": "u1"}}, "event", id="event-number"),
    pytest.param({"event": None, "properties": {"distinct_id": "u1"}}, "event", id="event-null"),
    pytest.param({"event": "Viewed"}, "properties", id="properties-missing"),
    pytest.param({"event": "Viewed", "properties": ["u1"]}, "properties", id="properties-list"),
    pytest.param({"event": "Viewed", "properties": "u1"}, "properties", id="properties-string"),
    pytest.param({"event": "Viewed", "properties": {}}, "distinct_id", id="distinct_id-missing"),
    pytest.param(event(distinct_id=""), "distinct_id", id="distinct_id-empty"),
    pytest.param(
        {"event": "Viewed", "properties": {"distinct_id": 42}}, "distinct_id", id="distinct_id-number"
    ),
    pytest.param(
        {"event": "Viewed", "properties": {"distinct_id": None}}, "distinct_id", id="distinct_id-null"
    ),
    pytest.param(event(time="1751600000000"), "time", id="time-string"),
    pytest.param(event(time=True), "time", id="time-bool"),
    pytest.param(event(time=-1), "time", id="time-negative"),
    pytest.param(event(time=[1751600000000]), "time", id="time-list"),
    pytest.param(event(insert_id=""), "$insert_id", id="insert_id-empty"),
    pytest.param(
        {"event": "V", "properties": {"distinct_id": "u1", "$insert_id": 17}},
        "$insert_id",
        id="insert_id-int",
    ),
    pytest.param(event(insert_id="x" * 256), "$insert_id", id="insert_id-too-long"),
]


@pytest.mark.parametrize(("record", "field"), BAD_EVENTS)
async def test_invalid_event_is_400_naming_the_field_and_the_record(backend, record, field) -> None:
    async with gateway(settings_for(backend)) as client:
        single = assert_error(await client.post("/track", headers=SHOP, json=record), 400, field)
        assert "record" not in single
        batched = assert_error(
            await client.post("/track", headers=SHOP, json=[event("A"), event("B"), record, event("C")]),
            400,
            "record 2",
            field,
        )
        for message in (single, batched):
            for other in FIELDS:
                if other != field:
                    assert other not in message, message
        assert await events_of(client) == []


async def test_event_time(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        before = now_ms()
        reply = await client.post(
            "/track",
            headers=SHOP,
            json=[
                event("Int", time=1751600000123),
                event("Float", time=1751600000123.9),
                event("Absent"),
                event("Null", time=None),
                event("Zero", time=0),
            ],
        )
        after = now_ms()
        assert reply.json() == {"status": 1, "inserted": 5}
        stored = {e["name"]: e for e in await events_of(client)}
        assert stored["Int"]["time"] == 1751600000123
        assert stored["Float"]["time"] == 1751600000123
        assert stored["Zero"]["time"] == 0
        for name in ("Absent", "Null"):
            assert before <= stored[name]["time"] <= after
            assert stored[name]["time"] == stored[name]["received_at"]
        for e in stored.values():
            assert before <= e["received_at"] <= after
            assert "time" not in e["properties"]


async def test_stored_event_shape(backend) -> None:
    async with gateway(settings_for(backend), client_ip="198.51.100.7") as client:
        reply = await client.post(
            "/track",
            headers={**SHOP, "User-Agent": "cohorly-node/1.4.0"},
            json=event("Signed Up", "user_123", "4f0c", time=1751600000000, plan="pro", **{"$lib": "node"}),
        )
        assert reply.json() == {"status": 1, "inserted": 1}
        [stored] = await events_of(client)
        stored.pop("id")
        stored.pop("received_at")
        assert stored == {
            "project": "shop",
            "source": "cohorly",
            "name": "Signed Up",
            "distinct_id": "user_123",
            "anonymous_id": None,
            "user_id": None,
            "time": 1751600000000,
            "insert_id": "4f0c",
            "session_id": None,
            "properties": {"plan": "pro", "$lib": "node"},
            "context": {"ip": "198.51.100.7", "user_agent": "cohorly-node/1.4.0"},
            "consent": None,
        }
        assert len(await events_of(client, source="cohorly")) == 1


# -- $insert_id -----------------------------------------------------------------


async def test_insert_id_twice_in_one_batch_stores_once(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post(
            "/track",
            headers=SHOP,
            json=[event("First", insert_id="dup"), event("Second", insert_id="dup"), event("Other")],
        )
        assert reply.json() == {"status": 1, "inserted": 2}
        assert [e["name"] for e in await events_of(client)] == ["First", "Other"]


async def test_resent_batch_stores_nothing_new(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        batch = [event("E", insert_id=i) for i in ("a", "b", "c")]
        assert (await client.post("/track", headers=SHOP, json=batch)).json() == {"status": 1, "inserted": 3}
        assert (await client.post("/track", headers=SHOP, json=batch)).json() == {"status": 1, "inserted": 0}
        reply = await client.post("/track", headers=SHOP, json=[*batch, event("E", insert_id="d")])
        assert reply.json() == {"status": 1, "inserted": 1}
        assert [e["insert_id"] for e in await events_of(client)] == ["a", "b", "c", "d"]


async def test_same_insert_id_with_another_name_or_time_is_a_duplicate(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        first = event("Original", insert_id="k1", time=1751600000000)
        assert (await client.post("/track", headers=SHOP, json=first)).json() == {"status": 1, "inserted": 1}
        for other in (
            event("Renamed", insert_id="k1", time=1751600000000),
            event("Original", insert_id="k1", time=1751699999999),
            event("Renamed", "someone_else", insert_id="k1"),
        ):
            assert (await client.post("/track", headers=SHOP, json=other)).json() == {
                "status": 1,
                "inserted": 0,
            }
        [stored] = await events_of(client)
        assert (stored["name"], stored["time"], stored["distinct_id"]) == ("Original", 1751600000000, "u1")


async def test_same_insert_id_in_another_project_is_not_a_duplicate(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post(
            "/track",
            json=[
                event("S", insert_id="same", token="tok_shop"),
                event("B", insert_id="same", token="tok_blog"),
            ],
        )
        assert reply.json() == {"status": 1, "inserted": 2}
        reply = await client.post("/track", headers=BLOG, json=event("B2", insert_id="only-shop-had-it"))
        await client.post("/track", headers=SHOP, json=event("S2", insert_id="only-shop-had-it"))
        assert reply.json() == {"status": 1, "inserted": 1}
        assert [e["name"] for e in await events_of(client, "shop")] == ["S", "S2"]
        assert [e["name"] for e in await events_of(client, "blog")] == ["B", "B2"]


async def test_events_without_insert_id_are_never_deduplicated(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for _ in range(2):
            reply = await client.post("/track", headers=SHOP, json=[event(), event()])
            assert reply.json() == {"status": 1, "inserted": 2}
        assert len(await events_of(client)) == 4


# -- batches and bodies -----------------------------------------------------------


def engage_op(i: int = 0) -> dict:
    return {"distinct_id": "u1", "$add": {"n": 1}}


@pytest.mark.parametrize("path", ["/track", "/engage"])
async def test_batch_bounds(backend, path) -> None:
    make = (lambda i: event(f"E{i}")) if path == "/track" else engage_op
    async with gateway(settings_for(backend)) as client:
        assert_error(await client.post(path, headers=SHOP, json=[]), 400)
        too_large = await client.post(path, headers=SHOP, json=[make(i) for i in range(501)])
        assert (too_large.status_code, too_large.json()) == (400, {"status": 0, "error": "batch too large"})
        assert await events_of(client) == [] and await profile_of(client, "u1") is None
        reply = await client.post(path, headers=SHOP, json=[make(i) for i in range(500)])
        assert reply.status_code == 200
        if path == "/track":
            assert reply.json() == {"status": 1, "inserted": 500}
            assert len(await events_of(client, limit="1000")) == 500
        else:
            assert reply.json() == {"status": 1, "applied": 500}
            assert await props_of(client, "u1") == {"n": 500}


def padded(path: str, size: int) -> bytes:
    """A valid body for `path` of exactly `size` bytes."""
    template = {
        "/track": b'{"event":"Big","properties":{"distinct_id":"u1","pad":"%s"}}',
        "/engage": b'{"distinct_id":"u1","$set":{"pad":"%s"}}',
        "/alias": b'{"alias":"anon","distinct_id":"u1","pad":"%s"}',
    }[path]
    pad = size - len(template % b"")
    return template % (b"x" * pad)


async def stored_anything(client: httpx.AsyncClient) -> bool:
    """Whether a `padded` body left a trace (the test stored one "Anon" event first)."""
    names = [e["name"] for e in await events_of(client)]
    linked = await events_of(client, distinct_id="u1")
    return names != ["Anon"] or bool(linked) or await profile_of(client, "u1") is not None


@pytest.mark.parametrize("path", ["/track", "/engage", "/alias"])
async def test_body_over_1_mb_is_413(backend, path) -> None:
    async with gateway(settings_for(backend)) as client:
        await client.post("/track", headers=SHOP, json=event("Anon", "anon"))

        async def chunks(body: bytes):
            for start in range(0, len(body), 64 * 1024):
                yield body[start : start + 64 * 1024]

        for body in (padded(path, MB + 1), padded(path, 3 * MB)):
            assert_error(await client.post(path, headers=SHOP, content=body), 413)
            # Streamed without a Content-Length: refused while reading.
            assert_error(await client.post(path, headers=SHOP, content=chunks(body)), 413)
        assert not await stored_anything(client)

        exact = padded(path, MB)
        assert len(exact) == MB
        reply = await client.post(path, headers=SHOP, content=exact)
        assert reply.status_code == 200, reply.text
        assert await stored_anything(client)


@pytest.mark.parametrize("path", ["/track", "/engage", "/alias"])
async def test_gzip_body(backend, path) -> None:
    async with gateway(settings_for(backend)) as client:
        await client.post("/track", headers=SHOP, json=event("Anon", "anon"))
        gz = {**SHOP, "Content-Encoding": "gzip"}
        # A gzip bomb: 30 KB on the wire, 40 MB inflated.
        bomb = gzip.compress(padded(path, 40 * MB))
        assert len(bomb) < 64 * 1024
        assert_error(await client.post(path, headers=gz, content=bomb), 413)
        assert_error(await client.post(path, headers=gz, content=gzip.compress(padded(path, MB + 1))), 413)
        assert not await stored_anything(client)
        reply = await client.post(path, headers=gz, content=gzip.compress(padded(path, MB)))
        assert reply.status_code == 200, reply.text
        assert await stored_anything(client)


BAD_ENCODINGS = [
    pytest.param("gzip", b"this is not gzip at all", id="not-gzip"),
    pytest.param(
        "gzip", gzip.compress(b'{"event":"E","properties":{"distinct_id":"u1"}}')[:-6], id="truncated"
    ),
    pytest.param(
        "gzip",
        gzip.compress(b'{"event":"E","properties":{"distinct_id":"u1"}}')[:-8] + b"\0\0\0\0\0\0\0\0",
        id="bad-crc",
    ),
    pytest.param("br", b'{"event":"E","properties":{"distinct_id":"u1"}}', id="brotli"),
    pytest.param("deflate2", b'{"event":"E","properties":{"distinct_id":"u1"}}', id="made-up"),
]


@pytest.mark.parametrize(("encoding", "body"), BAD_ENCODINGS)
async def test_corrupt_gzip_or_unknown_encoding_is_400(backend, encoding, body) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_error(
            await client.post("/track", headers={**SHOP, "Content-Encoding": encoding}, content=body), 400
        )
        assert await events_of(client) == []


async def test_gzip_track_is_stored(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        body = b'[{"event":"Zipped","properties":{"distinct_id":"u1","k":"v"}}]'
        for encoding in ("gzip", "GZIP", "x-gzip"):
            reply = await client.post(
                "/track", headers={**SHOP, "Content-Encoding": encoding}, content=gzip.compress(body)
            )
            assert reply.json() == {"status": 1, "inserted": 1}, encoding
        reply = await client.post("/track", headers={**SHOP, "Content-Encoding": "identity"}, content=body)
        assert reply.json() == {"status": 1, "inserted": 1}
        assert [e["properties"] for e in await events_of(client)] == [{"k": "v"}] * 4


@pytest.mark.parametrize(
    "content_type",
    ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None, "application/json"],
)
async def test_json_is_parsed_whatever_the_content_type(backend, content_type) -> None:
    async with gateway(settings_for(backend)) as client:
        headers = {"Content-Type": content_type} if content_type else {}
        body = b'{"event":"Beacon","properties":{"distinct_id":"u1","token":"tok_shop"}}'
        reply = await client.post("/track", headers=headers, content=body)
        assert reply.json() == {"status": 1, "inserted": 1}
        reply = await client.post(
            "/engage", headers=headers, content=b'{"token":"tok_shop","distinct_id":"u1","$set":{"a":1}}'
        )
        assert reply.json() == {"status": 1, "applied": 1}
        assert [e["name"] for e in await events_of(client)] == ["Beacon"]
        assert await props_of(client, "u1") == {"a": 1}


@pytest.mark.parametrize("path", ["/track", "/engage", "/alias"])
@pytest.mark.parametrize(
    "body", [b'{"event": "E", ', b"", b"\xff\xfe{}", b"{'event': 'E'}", b"null", b"42", b'"text"', b"[1, 2]"]
)
async def test_invalid_json_or_body_shape_is_400(backend, path, body) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_error(await client.post(path, headers=SHOP, content=body), 400)
        assert await events_of(client) == []


@pytest.mark.parametrize("path", ["/track", "/engage", "/alias"])
async def test_deeply_nested_json_is_400(backend, path) -> None:
    nested = b"[" * 5000 + b"]" * 5000
    body = (
        b'{"distinct_id":"u1","alias":"a","$set":{"d":'
        + nested
        + b'},"event":"E","properties":{"distinct_id":"u1"}}'
    )
    async with gateway(settings_for(backend)) as client:
        assert_error(await client.post(path, headers=SHOP, content=body), 400)
        assert await events_of(client) == [] and await profile_of(client, "u1") is None


async def test_nul_characters_are_stored_on_every_backend(backend) -> None:
    # PostgreSQL refuses U+0000 in jsonb and text: every backend stores U+FFFD.
    async with gateway(settings_for(backend)) as client:
        body = [event("Ok"), event("Nul\u0000", comment="a\u0000b", **{"k\u0000": "v"})]
        reply = await client.post("/track", headers=SHOP, json=body)
        assert (reply.status_code, reply.json()) == (200, {"status": 1, "inserted": 2})
        stored = await events_of(client)
        assert [e["name"] for e in stored] == ["Ok", "Nul\ufffd"]
        assert stored[1]["properties"]["comment"] == "a\ufffdb"
        assert stored[1]["properties"]["k\ufffd"] == "v"
        reply = await client.post(
            "/engage", headers=SHOP, json={"distinct_id": "u1", "$set": {"note": "x\u0000y"}}
        )
        assert reply.status_code == 200
        assert await profile_of(client, "u1") is not None


async def test_concurrent_requests(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        replies: list[httpx.Response] = []

        async def post(path: str, body: Any) -> None:
            replies.append(await client.post(path, headers=SHOP, json=body))

        async with anyio.create_task_group() as group:
            for _ in range(40):
                group.start_soon(post, "/engage", {"distinct_id": "u1", "$add": {"n": 1}})
            for _ in range(10):
                group.start_soon(post, "/track", [event("Same", insert_id="a"), event("Same", insert_id="b")])
        assert sorted(r.status_code for r in replies) == [200] * 50
        assert sum(r.json().get("applied", 0) for r in replies) == 40
        assert sum(r.json().get("inserted", 0) for r in replies) == 2
        assert await props_of(client, "u1") == {"n": 40}
        assert [e["insert_id"] for e in await events_of(client)] in (["a", "b"], ["b", "a"])


# -- /engage --------------------------------------------------------------------


async def engage(client: httpx.AsyncClient, body: Any, headers: dict[str, str] = SHOP) -> dict:
    reply = await client.post("/engage", headers=headers, json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


async def test_engage_set_and_set_once(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        first = {
            "distinct_id": "u1",
            "$set": {"name": "Ada", "plan": "free"},
            "$set_once": {"first_seen": "2025"},
        }
        assert await engage(client, first) == {"status": 1, "applied": 1}
        assert await props_of(client, "u1") == {"name": "Ada", "plan": "free", "first_seen": "2025"}
        second = {
            "distinct_id": "u1",
            "$set": {"plan": "pro"},
            "$set_once": {"first_seen": "2026", "utm": "ad"},
        }
        assert await engage(client, second) == {"status": 1, "applied": 1}
        assert await props_of(client, "u1") == {
            "name": "Ada",
            "plan": "pro",
            "first_seen": "2025",
            "utm": "ad",
        }
        found = await profile_of(client, "u1")
        assert (found["distinct_id"], found["ids"], found["devices"]) == ("u1", ["u1"], [])


async def test_engage_add(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await engage(
            client, {"distinct_id": "u1", "$set": {"name": "Ada", "logins": 2, "score": 1.5, "flag": True}}
        )
        assert await rejections_of(client) == []
        body = {
            "distinct_id": "u1",
            "$add": {"logins": 3, "score": 1, "visits": 1, "debt": -2.5, "name": 5, "flag": 1},
        }
        assert await engage(client, body) == {"status": 1, "applied": 1}
        assert await props_of(client, "u1") == {
            "name": "Ada",
            "logins": 5,
            "score": 2.5,
            "flag": True,
            "visits": 1,
            "debt": -2.5,
        }
        found = await rejections_of(client, project="shop", source="cohorly")
        assert {r["project"] for r in found} == {"shop"}
        assert {r["source"] for r in found} == {"cohorly"}
        details = " | ".join(r["detail"] for r in found)
        assert len(found) == 2, details
        assert "$add" in details and "name" in details and "flag" in details
        assert "logins" not in details and "visits" not in details


async def test_engage_unset(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await engage(client, {"distinct_id": "u1", "$set": {"a": 1, "b": 2, "c": 3}})
        assert await engage(client, {"distinct_id": "u1", "$unset": ["a", "missing"]}) == {
            "status": 1,
            "applied": 1,
        }
        assert await props_of(client, "u1") == {"b": 2, "c": 3}
        await engage(client, {"distinct_id": "u1", "$unset": []})
        assert await props_of(client, "u1") == {"b": 2, "c": 3}


async def test_engage_delete_true_deletes_the_profile_and_keeps_events(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await client.post("/track", headers=SHOP, json=[event("A"), event("B")])
        await engage(client, {"distinct_id": "u1", "$set": {"a": 1}})
        assert await props_of(client, "u1") == {"a": 1}
        reply = await engage(
            client, {"distinct_id": "u1", "$delete": True, "$set": {"b": 2}, "$add": {"n": 1}}
        )
        assert reply == {"status": 1, "applied": 1}
        assert await profile_of(client, "u1") is None
        assert [e["name"] for e in await events_of(client, distinct_id="u1")] == ["A", "B"]
        # Deleting what is not there is fine, and creates nothing.
        assert await engage(client, {"distinct_id": "u1", "$delete": True}) == {"status": 1, "applied": 1}
        assert await engage(client, {"distinct_id": "nobody", "$delete": True}) == {"status": 1, "applied": 1}
        assert await profile_of(client, "u1") is None and await profile_of(client, "nobody") is None
        # A later operation starts a new, empty profile.
        await engage(client, {"distinct_id": "u1", "$set": {"c": 3}})
        assert await props_of(client, "u1") == {"c": 3}


async def test_engage_delete_false_does_nothing(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await engage(client, {"distinct_id": "u1", "$set": {"a": 1}})
        assert await engage(client, {"distinct_id": "u1", "$delete": False}) == {"status": 1, "applied": 1}
        assert await props_of(client, "u1") == {"a": 1}
        assert await engage(client, {"distinct_id": "u1", "$delete": False, "$set": {"b": 2}}) == {
            "status": 1,
            "applied": 1,
        }
        assert await props_of(client, "u1") == {"a": 1, "b": 2}


async def test_engage_append_union_remove(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await engage(
            client,
            {"distinct_id": "u1", "$set": {"tags": ["a", "b"], "name": "Ada", "nums": [1, 2, 1, 3, 1]}},
        )

        await engage(client, {"distinct_id": "u1", "$append": {"tags": "c", "fresh": {"k": 1}, "name": "z"}})
        assert await props_of(client, "u1") == {
            "tags": ["a", "b", "c"],
            "fresh": [{"k": 1}],
            "name": "Ada",
            "nums": [1, 2, 1, 3, 1],
        }

        await engage(
            client,
            {"distinct_id": "u1", "$union": {"tags": ["d", "a", "e", "d"], "new": [1, 1, 2], "name": ["q"]}},
        )
        props = await props_of(client, "u1")
        assert props["tags"] == ["a", "b", "c", "d", "e"]
        assert props["new"] == [1, 2]
        assert props["name"] == "Ada"

        await engage(
            client, {"distinct_id": "u1", "$remove": {"nums": 1, "tags": "zzz", "name": "Ada", "absent": 1}}
        )
        props = await props_of(client, "u1")
        assert props["nums"] == [2, 3]
        assert props["tags"] == ["a", "b", "c", "d", "e"]
        assert props["name"] == "Ada"
        assert "absent" not in props

        details = [r["detail"] for r in await rejections_of(client, project="shop")]
        assert len(details) == 3, details
        for verb, detail in zip(("$append", "$union", "$remove"), details, strict=True):
            assert verb in detail and "name" in detail, detail


async def test_engage_verbs_apply_in_the_documented_order(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        # Keys are sent in the reverse of the order they must apply in.
        reply = await engage(
            client,
            [
                {
                    "distinct_id": "u1",
                    "$unset": ["gone"],
                    "$remove": {"l": "x"},
                    "$union": {"l": ["x", "y"], "m": ["a"]},
                    "$append": {"l": "x", "m": "a"},
                    "$add": {"n": 1},
                    "$set": {"n": 10, "gone": 1, "k": [1]},
                    "$set_once": {"n": 100, "once": 1},
                },
                {"distinct_id": "u2", "$unset": ["k"], "$remove": {"k": 1}, "$set": {"k": [1, 2]}},
            ],
        )
        assert reply == {"status": 1, "applied": 2}
        # set_once, set, add: n = 10 + 1; append then union: m = [a]; remove
        # after union: l = [y]; unset last: gone and k are absent.
        assert await props_of(client, "u1") == {"n": 11, "once": 1, "l": ["y"], "m": ["a"], "k": [1]}
        assert await props_of(client, "u2") == {}


async def test_engage_operations_apply_in_request_order(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await engage(client, {"distinct_id": "u1", "$set": {"old": True}})
        ops = [
            {"distinct_id": "u1", "$set": {"a": 1}},
            {"distinct_id": "u2", "$set": {"a": "other"}},
            {"distinct_id": "u1", "$add": {"a": 2}},
            {"distinct_id": "u1", "$set": {"a": 10}},
            {"distinct_id": "u1", "$append": {"l": 1}},
            {"distinct_id": "u1", "$append": {"l": 2}},
            {"distinct_id": "u2", "$delete": True},
            {"distinct_id": "u1", "$add": {"a": 5}},
            {"distinct_id": "u2", "$set": {"b": 1}},
            {"distinct_id": "u1", "$unset": ["old"]},
        ]
        assert await engage(client, ops) == {"status": 1, "applied": 10}
        assert await props_of(client, "u1") == {"a": 15, "l": [1, 2]}
        assert await props_of(client, "u2") == {"b": 1}

        # A delete in a batch, on a stored profile, followed by a new set.
        ops = [{"distinct_id": "u1", "$delete": True}, {"distinct_id": "u1", "$set": {"fresh": 1}}]
        assert await engage(client, ops) == {"status": 1, "applied": 2}
        assert await props_of(client, "u1") == {"fresh": 1}


BAD_OPS = [
    pytest.param({"$set": [1]}, "$set", id="set-list"),
    pytest.param({"$set": "x"}, "$set", id="set-string"),
    pytest.param({"$set_once": 1}, "$set_once", id="set_once-number"),
    pytest.param({"$add": [1]}, "$add", id="add-list"),
    pytest.param({"$add": {"n": "1"}}, "$add", id="add-string-amount"),
    pytest.param({"$add": {"n": True}}, "$add", id="add-bool-amount"),
    pytest.param({"$add": {"n": None}}, "$add", id="add-null-amount"),
    pytest.param({"$unset": "a"}, "$unset", id="unset-string"),
    pytest.param({"$unset": ["a", 1]}, "$unset", id="unset-non-string-item"),
    pytest.param({"$unset": {"a": 1}}, "$unset", id="unset-object"),
    pytest.param({"$delete": "true"}, "$delete", id="delete-string"),
    pytest.param({"$delete": 1}, "$delete", id="delete-number"),
    pytest.param({"$delete": None}, "$delete", id="delete-null"),
    pytest.param({"$append": ["x"]}, "$append", id="append-list"),
    pytest.param({"$union": ["x"]}, "$union", id="union-list"),
    pytest.param({"$union": {"l": "x"}}, "$union", id="union-non-list-value"),
    pytest.param({"$remove": "x"}, "$remove", id="remove-string"),
    pytest.param({"$bogus": {"a": 1}}, "$bogus", id="unknown-dollar-key"),
    pytest.param({"$set": {"a": 1}, "$increment": {"n": 1}}, "$increment", id="unknown-beside-valid-verb"),
    pytest.param({"$ip": "1.2.3.4", "$time": 1}, "verb", id="only-ignored-modifiers"),
    pytest.param({}, "verb", id="no-verb"),
]


@pytest.mark.parametrize(("verbs", "fragment"), BAD_OPS)
async def test_invalid_operation_is_400_and_nothing_is_applied(backend, verbs, fragment) -> None:
    async with gateway(settings_for(backend)) as client:
        bad = {"distinct_id": "u2", **verbs}
        single = assert_error(await client.post("/engage", headers=SHOP, json=bad), 400, fragment)
        assert "record" not in single
        batch = [{"distinct_id": "u1", "$set": {"a": 1}}, bad, {"distinct_id": "u3", "$set": {"a": 1}}]
        assert_error(await client.post("/engage", headers=SHOP, json=batch), 400, "record 1", fragment)
        for id_ in ("u1", "u2", "u3"):
            assert await profile_of(client, id_) is None
        assert await rejections_of(client) == []


@pytest.mark.parametrize(
    "op",
    [
        pytest.param({"$set": {"a": 1}}, id="missing"),
        pytest.param({"distinct_id": "", "$set": {"a": 1}}, id="empty"),
        pytest.param({"distinct_id": 5, "$set": {"a": 1}}, id="number"),
        pytest.param({"$distinct_id": None, "$set": {"a": 1}}, id="null-synonym"),
    ],
)
async def test_engage_without_distinct_id_is_400(backend, op) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_error(await client.post("/engage", headers=SHOP, json=op), 400, "distinct_id")
        reply = await client.post("/engage", headers=SHOP, json=[{"distinct_id": "u1", "$set": {"a": 1}}, op])
        assert_error(reply, 400, "record 1", "distinct_id")
        assert await profile_of(client, "u1") is None


async def test_engage_mixpanel_modifiers(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        op = {
            "$token": "tok_blog",
            "$distinct_id": "u9",
            "$set": {"a": 1},
            "$ip": "1.2.3.4",
            "$time": 1751600000000,
            "$ignore_time": True,
            "$ignore_alias": False,
        }
        assert await engage(client, op, headers={}) == {"status": 1, "applied": 1}
        assert await props_of(client, "u9", "blog") == {"a": 1}
        assert await profile_of(client, "u9", "shop") is None
        # `$token` wins over the header, as `token` does.
        assert await engage(client, {"$token": "tok_blog", "distinct_id": "u9", "$add": {"n": 1}}) == {
            "status": 1,
            "applied": 1,
        }
        assert await props_of(client, "u9", "blog") == {"a": 1, "n": 1}
        assert await profile_of(client, "u9", "shop") is None


# -- /alias ---------------------------------------------------------------------


async def alias(client: httpx.AsyncClient, a: Any, d: Any, headers: dict[str, str] = SHOP) -> httpx.Response:
    return await client.post("/alias", headers=headers, json={"alias": a, "distinct_id": d})


async def test_alias_links_both_ids_and_is_idempotent(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await client.post(
            "/track", headers=SHOP, json=[event("A1", "anon"), event("U1", "u1"), event("A2", "anon")]
        )
        reply = await alias(client, "anon", "u1")
        assert (reply.status_code, reply.json()) == (200, OK)
        for id_ in ("anon", "u1"):
            found = await events_of(client, distinct_id=id_)
            assert [(e["name"], e["distinct_id"]) for e in found] == [
                ("A1", "anon"),
                ("U1", "u1"),
                ("A2", "anon"),
            ]
        reply = await alias(client, "anon", "u1")
        assert (reply.status_code, reply.json()) == (200, OK)
        assert len(await events_of(client, distinct_id="u1")) == 3
        # A link that already exists through the person is also a success.
        assert (await alias(client, "u1", "u2")).status_code == 200
        for a, d in (("anon", "u2"), ("u1", "u2"), ("anon", "u1")):
            reply = await alias(client, a, d)
            assert (reply.status_code, reply.json()) == (200, OK), (a, d)
        assert len(await events_of(client, distinct_id="u2")) == 3
        # Events sent later under the anonymous id belong to the person too.
        await client.post("/track", headers=SHOP, json=event("A3", "anon"))
        assert [e["name"] for e in await events_of(client, distinct_id="u2")] == ["A1", "U1", "A2", "A3"]


async def test_alias_merges_profiles_and_the_known_id_wins(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await engage(client, {"distinct_id": "anon", "$set": {"plan": "free", "ref": "ad", "n": 1}})
        await engage(client, {"distinct_id": "u1", "$set": {"plan": "pro", "name": "Ada"}})
        assert (await alias(client, "anon", "u1")).status_code == 200
        for id_ in ("anon", "u1"):
            found = await profile_of(client, id_)
            assert found["distinct_id"] == "u1"
            assert sorted(found["ids"]) == ["anon", "u1"]
            assert found["properties"] == {"plan": "pro", "name": "Ada", "ref": "ad", "n": 1}
        # Updates addressed to the anonymous id now reach the person.
        await engage(client, {"distinct_id": "anon", "$add": {"n": 1}})
        assert (await props_of(client, "u1"))["n"] == 2


async def test_alias_keeps_the_anonymous_profile_when_the_known_id_has_none(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await engage(client, {"distinct_id": "anon", "$set": {"ref": "ad"}})
        assert (await alias(client, "anon", "u1")).status_code == 200
        found = await profile_of(client, "u1")
        assert (found["distinct_id"], found["properties"], sorted(found["ids"])) == (
            "u1",
            {"ref": "ad"},
            ["anon", "u1"],
        )
        assert (await profile_of(client, "anon"))["properties"] == {"ref": "ad"}


async def test_alias_to_another_person_is_400_and_changes_nothing(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await client.post("/track", headers=SHOP, json=[event("A", "anon"), event("U2", "u2")])
        await engage(client, {"distinct_id": "u2", "$set": {"x": 1}})
        assert (await alias(client, "anon", "u1")).status_code == 200
        assert_error(await alias(client, "anon", "u2"), 400, "another person")
        assert [e["name"] for e in await events_of(client, distinct_id="u2")] == ["U2"]
        assert [e["name"] for e in await events_of(client, distinct_id="u1")] == ["A"]
        assert (await profile_of(client, "u2"))["ids"] == ["u2"]
        # Rejected aliases were answered; they are not quarantined.
        assert await rejections_of(client) == []


async def test_alias_making_a_cycle_is_400(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await client.post("/track", headers=SHOP, json=[event("X", "x"), event("Y", "y"), event("Z", "z")])
        assert (await alias(client, "x", "y")).status_code == 200
        assert_error(await alias(client, "y", "x"), 400, "cycle")
        assert (await alias(client, "y", "z")).status_code == 200
        assert_error(await alias(client, "z", "x"), 400, "cycle")
        for id_ in ("x", "y", "z"):
            assert [e["name"] for e in await events_of(client, distinct_id=id_)] == ["X", "Y", "Z"]
        # y and x still belong to z: nothing was changed by the refusals.
        assert [e["name"] for e in await events_of(client, distinct_id="z")] == ["X", "Y", "Z"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"distinct_id": "u1"}, "alias", id="alias-missing"),
        pytest.param({"alias": "", "distinct_id": "u1"}, "alias", id="alias-empty"),
        pytest.param({"alias": 5, "distinct_id": "u1"}, "alias", id="alias-number"),
        pytest.param({"alias": None, "distinct_id": "u1"}, "alias", id="alias-null"),
        pytest.param({"alias": "anon"}, "distinct_id", id="distinct_id-missing"),
        pytest.param({"alias": "anon", "distinct_id": ""}, "distinct_id", id="distinct_id-empty"),
        pytest.param({"alias": "anon", "distinct_id": ["u1"]}, "distinct_id", id="distinct_id-list"),
        pytest.param({"alias": "u1", "distinct_id": "u1"}, "alias", id="alias-equals-distinct_id"),
        pytest.param([{"alias": "anon", "distinct_id": "u1"}], "", id="array-body"),
    ],
)
async def test_invalid_alias_is_400(backend, body, field) -> None:
    async with gateway(settings_for(backend)) as client:
        await client.post("/track", headers=SHOP, json=[event("A", "anon"), event("U", "u1")])
        assert_error(await client.post("/alias", headers=SHOP, json=body), 400, field)
        assert [e["name"] for e in await events_of(client, distinct_id="u1")] == ["U"]


# -- paths, methods, CORS ---------------------------------------------------------


async def test_trailing_slashes_are_served_without_redirect(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post("/track/", headers=SHOP, json=event())
        assert (reply.status_code, reply.json()) == (200, {"status": 1, "inserted": 1})
        reply = await client.post("/engage/", headers=SHOP, json={"distinct_id": "u1", "$set": {"a": 1}})
        assert (reply.status_code, reply.json()) == (200, {"status": 1, "applied": 1})
        reply = await client.post("/alias/", headers=SHOP, json={"alias": "anon", "distinct_id": "u1"})
        assert (reply.status_code, reply.json()) == (200, OK)
        assert (await client.options("/track/", headers={"Origin": ORIGIN})).status_code == 204
        assert len(await events_of(client)) == 1


async def test_unknown_path_is_404_and_wrong_method_405(backend) -> None:
    # Without Mixpanel credentials, Cohorly's paths are Cohorly's alone (with
    # them, GET on these paths is Mixpanel's; /import is Mixpanel's anyway).
    cohorly_only = [{k: v for k, v in p.items() if not k.startswith("mixpanel")} for p in PROJECTS]
    async with gateway(settings_for(backend, projects=cohorly_only)) as client:
        for path in ("/nope", "/track/extra", "/tracks", "/v1/track", "/imports"):
            assert (await client.post(path, headers=SHOP, json=event())).status_code == 404, path
        for path in ("/track", "/engage", "/alias", "/track/"):
            assert (await client.get(path, headers=SHOP)).status_code == 405, path
            assert (await client.patch(path, headers=SHOP)).status_code == 405, path
        assert (await client.put("/track", headers=SHOP, json=event())).status_code == 405
        assert (await client.delete("/engage", headers=SHOP)).status_code == 405
        assert await events_of(client) == []


@pytest.mark.parametrize("path", ["/track", "/engage", "/alias"])
async def test_cors_preflight(backend, path) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.options(
            path,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-cohorly-token,x-custom",
            },
        )
        assert reply.status_code == 204
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        assert reply.headers["access-control-allow-headers"] == "content-type,x-cohorly-token,x-custom"
        assert reply.headers["access-control-allow-credentials"] == "true"
        assert "POST" in reply.headers["access-control-allow-methods"]
        assert reply.content == b""


async def test_cors_on_every_ingestion_response_errors_included(backend) -> None:
    async with gateway(limited(backend, 5, 60)) as client:
        cors = {"Origin": ORIGIN}
        replies = [
            await client.post("/track", headers={**cors, **SHOP}, json=event()),
            await client.post("/track", headers={**cors, "X-Cohorly-Token": "tok_nope"}, json=event()),
            await client.post("/engage", headers={**cors, **SHOP}, json={"distinct_id": "u1", "$set": 1}),
            await client.post("/alias", headers={**cors, **SHOP}, json={"alias": "u1", "distinct_id": "u1"}),
            await client.post("/track", headers={**cors, **SHOP}, content=padded("/track", MB + 1)),
            await client.post("/engage", headers={**cors, **SHOP, "Content-Encoding": "br"}, content=b"{}"),
            await client.post("/track", headers={**cors, **SHOP}, json=event()),
        ]
        assert [r.status_code for r in replies] == [200, 401, 400, 400, 413, 400, 429]
        for reply in replies:
            assert reply.headers["access-control-allow-origin"] == ORIGIN, reply.status_code
            assert reply.headers["access-control-allow-credentials"] == "true", reply.status_code


# -- rate limit -----------------------------------------------------------------


async def test_rate_limit_is_shared_by_track_and_engage_but_not_alias(backend) -> None:
    async with gateway(limited(backend, 5, 60)) as client:
        for i in range(3):
            assert (await alias(client, f"anon{i}", "u1")).status_code == 200
        for _ in range(3):
            assert (await client.post("/track", headers=SHOP, json=event())).status_code == 200
        for _ in range(2):
            assert (await engage(client, {"distinct_id": "u1", "$add": {"n": 1}}))["applied"] == 1
        for path, body in (("/track", event()), ("/engage", {"distinct_id": "u1", "$add": {"n": 1}})):
            reply = await client.post(path, headers=SHOP, json=body)
            assert_error(reply, 429)
            assert 1 <= retry_after(reply) <= 60
        for i in range(3, 6):
            assert (await alias(client, f"anon{i}", "u1")).status_code == 200
        assert len(await events_of(client)) == 3
        assert (await props_of(client, "u1")) == {"n": 2}


async def test_rate_limit_is_checked_before_the_token_and_the_body(backend) -> None:
    async with gateway(limited(backend, 5, 60)) as client:
        # Refused requests count: they were not refused by the limiter.
        assert (await client.post("/track", json=event())).status_code == 401
        assert (
            await client.post("/track", headers={"X-Cohorly-Token": "tok_nope"}, json=event())
        ).status_code == 401
        assert (await client.post("/engage", headers=SHOP, content=b"{")).status_code == 400
        assert (
            await client.post("/track", headers=SHOP, content=padded("/track", MB + 1))
        ).status_code == 413
        assert (await client.post("/track", headers=SHOP, json=event("Fifth"))).status_code == 200
        for headers, body in (
            (SHOP, event("Sixth")),
            ({"X-Cohorly-Token": "tok_nope"}, event()),
            ({}, event()),
            (SHOP, b"not json"),
            (SHOP, padded("/track", 2 * MB)),
        ):
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            reply = await client.post("/track", headers=headers, **kwargs)
            assert_error(reply, 429)
            assert 1 <= retry_after(reply) <= 60
        assert [e["name"] for e in await events_of(client)] == ["Fifth"]


async def test_retry_after_is_whole_seconds_rounded_up(backend) -> None:
    async with gateway(limited(backend, 1, 30)) as client:
        assert (await client.post("/track", headers=SHOP, json=event())).status_code == 200
        reply = await client.post("/track", headers=SHOP, json=event())
        assert reply.status_code == 429
        # A little under 30 s remain: rounded up, that is 30 (29 on a slow machine).
        assert retry_after(reply) in (29, 30)


async def test_default_rate_limit_is_100_per_10_seconds(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for i in range(100):
            path = "/track" if i % 2 else "/engage"
            reply = await client.post(path, headers={"X-Cohorly-Token": "tok_nope"}, json={})
            assert reply.status_code in (400, 401), (i, reply.status_code)
        reply = await client.post("/track", headers=SHOP, json=event())
        assert reply.status_code == 429
        assert 1 <= retry_after(reply) <= 10
        assert (await alias(client, "anon", "u1")).status_code == 200


async def test_rate_limit_is_a_sliding_window(backend) -> None:
    async with gateway(limited(backend, 5, 2)) as client:

        async def send() -> int:
            return (await client.post("/track", headers=SHOP, json=event())).status_code

        start = time.monotonic()
        assert [await send() for _ in range(3)] == [200] * 3
        await _sleep_until(start + 0.8)
        second = time.monotonic()
        assert [await send() for _ in range(3)] == [200, 200, 429]
        # The first three leave the window; the two of the second group and
        # the refused request (which does not count) stay in it.
        await _sleep_until(start + 2.15)
        assert time.monotonic() < second + 2.0, "too slow to test the window"
        assert [await send() for _ in range(4)] == [200, 200, 200, 429]
        assert len(await events_of(client)) == 8


async def _sleep_until(deadline: float) -> None:
    await anyio.sleep(max(0.0, deadline - time.monotonic()))


async def test_client_ips_have_separate_budgets(backend) -> None:
    async with clients(limited(backend, 3, 60), "198.51.100.1", "198.51.100.2") as (one, two):
        for _ in range(3):
            assert (await one.post("/track", headers=SHOP, json=event("One"))).status_code == 200
        assert (await one.post("/track", headers=SHOP, json=event("One"))).status_code == 429
        for _ in range(3):
            assert (await two.post("/track", headers=SHOP, json=event("Two"))).status_code == 200
        assert (
            await two.post("/engage", headers=SHOP, json={"distinct_id": "u1", "$set": {}})
        ).status_code == 429
        assert (await one.post("/track", headers=SHOP, json=event("One"))).status_code == 429
        stored = await events_of(one)
        assert [e["context"]["ip"] for e in stored] == ["198.51.100.1"] * 3 + ["198.51.100.2"] * 3


async def test_trusted_proxy_forwarded_for_counts(backend) -> None:
    settings = limited(backend, 2, 60, server={"trusted_proxies": ["127.0.0.0/8"]})
    async with gateway(settings, client_ip="127.0.0.1") as client:

        async def send(forwarded: str, name: str) -> int:
            reply = await client.post(
                "/track", headers={**SHOP, "X-Forwarded-For": forwarded}, json=event(name)
            )
            return reply.status_code

        assert [await send("203.0.113.1", "A") for _ in range(2)] == [200, 200]
        assert await send("203.0.113.1", "A") == 429
        # Another client behind the same proxy has its own budget.
        assert await send("203.0.113.2", "B") == 200
        # A client cannot escape by prepending an address: the rightmost
        # address not trusted is the client.
        assert await send("192.0.2.99, 203.0.113.1", "A") == 429
        # Trusted hops on the right are skipped.
        assert await send("203.0.113.3, 127.0.0.9", "C") == 200
        ips = {e["name"]: e["context"]["ip"] for e in await events_of(client)}
        assert ips == {"A": "203.0.113.1", "B": "203.0.113.2", "C": "203.0.113.3"}


async def test_untrusted_peer_forwarded_for_is_ignored(backend) -> None:
    settings = limited(backend, 2, 60, server={"trusted_proxies": ["10.0.0.0/8"]})
    async with gateway(settings, client_ip="198.51.100.20") as client:

        async def send(forwarded: str) -> int:
            reply = await client.post("/track", headers={**SHOP, "X-Forwarded-For": forwarded}, json=event())
            return reply.status_code

        assert [await send("203.0.113.1"), await send("203.0.113.2")] == [200, 200]
        assert await send("203.0.113.3") == 429
        assert [e["context"]["ip"] for e in await events_of(client)] == ["198.51.100.20"] * 2


async def test_forwarded_for_is_ignored_without_trusted_proxies(backend) -> None:
    async with gateway(settings_for(backend), client_ip="192.0.2.5") as client:
        await client.post("/track", headers={**SHOP, "X-Forwarded-For": "203.0.113.1"}, json=event())
        [stored] = await events_of(client)
        assert stored["context"]["ip"] == "192.0.2.5"


# -- metrics ----------------------------------------------------------------------


async def test_metrics_count_each_event_under_its_own_project(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post(
            "/track", json=[event(token="tok_shop"), event(token="tok_shop"), event(token="tok_blog")]
        )
        assert reply.json() == {"status": 1, "inserted": 3}
        text = (await client.get("/metrics")).text
        assert 'dialgate_events_received_total{dialect="cohorly",project="shop"} 2' in text
        assert 'dialgate_events_received_total{dialect="cohorly",project="blog"} 1' in text
        assert 'dialgate_events_stored_total{dialect="cohorly",project="blog"} 1' in text


async def test_delete_false_alone_creates_no_profile(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        reply = await client.post("/engage", headers=SHOP, json={"distinct_id": "ghost", "$delete": False})
        assert reply.json() == {"status": 1, "applied": 1}
        assert await profile_of(client, "ghost") is None


async def test_an_error_quoting_a_long_key_is_answered_cut_and_not_kept(sqlite_backend) -> None:
    # Short error bodies are encoded once and kept; one quoting a key of the
    # payload can be as long as the body, and a flood of them must not pile up.
    from dialects.cohorly_answers import plain_error as _plain_error

    key = "k" * 5000
    async with gateway(settings_for(sqlite_backend)) as client:
        short = await client.post("/engage", headers=SHOP, json={"distinct_id": "u", "$add": {"k": "x"}})
        kept = _plain_error.cache_info().currsize
        long = await client.post("/engage", headers=SHOP, json={"distinct_id": "u", "$add": {key: "x"}})
        assert _plain_error.cache_info().currsize == kept
    assert assert_error(short, 400) == "$add.k must be a number"
    # Cut in the middle (DIALECTS.md, "Limits"): the field and the problem stay.
    said = assert_error(long, 400)
    assert said.startswith("$add.kkk") and said.endswith("k must be a number") and len(said) <= 300
