"""The adapter contract every dialect implements.

A dialect is a pure translator at the edge of the gateway. It is given the
request as bytes plus metadata (`Incoming`) and a credential lookup built once
from the configuration, and returns either canonical records (`Batch`) or a
typed refusal (`Failure`). After the pipeline has limited, deduplicated and
stored the batch, the dialect turns the `Outcome` (or a `Failure` the pipeline
raised itself: body too large, rate limited, storage unavailable, an
internal error) into the vendor's status code and body, for every
`FailureKind`. A dialect does no I/O and keeps no state between requests;
everything with I/O lives in the pipeline, once.

A credential carried in a header is checked by `precheck`, from the headers
and the query alone, before the body is read: a request it refuses is never
read, inflated or parsed. Translation must bound its own work: values nested
deeper than `dialects.limits.MAX_DEPTH` are invalid input naming the record
(`dialects.limits.deep_record`), and RecursionError from a decoder means
such nesting. The pipeline caps every refusal's problem list and texts
(`dialects.limits.bounded`) before `render`, and answers an exception out of
`translate` or `render` as the `internal` kind.

Everything vendor-specific is declared by the dialect, never spelled in
`gateway/`: its endpoints and limits (`endpoints`, `ip_limit`,
`project_limit`), the credential lists it adds to `[[projects]]`
(`credential_lists`: key names are the contract), the per-project options it
reads (`project_fields`, with their types and constraints), its
`[dialects.<name>]` table (`Config`), the request headers browsers must be
allowed to send (`cors_headers`), its error shapes (`render`) and the
description of all of it its OpenAPI document is made from (`describe`,
`dialects.describe`).

Dialects are found through the `dialgate.dialects` entry-point group (the
shipped ones too): an entry point named like the dialect, pointing at its
class. Two dialects may serve one path: then the credential a request
carries picks the dialect (`carried`), and one credential in the lists of
two such dialects is a config error.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import msgspec

from dialects.describe import Description
from gateway.model import AliasOutcome, Record, Rejection

FailureKind = Literal[
    "bad_request",  # unparseable input (or invalid, for dialects that don't tell them apart)
    "invalid",  # well-formed input that breaks the dialect's rules
    "unauthorized",  # missing or unknown credentials
    "too_large",  # body over the endpoint's limit, compressed or not
    "rate_limited",  # refused by a rate limit; retry_after is set
    "unavailable",  # storage unreachable; retry_after is set
    "unstorable",  # the database refused data that passed validation
    "internal",  # an unexpected error in the gateway itself (a bug)
]


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    name: str
    methods: tuple[str, ...] = ("POST",)
    max_body: int = 1024 * 1024
    # Counted against the dialect's per-client-IP limit (checked before the
    # body or credentials are looked at).
    ip_limited: bool = False
    # Counted against `[limits] per_ip` (off for endpoints that never
    # answer 429, and for health checks).
    per_ip: bool = True


class Incoming(msgspec.Struct, frozen=True, kw_only=True):
    endpoint: str
    method: str
    headers: Mapping[str, str]  # lower-cased names; repeated headers joined by ","
    query: Sequence[tuple[str, str]]
    body: bytes
    client_ip: str
    received_at: int  # unix ms


class Batch(msgspec.Struct, kw_only=True):
    records: list[Record] = []
    # Problems the caller is not told about (the quarantine).
    rejections: list[Rejection] = []
    # For a per-project limit (`Dialect.project_limit`): whose budget, and
    # how many tokens this request takes from it.
    project: str | None = None
    cost: int = 0


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    kind: FailureKind
    message: str
    details: tuple[str, ...] = ()
    retry_after: int | None = None
    # Problems found beyond `details`, counted but not phrased (a dialect may
    # stop phrasing past `dialects.limits.MAX_PROBLEMS`).
    omitted: int = 0


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    inserted: int = 0  # events newly stored
    duplicates: int = 0  # events skipped as already stored
    applied: int = 0  # profile operations applied
    aliases: tuple[AliasOutcome, ...] = ()  # one per Alias record, in order


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class SlidingWindow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """At most `requests` in any window of `per_seconds`."""

    requests: int
    per_seconds: int


class TokenBucket(msgspec.Struct, frozen=True):
    """`capacity` tokens, all back `per_seconds` after the window opened."""

    capacity: int
    per_seconds: int = 60


def _same(item: Hashable) -> Hashable:
    return item


def _empty_string(item: object) -> bool:
    return item == ""


class CredentialList(msgspec.Struct, frozen=True, kw_only=True):
    """A credential list a dialect adds to every `[[projects]]` table.

    `field` is its key there (a contract: configs in the field use it),
    `item` the type of one entry (a str, or a Struct with a masked repr).
    `key` makes the value the dialect looks a request's credential up by
    (the mapping a dialect gets is `key(item) -> project name`), `empty`
    says when an entry is unusable (a config error). Keys are unique across
    projects and lists: one credential names one project.
    """

    field: str
    item: Any = str
    key: Callable[[Any], Hashable] = _same
    empty: Callable[[Any], bool] = _empty_string


class ProjectField(msgspec.Struct, frozen=True, kw_only=True):
    """A per-project setting a dialect reads from `[[projects]]` (such as a
    limit a project may override): its key, its type with the constraints
    beside it (`Annotated[int, Meta(ge=1)] | None`) and its default."""

    field: str
    type: Any
    default: Any = None


class Dialect:
    name: ClassVar[str]
    # This dialect's `[dialects.<name>]` table; must have `enabled: bool`.
    Config: ClassVar[type[msgspec.Struct]]
    # What it adds to `[[projects]]`: credential lists (the first is the one
    # handed over as `credentials`; all of them as `lookups`, by field) and
    # per-project options, handed over as `project_options[project][field]`.
    credential_lists: ClassVar[tuple[CredentialList, ...]] = ()
    project_fields: ClassVar[tuple[ProjectField, ...]] = ()
    # Request headers its browser SDKs send, allowed in CORS preflights.
    cors_headers: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        config: Any,
        credentials: Mapping[Any, str],
        project_options: Mapping[str, Mapping[str, Any]] | None = None,
        lookups: Mapping[str, Mapping[Any, str]] | None = None,
    ) -> None:
        self.config = config
        self.credentials = credentials  # credential -> project name
        self.project_options = project_options or {}
        if lookups is None:
            lookups = {self.credential_lists[0].field: credentials} if self.credential_lists else {}
        self.lookups = lookups  # every credential list's lookup, by field

    def endpoints(self) -> Sequence[Endpoint]:
        raise NotImplementedError

    def ip_limit(self) -> SlidingWindow | None:
        """The per-client-IP limit shared by the endpoints marked ip_limited."""
        return None

    def project_limit(self, project: str) -> TokenBucket | None:
        """The per-project budget a `Batch` with a cost draws from."""
        return None

    def precheck(self, request: Incoming) -> Failure | None:
        """A refusal known from the headers and query alone (`request.body`
        is empty here), such as an unknown header credential; None to go on
        and read the body. Cheap and pure: it runs for every request."""
        return None

    def carried(self, request: Incoming) -> Iterable[Hashable]:
        """The credentials (lookup keys, as `CredentialList.key` makes them)
        this request carries where this dialect looks: headers, query, body
        (decoded here). Asked only on a path another dialect serves too, to
        pick the dialect: the one whose lookups know one of them translates.
        Return nothing for what this dialect could not parse."""
        return ()

    def translate(self, request: Incoming) -> Batch | Failure:
        raise NotImplementedError

    def replay_request(self, project: str, endpoint: str, payload: str, received_at: int) -> Incoming | None:
        """The request that re-runs a rejection's `payload` (see
        dialects.replay) for `project` through `translate`; None when this
        dialect keeps no payloads or the project has no credential now."""
        return None

    def render(self, request: Incoming, result: Outcome | Failure) -> Reply:
        raise NotImplementedError

    def describe(self) -> Description | None:
        """Its endpoints, bodies, credentials and answers, for its OpenAPI
        document (`gateway.openapi`); None: no document is served."""
        return None


def json_reply(status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status=status, body=msgspec.json.encode(payload), headers=headers)


def retry_after_headers(failure: Failure) -> tuple[tuple[str, str], ...]:
    if failure.retry_after is None:
        return ()
    return (("retry-after", str(max(1, failure.retry_after))),)


def bearer(request: Incoming) -> str | None:
    """The key of `Authorization: Bearer <key>` (the scheme in any case)."""
    scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


class BearerDialect(Dialect):
    """A dialect whose credential is the key of `Authorization: Bearer`, in
    its first credential list: the project a request names, and the
    credential it carries (for a shared path), both from the header."""

    def _project(self, request: Incoming) -> str | None:
        key = bearer(request)
        return None if key is None else self.credentials.get(key)

    def carried(self, request: Incoming) -> Iterable[Hashable]:
        key = bearer(request)
        return () if key is None else (key,)


def request_context(request: Incoming) -> dict[str, Any]:
    """What every event gets from its request: client IP and User-Agent."""
    context: dict[str, Any] = {"ip": request.client_ip}
    agent = request.headers.get("user-agent")
    if agent:
        context["user_agent"] = agent
    return context
