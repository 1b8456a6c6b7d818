"""The collect endpoint's wire for its OpenAPI document (`Collect.describe`).

The dialect normalises three generations of payloads by hand and answers
200 to all but invalid JSON and oversized bodies (what it cannot store goes
to the quarantine), so these Structs describe the current format, with the
older names the dialect also reads said in their descriptions; every field
is optional on the wire.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from dialects.describe import CREDENTIAL_KEY, Answer, Auth, Body, Description, Operation, Param, json_answer

KB = 1024
Site = Annotated[str, Meta(description="the site id (digits) of one of the project's `collect_sources`",
                           extra_json_schema={CREDENTIAL_KEY: "collect_sources.site"})]
Token = Annotated[str, Meta(description="the source key of that `collect_sources` entry",
                            extra_json_schema={CREDENTIAL_KEY: "collect_sources.token"})]
Id = str | int


class CollectUser(msgspec.Struct, kw_only=True):
    """The person; other traits (email, phone, ...) go to the event's context."""

    id: Annotated[Id, Meta(description="the known id")] | UnsetType = UNSET
    consistent_anonymous_id: Annotated[Id, Meta(description="the anonymous id")] | UnsetType = UNSET


class CollectContext(msgspec.Struct, kw_only=True):
    """Stored as the event's context. Also read: `eventId` for `event_id`,
    an ISO date `created` for `event_timestamp`, `page.location` for `page.url`."""

    event_id: Annotated[str, Meta(description="the idempotency key")] | UnsetType = UNSET
    event_timestamp: Annotated[int | Annotated[str, Meta(pattern="^[0-9]+$")], Meta(
        description="unix ms, an integer or a numeric string; absent: receipt time")] | UnsetType = UNSET
    page: dict[str, Any] | UnsetType = UNSET
    device: dict[str, Any] | UnsetType = UNSET
    app: dict[str, Any] | UnsetType = UNSET


class CollectEvent(msgspec.Struct, kw_only=True):
    """One event: `event_name` (older tags: `event`) and its properties at
    the root (older tags: in a `properties` object). An event without a
    name is not stored (quarantined) and still answered 200."""

    event_name: Annotated[str, Meta(min_length=1)] | UnsetType = UNSET
    user: CollectUser | UnsetType = UNSET
    context: CollectContext | UnsetType = UNSET


class CollectBatch(msgspec.Struct, kw_only=True):
    """Not atomic: an event over 32 KB (as compact JSON) or without a name is
    dropped into the quarantine and the rest stored."""

    batch: list[CollectEvent]


class Ok(msgspec.Struct):
    status: Literal["ok"]


class CollectError(msgspec.Struct):
    error: str


Pixel = Annotated[str, Meta(description="a 1x1 transparent GIF", extra_json_schema={"format": "binary"})]

SOURCE = (
    Param(name="tc_s", type=Site, description="missing or unknown (with `token`): 200, nothing stored"),
    Param(name="token", type=Token, description="or as `Authorization: Bearer`"),
)
GZIP = Param(name="Content-Encoding", where="header", type=Literal["gzip"],
             description="the body is gzip-compressed (limits apply to the decompressed body)")
UNAVAILABLE = Answer(status=503, description="Storage unavailable or the worker full (the one case 200 would "
                     "lose data)", bodies=(("application/json", CollectError),), retry_after=True)


def _post(endpoint: str, summary: str, type_: Any, limit: str) -> Operation:
    return Operation(
        endpoint=endpoint, method="POST", summary=summary, params=(*SOURCE, GZIP), auth=("sourceKey", "bearer"),
        bodies=(Body(media_types=("application/json", "text/plain"), type=type_,
                     description="JSON whatever the Content-Type says"),),
        answers=(
            json_answer(200, "Taken: stored, or quarantined when it cannot be (unknown source, no event name, "
                        "not an event)", Ok),
            json_answer(400, f"Invalid JSON, a corrupt gzip body, or a body over {limit}", CollectError),
            UNAVAILABLE,
        ),
    )


DESCRIPTION = Description(
    title="Dialgate: collect endpoint",
    description=(
        "The tc_s/token collect endpoint as Dialgate serves it (DIALECTS.md, collect), under `/events` and "
        "`/cdp/events`. It answers 200 to everything but invalid JSON and oversized bodies; what cannot be "
        "stored is kept in the quarantine, not told. It has no rate limit and never answers 429."
    ),
    auth=(
        Auth(name="sourceKey", kind="query", param="token", credential="collect_sources.token",
             description="the source key, with the site as `tc_s`"),
        Auth(name="bearer", kind="bearer", credential="collect_sources.token",
             description="the source key instead of `token` (the site still as `tc_s`)"),
    ),
    operations=(
        _post("event", "Send one event", CollectEvent, f"{32} KB"),
        _post("batch", "Send a batch of events", CollectBatch, f"{500} KB"),
        Operation(
            endpoint="event", method="GET", summary="The pixel: one event in the query string",
            description=(
                "Every other query parameter is a property in bracket notation (`user[id]=`, "
                "`items[0][product][id]=`); an index builds a list; values stay strings."
            ),
            params=(*SOURCE, Param(name="event_name", description="the event's name; absent: not stored")),
            auth=("sourceKey",),
            answers=(
                Answer(status=200, description="Taken (as the POST form); a 1x1 transparent GIF",
                       bodies=(("image/gif", Pixel),), headers=(("Cache-Control", "no-store"),)),
                UNAVAILABLE,
            ),
        ),
    ),
)
