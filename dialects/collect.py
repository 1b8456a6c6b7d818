"""The tc_s/token collect endpoint (DIALECTS.md, section collect).

`POST /events` (one event) and `POST /events/batch` (`{"batch": [...]}`),
also under `/cdp/`, plus the `GET /events` pixel. The vendor answers 200 to
everything but invalid JSON and oversized requests, so whatever cannot be
stored is not an error for the caller: it goes to the quarantine with a
reason code. Batches are not atomic.

Several payload generations are in the field; all are normalised here:
- current: `event_name`, properties at the root, `user{id,
  consistent_anonymous_id, traits...}`, `context{event_id, event_timestamp,
  page, device, app}`;
- 2026 tags: the same with `context{eventId, created (ISO), version: 2}`;
- 2023 tags: `event`, `properties{..., user, url, created}`, `page`, `device`
  and `eventId` at the root, `version: 1`.
"""

from __future__ import annotations

import base64
import re
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
    Reply,
    bearer,
    json_reply,
)
from dialects.collect_openapi import DESCRIPTION
from dialects.describe import Description
from dialects.limits import TOO_DEEP, NotJson, TooDeep, deep_record, deep_records, load_json
from dialects.replay import credential_of, envelope, opened, request_for
from dialects.times import MAX_TIME_MS, lenient_iso_ms
from gateway.model import Alias, Event, Record, Rejection, long_id

KB = 1024
# Root keys that are not properties: names, ids, time and context.
_RESERVED = frozenset(
    {"event_name", "event", "user", "context", "properties", "eventId", "event_id",
     "event_timestamp", "created", "page", "device", "app", "version"}
)
# Root keys of the older generations that belong in context.
_ROOT_CONTEXT = ("page", "device", "app", "version")
# Dropped events of one batch kept as rejections each; the rest of a request
# (a 1 KB gzip body can hold 170,000 empty events) are summed up in one per
# reason, so a flood of them costs a count, not a record each.
MAX_REJECTIONS = 100
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
_encode = msgspec.json.Encoder().encode


class CollectConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    max_request_bytes: int = 32 * KB
    max_batch_bytes: int = 500 * KB
    max_event_bytes: int = 32 * KB  # per event of a batch, as compact JSON


class CollectSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One `collect_sources` entry of a project: a site and its source key."""

    site: int
    token: str

    def __repr__(self) -> str:
        return f"CollectSource(site={self.site}, token=<masked>)"


def _source_key(source: CollectSource) -> tuple[int, str]:
    return (source.site, source.token)


def _source_empty(source: CollectSource) -> bool:
    return source.token == ""


class Dropped(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _ms(value: Any) -> int | None:
    """event_timestamp: unix ms as an integer or a numeric string."""
    if type(value) is str and _digits(value.strip(), 20):
        value = int(value.strip())
    elif type(value) is float and value == value:
        value = int(value)
    if type(value) is int and 0 <= value <= MAX_TIME_MS:
        return value
    return None


def _digits(text: str, most: int) -> bool:
    """ASCII digits only, and few: str.isdigit() accepts "²", which int()
    refuses, and int() refuses strings of more than 4300 digits."""
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


_BRACKET = re.compile(r"\[([^\]]*)\]")


def pixel_payload(query: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Query string in bracket notation -> nested dict; an index makes a list."""
    root: dict[str, Any] = {}
    # Empty slots a sparse index may create, over the whole query: items[9999999999]
    # must not build a list of that length. Past the budget an index appends.
    spare = len(query)
    for raw_key, value in query:
        if raw_key in ("tc_s", "token"):
            continue
        head, _, rest = raw_key.partition("[")
        parts = [head] + (_BRACKET.findall("[" + rest) if rest else [])
        node: Any = root
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            following = parts[index + 1] if not last else None
            make = (list) if following is not None and _digits(following, 9) else (dict)
            if isinstance(node, list):
                slot = int(part) if _digits(part, 9) else len(node)
                if slot - len(node) > spare:
                    slot = len(node)
                spare -= max(0, slot - len(node))
                while len(node) <= slot:
                    node.append(None)
                if last:
                    node[slot] = value
                elif not isinstance(node[slot], (dict, list)):
                    node[slot] = make()
                node = node[slot] if not last else node
            else:
                if last:
                    node[part] = value
                elif not isinstance(node.get(part), (dict, list)):
                    node[part] = make()
                node = node[part] if not last else node
    return root


def _replay(request: Incoming, in_batch: bool, reason: str, excerpt: bytes) -> tuple[str, bytes] | None:
    """The endpoint and body that re-run one dropped event: a batch's item
    as a batch of one (under the same per-event limits); none for a batch's
    too-deep item, which cannot be cut out of its batch."""
    if not in_batch:
        # A pixel's too: its excerpt is the JSON its query decoded to.
        return (request.endpoint, excerpt)
    return None if reason == "too_deep" else ("batch", b'{"batch":[' + excerpt + b"]}")


class Collect(Dialect):
    name = "collect"
    credential_lists = (
        CredentialList(field="collect_sources", item=CollectSource, key=_source_key, empty=_source_empty),
    )
    Config = CollectConfig

    config: CollectConfig

    def endpoints(self) -> Sequence[Endpoint]:
        single, batch = self.config.max_request_bytes, self.config.max_batch_bytes
        endpoints = []
        for prefix in ("", "/cdp"):
            # Never 429 (the contract): not under `[limits] per_ip`.
            endpoints.append(Endpoint(path=f"{prefix}/events", name="event", methods=("GET", "POST"),
                                      max_body=single, per_ip=False))
            endpoints.append(Endpoint(path=f"{prefix}/events/batch", name="batch", max_body=batch, per_ip=False))
        return endpoints

    def describe(self) -> Description:
        return DESCRIPTION

    def carried(self, request: Incoming) -> Iterable[Hashable]:
        query = dict(request.query)
        token = bearer(request) or query.get("token")
        site = query.get("tc_s", "").strip()
        return ((int(site), token),) if token and _digits(site, 18) else ()

    def _project(self, request: Incoming) -> str | None:
        query = dict(request.query)
        token = query.get("token")
        key = bearer(request)
        if key is not None:
            token = key
        site = query.get("tc_s", "").strip()
        if not token or not _digits(site, 18):
            return None
        return self.credentials.get((int(site), token))

    def translate(self, request: Incoming) -> Batch | Failure:
        shallow = False
        in_batch = request.endpoint == "batch"
        if request.method == "GET":
            body: Any = pixel_payload(request.query)
            if deep_record(None, [body]) is not None:
                # Bracket notation nested too deep: quarantined (answered
                # with the pixel, as everything else), the query as excerpt.
                query = "&".join(f"{k}={v}" for k, v in request.query if k not in ("tc_s", "token"))
                return self._dropped("too_deep", TOO_DEEP, query.encode(), request)
            raw = _encode(body)
        else:
            raw = request.body
            try:
                body, shallow = load_json(raw, ("batch",) if in_batch else ())
            except NotJson:
                return Failure(kind="bad_request", message="invalid JSON")
            except TooDeep as exc:
                # Valid JSON deeper than the decoder follows: not an error
                # for the caller, quarantined whole (it cannot be split).
                where = f"batch[{exc.index}]: " if in_batch and exc.index is not None else ""
                return self._dropped("too_deep", where + TOO_DEEP, raw, request)
        project = self._project(request)
        if project is None:
            unknown = self._reject(None, "unknown_source", "missing or unknown tc_s/token", raw, request)
            return Batch(rejections=[unknown])
        if in_batch:
            items = body.get("batch") if type(body) is dict else None
            if type(items) is not list:
                return Batch(rejections=[self._reject(project, "not_a_batch", "body has no batch array", raw, request)])
        else:
            items = [body]
        deep = set() if shallow else set(deep_records(raw, items))
        batch = Batch()
        beyond: dict[str, int] = {}  # reason -> dropped events past MAX_REJECTIONS
        for index, item in enumerate(items):
            # The common refusals without an exception: a flood of them
            # costs a check each.
            reason = _refused(item) if not deep or index not in deep else "too_deep"
            if reason is not None:
                if len(batch.rejections) >= MAX_REJECTIONS:
                    beyond[reason] = beyond.get(reason, 0) + 1
                    continue
                dropped = Dropped(reason, _DETAILS[reason])
            else:
                try:
                    if in_batch and len(encoded := _encode(item)) > self.config.max_event_bytes:
                        raise Dropped("event_too_large", f"{len(encoded)} bytes over {self.config.max_event_bytes}")
                    batch.records += self._event(item, project, request)
                    continue
                except Dropped as exc:
                    dropped = exc
            if len(batch.rejections) >= MAX_REJECTIONS:
                beyond[dropped.reason] = beyond.get(dropped.reason, 0) + 1
                continue
            where = f"batch[{index}]: " if in_batch else ""
            excerpt = _encode(item) if in_batch and dropped.reason != "too_deep" else raw
            batch.rejections.append(self._reject(project, dropped.reason, where + str(dropped), excerpt, request,
                                                 replay=_replay(request, in_batch, dropped.reason, excerpt)))
        # First, so that the quarantine's sampling keeps the count.
        batch.rejections[:0] = [
            self._reject(project, reason, f"{count} more events of this batch dropped for this reason", b"", request)
            for reason, count in beyond.items()
        ]
        return batch

    def _dropped(self, reason: str, detail: str, raw: bytes, request: Incoming) -> Batch:
        """The whole request quarantined, under its project when it has one."""
        replay = (request.endpoint, raw) if request.method == "POST" else None
        return Batch(rejections=[self._reject(self._project(request), reason, detail, raw, request, replay=replay)])

    def _reject(self, project: str | None, reason: str, detail: str, raw: bytes, request: Incoming,
                replay: tuple[str, bytes] | None = None) -> Rejection:
        """`replay`: the endpoint and body that re-run what was dropped."""
        return Rejection(
            project=project, source=self.name, reason=reason, detail=detail,
            # The pipeline bounds the excerpt; credentials are never in a body.
            excerpt=raw[:64 * KB].decode("utf-8", "replace"), received_at=request.received_at,
            payload=envelope(replay[1], request) if replay is not None else None,
            endpoint=replay[0] if replay is not None else None,
        )

    def replay_request(self, project: str, endpoint: str, payload: str, received_at: int) -> Incoming | None:
        kept, key = opened(payload), credential_of(self.credentials, project)
        if kept is None or not isinstance(key, tuple):
            return None
        site, token = key
        return request_for(kept, endpoint=endpoint, received_at=received_at, headers={},
                           query=[("tc_s", str(site)), ("token", str(token))])

    def _event(self, item: Any, project: str, request: Incoming) -> list[Record]:
        if type(item) is not dict:
            raise Dropped("not_an_event", "not a JSON object")
        name = item.get("event_name", item.get("event"))
        if type(name) is not str or not name:
            raise Dropped("no_event_name", "no event_name")
        context = item.get("context")
        context = dict(context) if type(context) is dict else {}
        for key in _ROOT_CONTEXT:
            if key in item and key not in context:
                context[key] = item[key]
        nested = item.get("properties")
        properties = {k: v for k, v in item.items() if k not in _RESERVED}
        user = item.get("user")
        created = item.get("created")
        if type(nested) is dict:
            # 2023 tags: properties in an object, with user and created inside.
            properties.update({k: v for k, v in nested.items() if k not in ("user", "created")})
            if user is None:
                user = nested.get("user")
            if created is None:
                created = nested.get("created")
        user = dict(user) if type(user) is dict else {}
        page = context.get("page")
        if type(page) is dict and "url" not in page and "location" in page:
            context["page"] = {**page, "url": page["location"]}
        event_id = context.get("event_id", context.get("eventId", item.get("event_id", item.get("eventId"))))
        if type(event_id) in (int, float):
            event_id = str(event_id)
        insert_id = event_id if type(event_id) is str and event_id else None
        time = _ms(context.get("event_timestamp", item.get("event_timestamp")))
        if time is None:
            created = created if created is not None else context.get("created")
            time = lenient_iso_ms(created) if type(created) is str else None
        if time is None:
            time = request.received_at
        device = context.get("device")
        if not (type(device) is dict and device.get("ip")) and not context.get("ip"):
            context["ip"] = request.client_ip
        agent = request.headers.get("user-agent")
        if agent and "user_agent" not in context:
            context["user_agent"] = agent
        user_id = _id(user.get("id"))
        anonymous_id = _id(user.get("consistent_anonymous_id"))
        if user:
            context["user"] = user
        records: list[Record] = []
        if user_id is not None and anonymous_id is not None and user_id != anonymous_id:
            records.append(Alias(project=project, source=self.name, alias=anonymous_id, distinct_id=user_id))
        event = Event(
            project=project, source=self.name, name=name,
            distinct_id=user_id if user_id is not None else anonymous_id,
            anonymous_id=anonymous_id, user_id=user_id, time=time,
            received_at=request.received_at, insert_id=insert_id,
            properties=properties, context=context,
        )
        if (field := long_id(event)) is not None:
            # Stored without its key, a retry would be stored twice.
            raise Dropped("id_too_long", f"{field} over its limit")
        records.append(event)
        return records

    def render(self, request: Incoming, result: Outcome | Failure) -> Reply:
        if isinstance(result, Failure):
            if result.kind in ("bad_request", "invalid", "unstorable"):
                # Unstorable: what the database refused is answered like
                # invalid input (README), never a 200 for data not kept.
                return json_reply(400, {"error": result.message})
            if result.kind == "too_large":
                return json_reply(400, {"error": "request too large"})
            if result.kind == "unavailable":
                # Storage is down, or the worker full: the one case where
                # 200 would lose data.
                retry = (("retry-after", str(result.retry_after or 5)),)
                return json_reply(503, {"error": "service unavailable"}, retry)
            # Internal errors, and limits this dialect is never put under:
            # never a 200 for data not kept.
            return json_reply(500, {"error": "internal error"})
        if request.method == "GET":
            return Reply(status=200, body=PIXEL, content_type="image/gif", headers=(("cache-control", "no-store"),))
        return json_reply(200, {"status": "ok"})


_DETAILS = {"too_deep": TOO_DEEP, "not_an_event": "not a JSON object", "no_event_name": "no event_name"}


def _refused(item: Any) -> str | None:
    """Why `item` is dropped (a reason of `_DETAILS`), for the reasons seen
    without translating it."""
    if type(item) is not dict:
        return "not_an_event"
    name = item.get("event_name", item.get("event"))
    if type(name) is not str or not name:
        return "no_event_name"
    return None


def _id(value: Any) -> str | None:
    if type(value) is str and value:
        return value
    if type(value) is int:
        return str(value)
    return None
