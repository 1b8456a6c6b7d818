"""What a dialect keeps of a quarantined record so that it can be re-run,
and the request that re-runs it (`dialgate replay`).

The payload is an envelope of the record's body and the parts of its
request that end up in the stored event (client IP, User-Agent); the
credential is not kept: the replay sends a current credential of the
rejection's project instead (a key rotated since still replays).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import msgspec

from dialects.base import Incoming


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    body: str
    ip: str = ""
    agent: str | None = None


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Envelope).decode


def envelope(body: bytes, request: Incoming) -> str:
    """The payload column's text for `body`, received with `request`."""
    kept = Envelope(body=body.decode("utf-8", "replace"), ip=request.client_ip,
                    agent=request.headers.get("user-agent"))
    return _encode(kept).decode()


def opened(payload: str) -> Envelope | None:
    """The envelope of a payload column, or None when it is not one."""
    try:
        return _decode(payload)
    except msgspec.DecodeError:
        return None


def credential_of(credentials: Mapping[Any, str], project: str) -> Hashable | None:
    """A lookup key of `project` (the first configured), if it has one."""
    return next((key for key, name in credentials.items() if name == project), None)


def request_for(kept: Envelope, *, endpoint: str, received_at: int, headers: dict[str, str],
                query: list[tuple[str, str]], body: bytes | None = None) -> Incoming:
    """A POST to `endpoint` re-running `kept`, with the credential given in
    `headers` or `query`."""
    if kept.agent:
        headers = {**headers, "user-agent": kept.agent}
    return Incoming(endpoint=endpoint, method="POST", headers={"content-type": "application/json", **headers},
                    query=query, body=kept.body.encode() if body is None else body, client_ip=kept.ip,
                    received_at=received_at)
