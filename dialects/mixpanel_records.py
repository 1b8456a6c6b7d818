"""Mixpanel records into canonical ones (DIALECTS.md, mixpanel; MIXPANEL.md
1.6 to 1.11): events, the identity events, profile and group updates.

Every function takes one decoded record and raises `Invalid` naming the
field at fault; the token (which project) is resolved by the caller.
"""

from __future__ import annotations

import math
from typing import Any

from dialects.times import MAX_TIME_MS
from gateway.model import MAX_INSERT_ID, Alias, Event, GroupUpdate, ProfileUpdate

# A `time` at least this large is milliseconds, else seconds (10^11 s is
# the year 5138; 10^11 ms is 1973).
MS_THRESHOLD = 10**11

# Lifted into canonical fields or credentials: never kept in properties.
LIFTED = frozenset({"distinct_id", "time", "$insert_id", "token"})
# Identity events: links, not events.
CREATE_ALIAS = "$create_alias"
IDENTIFY = "$identify"
MERGE = "$merge"

PROFILE_VERBS = ("$set_once", "$set", "$add", "$append", "$union", "$remove", "$unset", "$delete")
GROUP_VERBS = ("$set_once", "$set", "$union", "$remove", "$unset", "$delete")
# Modifiers the SDKs send beside the verbs: understood, nothing to store
# (no geolocation; `$time` is read; `$ignore_alias`, `$ignore_time` change
# nothing here, where profiles have no `$last_seen`).
MODIFIERS = frozenset({
    "$token", "$distinct_id", "$group_key", "$group_id", "$time", "$ip", "$ignore_time", "$ignore_alias",
    "$latitude", "$longitude", "$device_id", "$user_id", "$had_persisted_distinct_id",
})


class Invalid(Exception):
    """A record breaks the contract: `field` is at fault, `message` says how."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


def to_ms(value: Any, field: str, received_at: int) -> int:
    """Seconds since the epoch (a float allowed), or milliseconds when at
    least 10^11; absent (None): receipt time."""
    if value is None:
        return received_at
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise Invalid(field, "must be a number: seconds (or milliseconds) since the epoch")
    ms = int(value) if value >= MS_THRESHOLD else round(value * 1000)
    if ms > MAX_TIME_MS:
        raise Invalid(field, "is too far in the future")
    return ms


def an_id(value: Any, field: str, required: bool = True) -> str | None:
    """An id as Mixpanel takes it: a non-empty string, or a number (SDK
    callers pass numeric user ids) as its text."""
    if type(value) is str and value:
        return value
    if type(value) is int:
        return str(value)
    if value is None or value == "":
        if required:
            raise Invalid(field, "must be a non-empty string")
        return None
    raise Invalid(field, "must be a string")


def ignored(props: dict[str, Any]) -> bool:
    """`$ignore` truthy (true, a non-empty string, a non-zero number)."""
    value = props.get("$ignore")
    return value not in (None, False, "", 0)


def properties_of(item: Any) -> dict[str, Any]:
    if type(item) is not dict:
        raise Invalid("record", "must be an object")
    name = item.get("event")
    if type(name) is not str or not name:
        raise Invalid("event", "must be a non-empty string")
    props = item.get("properties", {})
    if props is None:
        return {}
    if type(props) is not dict:
        raise Invalid("properties", "must be an object")
    return props


def identity(name: str, props: dict[str, Any], project: str, source: str, strict: bool) -> list[Alias] | None:
    """The links of an identity event, or None when `name` is none."""
    if name == CREATE_ALIAS:
        alias = an_id(props.get("alias"), "properties.alias")
        distinct_id = an_id(props.get("distinct_id"), "properties.distinct_id")
        assert alias is not None and distinct_id is not None
        return [Alias(project=project, source=source, alias=alias, distinct_id=distinct_id, strict=strict)]
    if name == IDENTIFY:
        identified = an_id(props.get("$identified_id", props.get("distinct_id")), "properties.$identified_id")
        # mixpanel-browser names the anonymous id `$anon_distinct_id` (2.83.0, identify())
        anon = an_id(props.get("$anon_id", props.get("$anon_distinct_id")), "properties.$anon_id", required=False)
        assert identified is not None
        if anon is None or anon == identified:
            return []
        return [Alias(project=project, source=source, alias=anon, distinct_id=identified, strict=strict)]
    if name == MERGE:
        ids = props.get("$distinct_ids")
        if type(ids) is not list or len(ids) < 2:
            raise Invalid("properties.$distinct_ids", "must be a list of at least two ids")
        first = an_id(ids[0], "properties.$distinct_ids")
        assert first is not None
        links = []
        for other in ids[1:]:
            linked = an_id(other, "properties.$distinct_ids")
            if linked is not None and linked != first:
                # A merge joins the two persons whatever they already are
                # (Alias.merge); a link of an id already linked elsewhere
                # would be a conflict.
                links.append(Alias(project=project, source=source, alias=linked, distinct_id=first, strict=strict,
                                   merge=True))
        return links
    return None


def event(item: dict[str, Any], props: dict[str, Any], project: str, source: str, received_at: int,
          context: dict[str, Any]) -> Event:
    """The canonical event of a record `properties_of` accepted. `props`
    (decoded for this request alone) loses the lifted keys in place: a copy
    per event was a good part of a batch's translation."""
    distinct_id = an_id(props.get("distinct_id"), "properties.distinct_id", required=False)
    time = to_ms(props.get("time"), "properties.time", received_at)
    insert_id = props.get("$insert_id")
    if insert_id == "":
        insert_id = None
    elif insert_id is not None and (type(insert_id) is not str or len(insert_id) > MAX_INSERT_ID):
        raise Invalid("properties.$insert_id", f"must be a string of 1 to {MAX_INSERT_ID} characters")
    for key in LIFTED:
        props.pop(key, None)
    return Event(
        project=project,
        source=source,
        name=item["event"],
        distinct_id=distinct_id,
        time=time,
        received_at=received_at,
        insert_id=insert_id,
        properties=props,
        context=context,
    )


def _verbs(item: dict[str, Any], allowed: tuple[str, ...], kind: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in item.items():
        if key in allowed:
            fields[key[1:]] = _check_verb(key, value)
        elif key.startswith("$") and key not in MODIFIERS:
            if key in PROFILE_VERBS:
                raise Invalid(key, f"is not an operation on {kind}")
            raise Invalid(key, "is not a known operation")
    if not fields:
        raise Invalid("record", "has no operation (" + ", ".join(allowed) + ")")
    return fields


def profile(item: Any, project: str, source: str, received_at: int) -> ProfileUpdate:
    if type(item) is not dict:
        raise Invalid("record", "must be an object")
    distinct_id = an_id(item.get("$distinct_id", item.get("distinct_id")), "$distinct_id")
    assert distinct_id is not None
    fields = _verbs(item, PROFILE_VERBS, "profiles")
    time = to_ms(item.get("$time"), "$time", received_at)
    return ProfileUpdate(project=project, source=source, distinct_id=distinct_id, time=time, **fields)


def group(item: Any, project: str, source: str, received_at: int) -> GroupUpdate:
    if type(item) is not dict:
        raise Invalid("record", "must be an object")
    group_key = an_id(item.get("$group_key"), "$group_key")
    group_id = an_id(item.get("$group_id"), "$group_id")
    assert group_key is not None and group_id is not None
    fields = _verbs(item, GROUP_VERBS, "groups")
    time = to_ms(item.get("$time"), "$time", received_at)
    return GroupUpdate(project=project, source=source, group_key=group_key, group_id=group_id, time=time,
                       **fields)


def _check_verb(verb: str, value: Any) -> Any:
    if verb == "$delete":
        # Mixpanel deletes whatever the value: python sends "", the browser
        # the distinct_id.
        return True
    if verb in ("$set", "$set_once", "$append", "$remove"):
        if type(value) is not dict:
            raise Invalid(verb, "must be an object")
        return value
    if verb == "$add":
        if type(value) is not dict:
            raise Invalid(verb, "must be an object of numbers")
        for key, amount in value.items():
            if type(amount) not in (int, float):
                raise Invalid(f"$add.{key}", "must be a number")
        return value
    if verb == "$union":
        if type(value) is not dict:
            raise Invalid(verb, "must be an object of lists")
        for key, items in value.items():
            if type(items) is not list:
                raise Invalid(f"$union.{key}", "must be a list")
        return value
    # $unset
    if type(value) is not list or not all(type(k) is str for k in value):
        raise Invalid(verb, "must be an array of strings")
    return value
