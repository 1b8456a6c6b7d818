"""The bearer-key client API: `/api/client/{alias,identify,devices,events}`
(DIALECTS.md, section client).

Schemas are msgspec Structs that mirror DIALECTS.md field by field. The
vendor answers 422 with the first problem and the list of every problem, so
bodies are checked field by field against those schemas
(`dialects.problems.check`, paths like `0/user/email`) instead of stopping
at the first error the way a plain decode does; the rules msgspec cannot
express (IANA time zones, "anonymous_id or external_id") are `_Schema`'s. Absent and null are
kept apart (`UNSET` vs None): on identify an omitted field keeps the profile's
value and an explicit null clears it.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import UNSET, Meta, UnsetType

from dialects.base import (
    Batch,
    BearerDialect,
    CredentialList,
    Endpoint,
    Failure,
    Incoming,
    Outcome,
    Reply,
    json_reply,
    request_context,
    retry_after_headers,
)
from dialects.describe import Description
from dialects.limits import TOO_DEEP, NotJson, TooDeep, deep_record, load_json
from dialects.problems import Checked, Problems, check
from gateway.model import Alias, Device, Event, ProfileUpdate, Record

MB = 1024 * 1024
NonEmpty = Annotated[str, Meta(min_length=1)]
Optional = str | None | UnsetType
# Read once: validating a timezone must not touch the disk per request.
TIMEZONES = frozenset(zoneinfo.available_timezones())


class _Schema(Checked):
    """The vendor's field names are snake_case already; nothing is renamed."""

    # At least one of anonymous_id / external_id must be a string.
    needs_an_id: ClassVar[bool] = False

    def valid(self) -> bool:
        if self.needs_an_id and self.anonymous_id is None and self.external_id is None:  # type: ignore[attr-defined]  # subclasses' fields
            return False
        timezone = getattr(self, "timezone", None)
        return type(timezone) is not str or timezone in TIMEZONES

    @classmethod
    def field_problem(cls, name: str, value: Any) -> str | None:
        if name == "timezone" and value is not None and value not in TIMEZONES:
            return "not an IANA time zone name"
        return None

    @classmethod
    def record_problems(cls, value: dict[str, Any]) -> Iterable[tuple[str, str]]:
        if cls.needs_an_id and value.get("anonymous_id") is None and value.get("external_id") is None:
            return (("external_id", "anonymous_id or external_id is required"),)
        return ()


class AliasBody(_Schema, kw_only=True):
    anonymous_id: str
    external_id: str


class IdentifyBody(_Schema, kw_only=True, forbid_unknown_fields=True):
    needs_an_id = True

    anonymous_id: str | None = None
    external_id: str | None = None
    email: Optional = UNSET
    phone: Optional = UNSET
    timezone: Optional = UNSET
    locale: Optional = UNSET
    data: dict[str, Any] | None = None


class UserBlock(_Schema, kw_only=True, forbid_unknown_fields=True):
    email: Optional = UNSET
    phone: Optional = UNSET
    timezone: Optional = UNSET
    locale: Optional = UNSET
    data: dict[str, Any] | None = None


class DeviceBody(_Schema, kw_only=True):
    needs_an_id = True

    anonymous_id: str | None = None
    external_id: str | None = None
    device_id: str
    token: str | None = None
    os: str
    os_version: str | None = None
    model: str
    app_build: str
    app_version: str


class EventItem(_Schema, kw_only=True):
    needs_an_id = True

    name: NonEmpty
    anonymous_id: str | None = None
    external_id: str | None = None
    data: dict[str, Any] | None = None
    # The vendor's Android SDK sends its event data under this name.
    properties: dict[str, Any] | None = None
    user: UserBlock | None = None


class ClientConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    max_body_bytes: int = MB
    # Events per /api/client/events request; more is a 413.
    max_events: Annotated[int, Meta(ge=1)] = 1000


def _traits(block: IdentifyBody | UserBlock, project: str, person: str, now: int) -> ProfileUpdate:
    """The profile changes of identify (or an event's user block): set and unset."""
    set_: dict[str, Any] = {}
    unset: list[str] = []
    for field in ("email", "phone", "timezone", "locale"):
        value = getattr(block, field)
        if value is UNSET:
            continue
        if value is None:
            unset.append("$" + field)
        else:
            set_["$" + field] = value
    for key, value in (block.data or {}).items():
        if value is None:
            unset.append(key)
        else:
            set_[key] = value
    return ProfileUpdate(
        project=project, source="client", distinct_id=person, time=now, set=set_, unset=unset, touch=True
    )


def _person(anonymous_id: str | None, external_id: str | None) -> str:
    """The id records belong to: the known id when there is one."""
    person = external_id if external_id is not None else anonymous_id
    assert person is not None  # `check` has refused bodies without either
    return person


class Client(BearerDialect):
    name = "client"
    credential_lists = (CredentialList(field="client_keys"),)
    Config = ClientConfig

    config: ClientConfig

    def endpoints(self) -> Sequence[Endpoint]:
        limit = self.config.max_body_bytes
        return tuple(
            Endpoint(path=f"/api/client/{name}", name=name, max_body=limit)
            for name in ("alias", "identify", "devices", "events")
        )

    def describe(self) -> Description:
        from dialects.client_openapi import DESCRIPTION  # it names this module's schemas

        return DESCRIPTION

    def precheck(self, request: Incoming) -> Failure | None:
        if self._project(request) is None:
            return Failure(kind="unauthorized", message="Authorization error.")
        return None

    def translate(self, request: Incoming) -> Batch | Failure:
        project = self._project(request)
        if project is None:
            return Failure(kind="unauthorized", message="Authorization error.")
        events = request.endpoint == "events"
        try:
            # Only the events endpoint has records to name.
            body, shallow = load_json(request.body, () if events else None)
        except NotJson:
            return Failure(kind="bad_request", message="body: invalid JSON", details=("body: invalid JSON",))
        except TooDeep as exc:
            return _too_deep(exc.index)
        if events and type(body) is list and len(body) > self.config.max_events:
            # Counted before any event is looked at.
            limit = self.config.max_events
            problem = f"body: {len(body)} events, at most {limit} per request"
            return Failure(kind="too_large", message=problem, details=(problem,))
        records = body if events and type(body) is list else [body]
        if not shallow and (index := deep_record(request.body, records)) is not None:
            return _too_deep(index if records is body else None)
        problems = Problems()
        records = getattr(self, "_" + request.endpoint)(body, problems, request, project)
        if problems:
            return problems.failure("invalid")
        return Batch(records=records)

    def _alias(self, body: Any, problems: Problems, request: Incoming, project: str) -> list[Record]:
        parsed, found = check(body, AliasBody)
        if parsed is None:
            problems.extend("", found)
            return []
        return [Alias(project=project, source=self.name, alias=parsed.anonymous_id, distinct_id=parsed.external_id)]

    def _identify(self, body: Any, problems: Problems, request: Incoming, project: str) -> list[Record]:
        parsed, found = check(body, IdentifyBody)
        if parsed is None:
            problems.extend("", found)
            return []
        person = _person(parsed.anonymous_id, parsed.external_id)
        return [
            *_links(project, parsed.anonymous_id, parsed.external_id),
            _traits(parsed, project, person, request.received_at),
        ]

    def _devices(self, body: Any, problems: Problems, request: Incoming, project: str) -> list[Record]:
        parsed, found = check(body, DeviceBody)
        if parsed is None:
            problems.extend("", found)
            return []
        person = _person(parsed.anonymous_id, parsed.external_id)
        device = Device(
            project=project, source=self.name, distinct_id=person, device_id=parsed.device_id,
            push_token=parsed.token, os=parsed.os, os_version=parsed.os_version, model=parsed.model,
            app_build=parsed.app_build, app_version=parsed.app_version,
        )
        touch = ProfileUpdate(project=project, source=self.name, distinct_id=person,
                              time=request.received_at, touch=True)
        return [*_links(project, parsed.anonymous_id, parsed.external_id), touch, device]

    def _events(self, body: Any, problems: Problems, request: Incoming, project: str) -> list[Record]:
        if type(body) is not list:
            problems.extend("", ["body: must be an array of events"])
            return []
        if not body:
            problems.extend("", ["body: must contain at least one event"])
            return []
        records: list[Record] = []
        touched: set[str] = set()  # one profile touch per person is enough
        context = request_context(request)
        for index, item in enumerate(body):
            parsed, found = check(item, EventItem, str(index))
            if parsed is None:
                problems.extend("", found)
                continue
            person = _person(parsed.anonymous_id, parsed.external_id)
            data = parsed.data if parsed.data is not None else parsed.properties
            records += _links(project, parsed.anonymous_id, parsed.external_id)
            if parsed.user is not None:
                records.append(_traits(parsed.user, project, person, request.received_at))
            elif person not in touched:
                records.append(ProfileUpdate(project=project, source=self.name, distinct_id=person,
                                             time=request.received_at, touch=True))
            touched.add(person)
            records.append(
                Event(
                    project=project, source=self.name, name=parsed.name, distinct_id=person,
                    anonymous_id=parsed.anonymous_id, user_id=parsed.external_id,
                    time=request.received_at, received_at=request.received_at,
                    properties=data or {}, context=context,
                )
            )
        return records

    def render(self, request: Incoming, result: Outcome | Failure) -> Reply:
        if not isinstance(result, Failure):
            return Reply(status=204, content_type=None)
        if result.kind == "unauthorized":
            return json_reply(401, {"status": "error", "error": "Authorization error.", "code": 1000})
        if result.kind == "too_large" and result.details:
            # Too many events: the pipeline's own 413s have no details.
            return json_reply(413, {"status": "error", "error": result.details[0], "details": list(result.details)})
        status, message = {
            "bad_request": (400, result.message),
            "invalid": (422, result.message),
            "too_large": (413, "body: request body too large (limit 1 MB)"),
            "rate_limited": (429, "rate limited"),
            "unavailable": (503, "service unavailable, retry later"),
            "unstorable": (422, "body: the database refused this data"),
            "internal": (500, "internal error"),
        }[result.kind]
        details = list(result.details) or [message]
        return json_reply(
            status, {"status": "error", "error": message, "details": details}, retry_after_headers(result)
        )


def _too_deep(index: int | None) -> Failure:
    """An event (by index) or the body holds a value nested too deep."""
    problem = f"{'body' if index is None else index}: {TOO_DEEP}"
    return Failure(kind="invalid", message=problem, details=(problem,))


def _links(project: str, anonymous_id: str | None, external_id: str | None) -> list[Record]:
    if anonymous_id is None or external_id is None or anonymous_id == external_id:
        return []
    return [Alias(project=project, source="client", alias=anonymous_id, distinct_id=external_id)]

