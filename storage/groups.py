"""The group of requests the writer commits together, and the pure steps
that plan and settle it (shared by every write path)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar, overload

from gateway.model import Event, ProfileUpdate, Record, Rejection
from storage.sink import Written


class Pending:
    __slots__ = ("records", "rejections", "future", "rows")

    def __init__(
        self,
        records: list[Record],
        rejections: list[Rejection],
        future: asyncio.Future[Written] | None,
    ) -> None:
        self.records = records
        self.rejections = rejections
        self.future = future
        self.rows = len(records) + len(rejections)


class Attempt:
    """One group's write across its retry: the token its transaction marks
    the database with (storage.postgres), and the outcome computed before
    the commit, to answer with should the retry find that the commit whose
    answer was lost did happen."""

    __slots__ = ("token", "results")

    def __init__(self) -> None:
        # Its unix milliseconds first: tokens sort in time order (the marks'
        # key grows at its end, and old ones go by a range of it).
        self.token = mark_prefix(int(time.time() * 1000)) + os.urandom(8)
        self.results: list[Written] | None = None


def mark_prefix(unix_ms: int) -> bytes:
    """The first bytes of the tokens made at `unix_ms`: every token made
    before sorts below it."""
    return unix_ms.to_bytes(8, "big")


def assumed(group: list[Pending]) -> list[Written]:
    """The outcome of a group of events (and touches) that committed out of
    sight: every event counted as inserted (those another request stored
    meanwhile included, as duplicates are not told apart then), every
    touch as applied."""
    results = [Written() for _ in group]
    _, owner = plan_events(group, results)
    touched(group, results)
    settle_events(owner, None, results)
    return results


# Ids per IN list and rows per multi-row upsert in the identity, profile and
# device writes: 500 rows of at most 11 columns stay far under SQLite's
# 32766 bound values.
_CHUNK = 500

_T = TypeVar("_T")


def chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


@overload
def clean(text_: str) -> str: ...
@overload
def clean(text_: str | None) -> str | None: ...
def clean(text_: str | None) -> str | None:
    """U+0000 -> U+FFFD in text columns: PostgreSQL's text type refuses NUL,
    and both backends must store the same thing."""
    if text_ is not None and "\x00" in text_:
        return text_.replace("\x00", "\ufffd")
    return text_


def plan_events(group: list[Pending], results: list[Written]) -> tuple[list[Event], dict[tuple[str, str, str], int]]:
    """The group's events to insert, and which request owns each insert id
    (the first to name it; a later copy in the same group is a duplicate)."""
    fresh: list[Event] = []
    owner: dict[tuple[str, str, str], int] = {}
    for index, (pending, written) in enumerate(zip(group, results, strict=False)):  # one Written per request
        for record in pending.records:
            if type(record) is not Event:
                continue
            event: Event = record
            if event.insert_id is not None:
                key = (event.project, event.source, clean(event.insert_id))
                if key in owner:
                    written.duplicates += 1
                    continue
                owner[key] = index
            else:
                written.inserted += 1
            fresh.append(event)
    return fresh, owner


def settle_events(
    owner: dict[tuple[str, str, str], int], stored: set[tuple[str, str, str]] | None, results: list[Written]
) -> None:
    """Count each keyed event as inserted or duplicate; `stored` None: all new."""
    for key, index in owner.items():
        if stored is None or key in stored:
            results[index].inserted += 1
            results[index].new_keys.append(key)
        else:
            results[index].duplicates += 1


def is_touch(record: Record) -> bool:
    """A profile update that only marks its person seen: created empty when
    missing, else only its updated_at moves."""
    return (
        type(record) is ProfileUpdate and record.touch
        and not record.delete and not _changes(record)
    )


def is_noop(update_: ProfileUpdate) -> bool:
    """`$delete: false` alone, say: nothing to apply, so nothing is created."""
    return not (update_.touch or _changes(update_))


def _changes(update_: ProfileUpdate) -> bool:
    return bool(
        update_.set_once or update_.set or update_.add or update_.append
        or update_.union or update_.remove or update_.unset
    )



def events_only(group: list[Pending]) -> bool:
    """A group of events and nothing else: each backend's fastest write."""
    return all(not p.rejections and all(type(r) is Event for r in p.records) for p in group)


def events_and_touches(group: list[Pending]) -> bool:
    """Events and the touches of their persons' profiles (the client API's
    events), and nothing else."""
    return all(not p.rejections and all(type(r) is Event or is_touch(r) for r in p.records) for p in group)


def touched(group: list[Pending], results: list[Written]) -> list[tuple[str, str]]:
    """The (project, id) the group's touches name, sorted (profile rows are
    always taken in one order); each touch counts as applied."""
    found: set[tuple[str, str]] = set()
    for pending, written in zip(group, results, strict=False):  # one Written per request
        for record in pending.records:
            if type(record) is ProfileUpdate:
                found.add((record.project, clean(record.distinct_id)))
                written.applied += 1
    return sorted(found)
