"""Inslytic's wire for its OpenAPI document (`Inslytic.describe`).

The dialect checks events field by field by hand, to phrase every problem
the vendor's way; `InslyticEvent` states the same rules as a schema (a
test holds the two together: tests/gateway/test_openapi_contract.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from dialects.describe import Auth, Body, Description, Operation, Param, json_answer

NonEmpty = Annotated[str, Meta(min_length=1)]
Timestamp = Annotated[str, Meta(
    description="ISO 8601 date-time with a timezone (stored as unix ms)",
    extra_json_schema={"format": "date-time"},
)]
Text = Annotated[str | None, Meta(description="null means absent")]


class InslyticEvent(msgspec.Struct, kw_only=True):
    """One event; unknown fields are ignored."""

    eventName: NonEmpty
    timestamp: Timestamp
    anonymousId: NonEmpty
    sessionId: Annotated[str, Meta(description="may be empty; stored as sent")]
    consentGiven: bool
    userId: Annotated[str, Meta(min_length=1)] | None = None
    properties: dict[str, str] | None = None
    pageUrl: Text = None
    pageTitle: Text = None
    referrer: Text = None
    utmSource: Text = None
    utmMedium: Text = None
    utmCampaign: Text = None
    deviceType: Literal["desktop", "mobile", "tablet"] | None = None
    browser: Text = None
    os: Text = None


class InslyticBatch(msgspec.Struct, kw_only=True):
    events: Annotated[list[InslyticEvent], Meta(
        min_length=1, max_length=1000,
        description="1 to `[dialects.inslytic] max_events` (default 1000) events; one invalid event "
                    "rejects the request whole",
    )]


class Accepted(msgspec.Struct):
    accepted: Annotated[int, Meta(ge=0, description="events accepted (duplicates included)")]


class ValidationFailed(msgspec.Struct):
    error: str
    details: Annotated[list[str], Meta(description='every problem, as "Event <i>: <field> <what is wrong>"'
                                                   " (at most 100 listed)")]


class InslyticError(msgspec.Struct):
    error: str


class Health(msgspec.Struct):
    status: Literal["ok"]


GZIP = Param(name="Content-Encoding", where="header", type=Literal["gzip"],
             description="the body is gzip-compressed (limits apply to the decompressed body)")

DESCRIPTION = Description(
    title="Dialgate: Inslytic ingestion API",
    description=(
        "Inslytic's ingestion API as Dialgate serves it (DIALECTS.md, inslytic). The body is JSON "
        "whatever the Content-Type says. Each project draws from a token bucket of "
        "`events_per_minute` tokens (one per event) refilled every 60 s: over it, 429 with Retry-After."
    ),
    auth=(Auth(name="apiKey", kind="bearer", credential="inslytic_keys",
               description="a key from the project's `inslytic_keys`"),),
    operations=(
        Operation(
            endpoint="ingest", method="POST", summary="Ingest a batch of events",
            params=(GZIP,), auth=("apiKey",),
            bodies=(Body(media_types=("application/json",), type=InslyticBatch),),
            answers=(
                json_answer(202, "Accepted and stored", Accepted),
                json_answer(400, "Invalid JSON, no events array, an invalid event or a corrupt gzip body",
                            ValidationFailed),
                json_answer(401, "Missing or unknown API key", InslyticError),
                json_answer(413, "Body over the limit (5 MB by default), compressed or not", InslyticError),
                json_answer(429, "Rate limited (the project's bucket, or `[limits] per_ip`)", InslyticError,
                            retry_after=True),
                json_answer(503, "Storage unavailable or the worker full; retry after Retry-After",
                            InslyticError, retry_after=True),
            ),
        ),
        Operation(
            endpoint="health", method="GET", summary="Health check (no credential)",
            answers=(
                json_answer(200, "The gateway is up", Health),
                json_answer(503, "The worker is full; retry after Retry-After", InslyticError, retry_after=True),
            ),
        ),
    ),
)
