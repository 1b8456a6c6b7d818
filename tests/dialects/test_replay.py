"""dialects.replay: what a dialect keeps of a quarantined record and the
request that re-runs it, with a current credential of the project (never
the one it came with)."""

from __future__ import annotations

import base64

import msgspec

from dialects.base import Batch, Incoming
from dialects.replay import Envelope, credential_of, envelope, opened, request_for
from gateway.config import from_dict
from gateway.model import Event
from gateway.replay import dialects_of
from tests.support import PROJECTS


def _request(body: bytes, **headers: str) -> Incoming:
    return Incoming(endpoint="batch", method="POST", headers=headers, query=[("tc_s", "1234"), ("token", "src_shop")],
                    body=body, client_ip="203.0.113.9", received_at=5)


def test_the_envelope_keeps_the_body_ip_and_agent_and_no_credential() -> None:
    kept = envelope(b'{"a":"\xc3\xa9"}', _request(b"", **{"user-agent": "sdk/2", "authorization": "Bearer k"}))
    assert opened(kept) == Envelope(body='{"a":"é"}', ip="203.0.113.9", agent="sdk/2")
    assert "src_shop" not in kept and "Bearer" not in kept
    assert opened("not json") is None
    assert opened('{"ip": "x"}') is None  # no body


def test_a_request_for_an_envelope_carries_the_credential_given() -> None:
    request = request_for(Envelope(body="{}", ip="1.2.3.4", agent="a"), endpoint="event", received_at=9,
                          headers={"authorization": "Basic x"}, query=[("k", "v")])
    assert (request.method, request.endpoint, request.body, request.client_ip, request.received_at) == (
        "POST", "event", b"{}", "1.2.3.4", 9)
    assert request.headers == {"content-type": "application/json", "authorization": "Basic x", "user-agent": "a"}
    assert credential_of({"k1": "blog", "k2": "shop", "k3": "shop"}, "shop") == "k2"
    assert credential_of({"k1": "blog"}, "shop") is None


def test_collect_rebuilds_its_request_with_a_current_source_key() -> None:
    collect = dialects_of(from_dict({"projects": PROJECTS}, {}))["collect"]
    item = {"event_name": "e", "user": {"id": "u1"}}
    payload = envelope(b'{"batch":[' + msgspec.json.encode(item) + b"]}", _request(b""))
    request = collect.replay_request("shop", "batch", payload, 7)
    assert request is not None and dict(request.query) == {"tc_s": "1234", "token": "src_shop"}
    translated = collect.translate(request)
    assert isinstance(translated, Batch)
    [event] = translated.records
    assert isinstance(event, Event) and (event.project, event.name, event.distinct_id) == ("shop", "e", "u1")
    assert event.context["ip"] == "203.0.113.9"
    # A project without a collect source now, or a payload that is no envelope.
    assert collect.replay_request("nope", "batch", payload, 7) is None
    assert collect.replay_request("shop", "batch", "{", 7) is None


def test_mixpanel_replays_through_import_with_the_project_token() -> None:
    mixpanel = dialects_of(from_dict({"projects": PROJECTS}, {}))["mixpanel"]
    payload = envelope(b'[{"event":"e","properties":{"distinct_id":"m1","time":1700000000}}]', _request(b""))
    request = mixpanel.replay_request("blog", "import", payload, 7)
    assert request is not None
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"mp_blog:").decode()
    translated = mixpanel.translate(request)
    assert isinstance(translated, Batch) and [r.project for r in translated.records] == ["blog"]
    assert mixpanel.replay_request("blog", "track", payload, 7) is None  # only /import keeps payloads


def test_a_dialect_without_payloads_replays_nothing() -> None:
    client = dialects_of(from_dict({"projects": PROJECTS}, {}))["client"]
    assert client.replay_request("shop", "events", envelope(b"[]", _request(b"")), 7) is None
