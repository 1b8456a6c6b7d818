"""Inslytic: `POST /v1/ingest`, `GET /health` (DIALECTS.md, section inslytic).

Batches of 1..1000 events with a project bearer key. The vendor lists every
problem of a rejected batch as "Event <i>: <field> <what is wrong>", so events
are checked field by field by hand and each problem phrased that way; one
invalid event rejects the request whole. Requests draw from a per-project
token bucket (one token per event) after validation, so invalid requests
cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from dialects.base import (
    Batch,
    BearerDialect,
    CredentialList,
    Endpoint,
    Failure,
    Incoming,
    Outcome,
    ProjectField,
    Reply,
    TokenBucket,
    json_reply,
    retry_after_headers,
)
from dialects.describe import Description
from dialects.inslytic_openapi import DESCRIPTION
from dialects.limits import MAX_PROBLEMS, TOO_DEEP, NotJson, TooDeep, deep_record, load_json
from dialects.problems import Problems
from dialects.times import iso8601_ms
from gateway.model import Alias, Event, Record

MB = 1024 * 1024
MAX_EVENTS = 1000
DEVICE_TYPES = ("desktop", "mobile", "tablet")
# Optional string fields (null means absent) and where they go in context.
_CONTEXT_FIELDS = {
    "pageUrl": "page_url",
    "pageTitle": "page_title",
    "referrer": "referrer",
    "utmSource": "utm_source",
    "utmMedium": "utm_medium",
    "utmCampaign": "utm_campaign",
    "browser": "browser",
    "os": "os",
}


class InslyticConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    # Per project; `inslytic_events_per_minute` in [[projects]] overrides it.
    events_per_minute: Annotated[int, Meta(ge=1)] = 1000
    max_events: Annotated[int, Meta(ge=1)] = MAX_EVENTS
    max_body_bytes: int = 5 * MB


class Inslytic(BearerDialect):
    name = "inslytic"
    credential_lists = (CredentialList(field="inslytic_keys"),)
    # Overrides [dialects.inslytic] events_per_minute for the project.
    project_fields = (
        ProjectField(field="inslytic_events_per_minute", type=Annotated[int, Meta(ge=1)] | None),
    )
    Config = InslyticConfig

    config: InslyticConfig

    def endpoints(self) -> Sequence[Endpoint]:
        return (
            Endpoint(path="/v1/ingest", name="ingest", max_body=self.config.max_body_bytes),
            Endpoint(path="/health", name="health", methods=("GET",), max_body=0, per_ip=False),
        )

    def describe(self) -> Description:
        return DESCRIPTION

    def project_limit(self, project: str) -> TokenBucket | None:
        override = self.project_options.get(project, {}).get("inslytic_events_per_minute")
        capacity = override if override is not None else self.config.events_per_minute
        return TokenBucket(capacity=capacity, per_seconds=60)

    def precheck(self, request: Incoming) -> Failure | None:
        if request.endpoint != "health" and self._project(request) is None:
            return Failure(kind="unauthorized", message="Invalid API key")
        return None

    def translate(self, request: Incoming) -> Batch | Failure:
        if request.endpoint == "health":
            return Batch()
        project = self._project(request)
        if project is None:
            return Failure(kind="unauthorized", message="Invalid API key")
        try:
            body, shallow = load_json(request.body, ("events",))
        except NotJson:
            return _invalid(["Invalid JSON"])
        except TooDeep as exc:
            return _invalid([_too_deep(exc.index)])
        items = body.get("events") if type(body) is dict else None
        if type(items) is not list:
            return _invalid(["events must be an array"])
        if not items:
            return _invalid(["events must contain at least 1 event"])
        if len(items) > self.config.max_events:
            return _invalid([f"events must contain at most {self.config.max_events} events"])
        if not shallow and (index := deep_record(request.body, items)) is not None:
            return _invalid([_too_deep(index)])
        problems = Problems()
        records: list[Record] = []
        for index, item in enumerate(items):
            found, more = self._event(item, project, request, records)
            if found:
                problems.extend(f"Event {index}: ", found, more)
        if problems:
            return problems.failure("invalid")
        return Batch(records=records, project=project, cost=len(items))

    def _event(self, item: Any, project: str, request: Incoming, out: list[Record]) -> tuple[list[str], int]:
        """The event's problems (the first MAX_PROBLEMS of its properties
        phrased, and how many more), or its records appended to `out`."""
        if type(item) is not dict:
            return ["must be an object"], 0
        problems: list[str] = []
        more = 0
        # Any: checked by hand, and the problems found (not narrowing) say
        # whether the event goes on to be built from these values.
        name: Any = item.get("eventName")
        if name is None:
            problems.append("eventName is required")
        elif type(name) is not str or not name:
            problems.append("eventName must be a non-empty string")
        stamp = item.get("timestamp")
        time: int | None = None
        if stamp is None:
            problems.append("timestamp is required")
        elif type(stamp) is not str or (time := iso8601_ms(stamp)) is None:
            problems.append("timestamp must be an ISO 8601 date-time with a timezone")
        anonymous_id: Any = item.get("anonymousId")
        if anonymous_id is None:
            problems.append("anonymousId is required")
        elif type(anonymous_id) is not str or not anonymous_id:
            problems.append("anonymousId must be a non-empty string")
        session_id = item.get("sessionId")
        if session_id is None:
            problems.append("sessionId is required")
        elif type(session_id) is not str:
            problems.append("sessionId must be a string")
        consent = item.get("consentGiven")
        if consent is None:
            problems.append("consentGiven is required")
        elif type(consent) is not bool:
            problems.append("consentGiven must be a boolean")
        user_id = item.get("userId")
        if user_id is not None and (type(user_id) is not str or not user_id):
            problems.append("userId must be a non-empty string or null")
        properties = item.get("properties")
        if properties is None:
            properties = {}
        elif type(properties) is not dict:
            problems.append("properties must be an object of string values")
        else:
            bad = [k for k, v in properties.items() if type(v) is not str]
            problems += [f"properties.{k} must be a string" for k in bad[:MAX_PROBLEMS]]
            more = max(0, len(bad) - MAX_PROBLEMS)
        context: dict[str, Any] = {"ip": request.client_ip}
        for field, key in _CONTEXT_FIELDS.items():
            value = item.get(field)
            if value is None:
                continue
            if type(value) is not str:
                problems.append(f"{field} must be a string")
            else:
                context[key] = value
        device_type = item.get("deviceType")
        if device_type is not None:
            if device_type not in DEVICE_TYPES:
                problems.append("deviceType must be one of " + ", ".join(DEVICE_TYPES))
            else:
                context["device_type"] = device_type
        if problems:
            return problems, more
        agent = request.headers.get("user-agent")
        if agent:
            context["user_agent"] = agent
        if user_id is not None and user_id != anonymous_id:
            out.append(Alias(project=project, source=self.name, alias=anonymous_id, distinct_id=user_id))
        out.append(
            Event(
                project=project,
                source=self.name,
                name=name,
                distinct_id=user_id if user_id is not None else anonymous_id,
                anonymous_id=anonymous_id,
                user_id=user_id,
                time=time,  # type: ignore[arg-type]  # set when no problem was found
                received_at=request.received_at,
                session_id=session_id,
                properties=properties,
                context=context,
                consent=consent,
            )
        )
        return [], 0

    def render(self, request: Incoming, result: Outcome | Failure) -> Reply:
        if request.endpoint == "health" and not isinstance(result, Failure):
            return json_reply(200, {"status": "ok"})
        if not isinstance(result, Failure):
            return json_reply(202, {"accepted": result.inserted + result.duplicates})
        if result.kind in ("bad_request", "invalid"):
            details = list(result.details) or [result.message]
            return json_reply(400, {"error": "Validation failed", "details": details})
        status, message = {
            "unauthorized": (401, "Invalid API key"),
            "too_large": (413, "Payload too large"),
            "rate_limited": (429, "Rate limit exceeded"),
            "unavailable": (503, "Service unavailable"),
            "unstorable": (400, "Validation failed"),
            "internal": (500, "Internal server error"),
        }[result.kind]
        return json_reply(status, {"error": message}, retry_after_headers(result))


def _too_deep(index: int | None) -> str:
    where = f"Event {index}:" if index is not None else "body:"
    return f"{where} {TOO_DEEP}"


def _invalid(problems: list[str]) -> Failure:
    return Failure(kind="invalid", message=problems[0], details=tuple(problems))
