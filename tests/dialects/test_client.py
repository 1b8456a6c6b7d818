"""The client API (`/api/client/*`) over real HTTP (the ASGI app), one test
per rule of DIALECTS.md's client section and of the shared rules as they
apply to it. Every check goes through the admin API; no test reads a table."""

from __future__ import annotations

import functools
import gzip
import time
from typing import Any

import httpx
import msgspec
import pytest

from tests.support import events_of, gateway, profile_of, props_of, rejections_of, settings_for

pytestmark = pytest.mark.anyio

MB = 1024 * 1024
SHOP = {"Authorization": "Bearer pk_shop"}
SECRET = {"Authorization": "Bearer sk_shop"}
BLOG = {"Authorization": "Bearer pk_blog"}
UNAUTHORIZED = {"status": "error", "error": "Authorization error.", "code": 1000}
ORIGIN = "https://app.example"
ENDPOINTS = ("alias", "identify", "devices", "events")
# How a detail names the "anonymous_id or external_id" problem: either id
# may carry it.
EITHER = "anonymous_id|external_id"
DEVICE_KEYS = {"device_id", "token", "os", "os_version", "model", "app_build", "app_version"}


def device(device_id: str = "d1", **fields: Any) -> dict[str, Any]:
    body = {
        "device_id": device_id,
        "token": "45d2e0c7bbb649679723a96d92d0fa30",
        "os": "iOS",
        "os_version": "17.2",
        "model": "iPhone15,2",
        "app_build": "465",
        "app_version": "1.2.4",
    }
    return {**body, **fields}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


def event(name: str = "Viewed", **fields: Any) -> dict[str, Any]:
    return {"name": name, **fields}


# One valid body per endpoint, all about the person a1 -> u1.
VALID: dict[str, Any] = {
    "alias": {"anonymous_id": "a1", "external_id": "u1"},
    "identify": {"external_id": "u1", "email": "ada@example.com", "data": {"plan": "pro"}},
    "devices": device(external_id="u1"),
    "events": [event("Bought", anonymous_id="a1", data={"sku": "x"})],
}


async def post(
    client: httpx.AsyncClient, endpoint: str, body: Any, headers: dict[str, str] = SHOP
) -> httpx.Response:
    # Encoded here rather than with `json=`, which sends no body at all for None.
    return await client.post(f"/api/client/{endpoint}", headers=headers, content=msgspec.json.encode(body))


def assert_no_content(reply: httpx.Response) -> None:
    assert reply.status_code == 204, reply.text
    assert reply.content == b""


async def ok(client: httpx.AsyncClient, endpoint: str, body: Any, headers: dict[str, str] = SHOP) -> None:
    assert_no_content(await post(client, endpoint, body, headers))


def where(problem: str) -> str:
    """The path a detail names (the text before its first colon)."""
    path, sep, what = problem.partition(":")
    assert sep and what.strip(), problem
    head, _, last = path.rpartition("/")
    if "anonymous_id" in what and "external_id" in what and last in ("anonymous_id", "external_id"):
        return f"{head}/{EITHER}" if head else EITHER
    return path


def assert_error(reply: httpx.Response, status: int, *paths: str, case: str = "") -> list[str]:
    """The client API's error shape; with `paths`, exactly those problems."""
    assert reply.status_code == status, (case, reply.text)
    body = reply.json()
    assert set(body) == {"status", "error", "details"}, (case, body)
    assert body["status"] == "error"
    details = body["details"]
    assert type(details) is list and details, (case, body)
    assert all(type(d) is str and d for d in details), (case, body)
    assert body["error"] == details[0], (case, body)
    if paths:
        assert sorted(where(d) for d in details) == sorted(paths), (case, details)
    return details


async def names_of(client: httpx.AsyncClient, project: str = "shop", **params: str) -> list[str]:
    return [e["name"] for e in await events_of(client, project, **params)]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- success ------------------------------------------------------------------------


async def test_every_endpoint_answers_204_with_an_empty_body_once_stored(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for endpoint in ("events", "alias", "identify", "devices"):
            assert_no_content(await post(client, endpoint, VALID[endpoint]))
        assert await names_of(client, distinct_id="u1") == ["Bought"]
        found = await profile_of(client, "a1")
        assert found is not None
        assert (found["distinct_id"], found["ids"]) == ("u1", ["u1", "a1"])
        assert found["properties"] == {"$email": "ada@example.com", "plan": "pro"}
        assert [d["device_id"] for d in found["devices"]] == ["d1"]


async def test_json_is_parsed_whatever_the_content_type(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        body = b'[{"name":"Beacon","external_id":"u1"}]'
        for content_type in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None):
            headers = {**SHOP, "Content-Type": content_type} if content_type else SHOP
            assert_no_content(await client.post("/api/client/events", headers=headers, content=body))
        assert await names_of(client) == ["Beacon"] * 3


# -- credentials ----------------------------------------------------------------------

BAD_CREDENTIALS = [
    ("missing", {}),
    ("empty", {"Authorization": ""}),
    ("basic-scheme", {"Authorization": "Basic pk_shop"}),
    ("basic-base64", {"Authorization": "Basic cGtfc2hvcDo="}),
    ("bearer-without-key", {"Authorization": "Bearer"}),
    ("bearer-blank-key", {"Authorization": "Bearer   "}),
    ("no-scheme", {"Authorization": "pk_shop"}),
    ("token-scheme", {"Authorization": "Token pk_shop"}),
    ("unknown-key", {"Authorization": "Bearer pk_nope"}),
    ("key-is-case-sensitive", {"Authorization": "Bearer PK_SHOP"}),
    ("cohorly-token", {"Authorization": "Bearer tok_shop"}),
    ("admin-key", {"Authorization": "Bearer adm_test_key"}),
    ("cohorly-header", {"X-Cohorly-Token": "tok_shop"}),
]


async def test_missing_malformed_or_unknown_key_is_401_and_nothing_is_stored(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for case, headers in BAD_CREDENTIALS:
            for endpoint in ENDPOINTS:
                reply = await post(client, endpoint, VALID[endpoint], headers)
                assert (reply.status_code, reply.json()) == (401, UNAUTHORIZED), (case, endpoint)
        for project in ("shop", "blog"):
            assert await events_of(client, project) == []
            assert await profile_of(client, "u1", project) is None
            assert await profile_of(client, "a1", project) is None
        assert await rejections_of(client) == []


async def test_scheme_is_case_insensitive_and_secret_keys_work(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for i, auth in enumerate(("bearer pk_shop", "BEARER pk_shop", "Bearer sk_shop", "bEaReR sk_shop")):
            await ok(client, "events", [event(f"E{i}", external_id="u1")], {"Authorization": auth})
        await ok(client, "identify", {"external_id": "u1", "locale": "en"}, SECRET)
        await ok(client, "devices", device(external_id="u1"), SECRET)
        await ok(client, "alias", {"anonymous_id": "a1", "external_id": "u1"}, SECRET)
        assert await names_of(client) == ["E0", "E1", "E2", "E3"]
        found = await profile_of(client, "a1")
        assert (found["distinct_id"], found["properties"]) == ("u1", {"$locale": "en"})
        assert len(found["devices"]) == 1
        assert await events_of(client, "blog") == []


async def test_blog_credentials_never_write_into_shop(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "identify", {"external_id": "u1", "data": {"site": "shop"}})
        await ok(client, "devices", device("d1", external_id="u1"))
        await ok(client, "events", [event("Shop", external_id="u1")])

        await ok(client, "alias", {"anonymous_id": "a1", "external_id": "u1"}, BLOG)
        await ok(client, "identify", {"anonymous_id": "a1", "data": {"site": "blog"}}, BLOG)
        await ok(client, "devices", device("d1", token="blog-token", external_id="u9"), BLOG)
        await ok(client, "events", [event("Blog", anonymous_id="a1", external_id="u1")], BLOG)
        # A link the blog could not make is the blog's rejection.
        await ok(client, "alias", {"anonymous_id": "a1", "external_id": "other"}, BLOG)

        shop = await profile_of(client, "u1")
        assert (shop["ids"], shop["properties"]) == (["u1"], {"site": "shop"})
        assert [(d["device_id"], d["token"]) for d in shop["devices"]] == [
            ("d1", "45d2e0c7bbb649679723a96d92d0fa30")
        ]
        assert await profile_of(client, "a1") is None
        assert await profile_of(client, "u9") is None
        assert await names_of(client) == ["Shop"]

        blog = await profile_of(client, "a1", "blog")
        assert (blog["distinct_id"], blog["ids"], blog["properties"]) == (
            "u1",
            ["u1", "a1"],
            {"site": "blog"},
        )
        assert [
            (d["device_id"], d["token"]) for d in (await profile_of(client, "u9", "blog"))["devices"]
        ] == [("d1", "blog-token")]
        assert [(e["name"], e["project"]) for e in await events_of(client, "blog")] == [("Blog", "blog")]
        assert await rejections_of(client, project="shop") == []
        assert [r["reason"] for r in await rejections_of(client, project="blog")] == ["alias_conflict"]


# -- error shapes ----------------------------------------------------------------------


async def test_invalid_body_is_422_with_the_first_problem_and_every_problem_by_path(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        body = [
            {"name": "", "data": 3},
            event("Fine", anonymous_id="a1"),
            {"name": 7, "external_id": "u1", "user": {"timezone": "Mars/Olympus", "email": 5, "age": 3}},
        ]
        details = assert_error(
            await post(client, "events", body),
            422,
            "0/name",
            "0/data",
            f"0/{EITHER}",
            "2/name",
            "2/user/timezone",
            "2/user/email",
            "2/user/age",
        )
        assert details[0].startswith("0/")
        details = assert_error(
            await post(client, "identify", {"email": [], "timezone": "Nowhere/Land", "data": 1, "nick": "x"}),
            422,
            "email",
            "timezone",
            "data",
            "nick",
            EITHER,
        )
        assert await events_of(client) == []
        assert await profile_of(client, "a1") is None and await profile_of(client, "u1") is None


async def test_unparseable_json_is_400_in_the_same_shape(backend) -> None:
    # Deeper than the decoder allows is too deep (422 naming the event), not unparseable.
    nested = b"[" * 5000 + b"]" * 5000
    deep = b'{"anonymous_id":"a1","external_id":"u1","data":{"d":' + nested + b"}}"
    async with gateway(settings_for(backend)) as client:
        for endpoint in ENDPOINTS:
            too_deep = b'[{"name":"E",' + deep[1:] + b"]" if endpoint == "events" else deep
            for body in (
                b'{"name": ',
                b"",
                b"\xff\xfe{}",
                b"{'anonymous_id': 'a1'}",
                b"[1, 2,]",
                b"nul",
            ):
                reply = await client.post(f"/api/client/{endpoint}", headers=SHOP, content=body)
                assert_error(reply, 400, case=f"{endpoint} {body[:20]!r}")
            reply = await client.post(f"/api/client/{endpoint}", headers=SHOP, content=too_deep)
            where = "0" if endpoint == "events" else "body"
            assert_error(reply, 422, where, case=endpoint)
        assert await events_of(client) == []
        assert await profile_of(client, "u1") is None


PADDED = {
    "alias": b'{"anonymous_id":"a-alias","external_id":"u-alias","pad":"%s"}',
    "identify": b'{"external_id":"u-identify","data":{"pad":"%s"}}',
    "devices": b'{"external_id":"u-devices","device_id":"d1","os":"iOS","model":"M","app_build":"1",'
    b'"app_version":"1","pad":"%s"}',
    "events": b'[{"name":"Big","external_id":"u-events","data":{"pad":"%s"}}]',
}


def padded(endpoint: str, size: int) -> bytes:
    """A valid body for `endpoint` of exactly `size` bytes, about the person u-<endpoint>."""
    template = PADDED[endpoint]
    return template % (b"x" * (size - len(template % b"")))


@functools.cache
def bomb(endpoint: str) -> bytes:
    """A gzip bomb: a few KB on the wire, 16 MB inflated."""
    return gzip.compress(padded(endpoint, 16 * MB), compresslevel=9)


async def chunks(body: bytes):
    for start in range(0, len(body), 64 * 1024):
        yield body[start : start + 64 * 1024]


async def test_body_over_1_mb_is_413_compressed_or_not(backend) -> None:
    gz = {**SHOP, "Content-Encoding": "gzip"}
    async with gateway(settings_for(backend)) as client:
        # The alias body is seen through a1's profile, which an event creates.
        await ok(client, "events", [event("Anon", anonymous_id="a-alias")])
        for endpoint in ENDPOINTS:
            url = f"/api/client/{endpoint}"
            over = padded(endpoint, MB + 1)
            assert len(bomb(endpoint)) < 64 * 1024
            for case, headers, body in (
                ("plain", SHOP, over),
                # Streamed without a Content-Length: refused while reading.
                ("streamed", SHOP, chunks(over)),
                ("gzip", gz, gzip.compress(over, compresslevel=1)),
                ("bomb", gz, bomb(endpoint)),
            ):
                assert_error(
                    await client.post(url, headers=headers, content=body), 413, case=f"{endpoint} {case}"
                )
        assert await names_of(client) == ["Anon"]
        for endpoint in ENDPOINTS:
            assert await profile_of(client, f"u-{endpoint}") is None, endpoint

        for endpoint in ENDPOINTS:
            exact = padded(endpoint, MB)
            assert len(exact) == MB
            headers, body = (gz, gzip.compress(exact)) if endpoint in ("alias", "events") else (SHOP, exact)
            assert_no_content(await client.post(f"/api/client/{endpoint}", headers=headers, content=body))
            assert await profile_of(client, f"u-{endpoint}") is not None, endpoint
        assert await names_of(client) == ["Anon", "Big"]


async def test_corrupt_gzip_or_unknown_encoding_is_400(backend) -> None:
    body = b'[{"name":"E","external_id":"u1"}]'
    async with gateway(settings_for(backend)) as client:
        for encoding, sent in (
            ("gzip", b"not gzip at all"),
            ("gzip", gzip.compress(body)[:-6]),
            ("gzip", gzip.compress(body) + b"trailing"),
            ("br", body),
            ("deflate2", body),
        ):
            headers = {**SHOP, "Content-Encoding": encoding}
            reply = await client.post("/api/client/events", headers=headers, content=sent)
            assert_error(reply, 400, case=f"{encoding} {sent[:12]!r}")
        assert await events_of(client) == []
        for encoding in ("gzip", "x-gzip", "GZIP"):
            headers = {**SHOP, "Content-Encoding": encoding}
            zipped = body.replace(b"E", encoding.encode())
            assert_no_content(
                await client.post("/api/client/events", headers=headers, content=gzip.compress(zipped))
            )
        assert await names_of(client) == ["gzip", "x-gzip", "GZIP"]


# -- alias -----------------------------------------------------------------------------


async def test_alias_links_the_anonymous_id_to_the_external_id(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "events", [event("A", anonymous_id="a1"), event("U", external_id="u1")])
        assert await names_of(client, distinct_id="u1") == ["U"]
        # Extra keys are ignored.
        await ok(client, "alias", {"anonymous_id": "a1", "external_id": "u1", "sdk_version": "2.3", "at": 1})
        for id_ in ("a1", "u1"):
            assert await names_of(client, distinct_id=id_) == ["A", "U"]
        found = await profile_of(client, "a1")
        assert (found["distinct_id"], found["ids"]) == ("u1", ["u1", "a1"])
        # The same link again is fine and records nothing.
        await ok(client, "alias", {"anonymous_id": "a1", "external_id": "u1"})
        # So is an id linked to itself.
        await ok(client, "alias", {"anonymous_id": "u1", "external_id": "u1"})
        assert await rejections_of(client) == []
        await ok(client, "events", [event("Later", anonymous_id="a1")])
        assert await names_of(client, distinct_id="u1") == ["A", "U", "Later"]


async def test_alias_only_once_a_second_link_changes_nothing_and_is_quarantined(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "events", [event("A", anonymous_id="a1"), event("U2", external_id="u2")])
        await ok(client, "alias", {"anonymous_id": "a1", "external_id": "u1"})
        await ok(client, "alias", {"anonymous_id": "a1", "external_id": "u2"})
        assert await names_of(client, distinct_id="u1") == ["A"]
        assert await names_of(client, distinct_id="u2") == ["U2"]
        assert (await profile_of(client, "a1"))["distinct_id"] == "u1"
        assert (await profile_of(client, "u2"))["ids"] == ["u2"]
        [rejection] = await rejections_of(client, project="shop")
        assert (rejection["project"], rejection["source"], rejection["reason"]) == (
            "shop",
            "client",
            "alias_conflict",
        )
        assert "a1" in rejection["detail"] and "u2" in rejection["detail"]

        # A link back to the anonymous id would make a cycle: also 204, also quarantined.
        await ok(client, "alias", {"anonymous_id": "u1", "external_id": "a1"})
        assert (await profile_of(client, "u1"))["ids"] == ["u1", "a1"]
        reasons = [r["reason"] for r in await rejections_of(client, project="shop", source="client")]
        assert reasons == ["alias_conflict", "alias_cycle"]
        assert [r["reason"] for r in await rejections_of(client, reason="alias_conflict")] == [
            "alias_conflict"
        ]


BAD_ALIASES = [
    ("empty", {}, ("anonymous_id", "external_id")),
    ("anonymous_id-missing", {"external_id": "u1"}, ("anonymous_id",)),
    ("external_id-missing", {"anonymous_id": "a1"}, ("external_id",)),
    ("anonymous_id-null", {"anonymous_id": None, "external_id": "u1"}, ("anonymous_id",)),
    ("external_id-null", {"anonymous_id": "a1", "external_id": None}, ("external_id",)),
    ("anonymous_id-number", {"anonymous_id": 5, "external_id": "u1"}, ("anonymous_id",)),
    ("external_id-list", {"anonymous_id": "a1", "external_id": ["u1"]}, ("external_id",)),
    ("array", [{"anonymous_id": "a1", "external_id": "u1"}], ()),
    ("string", "a1", ()),
    ("null", None, ()),
]


async def test_invalid_alias_is_422_and_links_nothing(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "events", [event("A", anonymous_id="a1"), event("U", external_id="u1")])
        for case, body, paths in BAD_ALIASES:
            assert_error(await post(client, "alias", body), 422, *paths, case=case)
        assert await names_of(client, distinct_id="u1") == ["U"]
        assert await rejections_of(client) == []


# -- identify ------------------------------------------------------------------------


async def test_identify_sets_the_profile_and_links_both_ids(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "events", [event("Before", anonymous_id="a1")])
        body = {
            "anonymous_id": "a1",
            "external_id": "u1",
            "email": "ada@example.com",
            "phone": "+15555550100",
            "timezone": "America/Chicago",
            "locale": "en",
            "data": {"first_name": "Ada", "has_completed_onboarding": True, "prefs": {"a": 1}, "n": 3},
        }
        await ok(client, "identify", body)
        expected = {
            "$email": "ada@example.com",
            "$phone": "+15555550100",
            "$timezone": "America/Chicago",
            "$locale": "en",
            "first_name": "Ada",
            "has_completed_onboarding": True,
            "prefs": {"a": 1},
            "n": 3,
        }
        for id_ in ("a1", "u1"):
            found = await profile_of(client, id_)
            assert (found["distinct_id"], found["ids"], found["properties"]) == ("u1", ["u1", "a1"], expected)
            assert await names_of(client, distinct_id=id_) == ["Before"]
        assert await rejections_of(client) == []


async def test_identify_with_one_id_creates_that_profile(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "identify", {"anonymous_id": "a1"})
        await ok(client, "identify", {"external_id": "u1", "locale": "de"})
        assert (await profile_of(client, "a1"))["properties"] == {}
        assert (await profile_of(client, "u1"))["properties"] == {"$locale": "de"}
        assert (await profile_of(client, "u1"))["ids"] == ["u1"]


async def test_identify_is_a_shallow_merge(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(
            client,
            "identify",
            {
                "external_id": "u1",
                "email": "ada@example.com",
                "phone": "+15555550100",
                "timezone": "Europe/Berlin",
                "locale": "de",
                "data": {"plan": "free", "prefs": {"a": 1, "b": 2}, "name": "Ada", "gone": 1},
            },
        )
        # Top-level keys overwrite (no deep merge), an explicit null clears,
        # an omitted key keeps; `email: null` clears $email.
        await ok(
            client,
            "identify",
            {"external_id": "u1", "email": None, "data": {"plan": "pro", "prefs": {"c": 3}, "gone": None}},
        )
        assert await props_of(client, "u1") == {
            "$phone": "+15555550100",
            "$timezone": "Europe/Berlin",
            "$locale": "de",
            "plan": "pro",
            "prefs": {"c": 3},
            "name": "Ada",
        }
        # `data: null` changes nothing, `data: {}` neither.
        await ok(client, "identify", {"external_id": "u1", "locale": "fr", "data": None})
        await ok(client, "identify", {"external_id": "u1", "data": {}})
        expected = {
            "$phone": "+15555550100",
            "$timezone": "Europe/Berlin",
            "$locale": "fr",
            "plan": "pro",
            "prefs": {"c": 3},
            "name": "Ada",
        }
        assert await props_of(client, "u1") == expected
        # Every trait null clears every trait; data keys stay.
        await ok(
            client,
            "identify",
            {
                "external_id": "u1",
                "email": None,
                "phone": None,
                "timezone": None,
                "locale": None,
                "data": None,
            },
        )
        assert await props_of(client, "u1") == {"plan": "pro", "prefs": {"c": 3}, "name": "Ada"}


async def test_identify_accepts_every_valid_iana_zone(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for zone in ("UTC", "America/Chicago", "Asia/Kolkata", "America/Argentina/Buenos_Aires", "Etc/GMT+5"):
            await ok(client, "identify", {"external_id": "u1", "timezone": zone})
            assert await props_of(client, "u1") == {"$timezone": zone}


BAD_IDENTIFIES = [
    ("unknown-key", {"external_id": "u1", "name": "Ada"}, ("name",)),
    ("unknown-key-null", {"external_id": "u1", "user_id": None}, ("user_id",)),
    ("no-id", {}, (EITHER,)),
    ("traits-without-id", {"email": "ada@example.com"}, (EITHER,)),
    ("both-ids-null", {"anonymous_id": None, "external_id": None}, (EITHER,)),
    ("external_id-number", {"external_id": 42}, ("external_id",)),
    ("anonymous_id-list", {"anonymous_id": ["a1"]}, ("anonymous_id",)),
    ("timezone-unknown", {"external_id": "u1", "timezone": "Mars/Olympus"}, ("timezone",)),
    ("timezone-offset", {"external_id": "u1", "timezone": "CST -6"}, ("timezone",)),
    ("timezone-empty", {"external_id": "u1", "timezone": ""}, ("timezone",)),
    ("timezone-number", {"external_id": "u1", "timezone": -6}, ("timezone",)),
    ("data-list", {"external_id": "u1", "data": ["plan"]}, ("data",)),
    ("data-string", {"external_id": "u1", "data": "plan=pro"}, ("data",)),
    ("email-number", {"external_id": "u1", "email": 5}, ("email",)),
    ("phone-object", {"external_id": "u1", "phone": {"n": 1}}, ("phone",)),
    ("locale-bool", {"external_id": "u1", "locale": True}, ("locale",)),
    ("array", [{"external_id": "u1"}], ()),
]


async def test_invalid_identify_is_422_and_changes_nothing(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for case, body, paths in BAD_IDENTIFIES:
            assert_error(await post(client, "identify", body), 422, *paths, case=case)
        assert await profile_of(client, "u1") is None
        assert await profile_of(client, "a1") is None
        assert await rejections_of(client) == []


# -- devices ---------------------------------------------------------------------------


async def test_devices_register_and_create_the_profile(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "devices", device("d1", external_id="u1", sdk_version="2.3.1", platform="ios"))
        await ok(client, "devices", device("d2", anonymous_id="a2", token=None, os_version=None))
        minimal = without(without(device("d3", anonymous_id="a3"), "token"), "os_version")
        await ok(client, "devices", minimal)

        found = await profile_of(client, "u1")
        assert (found["properties"], found["ids"]) == ({}, ["u1"])
        assert found["devices"] == [
            {
                "device_id": "d1",
                "token": "45d2e0c7bbb649679723a96d92d0fa30",
                "os": "iOS",
                "os_version": "17.2",
                "model": "iPhone15,2",
                "app_build": "465",
                "app_version": "1.2.4",
            }
        ]
        for id_, device_id in (("a2", "d2"), ("a3", "d3")):
            [stored] = (await profile_of(client, id_))["devices"]
            assert set(stored) == DEVICE_KEYS
            assert (stored["device_id"], stored["token"], stored["os_version"]) == (device_id, None, None)


async def test_device_is_upserted_by_id_and_moves_to_the_last_person(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "devices", device("d1", external_id="u1", token=None, app_version="1.0"))
        await ok(client, "devices", device("d1", external_id="u1", token="t-1", app_version="1.1"))
        [stored] = (await profile_of(client, "u1"))["devices"]
        assert (stored["token"], stored["app_version"]) == ("t-1", "1.1")

        await ok(client, "devices", device("d1", external_id="u2", token="t-2", os_version="17.3"))
        assert (await profile_of(client, "u1"))["devices"] == []
        [moved] = (await profile_of(client, "u2"))["devices"]
        assert (moved["device_id"], moved["token"], moved["os_version"]) == ("d1", "t-2", "17.3")
        # Another device of u1 stays where it is.
        await ok(client, "devices", device("d2", external_id="u1"))
        assert [d["device_id"] for d in (await profile_of(client, "u1"))["devices"]] == ["d2"]
        assert [d["device_id"] for d in (await profile_of(client, "u2"))["devices"]] == ["d1"]


async def test_device_with_both_ids_links_them(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "devices", device("d1", anonymous_id="a1"))
        await ok(client, "identify", {"anonymous_id": "a1", "data": {"ref": "ad"}})
        await ok(client, "devices", device("d2", anonymous_id="a1", external_id="u1"))
        found = await profile_of(client, "a1")
        assert (found["distinct_id"], found["ids"], found["properties"]) == (
            "u1",
            ["u1", "a1"],
            {"ref": "ad"},
        )
        assert [d["device_id"] for d in found["devices"]] == ["d1", "d2"]


BAD_DEVICES = [
    *[
        (f"{key}-missing", without(device(external_id="u1"), key), (key,))
        for key in ("device_id", "os", "model", "app_build", "app_version")
    ],
    ("device_id-null", device(external_id="u1", device_id=None), ("device_id",)),
    ("os-null", device(external_id="u1", os=None), ("os",)),
    ("app_build-number", device(external_id="u1", app_build=465), ("app_build",)),
    ("app_version-number", device(external_id="u1", app_version=1.2), ("app_version",)),
    ("token-number", device(external_id="u1", token=12345), ("token",)),
    ("os_version-number", device(external_id="u1", os_version=17), ("os_version",)),
    ("no-id", device(), (EITHER,)),
    ("both-ids-null", device(anonymous_id=None, external_id=None), (EITHER,)),
    (
        "every-required-field-missing",
        {"external_id": "u1"},
        ("device_id", "os", "model", "app_build", "app_version"),
    ),
    ("array", [device(external_id="u1")], ()),
]


async def test_invalid_device_is_422_and_stores_nothing(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for case, body, paths in BAD_DEVICES:
            assert_error(await post(client, "devices", body), 422, *paths, case=case)
        assert await profile_of(client, "u1") is None
        assert await profile_of(client, "a1") is None
        assert await rejections_of(client) == []


# -- events ---------------------------------------------------------------------------


async def test_stored_event_shape(backend) -> None:
    async with gateway(settings_for(backend), client_ip="198.51.100.7") as client:
        before = now_ms()
        reply = await client.post(
            "/api/client/events",
            headers={**SHOP, "User-Agent": "ShopApp/465 CFNetwork/1494.0.7"},
            json=[
                event(
                    "Product Purchased",
                    anonymous_id="a1",
                    external_id="u1",
                    data={"product_id": 12345, "price": 49.99, "quantity": 4, "$lib": "ios"},
                ),
                event("Anonymous", anonymous_id="a2"),
                event("Known", external_id="u2"),
            ],
        )
        after = now_ms()
        assert_no_content(reply)
        stored = await events_of(client)
        assert len(stored) == 3
        for e in stored:
            assert before <= e["received_at"] <= after
            # No time field here: the time is the receipt time.
            assert e["time"] == e["received_at"]
            e.pop("id")
            e.pop("time")
            e.pop("received_at")
        common = {
            "project": "shop",
            "source": "client",
            "insert_id": None,
            "session_id": None,
            "context": {"ip": "198.51.100.7", "user_agent": "ShopApp/465 CFNetwork/1494.0.7"},
            "consent": None,
        }
        assert stored == [
            {
                **common,
                "name": "Product Purchased",
                "distinct_id": "u1",
                "anonymous_id": "a1",
                "user_id": "u1",
                "properties": {"product_id": 12345, "price": 49.99, "quantity": 4, "$lib": "ios"},
            },
            {
                **common,
                "name": "Anonymous",
                "distinct_id": "a2",
                "anonymous_id": "a2",
                "user_id": None,
                "properties": {},
            },
            {
                **common,
                "name": "Known",
                "distinct_id": "u2",
                "anonymous_id": None,
                "user_id": "u2",
                "properties": {},
            },
        ]
        assert len(await events_of(client, source="client")) == 3


async def test_event_data_and_its_properties_synonym(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(
            client,
            "events",
            [
                event("Data", external_id="u1", data={"k": 1}),
                event("DataNull", external_id="u1", data=None),
                event("Absent", external_id="u1"),
                event("Properties", external_id="u1", properties={"screen": "Home"}),
                event("PropertiesNull", external_id="u1", properties=None),
                event("DataNullProperties", external_id="u1", data=None, properties={"p": 2}),
                event("Both", external_id="u1", data={"d": 1}, properties={"p": 1}),
                # Extra keys are ignored, a time among them.
                event("Extra", external_id="u1", data={"e": 1}, time=1, timestamp="2020", sdk_version="2.3"),
            ],
        )
        stored = {e["name"]: e for e in await events_of(client)}
        assert {name: e["properties"] for name, e in stored.items()} == {
            "Data": {"k": 1},
            "DataNull": {},
            "Absent": {},
            "Properties": {"screen": "Home"},
            "PropertiesNull": {},
            "DataNullProperties": {"p": 2},
            "Both": {"d": 1},
            "Extra": {"e": 1},
        }
        assert stored["Extra"]["time"] == stored["Extra"]["received_at"] > 1


async def test_an_event_touches_the_profile_and_links_both_ids(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "events", [event("First", anonymous_id="a1")])
        found = await profile_of(client, "a1")
        assert (found["distinct_id"], found["properties"], found["ids"]) == ("a1", {}, ["a1"])
        await ok(client, "events", [event("Second", anonymous_id="a1", external_id="u1")])
        for id_ in ("a1", "u1"):
            found = await profile_of(client, id_)
            assert (found["distinct_id"], found["ids"]) == ("u1", ["u1", "a1"])
            assert await names_of(client, distinct_id=id_) == ["First", "Second"]
        assert await rejections_of(client) == []


async def test_event_user_block_updates_the_profile_like_identify(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        user = {
            "email": "ada@example.com",
            "timezone": "Europe/Paris",
            "locale": "fr",
            "data": {"plan": "free", "x": 1},
        }
        await ok(client, "events", [event("A", external_id="u1", user=user)])
        assert await props_of(client, "u1") == {
            "$email": "ada@example.com",
            "$timezone": "Europe/Paris",
            "$locale": "fr",
            "plan": "free",
            "x": 1,
        }
        await ok(
            client,
            "events",
            [
                event(
                    "B",
                    external_id="u1",
                    user={"email": None, "phone": "+331", "data": {"plan": "pro", "x": None}},
                ),
                event("C", external_id="u1", user=None),
                event("D", external_id="u1", user={}),
                event("E", external_id="u1", user={"data": None}),
            ],
        )
        assert await props_of(client, "u1") == {
            "$phone": "+331",
            "$timezone": "Europe/Paris",
            "$locale": "fr",
            "plan": "pro",
        }
        assert await names_of(client) == ["A", "B", "C", "D", "E"]


async def test_events_have_no_idempotency_key(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        body = [event("Same", external_id="u1", data={"k": 1}, insert_id="x", **{"$insert_id": "x"})]
        await ok(client, "events", body)
        await ok(client, "events", body)
        stored = await events_of(client)
        assert [(e["name"], e["insert_id"]) for e in stored] == [("Same", None), ("Same", None)]


async def test_links_that_cannot_be_made_do_not_fail_the_request(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "identify", {"external_id": "u1"})
        await ok(client, "alias", {"anonymous_id": "a1", "external_id": "u1"})
        await ok(client, "events", [event("Other", anonymous_id="a1", external_id="u2", data={"k": 1})])
        await ok(client, "identify", {"anonymous_id": "a1", "external_id": "u3", "locale": "en"})
        await ok(client, "devices", device("d1", anonymous_id="a1", external_id="u4"))
        [stored] = await events_of(client)
        assert (stored["distinct_id"], stored["anonymous_id"], stored["user_id"]) == ("u2", "a1", "u2")
        assert await names_of(client, distinct_id="u2") == ["Other"]
        assert await names_of(client, distinct_id="u1") == []
        # The records still belong to the external id; a1 stays with u1.
        assert (await profile_of(client, "u3"))["properties"] == {"$locale": "en"}
        assert [d["device_id"] for d in (await profile_of(client, "u4"))["devices"]] == ["d1"]
        for id_ in ("u2", "u3", "u4"):
            assert (await profile_of(client, id_))["ids"] == [id_]
        assert (await profile_of(client, "a1"))["ids"] == ["u1", "a1"]
        found = await rejections_of(client, project="shop", reason="alias_conflict")
        assert [(r["source"], r["reason"]) for r in found] == [("client", "alias_conflict")] * 3


GOOD_FIRST = event("Good", anonymous_id="a1", data={"k": 1})
GOOD_LAST = event("Good2", anonymous_id="a1", external_id="u1", user={"email": "x@example.com"})

BAD_ITEMS = [
    ("name-missing", {"anonymous_id": "a2"}, ("1/name",)),
    ("name-empty", event("", anonymous_id="a2"), ("1/name",)),
    ("name-null", event(None, anonymous_id="a2"), ("1/name",)),
    ("name-number", event(5, anonymous_id="a2"), ("1/name",)),
    ("no-id", event("E"), (f"1/{EITHER}",)),
    ("both-ids-null", event("E", anonymous_id=None, external_id=None), (f"1/{EITHER}",)),
    ("anonymous_id-number", event("E", anonymous_id=7), ("1/anonymous_id",)),
    ("external_id-list", event("E", external_id=["u1"]), ("1/external_id",)),
    ("data-list", event("E", anonymous_id="a2", data=[1]), ("1/data",)),
    ("data-string", event("E", anonymous_id="a2", data="k=1"), ("1/data",)),
    ("properties-list", event("E", anonymous_id="a2", properties=[1]), ("1/properties",)),
    ("user-string", event("E", anonymous_id="a2", user="u1"), ("1/user",)),
    ("user-timezone", event("E", anonymous_id="a2", user={"timezone": "Mars/Olympus"}), ("1/user/timezone",)),
    ("user-email-number", event("E", anonymous_id="a2", user={"email": 5}), ("1/user/email",)),
    ("user-data-list", event("E", anonymous_id="a2", user={"data": [1]}), ("1/user/data",)),
    ("user-unknown-key", event("E", anonymous_id="a2", user={"external_id": "u9"}), ("1/user/external_id",)),
    ("item-string", "Viewed", ("1",)),
    ("item-null", None, ("1",)),
    ("three-problems", {"name": "", "data": 3}, ("1/name", "1/data", f"1/{EITHER}")),
]


async def test_one_invalid_item_rejects_the_whole_request(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for case, item, paths in BAD_ITEMS:
            assert_error(await post(client, "events", [GOOD_FIRST, item, GOOD_LAST]), 422, *paths, case=case)
        assert await events_of(client) == []
        assert await rejections_of(client) == []
        assert await profile_of(client, "a1") is None
        assert await profile_of(client, "u1") is None


async def test_events_body_must_be_a_non_empty_array(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for case, body in (
            ("single-object", event("Single", anonymous_id="a1")),
            ("empty-array", []),
            ("wrapped", {"events": [event("Wrapped", anonymous_id="a1")]}),
            ("null", None),
            ("string", "Viewed"),
        ):
            assert_error(await post(client, "events", body), 422, case=case)
        assert await events_of(client) == []
        assert await profile_of(client, "a1") is None


async def test_client_ip_is_the_peer_or_a_trusted_proxys_forwarded_for(backend) -> None:
    forwarded = {**SHOP, "X-Forwarded-For": "203.0.113.9"}
    trusting = settings_for(backend, server={"trusted_proxies": ["10.0.0.0/8"]})
    async with gateway(trusting, client_ip="10.1.2.3") as client:
        await ok(client, "events", [event("Proxied", anonymous_id="a1")], forwarded)
    async with gateway(settings_for(backend), client_ip="192.0.2.5") as client:
        await ok(client, "events", [event("Direct", anonymous_id="a1")], forwarded)
        stored = await events_of(client)
        assert [(e["name"], e["context"]["ip"]) for e in stored] == [
            ("Proxied", "203.0.113.9"),
            ("Direct", "192.0.2.5"),
        ]


# -- nulls, NUL, paths, CORS -----------------------------------------------------------------


async def test_every_optional_field_accepts_an_explicit_null(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "alias", {"anonymous_id": "a1", "external_id": "u1", "created_at": None})
        await ok(
            client,
            "identify",
            {
                "anonymous_id": None,
                "external_id": "u1",
                "email": None,
                "phone": None,
                "timezone": None,
                "locale": None,
                "data": None,
            },
        )
        await ok(
            client,
            "identify",
            {
                "anonymous_id": "a2",
                "external_id": None,
                "email": "b@example.com",
                "phone": None,
                "data": None,
            },
        )
        await ok(
            client, "devices", device("d1", anonymous_id=None, external_id="u1", token=None, os_version=None)
        )
        await ok(
            client,
            "events",
            [
                event("E", anonymous_id=None, external_id="u1", data=None, properties=None, user=None),
                event(
                    "F",
                    anonymous_id="a2",
                    external_id=None,
                    user={"email": None, "phone": None, "timezone": None, "locale": None, "data": None},
                ),
            ],
        )
        assert [(e["name"], e["distinct_id"], e["properties"]) for e in await events_of(client)] == [
            ("E", "u1", {}),
            ("F", "a2", {}),
        ]
        found = await profile_of(client, "a1")
        assert (found["distinct_id"], found["properties"]) == ("u1", {})
        [stored] = found["devices"]
        assert (stored["token"], stored["os_version"]) == (None, None)
        assert await props_of(client, "a2") == {}


async def test_nul_characters_in_ids_and_traits_are_stored_as_replacement(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(
            client,
            "identify",
            {"external_id": "u\u00001", "email": "a\u0000b", "data": {"k\u0000": "v\u0000"}},
        )
        await ok(client, "events", [event("N\u0000", external_id="u\u00001", data={"c": "x\u0000y"})])
        assert await props_of(client, "u\ufffd1") == {"$email": "a\ufffdb", "k\ufffd": "v\ufffd"}
        [stored] = await events_of(client)
        assert (stored["name"], stored["distinct_id"], stored["properties"]) == (
            "N\ufffd",
            "u\ufffd1",
            {"c": "x\ufffdy"},
        )


async def test_nul_characters_in_device_fields_are_stored_as_replacement(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        body = device(
            "d\u00001",
            external_id="u1",
            token="t\u0000",
            os="iOS\u0000",
            os_version="17\u0000",
            model="iPhone\u0000",
            app_build="4\u00006",
            app_version="1\u0000",
        )
        await ok(client, "devices", body)
        [stored] = (await profile_of(client, "u1"))["devices"]
        assert stored == {
            "device_id": "d\ufffd1",
            "token": "t\ufffd",
            "os": "iOS\ufffd",
            "os_version": "17\ufffd",
            "model": "iPhone\ufffd",
            "app_build": "4\ufffd6",
            "app_version": "1\ufffd",
        }


async def test_trailing_slashes_unknown_paths_and_methods(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        await ok(client, "events/", [event("Slash", anonymous_id="a1")])
        await ok(client, "alias/", {"anonymous_id": "a1", "external_id": "u1"})
        await ok(client, "identify/", {"external_id": "u1", "locale": "en"})
        await ok(client, "devices/", device(external_id="u1"))
        assert await names_of(client, distinct_id="u1") == ["Slash"]
        found = await profile_of(client, "a1")
        assert (found["properties"], len(found["devices"])) == ({"$locale": "en"}, 1)
        for path in ("/api/client", "/api/client/track", "/api/client/events/extra", "/api/clients/events"):
            reply = await client.post(path, headers=SHOP, json=[event("Lost", anonymous_id="a1")])
            assert reply.status_code == 404, path
        for endpoint in ENDPOINTS:
            assert (await client.get(f"/api/client/{endpoint}", headers=SHOP)).status_code == 405
        assert (
            await client.put("/api/client/events", headers=SHOP, json=[event("Put", anonymous_id="a1")])
        ).status_code == 405
        assert await names_of(client) == ["Slash"]


async def test_cors_preflight_needs_no_credentials(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        for endpoint in ENDPOINTS:
            for path in (f"/api/client/{endpoint}", f"/api/client/{endpoint}/"):
                reply = await client.options(
                    path,
                    headers={
                        "Origin": ORIGIN,
                        "Access-Control-Request-Method": "POST",
                        "Access-Control-Request-Headers": "authorization,content-type",
                    },
                )
                assert reply.status_code == 204, path
                assert reply.content == b""
                assert reply.headers["access-control-allow-origin"] == ORIGIN
                assert reply.headers["access-control-allow-headers"] == "authorization,content-type"
                assert reply.headers["access-control-allow-credentials"] == "true"
                assert "POST" in reply.headers["access-control-allow-methods"]
        assert await events_of(client) == []


async def test_cors_origin_is_echoed_on_every_response_errors_included(backend) -> None:
    async with gateway(settings_for(backend)) as client:
        cors = {**SHOP, "Origin": ORIGIN}
        replies = [
            await post(client, "events", [event("E", anonymous_id="a1")], cors),
            await post(client, "identify", {"external_id": "u1"}, {"Origin": ORIGIN}),
            await post(client, "alias", {"anonymous_id": "a1"}, cors),
            await client.post("/api/client/devices", headers=cors, content=b"{"),
            await client.post("/api/client/events", headers=cors, content=padded("events", MB + 1)),
            await client.post(
                "/api/client/events", headers={**cors, "Content-Encoding": "br"}, content=b"[]"
            ),
        ]
        assert [r.status_code for r in replies] == [204, 401, 422, 400, 413, 400]
        for reply in replies:
            assert reply.headers["access-control-allow-origin"] == ORIGIN, reply.status_code
            assert reply.headers["access-control-allow-credentials"] == "true", reply.status_code


async def test_ids_longer_than_the_limit_are_refused_on_every_backend(backend) -> None:
    from gateway.model import MAX_ID_BYTES

    async with gateway(settings_for(backend)) as client:
        # 257 four-byte characters: 1,028 bytes, over the limit though short in characters.
        for long_id in ("x" * (MAX_ID_BYTES + 1), "\U00020000" * 257):
            reply = await client.post("/api/client/identify", headers={"Authorization": "Bearer pk_shop"},
                                      json={"external_id": long_id, "email": "a@b.c"})
            assert reply.status_code == 422
            assert reply.json()["error"] == f"distinct_id is longer than {MAX_ID_BYTES} bytes"
        for fits in ("x" * MAX_ID_BYTES, "\U00020000" * 256):
            ok = await client.post("/api/client/identify", headers={"Authorization": "Bearer pk_shop"},
                                   json={"external_id": fits, "email": "a@b.c"})
            assert ok.status_code == 204
