"""Echo: the smallest dialect worth the name, written against the contract of
`dialects.base` alone.

`POST /echo` (and any other paths listed in `[dialects.echo] paths`) takes
`{"name": ..., "id": ..., "insert_id": ...}` or an array of them, with the
key of a project's `echo_keys` in the `X-Echo-Key` header. Stored events get
the project's `echo_label` as a property. Answers `{"echoed": N,
"duplicates": M}`; refusals `{"echo_error": "<kind>"}`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import msgspec

from dialects.base import (
    Batch,
    CredentialList,
    Dialect,
    Endpoint,
    Failure,
    Incoming,
    Outcome,
    ProjectField,
    Reply,
    json_reply,
    retry_after_headers,
)
from gateway.model import Event, Record

STATUS = {"bad_request": 400, "invalid": 400, "unauthorized": 401, "too_large": 413, "rate_limited": 429,
          "unavailable": 503, "unstorable": 422, "internal": 500}


class EchoConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    paths: list[str] = msgspec.field(default_factory=lambda: ["/echo"])
    max_body_bytes: int = 64 * 1024


class Item(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    id: str
    insert_id: str | None = None


_decode = msgspec.json.Decoder(list[Item] | Item).decode


class Echo(Dialect):
    name = "echo"
    Config = EchoConfig
    credential_lists = (CredentialList(field="echo_keys"),)
    project_fields = (ProjectField(field="echo_label", type=str, default="plain"),)
    cors_headers = ("X-Echo-Key",)

    config: EchoConfig

    def endpoints(self) -> Sequence[Endpoint]:
        return [Endpoint(path=path, name="echo", max_body=self.config.max_body_bytes) for path in self.config.paths]

    def _project(self, request: Incoming) -> str | None:
        key = request.headers.get("x-echo-key")
        return None if key is None else self.credentials.get(key)

    def precheck(self, request: Incoming) -> Failure | None:
        if self._project(request) is None:
            return Failure(kind="unauthorized", message="unknown echo key")
        return None

    def carried(self, request: Incoming) -> Iterable[Hashable]:
        key = request.headers.get("x-echo-key")
        return () if key is None else (key,)

    def translate(self, request: Incoming) -> Batch | Failure:
        project = self._project(request)
        if project is None:
            return Failure(kind="unauthorized", message="unknown echo key")
        try:
            body = _decode(request.body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            return Failure(kind="invalid", message=str(exc)[:200])
        label = self.project_options.get(project, {}).get("echo_label")
        records: list[Record] = [
            Event(project=project, source=self.name, name=item.name, distinct_id=item.id,
                  time=request.received_at, received_at=request.received_at, insert_id=item.insert_id,
                  properties={"label": label})
            for item in (body if isinstance(body, list) else [body])
        ]
        return Batch(records=records)

    def render(self, request: Incoming, result: Outcome | Failure) -> Reply:
        if isinstance(result, Failure):
            return json_reply(STATUS[result.kind], {"echo_error": result.kind}, retry_after_headers(result))
        payload: dict[str, Any] = {"echoed": result.inserted, "duplicates": result.duplicates}
        return json_reply(200, payload)
