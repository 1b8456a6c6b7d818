"""Cohorly's wire for its OpenAPI document (`Cohorly.describe`).

The dialect validates records by hand, to name the record index and the
`$` key at fault in the vendor's words; these Structs state the same rules
as a schema, the /track properties by the types the fast path decodes
with. The rest is said in the descriptions: at least one verb per /engage
operation, no unknown `$` key, `alias` different from `distinct_id`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from dialects.describe import CREDENTIAL_KEY, Auth, Body, Description, Operation, Param, json_answer
from dialects.times import MAX_TIME_MS
from gateway.model import MAX_INSERT_ID

NonEmpty = Annotated[str, Meta(min_length=1)]
Token = Annotated[str, Meta(description="the project's token; wins over the X-Cohorly-Token header, never stored",
                            extra_json_schema={CREDENTIAL_KEY: "cohorly_tokens"})]
Millis = Annotated[int, Meta(ge=0, le=MAX_TIME_MS)] | Annotated[float, Meta(ge=0, le=MAX_TIME_MS)]
Batch = Meta(min_length=1, max_length=500, description="1 to `[dialects.cohorly] max_batch` (default 500) "
                                                      "records; one invalid record rejects the request whole")


class TrackProperties(msgspec.Struct, kw_only=True):
    """The event's properties: other keys are stored as they are."""

    distinct_id: NonEmpty
    time: Annotated[Millis, Meta(description="unix ms (a float is truncated); absent: receipt time")] | (
        UnsetType) = UNSET
    insert_id: Annotated[str, Meta(min_length=1, max_length=MAX_INSERT_ID, description="idempotency key")] | (
        UnsetType) = msgspec.field(default=UNSET, name="$insert_id")
    token: Token | UnsetType = UNSET


class TrackEvent(msgspec.Struct, kw_only=True):
    event: NonEmpty
    properties: TrackProperties


class EngageOperation(msgspec.Struct, kw_only=True):
    """One profile operation: `distinct_id` (or `$distinct_id`) and at least
    one verb. Verbs apply in the order $set_once, $set, $add, $append,
    $union, $remove, $unset; `$delete: true` deletes the profile. Any other
    `$` key is a 400."""

    distinct_id: NonEmpty
    token: Token | UnsetType = UNSET
    set_once: dict[str, Any] | UnsetType = msgspec.field(default=UNSET, name="$set_once")
    set: dict[str, Any] | UnsetType = msgspec.field(default=UNSET, name="$set")
    add: dict[str, int | float] | UnsetType = msgspec.field(default=UNSET, name="$add")
    append: dict[str, Any] | UnsetType = msgspec.field(default=UNSET, name="$append")
    union: dict[str, list[Any]] | UnsetType = msgspec.field(default=UNSET, name="$union")
    remove: dict[str, Any] | UnsetType = msgspec.field(default=UNSET, name="$remove")
    unset: list[str] | UnsetType = msgspec.field(default=UNSET, name="$unset")
    delete: bool | UnsetType = msgspec.field(default=UNSET, name="$delete")


class AliasBody(msgspec.Struct, kw_only=True):
    """`alias` must differ from `distinct_id`."""

    alias: NonEmpty
    distinct_id: NonEmpty
    token: Token | UnsetType = UNSET


class Tracked(msgspec.Struct):
    status: Literal[1]
    inserted: Annotated[int, Meta(ge=0, description="events newly stored (duplicates excluded)")]


class Applied(msgspec.Struct):
    status: Literal[1]
    applied: Annotated[int, Meta(ge=0, description="operations applied")]


class Linked(msgspec.Struct):
    status: Literal[1]


class CohorlyError(msgspec.Struct):
    status: Literal[0]
    error: Annotated[str, Meta(description="the problem, naming the field and, in a batch, the record")]


GZIP = Param(name="Content-Encoding", where="header", type=Literal["gzip"],
             description="the body is gzip-compressed (limits apply to the decompressed body)")


def _operation(endpoint: str, summary: str, body: Any, success: Any, limited: bool, bad: str) -> Operation:
    rate = "the client IP's window (/track and /engage share one) or `[limits] per_ip`" if limited else (
        "`[limits] per_ip`")
    return Operation(
        endpoint=endpoint, method="POST", summary=summary, params=(GZIP,), auth=("tokenHeader", "tokenInBody"),
        bodies=(Body(media_types=("application/json", "text/plain"), type=body,
                     description="JSON whatever the Content-Type says"),),
        answers=(
            json_answer(200, "Stored", success),
            json_answer(400, bad + "; or invalid JSON, a corrupt gzip body", CohorlyError),
            json_answer(401, "A record without a valid token; nothing stored", CohorlyError),
            json_answer(413, "Body over 1 MB, compressed or not", CohorlyError),
            json_answer(429, f"Rate limited ({rate})", CohorlyError, retry_after=True),
            json_answer(503, "Storage unavailable or the worker full", CohorlyError, retry_after=True),
        ),
    )


DESCRIPTION = Description(
    title="Dialgate: Cohorly tracking API",
    description=(
        "Cohorly's /track, /engage and /alias as Dialgate serves them (DIALECTS.md, cohorly). Records of "
        "one batch may belong to different projects. The same paths serve the Mixpanel dialect: a request "
        "carrying a Mixpanel token gets that dialect's contract (its own document)."
    ),
    auth=(
        Auth(name="tokenHeader", kind="header", param="X-Cohorly-Token", credential="cohorly_tokens",
             description="a token from the project's `cohorly_tokens`, for every record of the request"),
        Auth(name="tokenInBody", kind="body", param="token",
             description="per record (`properties.token` on /track, `token` or `$token` on /engage, `token` "
                         "on /alias); wins over the header"),
    ),
    operations=(
        _operation("track", "Track events", TrackEvent | Annotated[list[TrackEvent], Batch], Tracked, True,
                   "An invalid event, or more than 500"),
        _operation("engage", "Update profiles", EngageOperation | Annotated[list[EngageOperation], Batch],
                   Applied, True, "An invalid operation, or more than 500"),
        _operation("alias", "Link an alias to a distinct_id", AliasBody, Linked, False,
                   "Invalid, or the alias belongs to another person, equals its distinct_id or would make a cycle"),
    ),
)
