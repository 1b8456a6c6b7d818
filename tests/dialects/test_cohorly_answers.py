"""Cohorly's error answers (dialects/cohorly_answers.py): the status of each
failure kind, the vendor's fixed texts, Retry-After, short answers encoded
once."""

from __future__ import annotations

import msgspec
import pytest

from dialects.base import Failure
from dialects.cohorly_answers import error, plain_error


@pytest.mark.parametrize(("kind", "status", "text"), [
    ("bad_request", 400, "invalid JSON"),
    ("invalid", 400, "invalid JSON"),
    ("unauthorized", 401, "invalid token"),
    ("too_large", 413, "request body too large"),
    ("unstorable", 400, "invalid JSON"),
    ("internal", 500, "internal error"),
])
def test_each_kind_has_its_status_and_text(kind: str, status: int, text: str) -> None:
    reply = error(Failure(kind=kind, message="invalid JSON"))  # type: ignore[arg-type]
    assert reply.status == status
    assert msgspec.json.decode(reply.body) == {"status": 0, "error": text}


def test_retry_after_is_sent_and_never_below_one_second() -> None:
    reply = error(Failure(kind="rate_limited", message="rate limited", retry_after=0))
    assert (reply.status, dict(reply.headers)["retry-after"]) == (429, "1")
    assert msgspec.json.decode(error(Failure(kind="unavailable", message="x", retry_after=5)).body) == {
        "status": 0, "error": "service unavailable, retry later"}


def test_short_answers_are_encoded_once_long_ones_are_not_kept() -> None:
    assert error(Failure(kind="invalid", message="event: missing")) is plain_error("invalid", "event: missing")
    kept = plain_error.cache_info().currsize
    long = error(Failure(kind="invalid", message="k" * 500))
    assert msgspec.json.decode(long.body)["error"] == "k" * 500
    assert plain_error.cache_info().currsize == kept
