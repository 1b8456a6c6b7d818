"""Mixpanel's wire for its OpenAPI document (`Mixpanel.describe`).

Records are validated by hand (`dialects.mixpanel_records`); these Structs
state the same rules. What a schema cannot say is said in the text: the
records may come as JSON in the body, as a form's or the query's `data`
(JSON, or standard base64 of it), gzip on /track and /import, NDJSON on
/import; the answer is `text/plain` `1`/`0` unless `verbose` asks for JSON.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from dialects.describe import CREDENTIAL_KEY, Answer, Auth, Body, Description, Operation, Param
from dialects.times import MAX_TIME_MS
from gateway.model import MAX_INSERT_ID

NonEmpty = Annotated[str, Meta(min_length=1)]
Id = Annotated[str, Meta(min_length=1)] | int
Token = Annotated[str, Meta(description="the project's token (`mixpanel_tokens`)",
                            extra_json_schema={CREDENTIAL_KEY: "mixpanel_tokens"})]
Seconds = Annotated[float, Meta(ge=0, le=MAX_TIME_MS, description=(
    "seconds since the epoch (a float allowed), read as milliseconds when at least 10^11; absent: receipt time"))]
Records = Meta(min_length=1, max_length=2000, description="1 to `[dialects.mixpanel] max_batch` (default 2000)")
Object = dict[str, Any]


class ImportProperties(msgspec.Struct, kw_only=True):
    """Other properties are stored as they are. A truthy `$ignore` drops
    the event (counted)."""

    distinct_id: Id | UnsetType = UNSET
    time: Seconds | UnsetType = UNSET
    insert_id: Annotated[str, Meta(max_length=MAX_INSERT_ID, description="idempotency key")] | UnsetType = (
        msgspec.field(default=UNSET, name="$insert_id"))


class EventProperties(ImportProperties, kw_only=True):
    token: Token


class MixpanelEvent(msgspec.Struct, kw_only=True):
    """An event. `$create_alias` (`alias` to `distinct_id`) and `$identify`
    (`$anon_id` to `$identified_id`) become identity links, not events."""

    event: NonEmpty
    properties: EventProperties


class ImportEvent(msgspec.Struct, kw_only=True):
    """An event on /import (its token is not checked: the credentials name
    the project); `$merge` (`$distinct_ids`) links ids too."""

    event: NonEmpty
    properties: ImportProperties | UnsetType | None = UNSET


class AliasProperties(msgspec.Struct, kw_only=True):
    alias: Id
    distinct_id: Id
    token: Token


class AliasRecord(msgspec.Struct, kw_only=True):
    """A `$create_alias` event, or its properties alone."""

    event: Literal["$create_alias"]
    properties: AliasProperties


class ProfileUpdate(msgspec.Struct, kw_only=True):
    """At least one verb; any other `$` key but the modifiers Mixpanel's
    SDKs send (`$ip`, `$time`, `$ignore_time`, `$ignore_alias`, ...) is a 400.
    `$delete` deletes the profile whatever its value."""

    token: Token = msgspec.field(name="$token")
    distinct_id: Id = msgspec.field(name="$distinct_id")
    time: Seconds | UnsetType = msgspec.field(default=UNSET, name="$time")
    set_once: Object | UnsetType = msgspec.field(default=UNSET, name="$set_once")
    set: Object | UnsetType = msgspec.field(default=UNSET, name="$set")
    add: dict[str, int | float] | UnsetType = msgspec.field(default=UNSET, name="$add")
    append: Object | UnsetType = msgspec.field(default=UNSET, name="$append")
    union: dict[str, list[Any]] | UnsetType = msgspec.field(default=UNSET, name="$union")
    remove: Object | UnsetType = msgspec.field(default=UNSET, name="$remove")
    unset: list[str] | UnsetType = msgspec.field(default=UNSET, name="$unset")
    delete: Any = msgspec.field(default=UNSET, name="$delete")


class GroupUpdate(msgspec.Struct, kw_only=True):
    """At least one verb; `$add` and `$append` are not operations on groups."""

    token: Token = msgspec.field(name="$token")
    group_key: Id = msgspec.field(name="$group_key")
    group_id: Id = msgspec.field(name="$group_id")
    time: Seconds | UnsetType = msgspec.field(default=UNSET, name="$time")
    set_once: Object | UnsetType = msgspec.field(default=UNSET, name="$set_once")
    set: Object | UnsetType = msgspec.field(default=UNSET, name="$set")
    union: dict[str, list[Any]] | UnsetType = msgspec.field(default=UNSET, name="$union")
    remove: Object | UnsetType = msgspec.field(default=UNSET, name="$remove")
    unset: list[str] | UnsetType = msgspec.field(default=UNSET, name="$unset")
    delete: Any = msgspec.field(default=UNSET, name="$delete")


class Verbose(msgspec.Struct):
    """The answer with `verbose=1`."""

    status: Literal[0, 1]
    error: str | None


class Imported(msgspec.Struct, kw_only=True):
    """/import's own answer (to a JSON body, and whenever `strict=1`)."""

    code: int
    status: str
    num_records_imported: Annotated[int, Meta(ge=0)] | UnsetType = UNSET
    error: str | UnsetType = UNSET
    failed_records: list[Object] | UnsetType = UNSET


def _records(record: Any) -> Any:
    return record | Annotated[list[record], Records]


def _data(record: Any) -> Any:
    """The `data` field: the records as JSON, or standard base64 of that JSON."""
    return Annotated[str, Meta(
        description="the records as JSON, or standard base64 of the JSON (a space in base64 is a `+`)",
        extra_json_schema={"contentMediaType": "application/json",
                           "contentSchema": {"$ref": f"#/components/schemas/{record.__name__}"}},
    )]


FLAGS = (
    Param(name="verbose", type=Literal["0", "1"], description="1: answer JSON (`{status, error}`), else `1`/`0`"),
    Param(name="ip", type=Literal["0", "1"], description="0: store no client IP"),
    Param(name="test", description="understood and ignored"),
    Param(name="_", description="cache buster, ignored"),
)
IMPORT_PARAMS = (
    Param(name="strict", type=Literal["0", "1"], description="1: invalid records listed in a 400, the rest stored"),
    Param(name="project_id", description="the project's name, with a service account's Basic credentials"),
)
TEXT = "text/plain"
GZIP = Param(name="Content-Encoding", where="header", type=Literal["gzip"],
             description="the body is gzip-compressed (/track and /import; limits apply decompressed)")


class Form(msgspec.Struct, kw_only=True):
    """A form (also sent as text/plain, as sendBeacon does); other fields
    are parameters like the query's."""

    data: Annotated[str, Meta(description="the records as JSON, or standard base64 of the JSON")]
    verbose: Literal["0", "1"] | UnsetType = UNSET
    ip: Literal["0", "1"] | UnsetType = UNSET


class ImportForm(Form, kw_only=True):
    api_key: Annotated[str, Meta(description="a project secret (`mixpanel_secrets`), instead of Basic",
                                 extra_json_schema={CREDENTIAL_KEY: "mixpanel_secrets"})] | UnsetType = UNSET
    strict: Literal["0", "1"] | UnsetType = UNSET


def _answers(import_: bool) -> tuple[Answer, ...]:
    def answer(status: int, text: str, plain: Any, retry: bool = False) -> Answer:
        bodies: tuple[tuple[str, Any], ...] = (("application/json", (Imported, Verbose) if import_ else Verbose),
                                               (TEXT, plain))
        return Answer(status=status, description=text, bodies=bodies, retry_after=retry)

    return (
        answer(200, "Stored (duplicates included)", Literal["1"]),
        answer(400, "Invalid: a bad record (the whole request), an alias that conflicts, data neither JSON "
               "nor base64 JSON, a corrupt gzip body" + ("; with strict=1 the failed records" if import_ else ""),
               Literal["0"]),
        answer(401, "No known token (credentials on /import)", Literal["0"]),
        answer(413, "Body over the limit (1 MB; 10 MB on /import), compressed or not", Literal["0"]),
        answer(429, "Rate limited (`[dialects.mixpanel] rate_limit` or `[limits] per_ip`)", Literal["0"], True),
        answer(503, "Storage unavailable or the worker full", Literal["0"], True),
    )


def _operations(endpoint: str, summary: str, record: Any, import_: bool = False) -> tuple[Operation, ...]:
    params = FLAGS + (IMPORT_PARAMS if import_ else ())
    auth = ("basic", "apiKeyQuery") if import_ else ("tokenInBody",)
    text = ("Answers in /import's JSON shape to a JSON body or `strict=1`; to `data=` as /track does. "
            if import_ else "")
    form = ImportForm if import_ else Form
    gzip = (GZIP,) if endpoint in ("track", "import") else ()
    return (
        Operation(
            endpoint=endpoint, method="GET", summary=summary + " (`?data=`)", auth=auth, description=text,
            params=(Param(name="data", type=_data(record), required=True), *params),
            answers=_answers(import_),
        ),
        Operation(
            endpoint=endpoint, method="POST", summary=summary, auth=auth, params=(*params, *gzip),
            description=text + "Without a body, the records are read from `?data=` as on GET.",
            body_required=False,
            bodies=(
                Body(media_types=("application/json",), type=_records(record),
                     description="A JSON body: a record or an array (NDJSON too on /import), whatever the "
                                 "Content-Type says."),
                Body(media_types=("application/x-www-form-urlencoded",), type=form,
                     description="A form: `data` holds the records as JSON or base64 (also sent as text/plain "
                                 "by sendBeacon)."),
            ),
            answers=_answers(import_),
        ),
    )


DESCRIPTION = Description(
    title="Dialgate: Mixpanel ingestion API",
    description=(
        "Mixpanel's /track, /engage, /groups, /alias and /import as Dialgate serves them (DIALECTS.md, "
        "mixpanel), for the real SDKs pointed at Dialgate by host. /track, /engage and /alias are "
        "Cohorly's paths too: where that dialect is enabled, a request carrying no Mixpanel token is "
        "answered by Cohorly's contract (its own document)."
    ),
    auth=(
        Auth(name="tokenInBody", kind="body", param="properties.token / $token",
             description="each record's project token from `mixpanel_tokens`"),
        Auth(name="basic", kind="basic", credential="mixpanel_secrets",
             description="/import: a project secret as the user name and an empty password; or a service "
                         "account `user:secret` with `?project_id=<project>`"),
        Auth(name="apiKeyQuery", kind="query", param="api_key", credential="mixpanel_secrets",
             description="/import: a project secret as `api_key` (query or form field)"),
    ),
    operations=(
        *_operations("track", "Track events", MixpanelEvent),
        *_operations("engage", "Update person profiles", ProfileUpdate),
        *_operations("groups", "Update group profiles", GroupUpdate),
        *_operations("alias", "Link an alias", AliasRecord),
        *_operations("import", "Import events", ImportEvent, import_=True),
    ),
)
