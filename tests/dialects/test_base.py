"""dialects/base.py: the helpers every dialect shares."""

from __future__ import annotations

import msgspec
import pytest

from dialects.base import BearerDialect, Failure, Incoming, bearer, json_reply, request_context, retry_after_headers


def incoming(headers: dict[str, str]) -> Incoming:
    return Incoming(endpoint="e", method="POST", headers=headers, query=[], body=b"",
                    client_ip="203.0.113.7", received_at=1)


@pytest.mark.parametrize(("header", "key"), [
    ("Bearer k1", "k1"),
    ("bearer k1", "k1"),
    ("BEARER   k1  ", "k1"),
    ("  Bearer k1", "k1"),
    ("Basic k1", None),
    ("Bearer", None),
    ("Bearer ", None),
    ("k1", None),
    ("", None),
])
def test_bearer(header: str, key: str | None) -> None:
    assert bearer(incoming({"authorization": header})) == key


def test_bearer_without_the_header() -> None:
    assert bearer(incoming({})) is None


def test_a_bearer_dialect_names_the_project_and_carries_the_key_of_its_header() -> None:
    dialect = BearerDialect(None, {"pk_shop": "shop"})
    assert dialect._project(incoming({"authorization": "Bearer pk_shop"})) == "shop"
    assert dialect._project(incoming({"authorization": "Bearer pk_other"})) is None
    assert dialect._project(incoming({})) is None
    assert list(dialect.carried(incoming({"authorization": "bearer pk_other"}))) == ["pk_other"]
    assert list(dialect.carried(incoming({"authorization": "Basic abc"}))) == []


def test_request_context_has_the_ip_and_a_user_agent_if_any() -> None:
    assert request_context(incoming({})) == {"ip": "203.0.113.7"}
    assert request_context(incoming({"user-agent": ""})) == {"ip": "203.0.113.7"}
    assert request_context(incoming({"user-agent": "ua\x00"})) == {"ip": "203.0.113.7", "user_agent": "ua\x00"}


def test_json_reply_encodes_the_payload() -> None:
    reply = json_reply(418, {"a": [1, "\x00"]}, (("x-h", "1"),))
    assert reply.status == 418
    assert msgspec.json.decode(reply.body) == {"a": [1, "\x00"]}
    assert reply.content_type == "application/json"
    assert reply.headers == (("x-h", "1"),)


@pytest.mark.parametrize(("retry_after", "headers"), [
    (None, ()),
    (30, (("retry-after", "30"),)),
    (0, (("retry-after", "1"),)),  # never "retry now"
    (-5, (("retry-after", "1"),)),
])
def test_retry_after_headers(retry_after: int | None, headers: tuple[tuple[str, str], ...]) -> None:
    failure = Failure(kind="rate_limited", message="m", retry_after=retry_after)
    assert retry_after_headers(failure) == headers
