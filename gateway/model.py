"""The canonical records every dialect translates into.

This module imports nothing of ours: dialects depend on it, storage depends on
it, and it depends on neither.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# Ids (distinct, anonymous, user, device ids) are indexed, and an index entry
# must stay small on every backend (PostgreSQL counts bytes), so ids over
# this many UTF-8 bytes are refused.
MAX_ID_BYTES = 1024
# Insert ids (idempotency keys): characters, the width of their column.
MAX_INSERT_ID = 255


def _too_long(value: str) -> bool:
    # At most 4 bytes a character: short strings need no encoding.
    return len(value) > MAX_ID_BYTES // 4 and len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES


def long_id(record: Any) -> str | None:
    """The name of the first id field of `record` over its limit, if any."""
    for field in _ID_FIELDS.get(type(record), ()):
        value = getattr(record, field)
        if value is not None and _too_long(value):
            return field
    insert_id = getattr(record, "insert_id", None)
    if insert_id is not None and len(insert_id) > MAX_INSERT_ID:
        return "insert_id"
    return None


class Event(msgspec.Struct, frozen=True, kw_only=True):
    project: str
    source: str
    name: str
    distinct_id: str | None
    time: int
    received_at: int
    anonymous_id: str | None = None
    user_id: str | None = None
    insert_id: str | None = None
    session_id: str | None = None
    properties: dict[str, Any] = {}
    context: dict[str, Any] = {}
    consent: bool | None = None


class ProfileUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """One profile operation; verbs apply in the order of the fields below."""

    project: str
    source: str
    distinct_id: str
    time: int
    set_once: dict[str, Any] = {}
    set: dict[str, Any] = {}
    add: dict[str, int | float] = {}
    append: dict[str, Any] = {}
    union: dict[str, list[Any]] = {}
    remove: dict[str, Any] = {}
    unset: list[str] = []
    delete: bool = False
    # Only create the profile (used by device registration and identify).
    touch: bool = False


class Alias(msgspec.Struct, frozen=True, kw_only=True):
    """Link `alias` (the anonymous id) to the person of `distinct_id`.

    `strict` means the caller is told when the link cannot be made (a
    dialect's alias endpoint answers 400); otherwise a failed link is recorded as a rejection
    and the request still succeeds.
    """

    project: str
    source: str
    alias: str
    distinct_id: str
    strict: bool = False
    # Merge the two persons whatever they already are (Mixpanel's `$merge`):
    # the person of `alias` joins the person of `distinct_id`, so an alias
    # already linked elsewhere is no conflict. Without it, `alias` must be
    # unlinked (or a person's root), as Cohorly's `/alias` and Mixpanel's
    # `$create_alias` and `$identify` have it.
    merge: bool = False


class Device(msgspec.Struct, frozen=True, kw_only=True):
    project: str
    source: str
    distinct_id: str
    device_id: str
    push_token: str | None = None
    os: str | None = None
    os_version: str | None = None
    model: str | None = None
    app_build: str | None = None
    app_version: str | None = None


class GroupUpdate(msgspec.Struct, frozen=True, kw_only=True):
    """An update of a group profile, keyed by (group_key, group_id) within
    the project (Mixpanel's `$group_key`, `$group_id`); stored apart from
    person profiles. The verbs apply as ProfileUpdate's do."""

    project: str
    source: str
    group_key: str
    group_id: str
    time: int
    set_once: dict[str, Any] = {}
    set: dict[str, Any] = {}
    union: dict[str, list[Any]] = {}
    remove: dict[str, Any] = {}
    unset: list[str] = []
    delete: bool = False


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """Something the caller was not told about, kept in the quarantine."""

    project: str | None
    source: str
    reason: str
    detail: str
    excerpt: str = ""
    received_at: int = 0
    # For replay: the whole record (or body) and the endpoint of its
    # dialect that re-runs it; None when there is nothing to re-run.
    payload: str | None = None
    endpoint: str | None = None


Record = Event | ProfileUpdate | Alias | Device | GroupUpdate

AliasOutcome = Literal["linked", "exists", "self", "conflict", "cycle"]


_ID_FIELDS: dict[type, tuple[str, ...]] = {
    Event: ("distinct_id", "anonymous_id", "user_id"),
    ProfileUpdate: ("distinct_id",),
    Alias: ("alias", "distinct_id"),
    Device: ("distinct_id", "device_id"),
    GroupUpdate: ("group_key", "group_id"),
}
