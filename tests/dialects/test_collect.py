"""Collect (tc_s/token) over real HTTP (the ASGI app), one test per rule of
DIALECTS.md's collect section and of the shared rules as they apply to it,
then the captured payloads of every format generation (`payloads/collect/`,
written from SDKS.md) checked field by field. Every check goes through the
admin API; no test reads a table."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ADMIN, gateway, settings_for

pytestmark = pytest.mark.anyio

KB = 1024
PAYLOADS = Path(__file__).parent / "payloads" / "collect"
ORIGIN = "https://shop.example"
OK = {"status": "ok"}
SHOP = "tc_s=1234&token=src_shop"
BLOG = "tc_s=99&token=src_blog"
UA = "collect-test/1.0"
PEER = "198.51.100.7"


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sized(size: int, name: str = "pad", **fields: Any) -> bytes:
    """A compact single event of exactly `size` bytes."""
    base = compact({"event_name": name, **fields, "pad": ""})
    assert len(base) <= size
    return compact({"event_name": name, **fields, "pad": "x" * (size - len(base))})


def batch_of(items: list[bytes]) -> bytes:
    return b'{"batch":[' + b",".join(items) + b"]}"


def batch_sized(size: int) -> tuple[bytes, int]:
    """A batch body of exactly `size` bytes made of events of at most 30,000
    bytes each; returns the body and its number of events."""
    room = size - len(batch_of([]))
    items: list[bytes] = []
    while room > 30_000 + 1 + 100:
        items.append(sized(30_000, f"e{len(items)}"))
        room -= 30_000 + 1
    items.append(sized(room, f"e{len(items)}"))
    body = batch_of(items)
    assert len(body) == size
    return body, len(items)


def keep_all(backend: dict[str, str], **sections: Any) -> Any:
    """Settings whose quarantine keeps every rejection, so a test may send
    more than `per_minute` (10) of one reason and see them all."""
    return settings_for(backend, quarantine={"per_minute": 100_000}, **sections)


async def post(
    client: httpx.AsyncClient, path: str, body: Any, query: str = SHOP, **headers: str
) -> httpx.Response:
    content = body if isinstance(body, bytes) else compact(body)
    return await client.post(f"{path}?{query}" if query else path, content=content, headers=headers)


BARRIER = "zz-barrier"


async def events_of(client: httpx.AsyncClient, project: str = "shop", **params: str) -> list[dict]:
    reply = await client.get(
        f"/admin/v1/projects/{project}/events", headers=ADMIN, params={"limit": "1000", **params}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["next"] is None
    return [e for e in reply.json()["events"] if e["name"] != BARRIER]


async def settle(client: httpx.AsyncClient) -> None:
    """Wait until every rejection queued so far is committed.

    Rejections alone are written without the request waiting for them, on
    the writer's ordered lane, which also takes every profile operation; so
    once a profile operation sent afterwards is committed (the 200 says so),
    they are too. The barrier goes to project blog, through Cohorly.
    """
    reply = await client.post(
        "/engage", headers={"X-Cohorly-Token": "tok_blog"}, json={"distinct_id": BARRIER, "$set": {"b": 1}}
    )
    assert reply.status_code == 200, reply.text


async def rejections_of(client: httpx.AsyncClient, **params: str) -> list[dict]:
    await settle(client)
    reply = await client.get("/admin/v1/rejections", headers=ADMIN, params={"limit": "1000", **params})
    assert reply.status_code == 200, reply.text
    found = reply.json()["rejections"]
    assert {r["source"] for r in found} <= {"collect"}, found
    return found


async def the_event(client: httpx.AsyncClient, project: str = "shop") -> dict:
    found = await events_of(client, project)
    assert len(found) == 1, found
    return found[0]


async def nothing_stored(client: httpx.AsyncClient) -> None:
    assert await events_of(client, "shop") == []
    assert await events_of(client, "blog") == []


def assert_ok(reply: httpx.Response) -> None:
    assert (reply.status_code, reply.json()) == (200, OK), reply.text
    assert reply.headers["content-type"] == "application/json"


def assert_400(reply: httpx.Response) -> None:
    assert reply.status_code == 400, reply.text
    body = reply.json()
    assert list(body) == ["error"] and type(body["error"]) is str and body["error"], body


def assert_gif(reply: httpx.Response) -> None:
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/gif"
    assert reply.content.startswith(b"GIF8")
    # 1x1: the logical screen size right after the signature.
    assert reply.content[6:10] == b"\x01\x00\x01\x00"


# -- endpoints and credentials ---------------------------------------------------


@pytest.mark.parametrize("path", ["/events", "/cdp/events"])
async def test_single_event_is_stored(backend, path) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_ok(await post(client, path, {"event_name": "signup", "plan": "pro"}))
        assert_ok(await post(client, path, {"event_name": "read"}, BLOG))
        stored = await the_event(client)
        assert (stored["project"], stored["source"], stored["name"]) == ("shop", "collect", "signup")
        assert stored["properties"] == {"plan": "pro"}
        assert [e["name"] for e in await events_of(client, "blog")] == ["read"]
        assert await events_of(client, source="collect") == [stored]


@pytest.mark.parametrize("path", ["/events/batch", "/cdp/events/batch"])
async def test_batch_is_stored_in_order(backend, path) -> None:
    async with gateway(settings_for(backend)) as client:
        body = {"batch": [{"event_name": f"e{i}", "n": i} for i in range(3)]}
        assert_ok(await post(client, path, body))
        stored = await events_of(client)
        assert [(e["name"], e["properties"], e["source"]) for e in stored] == [
            (f"e{i}", {"n": i}, "collect") for i in range(3)
        ]
        assert_ok(await post(client, path, {"batch": []}))
        assert len(await events_of(client)) == 3
        assert await events_of(client, "blog") == []


async def test_source_key_as_bearer_with_tc_s_in_the_query(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        bearer = {"Authorization": "Bearer src_shop"}
        assert_ok(await post(client, "/events", {"event_name": "one"}, "tc_s=1234", **bearer))
        assert_ok(
            await post(client, "/cdp/events/batch", {"batch": [{"event_name": "two"}]}, "tc_s=1234", **bearer)
        )
        assert_ok(
            await post(client, "/events", {"event_name": "three"}, "tc_s=99", Authorization="bearer src_blog")
        )
        assert [e["name"] for e in await events_of(client)] == ["one", "two"]
        assert [e["name"] for e in await events_of(client, "blog")] == ["three"]
        for stored in await events_of(client) + await events_of(client, "blog"):
            assert "src_" not in json.dumps(stored)
        assert await rejections_of(client) == []


UNKNOWN_SOURCES = [
    ("no-tc_s", "/events", "token=src_shop", {}),
    ("no-token", "/events", "tc_s=1234", {}),
    ("neither", "/events", "", {}),
    ("empty-token", "/events", "tc_s=1234&token=", {}),
    ("unknown-token", "/events", "tc_s=1234&token=src_nope", {}),
    ("unknown-site", "/events", "tc_s=4321&token=src_shop", {}),
    ("site-99-with-shop-token", "/events", "tc_s=99&token=src_shop", {}),
    ("site-1234-with-blog-token", "/events", "tc_s=1234&token=src_blog", {}),
    ("non-numeric-site", "/events", "tc_s=shop&token=src_shop", {}),
    ("bearer-of-the-other-site", "/events", "tc_s=99", {"Authorization": "Bearer src_shop"}),
    ("unknown-bearer", "/events", "tc_s=1234", {"Authorization": "Bearer src_nope"}),
    ("not-bearer", "/events", "tc_s=1234", {"Authorization": "Basic src_shop"}),
    ("cdp-other-site", "/cdp/events", "tc_s=99&token=src_shop", {}),
    ("batch-other-site", "/events/batch", "tc_s=99&token=src_shop", {}),
    ("cdp-batch-no-token", "/cdp/events/batch", "tc_s=1234", {}),
]


async def test_unknown_source_is_200_stores_nothing_and_is_quarantined(backend) -> None:
    async with gateway(keep_all(backend)) as client:
        for case, path, query, headers in UNKNOWN_SOURCES:
            event = {"event_name": case, "user": {"id": "u1"}}
            body = {"batch": [event]} if path.endswith("batch") else event
            assert_ok(await post(client, path, body, query, **headers))
            await nothing_stored(client)
            *_, rejection = await rejections_of(client)
            assert (rejection["project"], rejection["reason"]) == (None, "unknown_source"), case
            assert case in rejection["excerpt"], case
        found = await rejections_of(client, reason="unknown_source")
        assert len(found) == len(UNKNOWN_SOURCES)
        assert await rejections_of(client) == found
        # They belong to no project.
        for project in ("shop", "blog"):
            assert await rejections_of(client, project=project) == []


# -- bodies: content types, encodings, 400s ---------------------------------------


@pytest.mark.parametrize("path", ["/events", "/cdp/events"])
async def test_beacon_text_plain_is_parsed(backend, path) -> None:
    async with gateway(settings_for(backend)) as client:
        body = compact({"event_name": "beacon", "k": "v"})
        for content_type in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", ""):
            reply = await post(client, path, body, **{"Content-Type": content_type})
            assert_ok(reply)
        stored = await events_of(client)
        assert [(e["name"], e["properties"]) for e in stored] == [("beacon", {"k": "v"})] * 3


async def test_gzip_bodies(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        gz = {"Content-Encoding": "gzip"}
        assert_ok(await post(client, "/events", gzip.compress(compact({"event_name": "zipped"})), **gz))
        batch = {"batch": [{"event_name": "z1"}, {"event_name": "z2"}]}
        assert_ok(await post(client, "/cdp/events/batch", gzip.compress(compact(batch)), **gz))
        beacon = {**gz, "Content-Type": "text/plain;charset=UTF-8"}
        assert_ok(await post(client, "/cdp/events", gzip.compress(compact({"event_name": "z3"})), **beacon))
        assert [e["name"] for e in await events_of(client)] == ["zipped", "z1", "z2", "z3"]


ALL_PATHS = ("/events", "/events/batch", "/cdp/events", "/cdp/events/batch")
INVALID_JSON = [
    b"",
    b"{",
    b"not json",
    b'{"event_name": "x",}',
    b"\xff\xfe{}",
    b'{"event_name": "x"} trailing',
    b'{"batch": [{"event_name": "x"}',
]


async def test_invalid_json_is_400_and_nothing_is_kept(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for path in ALL_PATHS:
            for body in INVALID_JSON:
                assert_400(await post(client, path, body))
                assert_400(await post(client, path, body, BLOG, **{"Content-Type": "text/plain"}))
        await nothing_stored(client)
        assert await rejections_of(client) == []


async def test_corrupt_gzip_or_unknown_encoding_is_400(backend) -> None:
    cases = [
        ("gzip", b"definitely not gzip"),
        ("gzip", gzip.compress(compact({"event_name": "cut"}))[:-6]),
        ("gzip", gzip.compress(compact({"event_name": "trailing"})) + b"junk"),
        ("br", compact({"event_name": "brotli?"})),
    ]
    async with gateway(settings_for(backend)) as client:
        for path in ALL_PATHS:
            for encoding, body in cases:
                assert_400(await post(client, path, body, **{"Content-Encoding": encoding}))
        await nothing_stored(client)
        assert await rejections_of(client) == []


@pytest.mark.parametrize("path", ["/events", "/cdp/events"])
async def test_single_request_over_32_kb_is_400(backend, path) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_ok(await post(client, path, sized(32 * KB, "at-limit")))
        assert_400(await post(client, path, sized(32 * KB + 1, "over-limit")))
        assert_400(await post(client, path, sized(200 * KB, "far-over")))
        assert [e["name"] for e in await events_of(client)] == ["at-limit"]
        assert await rejections_of(client) == []


@pytest.mark.parametrize("path", ["/events/batch", "/cdp/events/batch"])
async def test_batch_request_over_500_kb_is_400(backend, path) -> None:
    async with gateway(settings_for(backend)) as client:
        body, count = batch_sized(500 * KB)
        assert_ok(await post(client, path, body))
        assert len(await events_of(client)) == count
        over, _ = batch_sized(500 * KB + 1)
        assert_400(await post(client, path, over))
        assert len(await events_of(client)) == count
        assert await rejections_of(client) == []


async def test_gzip_body_decompressing_over_the_limit_is_400(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        gz = {"Content-Encoding": "gzip"}
        assert_ok(await post(client, "/events", gzip.compress(sized(32 * KB, "single-at-limit")), **gz))
        over = gzip.compress(sized(32 * KB + 1, "single-over"))
        assert len(over) < 1 * KB  # small on the wire, over the limit inflated
        assert_400(await post(client, "/events", over, **gz))
        body, count = batch_sized(500 * KB)
        assert_ok(await post(client, "/events/batch", gzip.compress(body), **gz))
        over_batch, _ = batch_sized(500 * KB + 1)
        assert_400(await post(client, "/events/batch", gzip.compress(over_batch), **gz))
        assert_400(await post(client, "/events/batch", gzip.compress(b" " * (10 * 1024 * KB)), **gz))
        stored = await events_of(client)
        assert len(stored) == 1 + count and stored[0]["name"] == "single-at-limit"
        assert await rejections_of(client) == []


# -- batches are not atomic -------------------------------------------------------


async def test_batch_is_not_atomic(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        too_large = sized(32 * KB + 1, "too-large")
        at_limit = sized(32 * KB, "at-limit")
        # 40 KB in the body but small once re-encoded compactly: stored.
        loose = b'{"event_name" :  "loose",' + b" " * (40 * KB) + b'"k": "v"}'
        body = batch_of(
            [
                compact({"event_name": "first"}),
                too_large,
                compact({"no_name": True}),
                at_limit,
                compact("just a string"),
                loose,
                compact({"event_name": "last"}),
            ]
        )
        assert_ok(await post(client, "/events/batch", body))
        assert [e["name"] for e in await events_of(client)] == ["first", "at-limit", "loose", "last"]
        found = {r["reason"]: r for r in await rejections_of(client, project="shop")}
        assert set(found) == {"event_too_large", "no_event_name", "not_an_event"}
        assert found["event_too_large"]["detail"].startswith("batch[1]")
        assert found["no_event_name"]["detail"].startswith("batch[2]")
        assert found["not_an_event"]["detail"].startswith("batch[4]")
        assert found["no_event_name"]["excerpt"] == '{"no_name":true}'
        assert found["event_too_large"]["excerpt"].startswith('{"event_name":"too-large"')
        for r in found.values():
            assert (r["project"], r["source"]) == ("shop", "collect")


async def test_batch_with_only_bad_events_stores_nothing_and_answers_200(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_ok(await post(client, "/events/batch", {"batch": [{"event_name": ""}, {"event": None}, 7]}))
        assert await events_of(client) == []
        reasons = [r["reason"] for r in await rejections_of(client, project="shop")]
        assert reasons == ["no_event_name", "no_event_name", "not_an_event"]


# -- bodies that are not events ---------------------------------------------------


async def test_json_that_is_not_an_event_is_quarantined(backend) -> None:
    bodies = [[{"event_name": "in-an-array"}], [], "a string", 42, None, True]
    async with gateway(keep_all(backend)) as client:
        for path in ("/events", "/cdp/events"):
            for body in bodies:
                assert_ok(await post(client, path, body))
                *_, rejection = await rejections_of(client)
                assert (rejection["project"], rejection["reason"]) == ("shop", "not_an_event"), body
                assert rejection["excerpt"] == compact(body).decode()
        await nothing_stored(client)
        assert len(await rejections_of(client, project="shop", reason="not_an_event")) == 2 * len(bodies)
        assert len(await rejections_of(client)) == 2 * len(bodies)


async def test_batch_without_batch_array_is_quarantined(backend) -> None:
    bodies = [
        {"events": [{"event_name": "x"}]},
        [{"event_name": "x"}],
        {"batch": {"event_name": "x"}},
        {"batch": "x"},
        {"batch": None},
        {"event_name": "single-sent-to-batch"},
        "batch",
    ]
    async with gateway(keep_all(backend)) as client:
        for path in ("/events/batch", "/cdp/events/batch"):
            for body in bodies:
                assert_ok(await post(client, path, body))
                *_, rejection = await rejections_of(client)
                assert (rejection["project"], rejection["reason"]) == ("shop", "not_a_batch"), body
                assert rejection["excerpt"] == compact(body).decode()
        await nothing_stored(client)
        assert len(await rejections_of(client)) == 2 * len(bodies)


async def test_event_without_event_name_is_quarantined(backend) -> None:
    bodies = [
        {},
        {"event_name": ""},
        {"event_name": None},
        {"event_name": 5},
        {"event_name": ["purchase"]},
        {"event": ""},
        {"properties": {"event_name": "nested-name-does-not-count"}},
        {"context": {"event_id": "e1"}, "user": {"id": "u1"}},
    ]
    async with gateway(keep_all(backend)) as client:
        for body in bodies:
            assert_ok(await post(client, "/events", body))
            *_, rejection = await rejections_of(client)
            assert (rejection["project"], rejection["reason"]) == ("shop", "no_event_name"), body
            assert rejection["excerpt"] == compact(body).decode()
        await nothing_stored(client)
        assert len(await rejections_of(client, project="shop", reason="no_event_name")) == len(bodies)


# -- normalisation ------------------------------------------------------------------


async def test_event_or_event_name(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_ok(await post(client, "/events", {"event_name": "current"}))
        assert_ok(await post(client, "/events", {"event": "older"}))
        assert_ok(await post(client, "/events", {"event_name": "wins", "event": "loses"}))
        stored = await events_of(client)
        assert [e["name"] for e in stored] == ["current", "older", "wins"]
        assert [e["properties"] for e in stored] == [{}, {}, {}]


async def test_properties_at_the_root_or_in_a_properties_object(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        root = {"event_name": "root", "value": 12.5, "items": [{"id": 1}], "nested": {"a": None}}
        assert_ok(await post(client, "/events", root))
        older = {
            "event": "older",
            "properties": {
                "value": 3,
                "url": "https://shop.example/",
                "user": {"id": "u9", "email": "e@x.org"},
            },
        }
        assert_ok(await post(client, "/events", older))
        both = {"event_name": "both", "at_root": 1, "properties": {"inside": 2}}
        assert_ok(await post(client, "/events", both))
        first, second, third = await events_of(client)
        assert first["properties"] == {"value": 12.5, "items": [{"id": 1}], "nested": {"a": None}}
        # `user` is lifted out of the properties: it is the event's user.
        assert second["properties"] == {"value": 3, "url": "https://shop.example/"}
        assert (second["distinct_id"], second["user_id"]) == ("u9", "u9")
        assert second["context"]["user"] == {"id": "u9", "email": "e@x.org"}
        assert third["properties"] == {"at_root": 1, "inside": 2}
        for stored in (first, second, third):
            for key in (
                "event_name",
                "event",
                "user",
                "context",
                "properties",
                "eventId",
                "event_id",
                "event_timestamp",
                "created",
                "page",
                "device",
                "app",
                "version",
            ):
                assert key not in stored["properties"], (stored["name"], key)


@pytest.mark.parametrize("path", ["/events", "/events/batch"])
async def test_event_id_in_any_of_its_places_is_one_idempotency_key(backend, path) -> None:
    shapes = [
        lambda k: {"event_name": "a", "context": {"event_id": k}},
        lambda k: {"event_name": "b", "context": {"eventId": k}},
        lambda k: {"event_name": "c", "eventId": k},
        lambda k: {"event_name": "d", "event_id": k},
        lambda k: {"event": "e", "properties": {"x": 1}, "eventId": k},
    ]
    async with gateway(settings_for(backend)) as client:
        # The first shape stores; the same key in every other shape is a duplicate.
        for index, _first in enumerate(shapes):
            key = f"key-{index}"
            events = [shape(key) for shape in shapes[index:] + shapes[:index]]
            if path == "/events":
                for event in events:
                    assert_ok(await post(client, path, event))
            else:
                assert_ok(await post(client, path, {"batch": events}))
        stored = await events_of(client)
        assert [(e["name"], e["insert_id"]) for e in stored] == [
            (name, f"key-{i}") for i, name in enumerate("abcde")
        ]


async def test_a_resent_event_is_stored_once_across_endpoints(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        single = {"event_name": "purchase", "context": {"event_id": "ord-1"}, "value": 1}
        assert_ok(await post(client, "/events", single))
        assert_ok(await post(client, "/events", single))
        assert_ok(await post(client, "/cdp/events", {**single, "value": 2}))
        batch = {"batch": [{**single, "value": 3}, {"event_name": "refund", "eventId": "ord-2"}]}
        assert_ok(await post(client, "/events/batch", batch))
        assert_ok(await post(client, "/cdp/events/batch", batch))
        assert_ok(await post(client, "/events", {"event": "refund", "properties": {}, "eventId": "ord-2"}))
        # Twice in one batch: once.
        assert_ok(
            await post(client, "/events/batch", {"batch": [{"event_name": "x", "eventId": "ord-3"}] * 2})
        )
        stored = await events_of(client)
        assert [(e["name"], e["insert_id"], e["properties"]) for e in stored] == [
            ("purchase", "ord-1", {"value": 1}),
            ("refund", "ord-2", {}),
            ("x", "ord-3", {}),
        ]
        # Events without any id are never deduplicated.
        for _ in range(2):
            assert_ok(await post(client, "/events", {"event_name": "no-id"}))
        assert len(await events_of(client, name="no-id")) == 2


async def test_the_same_event_id_in_another_project_is_not_a_duplicate(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        event = {"event_name": "purchase", "context": {"event_id": "shared"}}
        assert_ok(await post(client, "/events", event, SHOP))
        assert_ok(await post(client, "/events", event, BLOG))
        assert_ok(await post(client, "/events/batch", {"batch": [event]}, BLOG))
        assert [e["insert_id"] for e in await events_of(client, "shop")] == ["shared"]
        assert [e["insert_id"] for e in await events_of(client, "blog")] == ["shared"]


async def test_a_numeric_event_id_is_stored_as_its_string(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_ok(await post(client, "/events", {"event_name": "n", "context": {"event_id": 12345}}))
        assert_ok(await post(client, "/events", {"event_name": "n", "context": {"event_id": "12345"}}))
        assert [e["insert_id"] for e in await events_of(client)] == ["12345"]


async def times_of(client: httpx.AsyncClient, cases: dict[str, dict]) -> dict[str, dict]:
    """Send one event per case, named after it; the stored events by name."""
    for name, event in cases.items():
        assert_ok(await post(client, "/events", {"event_name": name, **event}))
    stored = {e["name"]: e for e in await events_of(client)}
    assert set(stored) == set(cases)
    return stored


async def test_user_ids_over_1024_characters_are_quarantined(backend) -> None:
    """README: ids are at most 1,024 characters; the collect dialect
    quarantines a longer one as id_too_long, and the rest of a batch is kept."""
    edge, over = "i" * 1024, "o" * 1025
    kept = {"event_name": "kept", "user": {"id": "u" + edge[1:], "consistent_anonymous_id": "a" + edge[1:]}}
    async with gateway(keep_all(backend)) as client:
        batch = [
            {"event_name": "long-user", "user": {"id": over}},
            {"event_name": "long-anon", "user": {"id": "short", "consistent_anonymous_id": over}},
            {"event": "long-old", "properties": {"user": {"id": over}}},
            kept,
        ]
        assert_ok(await post(client, "/events/batch", {"batch": batch}))
        assert_ok(await post(client, "/events", {"event_name": "single", "user": {"id": over}}))
        [stored] = await events_of(client)
        assert stored["name"] == "kept"
        assert (stored["user_id"], stored["anonymous_id"]) == ("u" + edge[1:], "a" + edge[1:])
        assert [e["name"] for e in await events_of(client, distinct_id="a" + edge[1:])] == ["kept"]
        assert await events_of(client, distinct_id="short") == []
        found = await rejections_of(client)
        assert [(r["project"], r["reason"]) for r in found] == [("shop", "id_too_long")] * 4
        assert [r["detail"][:8] for r in found[:3]] == [f"batch[{i}]" for i in range(3)]


async def test_event_ids_up_to_255_characters_are_keys_and_longer_ones_quarantined(backend) -> None:
    async with gateway(keep_all(backend)) as client:
        event = {"event_name": "long-key", "context": {"event_id": "k" * 255}}
        for path in ("/events", "/cdp/events"):
            assert_ok(await post(client, path, event))
        assert_ok(await post(client, "/events/batch", {"batch": [event, event]}))
        over = {"batch": [{"event_name": "too-long", "context": {"event_id": "o" * 256}}]}
        assert_ok(await post(client, "/events/batch", over))
        assert [e["insert_id"] for e in await events_of(client)] == ["k" * 255]
        assert [r["reason"] for r in await rejections_of(client)] == ["id_too_long"]


def wide_id(seed: int, length: int) -> str:
    """Characters of four UTF-8 bytes each, that do not compress."""
    import random

    rng = random.Random(seed)
    return "".join(chr(0x20000 + rng.randrange(40_000)) for _ in range(length))


async def test_ids_are_capped_in_bytes_identically_on_every_backend(backend) -> None:
    async with gateway(keep_all(backend)) as client:
        # 256 four-byte characters fit in 1,024 bytes; 257 do not, nor 1,024 of them.
        fits, over, wide = wide_id(1, 256), wide_id(2, 257), wide_id(3, 1024)
        assert_ok(await post(client, "/events", {"event_name": "wide", "user": {"id": fits}}))
        for too_long in (over, wide):
            body = {"event_name": "too-wide", "user": {"consistent_anonymous_id": too_long}}
            assert_ok(await post(client, "/events", body))
        stored = await events_of(client)
        assert [(e["name"], e["distinct_id"]) for e in stored] == [("wide", fits)]
        assert [r["reason"] for r in await rejections_of(client)] == ["id_too_long", "id_too_long"]


async def test_a_200_never_drops_an_event_silently(postgres_backend) -> None:
    """Data the database refuses (today: a wide id, see above) must not get
    a 200 while being neither stored nor quarantined; README: such data is
    answered like invalid input, 400."""
    async with gateway(settings_for(postgres_backend)) as client:
        reply = await post(client, "/events", {"event_name": "refused", "user": {"id": wide_id(3, 1024)}})
        stored, quarantined = await events_of(client), await rejections_of(client)
        if reply.status_code == 200:
            assert stored or quarantined, "200, but nothing stored and nothing quarantined"
        else:
            assert_400(reply)
            assert stored == [] and quarantined == []


async def test_event_timestamp(backend) -> None:
    cases = {
        "ctx-int": ({"context": {"event_timestamp": 1751600000123}}, 1751600000123),
        "ctx-string": ({"context": {"event_timestamp": "1751600000123"}}, 1751600000123),
        "ctx-padded-string": ({"context": {"event_timestamp": " 1751600000123 "}}, 1751600000123),
        "root-int": ({"event_timestamp": 1751600000456}, 1751600000456),
        "root-string": ({"event_timestamp": "1751600000456"}, 1751600000456),
        "ctx-wins": ({"event_timestamp": 1, "context": {"event_timestamp": 1751600000789}}, 1751600000789),
        "beats-ctx-created": (
            {"context": {"event_timestamp": 1751600000000, "created": "2020-01-01T00:00:00Z"}},
            1751600000000,
        ),
        "beats-root-created": (
            {"created": "2025-07-04T03:33:20.250Z", "event_timestamp": "1751600000999"},
            1751600000999,
        ),
        "epoch": ({"event_timestamp": 0}, 0),
    }
    async with gateway(settings_for(backend)) as client:
        stored = await times_of(client, {name: event for name, (event, _) in cases.items()})
        for name, (_, expected) in cases.items():
            assert stored[name]["time"] == expected, name
            assert "event_timestamp" not in stored[name]["properties"], name


async def test_iso_created_when_no_event_timestamp(backend) -> None:
    cases = {
        "root-z": ({"created": "2025-07-04T03:33:20.250Z"}, 1751600000250),
        "root-offset": ({"created": "2025-07-04T05:33:20.250+02:00"}, 1751600000250),
        "root-naive-is-utc": ({"created": "2025-07-04T03:33:20.250"}, 1751600000250),
        "in-properties": ({"properties": {"created": "2025-07-04T03:33:20Z"}}, 1751600000000),
        "in-context": ({"context": {"created": "2025-07-04T03:33:20Z"}}, 1751600000000),
        "root-beats-context": (
            {"created": "2025-07-04T03:33:21Z", "context": {"created": "2025-07-04T03:33:22Z"}},
            1751600001000,
        ),
        "properties-beat-context": (
            {
                "properties": {"created": "2025-07-04T03:33:21Z"},
                "context": {"created": "2025-07-04T03:33:22Z"},
            },
            1751600001000,
        ),
        "microseconds-truncate": ({"created": "2025-07-04T03:33:20.250999Z"}, 1751600000250),
        # Exact milliseconds: timestamp() * 1000 in floating point gave each of these 1 ms early.
        "exact-2004": ({"created": "2004-09-27T11:29:40.238Z"}, 1096284580238),
        "exact-2038": ({"created": "2038-11-25T10:13:31.930Z"}, 2174292811930),
        "exact-2038-offset": ({"created": "2038-07-03T07:22:24.857+02:00"}, 2161747344857),
    }
    async with gateway(settings_for(backend)) as client:
        stored = await times_of(client, {name: event for name, (event, _) in cases.items()})
        for name, (_, expected) in cases.items():
            assert stored[name]["time"] == expected, name
            assert "created" not in stored[name]["properties"], name


async def test_receipt_time_otherwise(backend) -> None:
    cases = {
        "nothing": {},
        "empty-context": {"context": {}},
        "word": {"event_timestamp": "soon"},
        "null": {"event_timestamp": None},
        "negative": {"event_timestamp": -5},
        "dotted": {"event_timestamp": "12.5.3"},
        "bool": {"event_timestamp": True},
        "after-year-9999": {"event_timestamp": 253402300800000},
        "superscript": {"event_timestamp": "\u00b2"},  # a digit to str.isdigit(), not to int()
        "huge-digits": {"event_timestamp": "9" * 5000},  # over int()'s digit limit
        "non-ascii-digits": {"context": {"event_timestamp": "\u0662\u0662"}},
        "bad-created": {"created": "not a date"},
        "created-number": {"created": 1751600000000},
        "created-before-1970": {"created": "1969-12-31T23:59:59Z"},
    }
    async with gateway(settings_for(backend)) as client:
        before = now_ms()
        stored = await times_of(client, cases)
        after = now_ms()
        for name, event in stored.items():
            assert before <= event["time"] <= after, name
            assert event["time"] == event["received_at"], name


async def test_page_location_is_page_url(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        location = "https://shop.example/p/1"
        assert_ok(
            await post(client, "/events", {"event_name": "a", "context": {"page": {"location": location}}})
        )
        assert_ok(
            await post(client, "/events", {"event": "b", "properties": {}, "page": {"location": location}})
        )
        both = {"event_name": "c", "context": {"page": {"location": "https://old/", "url": location}}}
        assert_ok(await post(client, "/events", both))
        first, second, third = await events_of(client)
        assert first["context"]["page"] == {"location": location, "url": location}
        assert second["context"]["page"] == {"location": location, "url": location}
        assert third["context"]["page"] == {"location": "https://old/", "url": location}


async def test_user_ids_are_linked_and_found_under_either(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        anon = {"consistent_anonymous_id": "caid_1"}
        assert_ok(await post(client, "/events", {"event_name": "visit", "user": anon}))
        assert_ok(await post(client, "/events", {"event_name": "login", "user": {**anon, "id": "user_1"}}))
        assert_ok(await post(client, "/events", {"event_name": "buy", "user": {"id": "user_1"}}))
        assert_ok(
            await post(
                client, "/events", {"event_name": "other", "user": {"consistent_anonymous_id": "caid_2"}}
            )
        )
        visit, login, buy, other = await events_of(client)
        assert (visit["distinct_id"], visit["anonymous_id"], visit["user_id"]) == ("caid_1", "caid_1", None)
        assert (login["distinct_id"], login["anonymous_id"], login["user_id"]) == (
            "user_1",
            "caid_1",
            "user_1",
        )
        assert (buy["distinct_id"], buy["anonymous_id"], buy["user_id"]) == ("user_1", None, "user_1")
        assert (other["distinct_id"], other["anonymous_id"], other["user_id"]) == ("caid_2", "caid_2", None)
        for id_ in ("caid_1", "user_1"):
            assert [e["name"] for e in await events_of(client, distinct_id=id_)] == ["visit", "login", "buy"]
        assert [e["name"] for e in await events_of(client, distinct_id="caid_2")] == ["other"]
        assert await events_of(client, "blog", distinct_id="user_1") == []


async def test_an_anonymous_id_of_another_person_keeps_the_event_and_is_quarantined(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_ok(
            await post(
                client,
                "/events",
                {"event_name": "first", "user": {"id": "u1", "consistent_anonymous_id": "c1"}},
            )
        )
        assert_ok(
            await post(
                client,
                "/events",
                {"event_name": "second", "user": {"id": "u2", "consistent_anonymous_id": "c1"}},
            )
        )
        assert [e["name"] for e in await events_of(client)] == ["first", "second"]
        assert [e["name"] for e in await events_of(client, distinct_id="c1")] == ["first"]
        assert [e["name"] for e in await events_of(client, distinct_id="u2")] == ["second"]
        [rejection] = await rejections_of(client)
        assert (rejection["project"], rejection["source"], rejection["reason"]) == (
            "shop",
            "collect",
            "alias_conflict",
        )


async def test_the_link_is_per_project(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        user = {"id": "user_1", "consistent_anonymous_id": "caid_1"}
        assert_ok(await post(client, "/events", {"event_name": "shop-login", "user": user}))
        assert_ok(
            await post(
                client,
                "/events",
                {"event_name": "blog-visit", "user": {"consistent_anonymous_id": "caid_1"}},
                BLOG,
            )
        )
        assert [e["name"] for e in await events_of(client, "blog", distinct_id="user_1")] == []
        assert [e["name"] for e in await events_of(client, "blog", distinct_id="caid_1")] == ["blog-visit"]


async def test_no_user_id_stores_distinct_id_null(backend) -> None:
    cases = {
        "absent": {},
        "empty": {"user": {}},
        "traits-only": {"user": {"email": "a@b.c"}},
        "empty-ids": {"user": {"id": "", "consistent_anonymous_id": ""}},
        "null-id": {"user": {"id": None}},
        "float-id": {"user": {"id": 1.5}},
        "bool-id": {"user": {"id": True}},
        "not-an-object": {"user": "u1"},
        "old-format": {"properties": {"user": {"email": "a@b.c"}}},
    }
    async with gateway(settings_for(backend)) as client:
        stored = await times_of(client, cases)
        for name, event in stored.items():
            assert (event["distinct_id"], event["anonymous_id"], event["user_id"]) == (None, None, None), name


async def test_integer_user_ids_are_stored_as_strings(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_ok(
            await post(
                client, "/events", {"event_name": "n", "user": {"id": 42, "consistent_anonymous_id": 7}}
            )
        )
        stored = await the_event(client)
        assert (stored["distinct_id"], stored["anonymous_id"], stored["user_id"]) == ("42", "7", "42")
        assert [e["name"] for e in await events_of(client, distinct_id="7")] == ["n"]


async def test_user_traits_and_page_device_app_go_to_context(backend) -> None:
    async with gateway(settings_for(backend), client_ip=PEER) as client:
        user = {
            "id": "u1",
            "consistent_anonymous_id": "c1",
            "email": "ada@example.com",
            "phone": "+33600000000",
            "consent_categories": ["1", "4"],
            "first_name": "Ada",
        }
        context = {
            "event_id": "e1",
            "page": {"url": "https://shop.example/", "title": "Home", "referrer": "https://ref.example/"},
            "device": {"lang": "fr", "screen": {"width": 390}},
            "app": {"name": "Shop", "version": "4.2.0"},
            "campaign": {"source": "newsletter"},
        }
        event = {"event_name": "view", "user": user, "context": context, "plan": "pro"}
        assert_ok(await post(client, "/events", event, **{"User-Agent": UA}))
        stored = await the_event(client)
        assert stored["properties"] == {"plan": "pro"}
        assert stored["context"] == {
            "event_id": "e1",
            "page": context["page"],
            "device": context["device"],
            "app": context["app"],
            "campaign": {"source": "newsletter"},
            "user": user,
            "ip": PEER,
            "user_agent": UA,
        }


async def test_client_ip_unless_the_payload_gives_one(backend) -> None:
    async with gateway(settings_for(backend), client_ip=PEER) as client:
        assert_ok(await post(client, "/events", {"event_name": "none"}))
        device = {"ip": "203.0.113.50", "model": "Pixel"}
        assert_ok(await post(client, "/events", {"event_name": "device-ip", "context": {"device": device}}))
        assert_ok(
            await post(client, "/events", {"event_name": "context-ip", "context": {"ip": "203.0.113.60"}})
        )
        assert_ok(await post(client, "/events", {"event": "old-device", "properties": {}, "device": device}))
        assert_ok(
            await post(client, "/events", {"event_name": "empty-ip", "context": {"device": {"ip": ""}}})
        )
        none, device_ip, context_ip, old_device, empty_ip = await events_of(client)
        assert none["context"]["ip"] == PEER
        assert "ip" not in device_ip["context"] and device_ip["context"]["device"] == device
        assert context_ip["context"]["ip"] == "203.0.113.60"
        assert "ip" not in old_device["context"] and old_device["context"]["device"] == device
        assert empty_ip["context"]["ip"] == PEER


async def test_forwarded_for_from_a_trusted_proxy_is_the_client_ip(backend) -> None:
    settings = settings_for(backend, server={"trusted_proxies": ["10.0.0.0/8"]})
    async with gateway(settings, client_ip="10.1.2.3") as client:
        forwarded = {"X-Forwarded-For": "203.0.113.70, 10.9.9.9"}
        assert_ok(await post(client, "/events", {"event_name": "proxied"}, **forwarded))
        assert (await the_event(client))["context"]["ip"] == "203.0.113.70"
    async with gateway(settings_for(backend), client_ip=PEER) as client:
        assert_ok(
            await post(client, "/events", {"event_name": "direct"}, **{"X-Forwarded-For": "203.0.113.70"})
        )
        assert [e["context"]["ip"] for e in await events_of(client)] == ["203.0.113.70", PEER]


# -- the quarantine: excerpts -------------------------------------------------------


async def test_excerpts_are_present_and_bounded(backend) -> None:
    async with gateway(settings_for(backend, quarantine={"excerpt_bytes": 100})) as client:
        big = compact(["not", "an", "event", "x" * 5000])
        assert_ok(await post(client, "/events", big))
        unnamed = {"no_name": "y" * 3000}
        assert_ok(await post(client, "/events/batch", {"batch": [unnamed, {"event_name": "kept"}]}))
        assert_ok(
            await post(client, "/events", {"event_name": "lost", "z": "z" * 3000}, "tc_s=1234&token=nope")
        )
        found = {r["reason"]: r for r in await rejections_of(client)}
        assert found["not_an_event"]["excerpt"] == big[:100].decode()
        assert found["no_event_name"]["excerpt"] == compact(unnamed)[:100].decode()
        assert found["unknown_source"]["excerpt"].startswith('{"event_name":"lost"')
        for rejection in found.values():
            assert 0 < len(rejection["excerpt"].encode()) <= 100
    async with gateway(settings_for(backend)) as client:
        assert_ok(await post(client, "/events", compact("w" * 10_000)))
        *_, rejection = await rejections_of(client, reason="not_an_event")
        assert rejection["excerpt"] == compact("w" * 10_000)[:2048].decode()


async def test_excerpt_bound_is_in_bytes(backend) -> None:
    async with gateway(settings_for(backend, quarantine={"excerpt_bytes": 100})) as client:
        assert_ok(await post(client, "/events", {"no_name": "é" * 500}))
        [rejection] = await rejections_of(client)
        assert rejection["excerpt"]
        assert len(rejection["excerpt"].encode()) <= 100


async def test_excerpts_never_contain_the_token(backend) -> None:
    secret = "src_secret_5f1c0d2a"
    async with gateway(settings_for(backend)) as client:
        event = {"event_name": "e", "page": {"url": "https://shop.example/?utm=1"}}
        assert_ok(await post(client, "/events", event, f"tc_s=1234&token={secret}"))
        assert_ok(await post(client, "/events", event, "tc_s=1234", Authorization=f"Bearer {secret}"))
        assert_ok(await post(client, "/events/batch", {"batch": [event]}, f"tc_s=1234&token={secret}"))
        assert_ok(await post(client, "/events", "not an event", SHOP))
        assert_ok(await post(client, "/events", {"no": "name"}, "tc_s=1234", Authorization="Bearer src_shop"))
        assert_gif(await client.get(f"/events?tc_s=1234&token={secret}&event_name=px&user[id]=u1"))
        assert_gif(await client.get(f"/events?{SHOP}&user[id]=u1"))
        found = await rejections_of(client)
        assert [r["reason"] for r in found] == ["unknown_source"] * 3 + ["not_an_event", "no_event_name"] + [
            "unknown_source",
            "no_event_name",
        ]
        for rejection in found:
            assert rejection["excerpt"], rejection
            text = json.dumps(rejection)
            assert secret not in text and "src_shop" not in text, rejection
            assert "tc_s" not in rejection["excerpt"] and "token" not in rejection["excerpt"]


# -- the pixel ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/events", "/cdp/events"])
async def test_pixel_stores_bracket_notation_and_answers_a_gif(backend, path) -> None:
    async with gateway(settings_for(backend), client_ip=PEER) as client:
        query = (
            f"{SHOP}&event_name=purchase&value=12.50&user[id]=user_1&user[consistent_anonymous_id]=caid_1"
            "&items[0][product][id]=SKU-1&items[0][quantity]=2&items[1][product][id]=SKU-2"
            "&context[event_id]=px-1"
        )
        reply = await client.get(f"{path}?{query}", headers={"User-Agent": UA})
        assert_gif(reply)
        assert reply.headers["cache-control"] == "no-store"
        assert_gif(await client.get(f"{path}?{query}"))  # the same event_id: stored once
        stored = await the_event(client)
        assert stored["name"] == "purchase"
        assert stored["properties"] == {
            "value": "12.50",
            "items": [{"product": {"id": "SKU-1"}, "quantity": "2"}, {"product": {"id": "SKU-2"}}],
        }
        assert (stored["distinct_id"], stored["anonymous_id"], stored["insert_id"]) == (
            "user_1",
            "caid_1",
            "px-1",
        )
        assert stored["context"] == {
            "event_id": "px-1",
            "user": {"id": "user_1", "consistent_anonymous_id": "caid_1"},
            "ip": PEER,
            "user_agent": UA,
        }
        assert [e["name"] for e in await events_of(client, distinct_id="caid_1")] == ["purchase"]


async def test_pixel_index_builds_a_list_and_values_stay_strings(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_gif(await client.get(f"/events?{SHOP}&event_name=list&items[0][id]=7"))
        assert_gif(
            await client.get(f"/events?{SHOP}&event_name=flat&n=1&flag=true&empty=&tags[0]=a&tags[1]=b")
        )
        assert_gif(
            await client.get(
                "/events",
                params=[
                    ("tc_s", "1234"),
                    ("token", "src_shop"),
                    ("event_name", "encoded"),
                    ("user[email]", "a+b@example.com"),
                    ("q", "x & y = z"),
                ],
            )
        )
        first, second, third = await events_of(client)
        assert first["properties"] == {"items": [{"id": "7"}]}
        assert second["properties"] == {"n": "1", "flag": "true", "empty": "", "tags": ["a", "b"]}
        assert third["properties"] == {"q": "x & y = z"}
        assert third["context"]["user"] == {"email": "a+b@example.com"}
        assert third["distinct_id"] is None


async def test_pixel_with_an_unknown_token_is_still_a_gif(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_gif(await client.get("/events?tc_s=1234&token=src_nope&event_name=px"))
        assert_gif(await client.get("/cdp/events?tc_s=99&token=src_shop&event_name=px"))
        assert_gif(await client.get("/events?event_name=px"))
        await nothing_stored(client)
        found = await rejections_of(client)
        assert [(r["project"], r["reason"]) for r in found] == [(None, "unknown_source")] * 3
        assert found[0]["excerpt"] == '{"event_name":"px"}'


async def test_pixel_without_event_name_is_a_gif_and_quarantined(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_gif(await client.get(f"/events?{SHOP}&user[id]=u1"))
        assert_gif(await client.get(f"/events?{SHOP}&event_name="))
        await nothing_stored(client)
        assert [r["reason"] for r in await rejections_of(client, project="shop")] == ["no_event_name"] * 2


async def test_pixel_huge_index_is_cheap(backend) -> None:
    queries = [
        "items[99999999]=1",
        "items[0][id]=1&items[999999999][id]=2",
        "items[99999999999][id]=1",
        "a[9999999999999999999999999]=1",
        "&".join(f"l{i}[99999999]=x" for i in range(200)),
    ]
    async with gateway(settings_for(backend)) as client:
        for query in queries:
            started = time.perf_counter()
            assert_gif(await client.get(f"/events?{SHOP}&event_name=huge&{query}"))
            assert time.perf_counter() - started < 2, query
        stored = await events_of(client)
        assert len(stored) == len(queries)
        assert len(json.dumps(stored)) < 100 * KB
        # Sparse but small indexes still make a list with empty slots.
        assert_gif(await client.get(f"/events?{SHOP}&event_name=sparse&items[2]=c&items[0]=a"))
        assert (await events_of(client, name="sparse"))[0]["properties"] == {"items": ["a", None, "c"]}


async def test_pixel_odd_index_is_not_a_server_error(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for index in ("\u00b2", "\u0661", "9" * 5000, "-1", "1.5"):
            query = [("tc_s", "1234"), ("token", "src_shop"), ("event_name", "odd"), (f"a[{index}][b]", "v")]
            assert_gif(await client.get("/events", params=query))
        assert [e["name"] for e in await events_of(client)] == ["odd"] * 5


async def test_pixel_get_is_not_served_on_batch(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for path in ("/events/batch", "/cdp/events/batch"):
            assert (await client.get(f"{path}?{SHOP}&event_name=x")).status_code == 405
        await nothing_stored(client)


# -- paths, methods, CORS ---------------------------------------------------------------


async def test_trailing_slashes_are_served_without_redirect(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        assert_ok(await post(client, "/events/", {"event_name": "a"}))
        assert_ok(await post(client, "/events/batch/", {"batch": [{"event_name": "b"}]}))
        assert_ok(await post(client, "/cdp/events/", {"event_name": "c"}))
        assert_ok(await post(client, "/cdp/events/batch/", {"batch": [{"event_name": "d"}]}))
        assert_gif(await client.get(f"/events/?{SHOP}&event_name=e"))
        assert (await client.options("/events/", headers={"Origin": ORIGIN})).status_code == 204
        assert [e["name"] for e in await events_of(client)] == ["a", "b", "c", "d", "e"]


async def test_unknown_path_is_404_and_wrong_method_405(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for path in ("/event", "/events/batches", "/cdp/event", "/cdp", "/events/x/batch", "/v1/events"):
            assert (await post(client, path, {"event_name": "x"})).status_code == 404, path
        for method in ("PUT", "DELETE", "PATCH"):
            for path in ("/events", "/events/batch", "/cdp/events"):
                reply = await client.request(method, f"{path}?{SHOP}", content=b'{"event_name":"x"}')
                assert reply.status_code == 405, (method, path)
        await nothing_stored(client)


async def test_cors_preflight(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for path in ALL_PATHS:
            # No credentials needed, and none checked.
            for query in (SHOP, "tc_s=1&token=nope", ""):
                reply = await client.options(
                    f"{path}?{query}",
                    headers={
                        "Origin": ORIGIN,
                        "Access-Control-Request-Method": "POST",
                        "Access-Control-Request-Headers": "content-type,authorization",
                    },
                )
                assert reply.status_code == 204, (path, query)
                assert reply.headers["access-control-allow-origin"] == ORIGIN
                assert reply.headers["access-control-allow-credentials"] == "true"
                assert reply.headers["access-control-allow-headers"] == "content-type,authorization"
                assert "POST" in reply.headers["access-control-allow-methods"]
                assert reply.content == b""
        await nothing_stored(client)
        assert await rejections_of(client) == []


async def test_cors_on_every_response_errors_included(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        cors = {"Origin": ORIGIN}
        replies = [
            await post(client, "/cdp/events", {"event_name": "ok"}, **cors),
            await post(client, "/cdp/events", {"event_name": "ok"}, "tc_s=1&token=nope", **cors),
            await post(client, "/cdp/events", b"{", **cors),
            await post(client, "/cdp/events", sized(40 * KB), **cors),
            await post(client, "/cdp/events", b"x", **{**cors, "Content-Encoding": "gzip"}),
            await post(client, "/cdp/events/batch", {"nope": 1}, **cors),
            await client.get(f"/cdp/events?{SHOP}&event_name=px", headers=cors),
        ]
        assert [r.status_code for r in replies] == [200, 200, 400, 400, 400, 200, 200]
        for reply in replies:
            assert reply.headers["access-control-allow-origin"] == ORIGIN, reply.status_code
            assert reply.headers["access-control-allow-credentials"] == "true", reply.status_code
        assert [e["name"] for e in await events_of(client)] == ["ok", "px"]


async def test_never_429_a_quick_burst_is_all_stored(backend) -> None:
    async with gateway(settings_for(backend)) as client:

        async def one(i: int) -> httpx.Response:
            if i % 3 == 2:
                return await post(client, "/events/batch", {"batch": [{"event_name": "burst", "i": i}]})
            return await post(client, "/events", {"event_name": "burst", "i": i})

        statuses: list[int] = []
        for start in range(0, 300, 100):
            replies = await asyncio.gather(*(one(i) for i in range(start, start + 100)))
            statuses += [r.status_code for r in replies]
        assert statuses == [200] * 300
        stored = await events_of(client, name="burst")
        assert sorted(e["properties"]["i"] for e in stored) == list(range(300))


# -- captured payloads, one per format generation ---------------------------------------------


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def without_ids(stored: dict) -> dict:
    stored = dict(stored)
    assert stored.pop("id")
    stored.pop("received_at")
    return stored


async def test_server_to_server_payload_with_string_event_timestamp(backend) -> None:
    async with gateway(settings_for(backend), client_ip=PEER) as client:
        headers = {"Content-Type": "application/json", "User-Agent": "python-requests/2.32.3"}
        assert_ok(await post(client, "/events", payload("s2s_search.json"), **headers))
        stored = await the_event(client)
        assert without_ids(stored) == {
            "project": "shop",
            "source": "collect",
            "name": "search",
            "distinct_id": "12345",
            "anonymous_id": "67892",
            "user_id": "12345",
            "time": 1751600000000,
            "insert_id": None,
            "session_id": None,
            "properties": {"search_term": "t-shirts", "results_count": 42},
            "context": {
                "event_timestamp": "1751600000000",
                "device": {
                    "ip": "198.51.100.23",
                    "user_agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
                    "(KHTML, like Gecko) Chrome/126.0 Safari/537.36",
                    "lang": "fr-FR",
                },
                "page": {"url": "https://shop.example/search?q=t-shirts", "title": "Search results"},
                "user": {
                    "id": "12345",
                    "consistent_anonymous_id": "67892",
                    "email": "jane.doe@example.com",
                    "phone": "+33612345678",
                    "consent_categories": ["1", "3"],
                },
                "user_agent": "python-requests/2.32.3",
            },
            "consent": None,
        }
        assert [e["name"] for e in await events_of(client, distinct_id="67892")] == ["search"]


async def test_mobile_sdk_payload(backend) -> None:
    async with gateway(settings_for(backend), client_ip=PEER) as client:
        agent = "okhttp/4.12.0"
        body = payload("mobile_sdk_purchase.json")
        assert_ok(await post(client, "/events", body, **{"User-Agent": agent}))
        assert_ok(await post(client, "/events", body, **{"User-Agent": agent}))  # a retry
        stored = await the_event(client)
        assert without_ids(stored) == {
            "project": "shop",
            "source": "collect",
            "name": "purchase",
            "distinct_id": "user_42",
            "anonymous_id": "8a4e2f1c-5b7d-4c3e-9f10-2d6b8e7a1c34",
            "user_id": "user_42",
            "time": 1751600123456,
            "insert_id": "100c1ccc-6e30-4e95-9b3c-ee8bd19a2b38",
            "session_id": None,
            "properties": {
                "id": "ORD-20250704-0091",
                "currency": "EUR",
                "value": 59.9,
                "shipping_amount": 4.9,
                "tax_amount": 9.98,
                "items": [{"product": {"id": "SKU-1", "name": "Linen shirt", "price": 27.5}, "quantity": 2}],
            },
            "context": {
                "event_id": "100c1ccc-6e30-4e95-9b3c-ee8bd19a2b38",
                "event_timestamp": 1751600123456,
                "app": {"name": "Shop", "version": "4.2.0", "build": "4200", "namespace": "com.shop.app"},
                "device": {
                    "manufacturer": "Google",
                    "model": "Pixel 8",
                    "os": {"name": "Android", "version": "14"},
                    "lang": "fr",
                    "timezone": "Europe/Paris",
                },
                "ip": PEER,
                "user_agent": agent,
                "user": {
                    "consistent_anonymous_id": "8a4e2f1c-5b7d-4c3e-9f10-2d6b8e7a1c34",
                    "id": "user_42",
                    "email": "ada@example.com",
                },
            },
            "consent": None,
        }
        found = await events_of(client, distinct_id="8a4e2f1c-5b7d-4c3e-9f10-2d6b8e7a1c34")
        assert [e["id"] for e in found] == [stored["id"]]


async def test_web_tag_2026_beacon_payload(backend) -> None:
    firefox = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14.5; rv:128.0) Gecko/20100101 Firefox/128.0"
    async with gateway(settings_for(backend), client_ip=PEER) as client:
        headers = {"Content-Type": "text/plain;charset=UTF-8", "Origin": ORIGIN, "User-Agent": firefox}
        reply = await post(client, "/cdp/events", payload("web_2026_page_view.json"), **headers)
        assert_ok(reply)
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        stored = await the_event(client)
        assert without_ids(stored) == {
            "project": "shop",
            "source": "collect",
            "name": "page_view",
            "distinct_id": None,
            "anonymous_id": None,
            "user_id": None,
            "time": 1795166102114,
            "insert_id": "39ca916c-8532-4f56-8cd5-4089ab60e4d4",
            "session_id": None,
            "properties": {"page_type": "product", "product_id": "SKU-1"},
            "context": {
                "page": {
                    "url": "https://shop.example/p/sku-1",
                    "title": "Linen shirt",
                    "referrer": "https://www.google.com/",
                },
                "device": {
                    "screen": {"width": 1440, "height": 900},
                    "lang": "fr-FR",
                    "timezone": "Europe/Paris",
                },
                "eventId": "39ca916c-8532-4f56-8cd5-4089ab60e4d4",
                "created": "2026-11-20T09:15:02.114Z",
                "version": 2,
                "ip": PEER,
                "user_agent": firefox,
            },
            "consent": None,
        }


async def test_web_tag_2023_payload(backend) -> None:
    safari = "Mozilla/5.0 (iPhone; CPU iPhone OS 16_4 like Mac OS X) AppleWebKit/605.1.15 Version/16.4 Safari/604.1"
    async with gateway(settings_for(backend), client_ip=PEER) as client:
        headers = {"Content-Type": "text/plain;charset=UTF-8", "User-Agent": safari}
        assert_ok(await post(client, "/events", payload("web_2023_add_to_cart.json"), **headers))
        stored = await the_event(client)
        assert without_ids(stored) == {
            "project": "shop",
            "source": "collect",
            "name": "add_to_cart",
            "distinct_id": "user_77",
            "anonymous_id": "caid_77",
            "user_id": "user_77",
            "time": 1683195630456,
            "insert_id": "1683195630456-k3j9x",
            "session_id": None,
            "properties": {
                "currency": "EUR",
                "value": 27.5,
                "items": [{"product": {"id": "SKU-1", "name": "Linen shirt", "price": 27.5}, "quantity": 1}],
                "url": "https://shop.example/p/sku-1",
            },
            "context": {
                "page": {
                    "location": "https://shop.example/p/sku-1",
                    "title": "Linen shirt",
                    "url": "https://shop.example/p/sku-1",
                },
                "device": {"lang": "fr-FR", "screen": {"width": 390, "height": 844}},
                "version": 1,
                "ip": PEER,
                "user_agent": safari,
                "user": {"id": "user_77", "consistent_anonymous_id": "caid_77", "email": "grace@example.com"},
            },
            "consent": None,
        }
        assert [e["name"] for e in await events_of(client, distinct_id="caid_77")] == ["add_to_cart"]


async def test_batch_payload(backend) -> None:
    async with gateway(settings_for(backend), client_ip=PEER) as client:
        assert_ok(await post(client, "/events/batch", payload("batch_mixed.json"), **{"User-Agent": UA}))
        login, view, logout = [without_ids(e) for e in await events_of(client)]
        common = {"project": "shop", "source": "collect", "session_id": None, "consent": None}
        caid = "8a4e2f1c-5b7d-4c3e-9f10-2d6b8e7a1c34"
        assert login == {
            **common,
            "name": "login",
            "distinct_id": "user_42",
            "anonymous_id": caid,
            "user_id": "user_42",
            "time": 1751600200000,
            "insert_id": "b-0001",
            "properties": {"method": "password"},
            "context": {
                "event_id": "b-0001",
                "event_timestamp": 1751600200000,
                "ip": PEER,
                "user_agent": UA,
                "user": {"id": "user_42", "consistent_anonymous_id": caid},
            },
        }
        assert view == {
            **common,
            "name": "view_item",
            "distinct_id": "user_42",
            "anonymous_id": None,
            "user_id": "user_42",
            "time": 1751600201000,
            "insert_id": "b-0002",
            "properties": {"item_id": "SKU-2"},
            "context": {"ip": PEER, "user_agent": UA, "user": {"id": "user_42"}},
        }
        assert logout == {
            **common,
            "name": "logout",
            "distinct_id": "user_42",
            "anonymous_id": None,
            "user_id": "user_42",
            "time": 1751600202000,
            "insert_id": "b-0004",
            "properties": {"reason": "idle"},
            "context": {"ip": PEER, "user_agent": UA, "user": {"id": "user_42"}},
        }
        [rejection] = await rejections_of(client)
        assert (rejection["project"], rejection["reason"]) == ("shop", "no_event_name")
        assert rejection["detail"].startswith("batch[2]")
        assert json.loads(rejection["excerpt"]) == {
            "search_term": "forgotten name",
            "context": {"event_id": "b-0003"},
        }
        assert len(await events_of(client, distinct_id=caid)) == 3


async def test_pixel_payload(backend) -> None:
    async with gateway(settings_for(backend), client_ip=PEER) as client:
        query = payload("pixel_purchase.txt").decode()
        reply = await client.get(f"/events?{query}", headers={"User-Agent": UA, "Origin": ORIGIN})
        assert_gif(reply)
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        stored = await the_event(client)
        assert without_ids(stored) == {
            "project": "shop",
            "source": "collect",
            "name": "purchase",
            "distinct_id": "user_42",
            "anonymous_id": None,
            "user_id": "user_42",
            "time": stored["received_at"],
            "insert_id": None,
            "session_id": None,
            "properties": {
                "id": "ORD-7",
                "value": "59.90",
                "currency": "EUR",
                "items": [
                    {"product": {"id": "SKU-1"}, "quantity": "2"},
                    {"product": {"id": "SKU-2"}, "quantity": "1"},
                ],
            },
            "context": {
                "page": {"location": "https://shop.example/thanks", "url": "https://shop.example/thanks"},
                "ip": PEER,
                "user_agent": UA,
                "user": {"id": "user_42", "email": "ada@example.com"},
            },
            "consent": None,
        }
        assert "src_shop" not in json.dumps(stored) and "tc_s" not in json.dumps(stored)


async def test_every_captured_payload_is_under_its_request_limit() -> None:
    names = sorted(path.name for path in PAYLOADS.iterdir())
    assert len(names) == 6, names
    for name in names:
        assert 0 < len(payload(name)) <= 32 * KB, name
        if name.endswith(".json"):
            assert isinstance(json.loads(payload(name)), dict), name
