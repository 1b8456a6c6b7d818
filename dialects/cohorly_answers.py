"""Cohorly's error answers: `{"status":0,"error":...}` with the status of
each failure kind, short ones encoded once."""

from __future__ import annotations

import functools

from dialects.base import Failure, Reply, json_reply, retry_after_headers


def error(failure: Failure) -> Reply:
    if failure.retry_after is None and len(failure.message) <= 200:
        return plain_error(failure.kind, failure.message)
    return json_reply(_STATUS[failure.kind], {"status": 0, "error": _message(failure.kind, failure.message)},
                      retry_after_headers(failure))


_STATUS = {
    "bad_request": 400,
    "invalid": 400,
    "unauthorized": 401,
    "too_large": 413,
    "rate_limited": 429,
    "unavailable": 503,
    "unstorable": 400,
    "internal": 500,
}


@functools.lru_cache(maxsize=256)
def plain_error(kind: str, message: str) -> Reply:
    """A short error without Retry-After: the same few again and again
    (under a flood of bad requests, one), so each is encoded once. (A
    message may quote a key of the payload: a long one is not kept.)"""
    return json_reply(_STATUS[kind], {"status": 0, "error": _message(kind, message)})


def _message(kind: str, message: str) -> str:
    return {
        "unauthorized": "invalid token",
        "too_large": "request body too large",
        "rate_limited": "rate limited",
        "unavailable": "service unavailable, retry later",
        "internal": "internal error",
    }.get(kind, message)
