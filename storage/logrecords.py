"""The stream's message format.

A message carries records of one request, one project and one lane, in the
request's order (a request of one project's events is one message):
- Subject: `<stream>.<project token>.<lane>`. The lane is `ev` for events and
  rejections (loaded by any loader, in any order) and `id` for identity,
  profile, device and group records (applied in stream order per project).
  The project token is the name itself when it is made of `[A-Za-z0-9_-]`,
  else `~` and the hex of its UTF-8 bytes (`~` alone: rejections with no
  project), so any name makes a valid subject token, distinct per project.
- Payload: `Batch` as JSON, an array: a string of the kind of each record
  in order (one letter each, `KINDS`), then an array of the records of each
  kind (the canonical Structs as objects, fields by name), in the order of
  `Batch`'s fields; rejections last. U+0000 in any string is sent as
  U+FFFD, as the database sink stores it.
- `Nats-Msg-Id`: for a message of events that all carry an insert id, `k`
  and a hash of their (project, source, insert id) keys in order, so a
  request sent again within the duplicate window is acknowledged as a
  duplicate; any other message a unique id (`u`, a random per-process
  prefix, a counter).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Iterator, Sequence

import msgspec

from gateway.model import Alias, Device, Event, GroupUpdate, ProfileUpdate, Record, Rejection
from storage.engine import json_text
from storage.groups import clean

__all__ = ["EVENTS", "IDENTITY", "BadMessage", "Batch", "MessageIds", "Row", "decode", "decode_rows", "encode", "lane",
           "subject"]

EVENTS = "ev"
IDENTITY = "id"

Message = Record | Rejection

KINDS: dict[type, int] = {
    Event: ord("e"), ProfileUpdate: ord("p"), Alias: ord("a"), Device: ord("d"), GroupUpdate: ord("g"),
    Rejection: ord("r"),
}


class Batch(msgspec.Struct, array_like=True, kw_only=True):
    order: str = ""
    events: list[Event] = []
    profiles: list[ProfileUpdate] = []
    aliases: list[Alias] = []
    devices: list[Device] = []
    groups: list[GroupUpdate] = []
    rejections: list[Rejection] = []

    def records(self) -> Iterator[Message]:
        """Every record in the order it was published."""
        lists: dict[int, Iterator[Message]] = {
            KINDS[Event]: iter(self.events), KINDS[ProfileUpdate]: iter(self.profiles),
            KINDS[Alias]: iter(self.aliases), KINDS[Device]: iter(self.devices),
            KINDS[GroupUpdate]: iter(self.groups), KINDS[Rejection]: iter(self.rejections),
        }
        for code in self.order:
            yield next(lists[ord(code)])


# Built once.
_ENCODER = msgspec.msgpack.Encoder()  # message ids' hash input
_DECODER = msgspec.json.Decoder(Batch)
_JSON = msgspec.json.Encoder()
_PLAIN = re.compile(r"[A-Za-z0-9_-]+")
_FIELDS: dict[type, str] = {
    Event: "events", ProfileUpdate: "profiles", Alias: "aliases", Device: "devices", GroupUpdate: "groups",
    Rejection: "rejections",
}


class BadMessage(ValueError):
    """A message that is not a batch of ours."""


def project_token(project: str | None) -> str:
    if project is not None and _PLAIN.fullmatch(project):
        return project
    return "~" + (project or "").encode("utf-8", "surrogatepass").hex()


def lane(record: Message) -> str:
    return EVENTS if type(record) is Event or type(record) is Rejection else IDENTITY


def subject(stream: str, project: str | None, lane_: str) -> str:
    return f"{stream}.{project_token(project)}.{lane_}"


def encode(records: Sequence[Message]) -> bytes:
    batch = Batch()
    if all(type(r) is Event for r in records):
        batch.events = list(records)  # type: ignore[arg-type]
        batch.order = "e" * len(records)
    else:
        kinds = []
        lists: dict[type, list[Message]] = {}
        for record in records:
            kind = type(record)
            kinds.append(chr(KINDS[kind]))
            lists.setdefault(kind, []).append(record)
        for kind, items in lists.items():
            setattr(batch, _FIELDS[kind], items)
        batch.order = "".join(kinds)
    data = _JSON.encode(batch)
    # json_text's U+0000 rewrite works on text: only when one may be there.
    return json_text(batch).encode() if b"u0000" in data else data


def record_count(data: bytes) -> int:
    """How many records a payload holds, from its order string alone."""
    end = data.find(b'"', 2)
    return max(end - 2, 0)


def decode(data: bytes) -> Batch:
    try:
        batch = _DECODER.decode(data)
    except msgspec.DecodeError as exc:
        raise BadMessage(str(exc)) from None
    counts = (len(batch.events), len(batch.profiles), len(batch.aliases), len(batch.devices),
              len(batch.groups), len(batch.rejections))
    expected = tuple(batch.order.count(chr(KINDS[k])) for k in _FIELDS)
    if counts != expected or sum(counts) != len(batch.order):
        raise BadMessage("the order does not match the records")
    return batch


class _CopyEvent(msgspec.Struct, kw_only=True):
    """An event as the loader copies it: its JSON objects kept as they came."""

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
    properties: msgspec.Raw = msgspec.Raw(b"{}")
    context: msgspec.Raw = msgspec.Raw(b"{}")
    consent: bool | None = None


class _CopyBatch(msgspec.Struct, array_like=True, kw_only=True):
    order: str = ""
    events: list[_CopyEvent] = []
    profiles: list[msgspec.Raw] = []
    aliases: list[msgspec.Raw] = []
    devices: list[msgspec.Raw] = []
    groups: list[msgspec.Raw] = []
    rejections: list[Rejection] = []


_COPY_DECODER = msgspec.json.Decoder(_CopyBatch)
Row = tuple[str, str, str, str | None, str | None, str | None, int, int, str | None, str | None, str, str,
            bool | None]


def decode_rows(data: bytes) -> tuple[list[Row], list[Rejection]]:
    """A message of the events lane as the rows of its events (columns of
    storage.sql.EVENT_COLUMNS, JSON as text) and its rejections: `decode`
    without turning the events' JSON objects into dicts and back, the most
    of a loader's work. BadMessage as `decode`."""
    try:
        batch = _COPY_DECODER.decode(data)
        if b"\\u" in data:
            # An escape somewhere: each string is checked (U+0000, a lone
            # surrogate). Without one no string can hold either (JSON has
            # no raw control characters), the common case, half the work.
            rows = [
                (e.project, e.source, clean(e.name), clean(e.distinct_id), clean(e.anonymous_id), clean(e.user_id),
                 e.time, e.received_at, clean(e.insert_id), clean(e.session_id), _object_text(e.properties),
                 _object_text(e.context), e.consent)
                for e in batch.events
            ]
        else:
            rows = [
                (e.project, e.source, e.name, e.distinct_id, e.anonymous_id, e.user_id, e.time, e.received_at,
                 e.insert_id, e.session_id, _plain_object(e.properties), _plain_object(e.context), e.consent)
                for e in batch.events
            ]
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadMessage(str(exc)) from None
    if batch.profiles or batch.aliases or batch.devices or batch.groups:
        raise BadMessage("identity records in a message of events")
    order = batch.order
    if order.count("e") != len(batch.events) or len(order) != len(batch.events) + len(batch.rejections):
        raise BadMessage("the order does not match the records")
    return rows, batch.rejections


def _plain_object(raw: msgspec.Raw) -> str:
    text = str(raw, "utf-8")
    if text[:1] != "{":
        raise msgspec.DecodeError("expected an object")
    return text


def _object_text(raw: msgspec.Raw) -> str:
    data = bytes(raw)
    if data[:1] != b"{":
        raise msgspec.DecodeError("expected an object")
    if b"\\u" in data:
        # An escape (U+0000, a lone surrogate: text PostgreSQL's jsonb
        # refuses) is rare: decoded and written again as the sink does.
        return json_text(msgspec.json.decode(data))
    return data.decode()


class MessageIds:
    """Each message's `Nats-Msg-Id`."""

    def __init__(self) -> None:
        self._prefix = "u" + os.urandom(12).hex() + "."
        self._counter = itertools.count()

    def of(self, records: Sequence[Message]) -> str:
        keys = []
        for record in records:
            if type(record) is not Event or record.insert_id is None:
                return self._prefix + str(next(self._counter))
            keys.append((record.project, record.source, clean(record.insert_id)))
        # A hash: an insert id may hold characters a header value cannot.
        return "k" + hashlib.blake2b(_ENCODER.encode(keys), digest_size=16).hexdigest()
