"""Mixpanel: `/track`, `/engage`, `/groups`, `/import`, `/alias`
(DIALECTS.md, section mixpanel; the evidence is MIXPANEL.md).

The real SDKs (python `mixpanel`, node `mixpanel`, `mixpanel-browser`)
work pointed at Dialgate by host or URL alone. `/track`, `/engage` and
`/alias` are Cohorly's paths too: a token in `mixpanel_tokens` picks this
dialect (`carried`, gateway/shared.py). Encodings: `dialects.mixpanel_wire`;
records: `dialects.mixpanel_records`.

Decisions where the contract is silent (README, "Moving from Mixpanel"):
- `/import` answers in its JSON shape (`{"code":200,...}`) to a JSON body
  and to `strict=1`; to the legacy `data=` encoding (GET or form, what the
  python and node SDKs send there) it answers as `/track` does, since those
  SDKs read `status` as 1 or the body as `1`.
- `/import` credentials: HTTP Basic with a project secret as the user name
  (empty password), or a service account `user:secret` with
  `?project_id=<project name>`, or a project secret as `api_key` (node over
  http, which sends no Basic secret unencrypted); a project token as the
  Basic user name is also taken (Mixpanel does).
- An event's token on `/import` is not checked against the credentials.
- A request whose records carry no known token is 401, whole (as Cohorly).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import msgspec

from dialects import mixpanel_records as rec
from dialects.base import (
    Batch,
    CredentialList,
    Dialect,
    Endpoint,
    Failure,
    Incoming,
    Outcome,
    Reply,
    SlidingWindow,
    json_reply,
    request_context,
    retry_after_headers,
)
from dialects.describe import Description
from dialects.limits import TOO_DEEP, NotJson, TooDeep, deep_records
from dialects.mixpanel_openapi import DESCRIPTION
from dialects.mixpanel_wire import NoData, Wire, carried_tokens, decode, flag, is_json_body, strict, verbose
from dialects.replay import credential_of, envelope, opened, request_for
from gateway.model import Record, Rejection

MB = 1024 * 1024
SOURCE = "mixpanel"


class MixpanelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    # Records in one request, on every path.
    max_batch: int = 2000
    max_body_bytes: int = MB
    max_import_bytes: int = 10 * MB
    # Per client IP, shared by /track, /engage, /groups; off by default
    # (Mixpanel limits per project, and a first-party proxy is one IP).
    rate_limit: SlidingWindow | None = None


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
_IMPORT_STATUS = {
    400: "Bad Request", 401: "Unauthorized", 413: "Request Entity Too Large", 429: "Too Many Requests",
    500: "Internal Server Error", 503: "Service Unavailable",
}
_MESSAGES = {
    "unauthorized": "invalid token",
    "too_large": "request body too large",
    "rate_limited": "rate limited",
    "unavailable": "service unavailable, retry later",
    "internal": "internal error",
}
_OK_TEXT = Reply(status=200, body=b"1", content_type="text/plain; charset=utf-8")
_OK_JSON = json_reply(200, {"status": 1, "error": None})
_UNAUTHORIZED_IMPORT = Failure(kind="unauthorized", message="Invalid credentials")


class Mixpanel(Dialect):
    name = SOURCE
    credential_lists = (CredentialList(field="mixpanel_tokens"), CredentialList(field="mixpanel_secrets"))
    Config = MixpanelConfig

    config: MixpanelConfig

    def endpoints(self) -> Sequence[Endpoint]:
        limit, limited = self.config.max_body_bytes, self.config.rate_limit is not None
        methods = ("GET", "POST")
        return (
            Endpoint(path="/track", name="track", methods=methods, max_body=limit, ip_limited=limited),
            Endpoint(path="/engage", name="engage", methods=methods, max_body=limit, ip_limited=limited),
            Endpoint(path="/groups", name="groups", methods=methods, max_body=limit, ip_limited=limited),
            Endpoint(path="/alias", name="alias", methods=methods, max_body=limit),
            Endpoint(path="/import", name="import", methods=methods, max_body=self.config.max_import_bytes),
        )

    def ip_limit(self) -> SlidingWindow | None:
        return self.config.rate_limit

    def describe(self) -> Description:
        return DESCRIPTION

    def precheck(self, request: Incoming) -> Failure | None:
        """On /import, a Basic credential that names no project is refused
        unread (one may also come in the body: `api_key`)."""
        if (request.endpoint == "import" and "authorization" in request.headers
                and self._import_project(request, {}) is None):
            return _UNAUTHORIZED_IMPORT
        return None

    # A form's `data` as `carried` decoded it, for `translate` of the same
    # request right after (on a shared path the pipeline calls one, then
    # the other, with no await between): it is not decoded twice. Keyed by
    # the body's identity, dropped once read.
    _carried: tuple[bytes, bytes] | None = None

    def carried(self, request: Incoming) -> Iterable[Hashable]:
        tokens, data = carried_tokens(request)
        self._carried = (request.body, data) if data is not None else None
        return tokens

    # -- translation -------------------------------------------------------

    def translate(self, request: Incoming) -> Batch | Failure:
        carried, self._carried = self._carried, None
        data = carried[1] if carried is not None and carried[0] is request.body else None
        try:
            wire = decode(request, data=data)
        except NoData:
            return Failure(kind="bad_request", message="data is missing", details=("data: missing",))
        except NotJson:
            return Failure(kind="bad_request", message="data is not JSON (nor base64 JSON)")
        except TooDeep as exc:
            return _too_deep(exc.index)
        items = wire.value if type(wire.value) is list else [wire.value]
        if not items:
            return Failure(kind="invalid", message="empty batch")
        if len(items) > self.config.max_batch:
            return Failure(kind="invalid", message=f"batch too large (more than {self.config.max_batch} records)")
        if not wire.shallow and (deep := deep_records(None, items)):
            return _too_deep(deep[0] if len(items) > 1 else None)
        if request.endpoint == "import":
            return self._import(request, wire, items)
        try:
            return self._records(request, wire, items)
        except _Refused as exc:
            return exc.failure

    def _records(self, request: Incoming, wire: Wire, items: list[Any]) -> Batch:
        tokens = self.credentials
        endpoint, received_at = request.endpoint, request.received_at
        context = _context(request, wire) if endpoint != "engage" and endpoint != "groups" else {}
        records: list[Record] = []
        rejections: list[Rejection] = []
        batch = len(items) > 1
        for index, item in enumerate(items):
            try:
                if endpoint == "track" or endpoint == "alias":
                    if endpoint == "alias":
                        item = _alias_event(item)
                    props = rec.properties_of(item)
                    project = _project(tokens, props.get("token"))
                    records += self._event(item, props, project, received_at, context, strict=endpoint == "alias",
                                           rejections=rejections)
                else:
                    if type(item) is not dict:
                        raise rec.Invalid("record", "must be an object")
                    project = _project(tokens, item.get("$token", item.get("token")))
                    make = rec.profile if endpoint == "engage" else rec.group
                    records.append(make(item, project, SOURCE, received_at))
            except rec.Invalid as exc:
                prefix = f"record {index}: " if batch else ""
                raise _Refused(Failure(kind="invalid", message=f"{prefix}{exc.field} {exc.message}",
                                       details=(f"{prefix}{exc.field}: {exc.message}",))) from None
        return Batch(records=records, rejections=rejections)

    def _event(self, item: dict[str, Any], props: dict[str, Any], project: str, received_at: int,
               context: dict[str, Any], strict: bool, rejections: list[Rejection] | None) -> list[Record]:
        """An event's records: none when `$ignore`d, links for an identity
        event, else the event."""
        if rec.ignored(props):
            if rejections is not None:
                rejections.append(Rejection(project=project, source=SOURCE, reason="ignored",
                                            detail="event dropped: $ignore is set", received_at=received_at))
            return []
        links = rec.identity(item.get("event", ""), props, project, SOURCE, strict)
        if links is not None:
            return list(links)
        return [rec.event(item, props, project, SOURCE, received_at, context)]

    def _import(self, request: Incoming, wire: Wire, items: list[Any]) -> Batch | Failure:
        project = self._import_project(request, wire.params)
        if project is None:
            return _UNAUTHORIZED_IMPORT
        records, rejections, _ = self._import_records(request, wire, items, project)
        return Batch(records=records, rejections=rejections)

    def _import_records(self, request: Incoming, wire: Wire, items: list[Any], project: str
                        ) -> tuple[list[Record], list[Rejection], list[dict[str, Any]]]:
        """Valid records, what was quarantined (without `strict`), and the
        failed records (with `strict`: the caller is told instead)."""
        strict = flag(wire.params, "strict")
        context = _context(request, wire)
        records: list[Record] = []
        rejections: list[Rejection] = []
        failed: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            try:
                props = rec.properties_of(item)
                records += self._event(item, props, project, request.received_at, context, strict=False,
                                       rejections=rejections)
            except rec.Invalid as exc:
                if strict:
                    given = item.get("properties") if type(item) is dict else None
                    insert_id = given.get("$insert_id") if type(given) is dict else None
                    failed.append({"index": index, "$insert_id": insert_id, "field": exc.field,
                                   "message": exc.message})
                else:
                    record = msgspec.json.encode(item)
                    rejections.append(Rejection(
                        project=project, source=SOURCE, reason="invalid",
                        detail=f"record {index}: {exc.field} {exc.message}",
                        excerpt=record.decode()[:2048], received_at=request.received_at,
                        payload=envelope(b"[" + record + b"]", request), endpoint="import",
                    ))
        return records, rejections, failed

    def replay_request(self, project: str, endpoint: str, payload: str, received_at: int) -> Incoming | None:
        kept, token = opened(payload), credential_of(self.credentials, project)
        if kept is None or not isinstance(token, str) or endpoint != "import":
            return None
        basic = base64.b64encode(f"{token}:".encode()).decode()
        return request_for(kept, endpoint=endpoint, received_at=received_at,
                           headers={"authorization": f"Basic {basic}"}, query=[])

    def _import_project(self, request: Incoming, params: dict[str, str]) -> str | None:
        secrets = self.lookups.get("mixpanel_secrets", {})
        scheme, _, encoded = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
            except (binascii.Error, ValueError):
                return None
            if password:
                # A service account: its secret, for the project it names.
                project = secrets.get(password)
                wanted = dict(request.query).get("project_id")
                return project if project is not None and project == wanted else None
            return secrets.get(user) or self.credentials.get(user)
        key = params.get("api_key", dict(request.query).get("api_key"))
        return secrets.get(key) if key else None

    # -- responses ---------------------------------------------------------

    def render(self, request: Incoming, result: Outcome | Failure) -> Reply:
        if request.endpoint == "import" and self._import_shaped(request):
            return self._render_import(request, result)
        loud = verbose(request)
        if isinstance(result, Failure):
            status = _STATUS[result.kind]
            headers = retry_after_headers(result)
            if loud:
                return json_reply(status, {"status": 0, "error": _MESSAGES.get(result.kind, result.message)},
                                  headers)
            return Reply(status=status, body=b"0", content_type="text/plain; charset=utf-8", headers=headers)
        if request.endpoint == "alias":
            for outcome in result.aliases:
                if outcome in ("conflict", "cycle"):
                    error = ("alias already belongs to another person" if outcome == "conflict"
                             else "alias would create a cycle")
                    if loud:
                        return json_reply(400, {"status": 0, "error": error})
                    return Reply(status=400, body=b"0", content_type="text/plain; charset=utf-8")
        return _OK_JSON if loud else _OK_TEXT

    def _import_shaped(self, request: Incoming) -> bool:
        """/import's own JSON answers: to a JSON body, to `strict=1`, and
        before the body is known; the legacy encoding gets /track's."""
        if strict(request):
            return True
        if request.method == "GET":
            return False
        return not request.body or is_json_body(request.body)

    def _render_import(self, request: Incoming, result: Outcome | Failure) -> Reply:
        if isinstance(result, Failure):
            status = _STATUS[result.kind]
            message = "Invalid credentials" if result.kind == "unauthorized" else _MESSAGES.get(
                result.kind, result.message)
            return json_reply(status, {"code": status, "error": message, "status": _IMPORT_STATUS[status]},
                              retry_after_headers(result))
        imported = result.inserted + result.duplicates + len(result.aliases)
        failed = self._failed_records(request)
        if failed:
            return json_reply(400, {
                "code": 400, "error": "some data points in the request failed validation",
                "failed_records": failed, "num_records_imported": imported, "status": "Bad Request",
            })
        return json_reply(200, {"code": 200, "num_records_imported": imported, "status": "OK"})

    def _failed_records(self, request: Incoming) -> list[dict[str, Any]]:
        """With `strict=1`, the invalid records of a request that was
        stored (translation again: only on this path, and pure)."""
        if not strict(request):
            return []
        try:
            wire = decode(request)
        except (NoData, NotJson, TooDeep):
            return []
        items = wire.value if type(wire.value) is list else [wire.value]
        project = self._import_project(request, wire.params) or ""
        return self._import_records(request, wire, items, project)[2][:100]


class _Refused(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _project(tokens: Any, token: Any) -> str:
    project = tokens.get(token) if type(token) is str else None
    if project is None:
        raise _Refused(Failure(kind="unauthorized", message="invalid token"))
    return str(project)


def _alias_event(item: Any) -> Any:
    """/alias takes a `$create_alias` event, or its properties as such
    (`{"alias", "distinct_id", "token"}`)."""
    if type(item) is dict and "event" not in item:
        props = dict(item)
        if "token" not in props and "$token" in props:
            props["token"] = props.pop("$token")
        return {"event": rec.CREATE_ALIAS, "properties": props}
    if type(item) is dict and item.get("event") != rec.CREATE_ALIAS:
        raise rec.Invalid("event", f"must be {rec.CREATE_ALIAS} on /alias")
    return item


def _context(request: Incoming, wire: Wire) -> dict[str, Any]:
    """The client IP and User-Agent; no IP with `ip=0`."""
    context = request_context(request)
    if not flag(wire.params, "ip", default=True):
        del context["ip"]
    return context


def _too_deep(index: int | None) -> Failure:
    prefix = f"record {index}: " if index is not None else ""
    return Failure(kind="bad_request", message=prefix + TOO_DEEP)
