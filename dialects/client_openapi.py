"""The client API's wire for its OpenAPI document (`Client.describe`): the
body schemas are the Structs the dialect checks bodies with."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from dialects.client import AliasBody, DeviceBody, EventItem, IdentifyBody
from dialects.describe import Answer, Auth, Body, Description, Operation, Param, json_answer


class ClientError(msgspec.Struct):
    status: Literal["error"]
    error: Annotated[str, Meta(description="the first problem, with its path")]
    details: Annotated[list[str], Meta(description="every problem, each with its path such as `0/name` "
                                                   "(at most 100 listed)")]


class AuthorizationError(msgspec.Struct):
    status: Literal["error"]
    error: Literal["Authorization error."]
    code: Literal[1000]


Events = Annotated[list[EventItem], Meta(
    min_length=1, max_length=1000,
    description="1 to `[dialects.client] max_events` (default 1000) events; one invalid event rejects "
                "the request whole",
)]

_RULES = (
    "Rules beyond the schema: `anonymous_id` or `external_id` must be a string (where both are "
    "optional), and `timezone` an IANA time zone name; both ids given also link them."
)
_ENDPOINTS = (
    ("alias", AliasBody, "Link an anonymous id to an external id",
     "Only once: an anonymous id linked to another person already changes nothing (still 204)."),
    ("identify", IdentifyBody, "Set profile properties",
     "An omitted field keeps the profile's value, null clears it; `data` is merged shallowly."),
    ("devices", DeviceBody, "Register a device", "Upserts the device by (project, device_id)."),
    ("events", Events, "Send events", "A non-empty array; a single object is a 422."),
)
GZIP = Param(name="Content-Encoding", where="header", type=Literal["gzip"],
             description="the body is gzip-compressed (limits apply to the decompressed body)")


def _answers(name: str) -> tuple[Answer, ...]:
    too_large = "Body over the limit (1 MB by default), compressed or not"
    if name == "events":
        too_large += ", or more events than `max_events`"
    return (
        Answer(status=204, description="Stored (committed); no body"),
        json_answer(400, "Unparseable JSON, or a corrupt gzip body", ClientError),
        json_answer(401, "Missing, malformed or unknown key", AuthorizationError),
        json_answer(413, too_large, ClientError),
        json_answer(422, "Invalid body", ClientError),
        json_answer(429, "Rate limited (`[limits] per_ip`)", ClientError, retry_after=True),
        json_answer(503, "Storage unavailable or the worker full", ClientError, retry_after=True),
    )


DESCRIPTION = Description(
    title="Dialgate: client API",
    description=(
        "The bearer-key client API as Dialgate serves it (DIALECTS.md, client). Bodies are JSON whatever "
        "the Content-Type says; every optional field accepts an explicit null. " + _RULES
    ),
    auth=(Auth(name="clientKey", kind="bearer", credential="client_keys",
               description="a public (`pk_`) or secret (`sk_`) key from the project's `client_keys`"),),
    operations=tuple(
        Operation(endpoint=name, method="POST", summary=summary, description=text, params=(GZIP,),
                  auth=("clientKey",), bodies=(Body(media_types=("application/json",), type=type_),),
                  answers=_answers(name))
        for name, type_, summary, text in _ENDPOINTS
    ),
)
