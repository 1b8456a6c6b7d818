"""Cohorly: `/track`, `/engage`, `/alias` (DIALECTS.md, section cohorly).

The token travels in the `X-Cohorly-Token` header or per record
(`properties.token` on /track, `token` on /alias, `token` or `$token` on
/engage); a
per-record token wins and is never stored. Records of one batch may belong to
different projects. Bodies are validated by hand rather than with a Struct
schema because the vendor's errors name the record index and the `$` key at
fault, which a generic decoder path does not say in the vendor's words.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any, TypeGuard

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
    SlidingWindow,
    json_reply,
    request_context,
)
from dialects.cohorly_answers import error
from dialects.cohorly_openapi import DESCRIPTION
from dialects.describe import Description
from dialects.limits import TOO_DEEP, NotJson, Shallow, TooDeep, deep_record, load_json
from dialects.times import MAX_TIME_MS
from gateway.model import MAX_INSERT_ID, Alias, Event, ProfileUpdate, Record

MB = 1024 * 1024

# Lifted into canonical fields or credentials: never kept in properties.
_LIFTED = frozenset({"distinct_id", "time", "$insert_id", "token"})
# Mixpanel engage modifiers that are accepted and ignored.
_IGNORED_MODIFIERS = frozenset({"$ip", "$time", "$ignore_time", "$ignore_alias"})
_VERBS = ("$set_once", "$set", "$add", "$append", "$union", "$remove", "$unset", "$delete")


class _TrackItem(msgspec.Struct):
    """The shape of a valid /track event (other top-level keys are ignored);
    properties nested deeper than `Shallow` go to the general path, which
    checks the nesting limit."""

    event: str
    properties: dict[str, Shallow]


_decode_track = msgspec.json.Decoder(list[_TrackItem] | _TrackItem).decode


def _window() -> SlidingWindow:
    return SlidingWindow(requests=100, per_seconds=10)


class CohorlyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    # Per client IP, one budget shared by /track and /engage.
    rate_limit: SlidingWindow = msgspec.field(default_factory=_window)
    max_batch: int = 500
    max_body_bytes: int = MB


class Invalid(Exception):
    """A record is invalid; the message names the field at fault."""


def _nonempty_str(value: Any) -> TypeGuard[str]:
    return type(value) is str and value != ""


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


class Cohorly(Dialect):
    name = "cohorly"
    credential_lists = (CredentialList(field="cohorly_tokens"),)
    cors_headers = ("X-Cohorly-Token",)
    Config = CohorlyConfig

    config: CohorlyConfig

    def endpoints(self) -> Sequence[Endpoint]:
        limit = self.config.max_body_bytes
        return (
            Endpoint(path="/track", name="track", max_body=limit, ip_limited=True),
            Endpoint(path="/engage", name="engage", max_body=limit, ip_limited=True),
            Endpoint(path="/alias", name="alias", max_body=limit),
        )

    def ip_limit(self) -> SlidingWindow | None:
        return self.config.rate_limit

    def describe(self) -> Description:
        return DESCRIPTION

    def carried(self, request: Incoming) -> Iterable[Hashable]:
        """Each record's token (its own, else the header's), as translation
        resolves them; just the header's when the body is not JSON."""
        header_token = request.headers.get("x-cohorly-token")
        try:
            body = msgspec.json.decode(request.body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return () if header_token is None else (header_token,)
        tokens: set[Hashable] = set()
        for item in body if type(body) is list else [body]:
            if type(item) is not dict:
                continue
            if request.endpoint == "track":
                props = item.get("properties")
                token = props.get("token") if type(props) is dict else None
            elif request.endpoint == "engage":
                token = item.get("token", item.get("$token"))
            else:
                token = item.get("token")
            token = token if token is not None else header_token
            if type(token) is str:
                tokens.add(token)
        return tokens

    # -- translation -------------------------------------------------------

    def translate(self, request: Incoming) -> Batch | Failure:
        if request.endpoint == "track":
            fast = self._track_fast(request)
            if fast is not None:
                return fast
        return self._translate_general(request)

    def _translate_general(self, request: Incoming) -> Batch | Failure:
        try:
            body, shallow = load_json(request.body)
        except NotJson:
            return Failure(kind="bad_request", message="invalid JSON")
        except TooDeep as exc:
            return _too_deep(exc.index)
        header_token = request.headers.get("x-cohorly-token")
        try:
            if request.endpoint == "alias":
                if not shallow and deep_record(request.body, [body]) is not None:
                    return _too_deep(None)
                return self._alias(body, header_token)
            items, batched = self._items(body)
            if not shallow and (index := deep_record(request.body, items)) is not None:
                return _too_deep(index if batched else None)
            translate = self._event if request.endpoint == "track" else self._engage
            # One context for every event of the request (the records never change it).
            context = request_context(request)
            records: list[Record] = []
            for index, item in enumerate(items):
                try:
                    record = translate(item, header_token, request, context)
                except Invalid as exc:
                    prefix = f"record {index}: " if batched else ""
                    return Failure(kind="bad_request", message=prefix + str(exc))
                if record is None:
                    return Failure(kind="unauthorized", message="invalid token")
                records.append(record)
        except Invalid as exc:
            return Failure(kind="bad_request", message=str(exc))
        return Batch(records=records)

    def _track_fast(self, request: Incoming) -> Batch | Failure | None:
        """/track for a body that is entirely valid, decoded straight into
        typed records; None for anything else, which the general path then
        answers with the exact error (so the two can never disagree). One
        error is answered here: an unknown token on a record that is
        otherwise valid, after valid records, which is all the general path
        would have looked at (the reject path's common case)."""
        try:
            body = _decode_track(request.body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
        items = body if isinstance(body, list) else [body]  # decoded: never a list subclass
        if not items or len(items) > self.config.max_batch:
            return None
        header_token = request.headers.get("x-cohorly-token")
        credentials = self.credentials
        received_at = request.received_at
        context: dict[str, Any] | None = None  # made once a record is accepted
        records: list[Record] = []
        for item in items:
            name, props = item.event, item.properties
            distinct_id = props.get("distinct_id")
            time = props.get("time", received_at)
            insert_id = props.get("$insert_id")
            token = props.get("token", header_token)
            if (
                not name
                or type(distinct_id) is not str or not distinct_id
                or type(time) is not int or not 0 <= time <= MAX_TIME_MS
                or (insert_id is not None and (type(insert_id) is not str or not 0 < len(insert_id) <= MAX_INSERT_ID))
                or type(token) is not str
            ):
                return None
            project = credentials.get(token)
            if project is None:
                return Failure(kind="unauthorized", message="invalid token")
            # Decoded for this request alone: the lifted keys come out in
            # place (a copy per event was a tenth of a batch's translation).
            for key in _LIFTED:
                props.pop(key, None)
            if context is None:
                context = request_context(request)
            records.append(
                self._track_event(project, name, props, distinct_id, time, insert_id, received_at, context)
            )
        return Batch(records=records)

    def _items(self, body: Any) -> tuple[list[Any], bool]:
        if type(body) is dict:
            return [body], False
        if type(body) is not list:
            raise Invalid("body must be a JSON object or an array of objects")
        if not body:
            raise Invalid("empty batch")
        if len(body) > self.config.max_batch:
            raise Invalid("batch too large")
        return body, True

    def _project(self, record_token: Any, header_token: str | None) -> str | None:
        token = record_token if record_token is not None else header_token
        if type(token) is not str:
            return None
        return self.credentials.get(token)

    def _event(
        self, item: Any, header_token: str | None, request: Incoming, context: dict[str, Any]
    ) -> Event | None:
        if type(item) is not dict:
            raise Invalid("event must be an object")
        name = item.get("event")
        if not _nonempty_str(name):
            raise Invalid("event must be a non-empty string")
        props = item.get("properties")
        if type(props) is not dict:
            raise Invalid("properties must be an object")
        distinct_id = props.get("distinct_id")
        if not _nonempty_str(distinct_id):
            raise Invalid("properties.distinct_id must be a non-empty string")
        time = props.get("time")
        if time is None:
            time = request.received_at
        elif type(time) is float:
            if time != time or not 0 <= time <= MAX_TIME_MS:
                raise Invalid("properties.time must be unix milliseconds")
            time = int(time)
        elif type(time) is not int or not 0 <= time <= MAX_TIME_MS:
            raise Invalid("properties.time must be unix milliseconds (an integer)")
        insert_id = props.get("$insert_id")
        if insert_id is not None and (
            not _nonempty_str(insert_id) or len(insert_id) > MAX_INSERT_ID
        ):
            raise Invalid(f"properties.$insert_id must be a string of 1 to {MAX_INSERT_ID} characters")
        project = self._project(props.get("token"), header_token)
        if project is None:
            return None
        properties = {k: v for k, v in props.items() if k not in _LIFTED}
        return self._track_event(
            project, name, properties, distinct_id, time, insert_id, request.received_at, context
        )

    def _track_event(
        self, project: str, name: str, properties: dict[str, Any], distinct_id: str, time: int,
        insert_id: str | None, received_at: int, context: dict[str, Any],
    ) -> Event:
        """The canonical event of a validated /track record (both paths);
        `properties` without the lifted keys."""
        return Event(
            project=project,
            source=self.name,
            name=name,
            distinct_id=distinct_id,
            time=time,
            received_at=received_at,
            insert_id=insert_id,
            properties=properties,
            context=context,
        )

    def _engage(
        self, item: Any, header_token: str | None, request: Incoming, _context: dict[str, Any]
    ) -> ProfileUpdate | None:
        if type(item) is not dict:
            raise Invalid("operation must be an object")
        distinct_id = item.get("distinct_id", item.get("$distinct_id"))
        if not _nonempty_str(distinct_id):
            raise Invalid("distinct_id must be a non-empty string")
        verbs: dict[str, Any] = {}
        for key, value in item.items():
            if key in _VERBS:
                verbs[key] = value
            elif key.startswith("$") and key not in _IGNORED_MODIFIERS and key not in (
                "$token",
                "$distinct_id",
            ):
                raise Invalid(f"unknown verb {key}")
        if not verbs:
            raise Invalid("no update verb (" + ", ".join(_VERBS) + ")")
        fields: dict[str, Any] = {}
        for verb, value in verbs.items():
            fields[verb[1:]] = _check_verb(verb, value)
        project = self._project(item.get("token", item.get("$token")), header_token)
        if project is None:
            return None
        return ProfileUpdate(
            project=project,
            source=self.name,
            distinct_id=distinct_id,
            time=request.received_at,
            **fields,
        )

    def _alias(self, body: Any, header_token: str | None) -> Batch | Failure:
        if type(body) is not dict:
            raise Invalid("body must be a JSON object")
        alias = body.get("alias")
        distinct_id = body.get("distinct_id")
        if not _nonempty_str(alias):
            raise Invalid("alias must be a non-empty string")
        if not _nonempty_str(distinct_id):
            raise Invalid("distinct_id must be a non-empty string")
        if alias == distinct_id:
            raise Invalid("alias must differ from distinct_id")
        project = self._project(body.get("token"), header_token)
        if project is None:
            return Failure(kind="unauthorized", message="invalid token")
        record = Alias(
            project=project, source=self.name, alias=alias, distinct_id=distinct_id, strict=True
        )
        return Batch(records=[record])

    # -- responses ---------------------------------------------------------

    def render(self, request: Incoming, result: Outcome | Failure) -> Reply:
        if isinstance(result, Failure):
            return error(result)
        if request.endpoint == "track":
            return json_reply(200, {"status": 1, "inserted": result.inserted})
        if request.endpoint == "engage":
            return json_reply(200, {"status": 1, "applied": result.applied})
        for outcome in result.aliases:
            if outcome == "conflict":
                return json_reply(400, {"status": 0, "error": "alias already belongs to another person"})
            if outcome == "cycle":
                return json_reply(400, {"status": 0, "error": "alias would create a cycle"})
        return json_reply(200, {"status": 1})


def _too_deep(index: int | None) -> Failure:
    prefix = f"record {index}: " if index is not None else ""
    return Failure(kind="bad_request", message=prefix + TOO_DEEP)


def _check_verb(verb: str, value: Any) -> Any:
    if verb in ("$set", "$set_once", "$append", "$remove"):
        if type(value) is not dict:
            raise Invalid(f"{verb} must be an object")
        return value
    if verb == "$add":
        if type(value) is not dict:
            raise Invalid("$add must be an object of numbers")
        for key, amount in value.items():
            if not _is_number(amount):
                raise Invalid(f"$add.{key} must be a number")
        return value
    if verb == "$union":
        if type(value) is not dict:
            raise Invalid("$union must be an object of lists")
        for key, items in value.items():
            if type(items) is not list:
                raise Invalid(f"$union.{key} must be a list")
        return value
    if verb == "$unset":
        if type(value) is not list or not all(type(k) is str for k in value):
            raise Invalid("$unset must be an array of strings")
        return value
    # $delete
    if type(value) is not bool:
        raise Invalid("$delete must be a boolean")
    return value
