"""Cohorly's adapter alone: SDK-shaped bytes in, canonical records out, no I/O.

The payloads in `payloads/cohorly/` are written from SDKS.md (the shapes the
Python, Node and web SDKs send)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dialects.base import Batch, Failure, Incoming, Outcome
from dialects.cohorly import Cohorly, CohorlyConfig
from gateway.model import Alias, Event, ProfileUpdate

PAYLOADS = Path(__file__).parent / "payloads" / "cohorly"
RECEIVED = 1751600009999
IP = "203.0.113.7"
PYTHON_UA = "Python-urllib/3.11"
FIREFOX_UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14.5; rv:128.0) Gecko/20100101 Firefox/128.0"

dialect = Cohorly(CohorlyConfig(), {"tok_shop": "shop", "tok_blog": "blog"})


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def incoming(endpoint: str, body: bytes | Any, headers: dict[str, str] | None = None) -> Incoming:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return Incoming(
        endpoint=endpoint,
        method="POST",
        headers={k.lower(): v for k, v in (headers or {}).items()},
        query=[],
        body=raw,
        client_ip=IP,
        received_at=RECEIVED,
    )


def records(endpoint: str, body: bytes | Any, headers: dict[str, str] | None = None) -> list[Any]:
    result = dialect.translate(incoming(endpoint, body, headers))
    assert isinstance(result, Batch), result
    assert result.rejections == []
    return result.records


def failure(endpoint: str, body: bytes | Any, headers: dict[str, str] | None = None) -> Failure:
    result = dialect.translate(incoming(endpoint, body, headers))
    assert isinstance(result, Failure), result
    return result


# -- captured SDK payloads ----------------------------------------------------------


def test_python_consumer_event_snapshot() -> None:
    [record] = records("track", payload("python_consumer_track.json"), {"User-Agent": PYTHON_UA})
    assert type(record) is Event
    assert msgspec.structs.asdict(record) == {
        "project": "shop",
        "source": "cohorly",
        "name": "Signed Up",
        "distinct_id": "user_123",
        "time": 1751600000123,
        "received_at": RECEIVED,
        "anonymous_id": None,
        "user_id": None,
        "insert_id": "5f1c0d2a9b8e4c7fa3d2e1b0c9a8f7e6",
        "session_id": None,
        "properties": {
            "$lib": "python",
            "$lib_version": "0.2.0",
            "plan": "pro",
            "seats": 3,
            "trial": False,
            "referrer": None,
            "tags": ["beta", "eu"],
            "billing": {"currency": "EUR", "amount": 49.5},
        },
        "context": {"ip": IP, "user_agent": PYTHON_UA},
        "consent": None,
    }


def test_python_buffered_consumer_batch() -> None:
    events = records("track", payload("python_buffered_track.json"))
    assert [type(e) for e in events] == [Event] * 3
    assert [(e.name, e.distinct_id, e.time) for e in events] == [
        ("Page Viewed", "user_123", 1751600001000),
        ("$feature_flag_called", "user_123", 1751600001005),
        ("Order Imported", "user_456", 1700000000000),
    ]
    for e in events:
        assert (e.project, e.source, e.received_at) == ("shop", "cohorly", RECEIVED)
        assert re.fullmatch(r"[0-9a-f]{32}", e.insert_id)
        assert e.properties["$lib"] == "python" and e.properties["$lib_version"] == "0.2.0"
        assert not {"token", "distinct_id", "time", "$insert_id"} & set(e.properties)
        assert e.context == {"ip": IP}
    assert events[1].properties == {
        "$lib": "python",
        "$lib_version": "0.2.0",
        "$feature_flag": "new-checkout",
        "$feature_flag_response": "variant-b",
    }
    assert len({e.insert_id for e in events}) == 3


def test_node_batch_takes_the_header_token() -> None:
    body = payload("node_track_batch.json")
    events = records("track", body, {"X-Cohorly-Token": "tok_shop"})
    assert [(e.project, e.name, e.insert_id) for e in events] == [
        ("shop", "Checkout Started", "1b4e28ba-2fa1-4d2e-883f-0016d3cca427"),
        ("shop", "Checkout Completed", "6fa459ea-ee8a-4ca4-894e-db77e160355e"),
    ]
    assert events[1].properties == {"revenue": 99.9, "coupon": None}
    assert [e.project for e in records("track", body, {"X-Cohorly-Token": "tok_blog"})] == ["blog", "blog"]
    assert failure("track", body) == Failure(kind="unauthorized", message="invalid token")
    assert failure("track", body, {"X-Cohorly-Token": "tok_other"}).kind == "unauthorized"


def test_web_beacon_event() -> None:
    [e] = records(
        "track",
        payload("web_beacon_track.json"),
        {"Content-Type": "text/plain;charset=UTF-8", "User-Agent": FIREFOX_UA},
    )
    assert (e.project, e.name, e.distinct_id, e.time, e.insert_id) == (
        "shop",
        "Page Viewed",
        "anon_7f3a9c",
        1751600003000,
        "w-1751600003000-4k2j9x",
    )
    assert e.properties == {
        "$browser": "Firefox",
        "$browser_version": 128,
        "$os": "Mac OS X",
        "$current_url": "https://shop.example/pricing?plan=pro",
        "$referrer": "https://www.google.com/",
        "$screen_width": 1440,
        "$screen_height": 900,
        "title": "Pricing",
    }
    assert e.context == {"ip": IP, "user_agent": FIREFOX_UA}


def test_engage_with_several_verbs() -> None:
    [update] = records("engage", payload("python_engage.json"))
    assert update == ProfileUpdate(
        project="shop",
        source="cohorly",
        distinct_id="user_123",
        time=RECEIVED,
        set_once={"first_seen": "2025-07-04"},
        set={"name": "Ada Lovelace", "plan": "pro"},
        add={"logins": 1, "credits": -2.5},
        append={"devices": "iphone"},
        union={"teams": ["eng", "research"]},
        remove={"flags": "legacy"},
        unset=["trial_ends"],
        delete=False,
    )


def test_web_identify_alias() -> None:
    assert records("alias", payload("web_identify_alias.json")) == [
        Alias(project="shop", source="cohorly", alias="anon_7f3a9c", distinct_id="user_123", strict=True)
    ]


# -- rules, at the adapter ------------------------------------------------------------


def test_per_record_token_wins_and_is_dropped() -> None:
    body = [
        {"event": "A", "properties": {"distinct_id": "u1", "token": "tok_blog"}},
        {"event": "B", "properties": {"distinct_id": "u1"}},
    ]
    a, b = records("track", body, {"X-Cohorly-Token": "tok_shop"})
    assert (a.project, b.project) == ("blog", "shop")
    assert a.properties == {} and b.properties == {}
    [op] = records(
        "engage",
        {"token": "tok_blog", "distinct_id": "u1", "$set": {"a": 1}},
        {"X-Cohorly-Token": "tok_shop"},
    )
    assert op.project == "blog"
    [op] = records("engage", {"$token": "tok_blog", "$distinct_id": "u1", "$set": {"a": 1}})
    assert (op.project, op.distinct_id) == ("blog", "u1")
    [link] = records(
        "alias", {"alias": "a", "distinct_id": "u1", "token": "tok_blog"}, {"X-Cohorly-Token": "tok_shop"}
    )
    assert link.project == "blog"


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (
            "track",
            [
                {"event": "A", "properties": {"distinct_id": "u1", "token": "tok_shop"}},
                {"event": "B", "properties": {"distinct_id": "u1"}},
            ],
        ),
        ("track", {"event": "A", "properties": {"distinct_id": "u1", "token": ""}}),
        (
            "engage",
            [
                {"token": "tok_shop", "distinct_id": "u1", "$set": {}},
                {"token": "nope", "distinct_id": "u1", "$set": {}},
            ],
        ),
        ("alias", {"alias": "a", "distinct_id": "u1"}),
    ],
)
def test_a_record_without_a_valid_token_fails_the_request(endpoint, body) -> None:
    assert failure(endpoint, body) == Failure(kind="unauthorized", message="invalid token")


def test_event_time() -> None:
    def time_of(value: Any) -> int:
        props = {"distinct_id": "u1"} if value is ... else {"distinct_id": "u1", "time": value}
        [e] = records("track", {"event": "E", "properties": props}, {"X-Cohorly-Token": "tok_shop"})
        return e.time

    assert time_of(1751600000123) == 1751600000123
    assert time_of(1751600000123.99) == 1751600000123
    assert time_of(...) == RECEIVED
    assert time_of(None) == RECEIVED
    for bad in ("1751600000123", True, -1, 253402300800000, 1e300, {}):
        message = failure(
            "track",
            {"event": "E", "properties": {"distinct_id": "u1", "time": bad}},
            {"X-Cohorly-Token": "tok_shop"},
        ).message
        assert "time" in message, bad


def test_errors_name_the_record_index_in_a_batch_only() -> None:
    good = {"event": "E", "properties": {"distinct_id": "u1"}}
    bad = {"event": "E", "properties": {"distinct_id": ""}}
    headers = {"X-Cohorly-Token": "tok_shop"}
    single = failure("track", bad, headers)
    batched = failure("track", [good, good, good, bad], headers)
    assert single.kind == batched.kind == "bad_request"
    assert "distinct_id" in single.message and "record" not in single.message
    assert batched.message.startswith("record 3") and "distinct_id" in batched.message
    op = failure(
        "engage", [{"distinct_id": "u1", "$set": {}}, {"distinct_id": "u1", "$add": {"n": "1"}}], headers
    )
    assert "record 1" in op.message and "$add" in op.message


@pytest.mark.parametrize("endpoint", ["track", "engage", "alias"])
def test_deeply_nested_json_is_a_bad_request(endpoint) -> None:
    # msgspec raises RecursionError, not DecodeError, past its depth limit.
    nested = b"[" * 5000 + b"]" * 5000
    body = (
        b'{"event":"E","distinct_id":"u1","alias":"a","properties":{"distinct_id":"u1","d":' + nested + b"}}"
    )
    assert failure(endpoint, body, {"X-Cohorly-Token": "tok_shop"}).kind == "bad_request"


def test_batch_bounds() -> None:
    headers = {"X-Cohorly-Token": "tok_shop"}
    event = {"event": "E", "properties": {"distinct_id": "u1"}}
    assert failure("track", [], headers).kind == "bad_request"
    assert failure("track", [event] * 501, headers) == Failure(kind="bad_request", message="batch too large")
    assert len(records("track", [event] * 500, headers)) == 500
    op = {"distinct_id": "u1", "$set": {}}
    assert failure("engage", [op] * 501, headers) == Failure(kind="bad_request", message="batch too large")
    assert len(records("engage", [op] * 500, headers)) == 500


def test_endpoints_and_limit() -> None:
    assert [(e.path, e.name, e.methods, e.max_body, e.ip_limited) for e in dialect.endpoints()] == [
        ("/track", "track", ("POST",), 1024 * 1024, True),
        ("/engage", "engage", ("POST",), 1024 * 1024, True),
        ("/alias", "alias", ("POST",), 1024 * 1024, False),
    ]
    window = dialect.ip_limit()
    assert (window.requests, window.per_seconds) == (100, 10)


# -- rendering --------------------------------------------------------------------------


def render(endpoint: str, result: Outcome | Failure) -> tuple[int, Any, dict[str, str]]:
    reply = dialect.render(incoming(endpoint, b"{}"), result)
    assert reply.content_type == "application/json"
    return reply.status, msgspec.json.decode(reply.body), dict(reply.headers)


def test_render_success() -> None:
    assert render("track", Outcome(inserted=3, duplicates=2)) == (200, {"status": 1, "inserted": 3}, {})
    assert render("engage", Outcome(applied=4)) == (200, {"status": 1, "applied": 4}, {})
    for outcome in ("linked", "exists"):
        assert render("alias", Outcome(aliases=(outcome,))) == (200, {"status": 1}, {})


def test_render_refusals() -> None:
    status, body, _ = render("alias", Outcome(aliases=("conflict",)))
    assert (status, body["status"]) == (400, 0) and "another person" in body["error"]
    status, body, _ = render("alias", Outcome(aliases=("cycle",)))
    assert (status, body["status"]) == (400, 0) and "cycle" in body["error"]
    assert render("track", Failure(kind="unauthorized", message="whatever")) == (
        401,
        {"status": 0, "error": "invalid token"},
        {},
    )
    assert render(
        "track", Failure(kind="bad_request", message="record 2: event must be a non-empty string")
    ) == (
        400,
        {"status": 0, "error": "record 2: event must be a non-empty string"},
        {},
    )
    status, body, _ = render("track", Failure(kind="too_large", message="x"))
    assert (status, body["status"]) == (413, 0)
    assert render("engage", Failure(kind="rate_limited", message="x", retry_after=3))[::2] == (
        429,
        {"retry-after": "3"},
    )
    assert render("engage", Failure(kind="rate_limited", message="x", retry_after=0))[2] == {
        "retry-after": "1"
    }
    assert render("track", Failure(kind="unavailable", message="x", retry_after=5))[::2] == (
        503,
        {"retry-after": "5"},
    )


# -- the /track fast path never disagrees with the general path --------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10, max_value=2**64), st.floats(allow_nan=True),
    st.sampled_from(["", "u1", "tok_shop", "tok_blog", "nope", "x" * 300, "e\u0000"]),
)
_props = st.dictionaries(
    st.sampled_from(["distinct_id", "time", "$insert_id", "token", "plan", "$lib"]),
    st.one_of(_scalars, st.lists(_scalars, max_size=2), st.dictionaries(st.text(max_size=3), _scalars, max_size=2)),
)
_item = st.one_of(
    st.fixed_dictionaries({"event": _scalars, "properties": _props}, optional={"extra": _scalars}),
    st.fixed_dictionaries({}, optional={"event": _scalars, "properties": st.one_of(_props, _scalars)}),
    _scalars,
)


@settings(max_examples=400, deadline=None)
@given(body=st.one_of(_item, st.lists(_item, max_size=4)), header=st.sampled_from([None, "tok_shop", "nope"]))
def test_track_fast_path_agrees_with_the_general_path(body: Any, header: str | None) -> None:
    request = incoming("track", body, {"X-Cohorly-Token": header} if header else None)
    fast = dialect._track_fast(request)
    general = dialect._translate_general(request)
    if isinstance(fast, Batch):
        assert isinstance(general, Batch)
        assert fast.records == general.records
    elif fast is not None:
        assert fast == general == Failure(kind="unauthorized", message="invalid token")
    # Whatever the path, translate answers as the general path does.
    assert dialect.translate(request) == general


@pytest.mark.parametrize(
    "name",
    ["node_track_batch.json", "python_buffered_track.json", "python_consumer_track.json", "web_beacon_track.json"],
)
def test_track_fast_path_takes_what_the_sdks_send(name: str) -> None:
    request = incoming("track", payload(name), {"X-Cohorly-Token": "tok_shop"})
    fast = dialect._track_fast(request)
    assert isinstance(fast, Batch)
    assert fast == dialect._translate_general(request)
    # With a token nobody configured: the same 401 the general path gives.
    data = msgspec.json.decode(payload(name))
    for item in data if isinstance(data, list) else [data]:
        item["properties"].pop("token", None)
    wrong = incoming("track", data, {"X-Cohorly-Token": "tok_nobody"})
    assert dialect._track_fast(wrong) == dialect._translate_general(wrong) == Failure(
        kind="unauthorized", message="invalid token")
