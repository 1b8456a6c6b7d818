"""Mixpanel's adapter alone: SDK-shaped bytes in, canonical records out, no
I/O. The wire formats are MIXPANEL.md's section 3 (python form `data=` plain
JSON; node GET `?data=` base64 and POST `data=` raw base64; the browser's
URL-encoded base64 form, also as sendBeacon's text/plain)."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote, urlencode

import msgspec
import pytest

from dialects.base import Batch, Failure, Incoming, Outcome
from dialects.mixpanel import Mixpanel, MixpanelConfig
from dialects.mixpanel_records import to_ms
from gateway.model import Alias, Event, GroupUpdate, ProfileUpdate

RECEIVED = 1765000000000
IP = "203.0.113.7"
TOKENS = {"mp_shop": "shop", "mp_blog": "blog"}
SECRETS = {"mps_shop": "shop"}
dialect = Mixpanel(MixpanelConfig(), TOKENS, {}, {"mixpanel_tokens": TOKENS, "mixpanel_secrets": SECRETS})


def b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def incoming(endpoint: str, body: bytes = b"", method: str = "POST", query: list[tuple[str, str]] | None = None,
             headers: dict[str, str] | None = None) -> Incoming:
    return Incoming(endpoint=endpoint, method=method, headers=headers or {}, query=query or [], body=body,
                    client_ip=IP, received_at=RECEIVED)


def python_form(value: Any, **extra: str) -> bytes:
    """What requests sends for the python SDK: `data` (compact JSON), verbose, ip."""
    return urlencode({"data": json.dumps(value, separators=(",", ":")), "verbose": 1, "ip": 0, **extra}).encode()


def node_post(value: Any) -> bytes:
    """node's track_batch: `data=` + base64, not URL-encoded."""
    return ("data=" + b64(value)).encode()


def browser_form(value: Any) -> bytes:
    return ("data=" + quote(b64(value), safe="")).encode()


def translated(request: Incoming) -> Batch:
    result = dialect.translate(request)
    assert isinstance(result, Batch), result
    return result


def failed(request: Incoming) -> Failure:
    result = dialect.translate(request)
    assert isinstance(result, Failure), result
    return result


def python_event(name: str = "Bought", **props: Any) -> dict[str, Any]:
    return {"event": name, "properties": {"token": "mp_shop", "distinct_id": "u1", "time": 1765000000.25,
                                          "$insert_id": "a" * 32, "mp_lib": "python", **props}}


def test_python_form_plain_json_event() -> None:
    [event] = translated(incoming("track", python_form(python_event(price=3)))).records
    assert event == Event(
        project="shop", source="mixpanel", name="Bought", distinct_id="u1", time=1765000000250,
        received_at=RECEIVED, insert_id="a" * 32, properties={"mp_lib": "python", "price": 3}, context={},
    )


def test_node_get_base64_and_query_params() -> None:
    body = {"event": "Viewed", "properties": {"token": "mp_blog", "mp_lib": "node"}}
    request = incoming("track", method="GET", query=[("ip", "1"), ("verbose", "0"), ("data", b64(body))])
    [event] = translated(request).records
    assert isinstance(event, Event)
    # No distinct_id, no time, no $insert_id: stored as sent, at receipt time.
    assert (event.project, event.distinct_id, event.time, event.insert_id) == ("blog", None, RECEIVED, None)
    assert event.context == {"ip": IP}


def test_node_post_raw_base64_with_plus_signs() -> None:
    # A `+` in the raw base64 reaches a form decoder as a space: put back.
    batch = [{"event": "e>>>?", "properties": {"token": "mp_shop", "distinct_id": f"~~~{i}", "time": 1765000000123}}
             for i in range(3)]
    raw = node_post(batch)
    assert b"+" in raw
    events = translated(incoming("track", raw)).records
    assert [e.distinct_id for e in events] == ["~~~0", "~~~1", "~~~2"]  # type: ignore[union-attr]
    # Milliseconds (>= 10^11) stay milliseconds.
    assert {e.time for e in events} == {1765000000123}  # type: ignore[union-attr]


def test_browser_urlencoded_base64_also_as_text_plain() -> None:
    batch = [python_event("$pageview", time=1765000000.5, **{"$insert_id": "k3j4h5g6f7d8s9a0"})]
    for content_type in ("application/x-www-form-urlencoded", "text/plain;charset=UTF-8"):
        request = incoming("track", browser_form(batch), query=[("verbose", "1"), ("ip", "1"), ("_", "1765")],
                           headers={"content-type": content_type})
        [event] = translated(request).records
        assert isinstance(event, Event) and event.time == 1765000000500 and event.insert_id == "k3j4h5g6f7d8s9a0"


def test_json_body_object_or_array() -> None:
    one = translated(incoming("track", msgspec.json.encode(python_event()))).records
    many = translated(incoming("track", msgspec.json.encode([python_event(), python_event("Other")]))).records
    assert len(one) == 1 and [e.name for e in many] == ["Bought", "Other"]  # type: ignore[union-attr]


def test_times_seconds_or_milliseconds() -> None:
    assert to_ms(1765000000, "time", 0) == 1765000000000
    assert to_ms(1765000000.001, "time", 0) == 1765000000001
    assert to_ms(10**11, "time", 0) == 10**11
    assert to_ms(None, "time", 7) == 7
    for bad in ("1765000000", -1, True, float("nan")):
        with pytest.raises(Exception, match="time"):
            to_ms(bad, "time", 0)


def test_identity_events_become_links() -> None:
    body = [
        {"event": "$create_alias", "properties": {"token": "mp_shop", "alias": "new", "distinct_id": "old"}},
        {"event": "$identify", "properties": {"token": "mp_shop", "distinct_id": "user",
                                              "$anon_id": "$device:d1", "$identified_id": "user"}},
        {"event": "$merge", "properties": {"token": "mp_shop", "$distinct_ids": ["a", "b"]}},
    ]
    records = translated(incoming("track", python_form(body))).records
    assert records == [
        Alias(project="shop", source="mixpanel", alias="new", distinct_id="old"),
        Alias(project="shop", source="mixpanel", alias="$device:d1", distinct_id="user"),
        Alias(project="shop", source="mixpanel", alias="b", distinct_id="a", merge=True),
    ]


def test_ignored_event_is_dropped_and_counted() -> None:
    result = translated(incoming("track", python_form([python_event(**{"$ignore": "bot"}),
                                                       python_event(**{"$ignore": ""})])))
    assert len(result.records) == 1
    assert [r.reason for r in result.rejections] == ["ignored"]


def test_engage_python_and_node_shapes() -> None:
    python = {"$token": "mp_shop", "$time": 1765000000.5, "$distinct_id": "u1", "$set": {"plan": "pro"},
              "$ignore_time": True, "$ip": 0}
    node = {"$token": "mp_shop", "$distinct_id": 42, "$delete": "", "$ip": "0", "$time": 1765000000999}
    records = translated(incoming("engage", python_form([python, node]))).records
    assert records == [
        ProfileUpdate(project="shop", source="mixpanel", distinct_id="u1", time=1765000000500, set={"plan": "pro"}),
        ProfileUpdate(project="shop", source="mixpanel", distinct_id="42", time=1765000000999, delete=True),
    ]


def test_engage_every_verb() -> None:
    op = {"$token": "mp_shop", "$distinct_id": "u1", "$set_once": {"a": 1}, "$add": {"n": 2},
          "$append": {"l": 1}, "$union": {"u": [1]}, "$remove": {"r": 1}, "$unset": ["x"]}
    [update] = translated(incoming("engage", msgspec.json.encode(op))).records
    assert isinstance(update, ProfileUpdate)
    assert (update.set_once, update.add, update.append, update.union, update.remove, update.unset) == (
        {"a": 1}, {"n": 2}, {"l": 1}, {"u": [1]}, {"r": 1}, ["x"])


def test_groups() -> None:
    op = {"$token": "mp_shop", "$group_key": "company", "$group_id": 7, "$set": {"name": "Acme"},
          "$union": {"tags": ["a"]}}
    [update] = translated(incoming("groups", python_form(op))).records
    assert update == GroupUpdate(project="shop", source="mixpanel", group_key="company", group_id="7",
                                 time=RECEIVED, set={"name": "Acme"}, union={"tags": ["a"]})
    bad = failed(incoming("groups", python_form({**op, "$add": {"n": 1}})))
    assert bad.kind == "invalid" and "$add" in bad.message


@pytest.mark.parametrize(("endpoint", "body", "fragment"), [
    ("track", [{"event": "", "properties": {"token": "mp_shop"}}], "event"),
    ("track", [{"event": "x", "properties": {"token": "mp_shop", "time": "2025-01-01T00:00:00"}}], "time"),
    ("track", [{"event": "x", "properties": {"token": "mp_shop", "distinct_id": ["a"]}}], "distinct_id"),
    ("engage", {"$token": "mp_shop", "$distinct_id": "u"}, "operation"),
    ("engage", {"$token": "mp_shop", "$distinct_id": "u", "$add": {"n": "1"}}, "$add.n"),
    ("engage", {"$token": "mp_shop", "$set": {}}, "$distinct_id"),
    ("engage", {"$token": "mp_shop", "$distinct_id": "u", "$frobnicate": {}}, "$frobnicate"),
    ("groups", {"$token": "mp_shop", "$group_id": "1", "$set": {}}, "$group_key"),
])
def test_invalid_records_name_the_field(endpoint: str, body: Any, fragment: str) -> None:
    result = failed(incoming(endpoint, python_form(body)))
    assert result.kind == "invalid" and fragment in result.message, result


def test_unknown_or_missing_token_is_unauthorized() -> None:
    for token in ("nope", None):
        result = failed(incoming("track", python_form(python_event(token=token))))
        assert result.kind == "unauthorized"
    assert failed(incoming("engage", python_form({"$distinct_id": "u", "$set": {}}))).kind == "unauthorized"


def test_undecodable_data_and_missing_data() -> None:
    assert failed(incoming("track", b"data=%%%not-base64")).kind == "bad_request"
    assert failed(incoming("track", b"verbose=1")).kind == "bad_request"
    assert failed(incoming("track", method="GET")).kind == "bad_request"


def test_batch_limit() -> None:
    small = Mixpanel(MixpanelConfig(max_batch=2), TOKENS, {}, {"mixpanel_tokens": TOKENS})
    result = small.translate(incoming("track", python_form([python_event()] * 3)))
    assert isinstance(result, Failure) and "batch too large" in result.message


def test_carried_tokens() -> None:
    assert set(dialect.carried(incoming("track", python_form([python_event(), python_event(token="x")])))) == {
        "mp_shop", "x"}
    assert set(dialect.carried(incoming("engage", browser_form({"$token": "mp_blog"})))) == {"mp_blog"}
    assert list(dialect.carried(incoming("track", b"garbage"))) == []
    # JSON bodies (Cohorly's too, on a shared path): read for the tokens alone.
    body = msgspec.json.encode([python_event(), {"$token": "mp_blog"}, {"event": "x", "properties": {"a": [1]}}])
    assert set(dialect.carried(incoming("track", body))) == {"mp_shop", "mp_blog"}
    odd = msgspec.json.encode([python_event(), 7, {"properties": "no"}])
    assert set(dialect.carried(incoming("track", odd))) == {"mp_shop"}


def basic(user: str, password: str = "") -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_import_credentials() -> None:
    body = python_form(python_event())
    for headers, query in (
        (basic("mps_shop"), []),
        (basic("svc-user", "mps_shop"), [("project_id", "shop")]),
        ({}, [("api_key", "mps_shop")]),
    ):
        request = incoming("import", body, query=query, headers=headers)
        assert dialect.precheck(request) is None
        assert [r.project for r in translated(request).records] == ["shop"]
    assert dialect.precheck(incoming("import", headers=basic("wrong"))) is not None
    assert dialect.precheck(incoming("import", headers=basic("u", "mps_shop"), query=[("project_id", "blog")]))
    assert failed(incoming("import", body)).kind == "unauthorized"


def test_import_quarantines_invalid_records_without_strict() -> None:
    body = msgspec.json.encode([python_event(), {"event": "", "properties": {}}])
    result = translated(incoming("import", body, headers=basic("mps_shop")))
    assert len(result.records) == 1 and [r.reason for r in result.rejections] == ["invalid"]


def test_import_strict_lists_failed_records() -> None:
    body = msgspec.json.encode([python_event(), {"event": "x", "properties": {"time": "soon", "$insert_id": "i2"}}])
    request = incoming("import", body, query=[("strict", "1")], headers=basic("mps_shop"))
    result = translated(request)
    assert len(result.records) == 1 and result.rejections == []
    reply = dialect.render(request, Outcome(inserted=1))
    assert reply.status == 400
    assert msgspec.json.decode(reply.body) == {
        "code": 400, "error": "some data points in the request failed validation",
        "failed_records": [{"index": 1, "$insert_id": "i2", "field": "properties.time",
                            "message": "must be a number: seconds (or milliseconds) since the epoch"}],
        "num_records_imported": 1, "status": "Bad Request",
    }


def test_answers() -> None:
    quiet = incoming("track", python_form(python_event()).replace(b"verbose=1", b"verbose=0"))
    loud = incoming("track", python_form(python_event()))
    assert dialect.render(quiet, Outcome(inserted=1)).body == b"1"
    assert msgspec.json.decode(dialect.render(loud, Outcome(inserted=1)).body) == {"status": 1, "error": None}
    refused = Failure(kind="rate_limited", message="rate limited", retry_after=3)
    reply = dialect.render(quiet, refused)
    assert (reply.status, reply.body, dict(reply.headers)) == (429, b"0", {"retry-after": "3"})
    reply = dialect.render(loud, Failure(kind="invalid", message="event must be a non-empty string"))
    assert (reply.status, msgspec.json.decode(reply.body)) == (
        400, {"status": 0, "error": "event must be a non-empty string"})
    imported = incoming("import", msgspec.json.encode([python_event()]), headers=basic("mps_shop"))
    assert msgspec.json.decode(dialect.render(imported, Outcome(inserted=1, duplicates=1)).body) == {
        "code": 200, "num_records_imported": 2, "status": "OK"}
    assert msgspec.json.decode(dialect.render(imported, Failure(kind="unauthorized", message="x")).body) == {
        "code": 401, "error": "Invalid credentials", "status": "Unauthorized"}
    # The legacy encoding on /import is answered as /track (what python and node read).
    legacy = incoming("import", python_form(python_event()), headers=basic("mps_shop"))
    assert msgspec.json.decode(dialect.render(legacy, Outcome(inserted=1)).body) == {"status": 1, "error": None}


def test_translate_after_carried_reads_the_same_request() -> None:
    # On a shared path `carried` decodes a form's data first; `translate`
    # of that request uses it, of another request never.
    first = incoming("track", browser_form([python_event("First")]))
    other = incoming("track", browser_form([python_event("Other")]))
    assert set(dialect.carried(first)) == {"mp_shop"}
    assert [e.name for e in translated(other).records] == ["Other"]  # type: ignore[union-attr]
    assert set(dialect.carried(first)) == {"mp_shop"}
    assert [e.name for e in translated(first).records] == ["First"]  # type: ignore[union-attr]
    assert [e.name for e in translated(first).records] == ["First"]  # type: ignore[union-attr]


def test_python_form_json_with_spaces_and_plus_signs() -> None:
    value = [python_event("A b+c", note="x + y = z")]
    [event] = translated(incoming("track", python_form(value))).records
    assert isinstance(event, Event) and event.name == "A b+c" and event.properties["note"] == "x + y = z"
    # In a form, an unescaped `+` is a space.
    raw = ("data=" + json.dumps(value).replace(" ", "+")).encode()
    [event] = translated(incoming("track", raw)).records
    assert isinstance(event, Event) and event.name == "A b c" and event.properties["note"] == "x   y = z"
