"""Property tests: whatever the body, every dialect answers one of its
documented statuses (never 5xx), in its own error shape, and a rejected
request stores nothing.

One gateway per test: the hypothesis loop runs in a worker thread
(`anyio.to_thread`) and calls back into the test's event loop for each
request (`anyio.from_thread.run`), so the app's resources stay on one loop.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.hostile.helpers import (
    ENDPOINTS,
    SUCCESS,
    check_shape,
    count_events,
    ids_in,
    profile_exists,
    request_args,
    settings,
)
from tests.support import gateway

pytestmark = pytest.mark.anyio

EXAMPLES = 50
MAX_TIME_MS = 253_402_300_799_999

# -- strategies ----------------------------------------------------------------

chars = st.one_of(
    st.characters(),
    st.sampled_from(["\x00", "\ud800", "\udbff", "\udc00", "\udfff", "\ufffd", "\uffff", "\U0010ffff", "$", "/"]),
)
texts = st.text(alphabet=chars, max_size=12)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),  # beyond 64 bits
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(texts, inner, max_size=5)),
    max_leaves=20,
)


def f(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field: usually of the right type, sometimes anything."""
    return st.one_of(good, good, good, json_values)


ids = st.one_of(
    st.sampled_from(["u1", "u2", "anon-1", "ext-1", "a b", "\x00id"]), st.text(alphabet=chars, min_size=1, max_size=10)
)
names = st.one_of(st.sampled_from(["Signup", "page_view", ""]), texts)
props = st.dictionaries(texts, json_values, max_size=4)


def obj(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {k: f(v) for k, v in required.items()}, optional={k: f(v) for k, v in optional.items()}
    )


def one_or_batch(item: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(item, st.lists(item, max_size=4))


track_event = obj(
    {"event": names, "properties": obj({"distinct_id": ids}, {
        "time": st.one_of(st.integers(0, MAX_TIME_MS), st.floats(0, MAX_TIME_MS), st.integers(-(2**70), 2**70)),
        "$insert_id": ids,
        "token": st.sampled_from(["tok_shop", "tok_blog", "nope", ""]),
        "plan": json_values,
        "\x00k": texts,
    })},
    {"extra": json_values},
)
engage_op = obj(
    {"distinct_id": ids},
    {
        "$set": props, "$set_once": props,
        "$add": st.dictionaries(texts, st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False))),
        "$append": props, "$union": st.dictionaries(texts, st.lists(json_values, max_size=3)),
        "$remove": props, "$unset": st.lists(texts, max_size=3), "$delete": st.booleans(),
        "$token": st.sampled_from(["tok_shop", "nope"]), "$ip": texts, "$bogus": json_values,
    },
)
cohorly_alias = obj({"alias": ids, "distinct_id": ids}, {"token": st.sampled_from(["tok_shop", "nope"])})

optional_str = st.one_of(st.none(), texts)
client_alias = obj({"anonymous_id": ids, "external_id": ids}, {"sdk_version": json_values})
user_block = obj({}, {"email": optional_str, "phone": optional_str,
                      "timezone": st.one_of(st.none(), st.sampled_from(["Europe/Paris", "UTC", "Mars/Base"])),
                      "locale": optional_str, "data": st.one_of(st.none(), props), "bogus": json_values})
client_identify = obj({}, {"anonymous_id": st.one_of(st.none(), ids), "external_id": st.one_of(st.none(), ids),
                           "email": optional_str, "phone": optional_str, "timezone": st.sampled_from(["UTC", "x"]),
                           "locale": optional_str, "data": st.one_of(st.none(), props)})
client_device = obj(
    {"device_id": ids, "os": texts, "model": texts, "app_build": texts, "app_version": texts},
    {"anonymous_id": st.one_of(st.none(), ids), "external_id": st.one_of(st.none(), ids),
     "token": optional_str, "os_version": optional_str},
)
client_event = obj({"name": names}, {"anonymous_id": st.one_of(st.none(), ids),
                                     "external_id": st.one_of(st.none(), ids),
                                     "data": st.one_of(st.none(), props), "properties": props, "user": user_block})

stamps = st.one_of(
    st.sampled_from(["2026-01-02T03:04:05Z", "2026-01-02T03:04:05.123+02:00", "20260102T030405Z",
                     "0001-01-01T00:00:00Z", "1900-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00",
                     "2026-01-02", "2026-01-02T03:04:05", "2026-01-02T03:04:05Z\x00"]),
    texts,
)
inslytic_event = obj(
    {"eventName": names, "timestamp": stamps, "anonymousId": ids, "sessionId": texts,
     "consentGiven": st.booleans()},
    {"userId": st.one_of(st.none(), ids), "properties": st.dictionaries(texts, texts, max_size=3),
     "pageUrl": texts, "deviceType": st.sampled_from(["desktop", "mobile", "tablet", "fridge"]),
     "browser": texts},
)
inslytic_body = obj({"events": st.lists(inslytic_event, max_size=3)}, {"extra": json_values})

collect_event = obj(
    {"event_name": names},
    {
        "event": names,
        "user": obj({}, {"id": st.one_of(ids, st.integers()), "consistent_anonymous_id": ids, "email": texts}),
        "context": obj({}, {"event_id": st.one_of(ids, st.integers(), st.floats()),
                            "event_timestamp": st.one_of(st.integers(-(2**70), 2**70),
                                                         st.text(alphabet="0123456789-", max_size=25)),
                            "created": stamps, "page": obj({}, {"url": texts, "location": texts}),
                            "device": obj({}, {"ip": texts})}),
        "properties": obj({}, {"user": obj({}, {"id": ids}), "created": stamps, "price": json_values}),
        "created": stamps, "eventId": ids, "event_timestamp": st.integers(-(2**70), 2**70),
        "price": json_values,
    },
)
collect_batch = obj({"batch": st.lists(collect_event, max_size=4)}, {})

SHAPED: dict[str, st.SearchStrategy[Any]] = {
    "/track": one_or_batch(track_event),
    "/engage": one_or_batch(engage_op),
    "/alias": cohorly_alias,
    "/api/client/alias": client_alias,
    "/api/client/identify": client_identify,
    "/api/client/devices": client_device,
    "/api/client/events": st.one_of(st.lists(client_event, max_size=4), client_event),
    "/v1/ingest": inslytic_body,
    "/events": collect_event,
    "/events/batch": collect_batch,
}


# Not UTF-8: a stray continuation, a truncated sequence, an encoded surrogate,
# past U+10FFFF, an overlong form; or any bytes.
BAD_UTF8 = st.one_of(
    st.sampled_from([b"\xff", b"\x80", b"\xc3(", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]),
    st.binary(min_size=1, max_size=6),
)


def encode(value: Any) -> bytes:
    # ensure_ascii: lone surrogates travel as \uXXXX escapes, which JSON allows.
    return json.dumps(value, ensure_ascii=True).encode()


def bodies(dialect: str, kind: str) -> st.SearchStrategy[tuple[str, bytes, Any]]:
    paths = st.sampled_from(ENDPOINTS[dialect])
    if kind == "json":
        return st.tuples(paths, json_values).map(lambda t: (t[0], encode(t[1]), t[1]))
    if kind == "shaped":
        return paths.flatmap(lambda p: SHAPED[p].map(lambda v: (p, encode(v), v)))
    return st.tuples(
        paths,
        st.one_of(
            st.binary(max_size=200),
            json_values.map(lambda v: encode(v)[:-1] + b"\xff\xfe"),
            # Bytes that are not UTF-8 inside a string of an otherwise valid payload.
            st.tuples(paths.flatmap(lambda p: SHAPED[p]), BAD_UTF8).map(
                lambda t: encode({"s": "MARK", "v": t[0]}).replace(b"MARK", t[1])
            ),
            st.tuples(st.sampled_from(list(SHAPED.values())).flatmap(lambda s: s), BAD_UTF8).map(
                lambda t: encode(t[0]).replace(b'"', b'"' + t[1], 1) if b'"' in encode(t[0]) else encode(t[0])
            ),
        ),
    ).map(lambda t: (t[0], t[1], None))


# -- the property ----------------------------------------------------------------


async def _one(client: httpx.AsyncClient, dialect: str, path: str, body: bytes, value: Any) -> None:
    candidates = ids_in(value)
    before = {p: await count_events(client, p) for p in ("shop", "blog")}
    existed = {i for i in candidates if await profile_exists(client, i)}
    args = request_args(dialect)
    args["headers"]["Content-Type"] = "application/json"
    reply = await client.post(path, content=body, **args)
    check_shape(dialect, reply)
    if reply.status_code != SUCCESS[dialect]:
        after = {p: await count_events(client, p) for p in ("shop", "blog")}
        assert after == before, (path, body[:300], reply.status_code, reply.text[:300])
        for id_ in candidates - existed:
            assert not await profile_exists(client, id_), (path, id_, body[:300], reply.text[:300])


@pytest.mark.parametrize("kind", ["json", "shaped", "bytes"])
@pytest.mark.parametrize("dialect", list(ENDPOINTS))
async def test_any_body_gets_a_documented_answer(backend: dict[str, str], dialect: str, kind: str) -> None:
    async with gateway(settings(backend)) as client:

        @hsettings(max_examples=EXAMPLES, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(bodies(dialect, kind))
        def prop(example: tuple[str, bytes, Any]) -> None:
            path, body, value = example
            anyio.from_thread.run(_one, client, dialect, path, body, value)

        await anyio.to_thread.run_sync(prop)


# -- query strings and headers ----------------------------------------------------

MAX_ERROR_BYTES = 64 * 1024
# Generous for a busy 2-core machine; a bound, not a benchmark.
ANSWER_SECONDS = 5.0

digits_like = st.one_of(
    st.sampled_from(["1234", "99", "0", "-1", "1e3", " 12 ", "\u00b2", "\u0661\u0662", "\uff11", "1" * 5000,
                     "9" * 19, "", "1234\x00"]),
    st.text(alphabet="0123456789", min_size=1, max_size=30),
)
header_chars = st.characters(min_codepoint=0x20, max_codepoint=0x2FF, blacklist_characters="\x7f")
header_texts = st.text(alphabet=header_chars, max_size=40)
# A URL carries UTF-8: no lone surrogates (percent-encoded bytes that are not
# UTF-8 are in `digits_like` and the bracket keys' odd forms).
query_texts = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["%ED%A0%80", "%FF", "%C2%B2", "a%00b", "%"]),
)
query_keys = st.one_of(
    st.sampled_from(["tc_s", "token", "event_name", "event", "user[id]", "items[0][id]", "items[99999999999]",
                     "a[]", "[", "]", "a]b[", "context[event_timestamp]", "verbose", "data", "ip"]),
    st.integers(1, 1500).map(lambda n: "a" + "[b]" * n),
    st.integers(1, 300).map(lambda n: "x" + "[0]" * n),
    query_texts,
)
query_values = st.one_of(digits_like, query_texts, st.sampled_from(["src_shop", "tok_shop", "E", "1" * 5000]))
queries = st.lists(st.tuples(query_keys, query_values), max_size=8)
header_values = {
    "content-length": digits_like,
    "content-encoding": st.one_of(st.sampled_from(["gzip", "x-gzip", "br", "gzip, gzip", "identity", "GZIP", ""]),
                                  header_texts),
    "authorization": st.one_of(
        st.sampled_from(["Bearer pk_shop", "Bearer ins_shop", "bearer sk_shop", "Bearer", "Bearer  ", "Basic x",
                         "Bearer " + "k" * 5000, "Bearer pk_shop, Bearer pk_blog", "Bearer src_shop"]),
        header_texts.map(lambda t: "Bearer " + t),
    ),
    "x-cohorly-token": st.one_of(st.sampled_from(["tok_shop", "tok_blog", "", "x" * 5000]), header_texts),
    "x-forwarded-for": st.one_of(st.sampled_from(["1.2.3.4", "::1", "1.2.3.4, ::ffff:1.2.3.4", "x" * 3000]),
                                 header_texts),
    "origin": header_texts,
    "user-agent": st.one_of(header_texts, st.just("ua" * 5000)),
    "content-type": header_texts,
}
headers_strategy = st.fixed_dictionaries({}, optional=header_values)


def small_valid_body(path: str) -> bytes:
    from tests.hostile.test_explicit import valid_body

    if path == "/api/client/alias":
        return encode({"anonymous_id": "anon-p1", "external_id": "p1"})
    if path == "/api/client/devices":
        return encode({"external_id": "p1", "device_id": "d1", "os": "ios", "model": "m", "app_build": "1",
                       "app_version": "1.0"})
    return encode(valid_body(path))


async def _one_request(client: httpx.AsyncClient, dialect: str, method: str, path: str,
                       query: list[tuple[str, str]], headers: dict[str, str], with_body: bool) -> None:
    before = await count_events(client)
    args = request_args(dialect)
    # As bytes: a server hands the app whatever bytes came (UTF-8 here).
    sent_headers = {k: v.encode() for k, v in {**args["headers"], **headers}.items() if k != "content-length"}
    params = [*args.get("params", {}).items(), *query] if "params" in args else query
    body = small_valid_body(path) if with_body and method == "POST" else b""
    request = client.build_request(method, path, params=params, headers=sent_headers,
                                   content=body if method == "POST" else None)
    if "content-length" in headers:
        request.headers["content-length"] = headers["content-length"]
    started = time.monotonic()
    reply = await client.send(request)
    took = time.monotonic() - started
    assert took < ANSWER_SECONDS, (path, query, headers, took)
    assert len(reply.content) <= MAX_ERROR_BYTES or reply.status_code == SUCCESS[dialect], len(reply.content)
    check_shape(dialect, reply)
    if reply.status_code != SUCCESS[dialect]:
        assert await count_events(client) == before, (path, query, headers, reply.text[:300])


@pytest.mark.parametrize("dialect", list(ENDPOINTS))
async def test_any_query_and_headers_get_a_documented_answer(backend: dict[str, str], dialect: str) -> None:
    """Hostile query strings and headers (odd digits, deep bracket keys,
    odd encodings, credentials and lengths) on every endpoint: a documented
    status in the dialect's shape, within a bound, an error body <= 64 KB,
    nothing stored by a refused request."""
    methods = ["POST", "GET"] if dialect == "collect" else ["POST"]
    async with gateway(settings(backend)) as client:

        @hsettings(max_examples=EXAMPLES, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(st.sampled_from(methods), st.sampled_from(ENDPOINTS[dialect]), queries, headers_strategy,
               st.booleans())
        def prop(method: str, path: str, query: list[tuple[str, str]], headers: dict[str, str],
                 with_body: bool) -> None:
            if method == "GET":
                path = "/events"
            anyio.from_thread.run(_one_request, client, dialect, method, path, query, headers, with_body)

        await anyio.to_thread.run_sync(prop)
