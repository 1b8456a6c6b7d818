"""Bounds every dialect applies to what a caller sends and to what it is
told back (DIALECTS.md, "Limits that keep one caller from hurting others").

- Nesting: a record holding a value nested deeper than `MAX_DEPTH` levels
  (objects and arrays; the record itself is level 1) is invalid input.
  `decode_json` decodes with a type that admits `SHALLOW_LEVELS` levels and
  no more, which msgspec checks in C as fast as an untyped decode: a body
  it accepts needs no further check. Only a deeper body is decoded again
  untyped and walked by `deep_record`, level by level (a loop, never the
  Python stack). msgspec follows nesting on the interpreter's stack and
  raises RecursionError near 1,000 levels; `deep_record_raw` then locates
  the record in the raw bytes, also without recursion. `load_json` does
  both for a dialect: a value, or `NotJson`, or `TooDeep` naming the record.
- Problem lists: `bounded` caps a refusal's details at `MAX_PROBLEMS`
  entries (the last one then reads `... and N more`) and its texts so that
  the encoded error body stays under `MAX_ERROR_BYTES`, whatever keys or
  values the problems quote.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec

from dialects.base import Failure

MAX_DEPTH = 64
MAX_PROBLEMS = 100
MAX_ERROR_BYTES = 64 * 1024
# One problem or message as sent: a key quoted in it may be a megabyte long.
MAX_PROBLEM_CHARS = 300
# What the dialect's fixed texts, the envelope and the first problem repeated
# as the headline may add around the details.
_ENVELOPE_BYTES = 4 * 1024

# How a refusal says it (after the record's index or path, if any).
TOO_DEEP = f"nested too deeply (more than {MAX_DEPTH} levels)"

_CONTAINERS = frozenset((dict, list))
_encode = msgspec.json.encode

# Levels a body may have and be decoded in one typed pass: more than any SDK
# sends, and few enough for msgspec's type tree (it doubles with each level).
SHALLOW_LEVELS = 8
_Scalar = str | int | float | bool | None


def _shallow(levels: int) -> Any:
    """JSON values of at most `levels` levels of objects and arrays."""
    kind: Any = _Scalar
    for _ in range(levels):
        kind = str | int | float | bool | None | list[kind] | dict[str, kind]
    return kind


# A value of a record kept as it came (properties, say) at most this deep.
Shallow: Any = _shallow(SHALLOW_LEVELS)
_decode_shallow = msgspec.json.Decoder(Shallow).decode
_decode_any = msgspec.json.Decoder().decode


def decode_json(raw: bytes) -> tuple[Any, bool]:
    """The JSON value of `raw`, and whether it is shallow (at most
    SHALLOW_LEVELS levels: no record in it needs `deep_record`). Raises as
    msgspec does: DecodeError, UnicodeDecodeError, RecursionError."""
    try:
        return _decode_shallow(raw), True
    except msgspec.ValidationError:
        # Deeper, or a number msgspec's typed path refuses (1e400): the
        # untyped decoder decides, as before.
        return _decode_any(raw), False


class NotJson(Exception):
    """The body is not JSON (or not UTF-8)."""


class TooDeep(Exception):
    """A value is nested deeper than MAX_DEPTH: in the record at `index`,
    or (None) elsewhere in the body or in a record not located."""

    def __init__(self, index: int | None) -> None:
        super().__init__(TOO_DEEP)
        self.index = index


def load_json(raw: bytes, envelope: Sequence[str] | None = ()) -> tuple[Any, bool]:
    """`decode_json` for a dialect: the value and whether it is shallow.
    Raises NotJson, or TooDeep for a body deeper than the decoder follows,
    the records being the array at the path `envelope` (as in
    `deep_record_raw`; None: the records are not located)."""
    try:
        return decode_json(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a string.
        raise NotJson from None
    except RecursionError:
        # msgspec's answer to nesting deeper than the interpreter allows:
        # the record is found in the raw bytes.
        if envelope is None:
            raise TooDeep(None) from None
        index = deep_record_raw(raw, envelope)
        if index is None:
            raise NotJson from None
        raise TooDeep(index if index >= 0 else None) from None


def too_shallow_to_check(raw: bytes) -> bool:
    """Whether `raw` holds too few opening brackets for any value in it to
    be nested deeper than MAX_DEPTH (then no walk is needed)."""
    return raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH


def _deeper(nodes: list[Any], levels: int) -> bool:
    """Whether any container in `nodes` (all at the same level) has more
    than `levels` levels of containers, itself included."""
    depth = 0
    containers = _CONTAINERS
    while nodes:
        depth += 1
        if depth > levels:
            return True
        below: list[Any] = []
        for node in nodes:
            values = node.values() if type(node) is dict else node
            # Mostly scalars: asked in C before any Python-level loop.
            if not containers.isdisjoint(map(type, values)):
                below += [v for v in values if type(v) is dict or type(v) is list]
        nodes = below
    return False


def deep_records(raw: bytes | None, records: Sequence[Any], level: int = 1) -> list[int]:
    """The indexes of the `records` holding a value nested deeper than
    MAX_DEPTH, when each record sits at `level` (2 for a record's property
    object, say). `raw` is the body they were decoded from (None: no body
    to count brackets in, always walk)."""
    if raw is not None and too_shallow_to_check(raw):
        return []
    levels = MAX_DEPTH - level + 1
    containers = [r for r in records if type(r) is dict or type(r) is list]
    if not _deeper(containers, levels):
        return []
    return [
        index for index, record in enumerate(records)
        if (type(record) is dict or type(record) is list) and _deeper([record], levels)
    ]


def deep_record(raw: bytes | None, records: Sequence[Any], level: int = 1) -> int | None:
    """The index of the first record too deep (see `deep_records`), or None."""
    found = deep_records(raw, records, level)
    return found[0] if found else None


# A JSON string (escapes included), or one structural character.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')


def deep_record_raw(raw: bytes, envelope: Sequence[str] = ()) -> int | None:
    """For a body msgspec could not follow (RecursionError): the index of
    the record nested too deep, the records being the array at the path
    `envelope` (object keys, from the root; () for a top-level array).
    -1 when the too-deep value is somewhere else in the body; None when
    nothing in it is nested deeper than MAX_DEPTH levels below the records.

    A scan of the raw bytes, stopped at the first value too deep."""
    keys = [b'"' + key.encode() + b'"' for key in envelope]
    records_at = len(keys) + 1  # stack height inside the records' array
    # Per open container: is it an array, its element index, the last string
    # read in it (an object's key, when one of its values is open).
    stack: list[list[Any]] = []
    for match in _TOKEN.finditer(raw):
        token = match.group()
        char = token[0]
        if char == 0x22:  # a string
            if stack:
                stack[-1][2] = token
        elif char == 0x2C:  # ","
            if stack:
                stack[-1][1] += 1
        elif char == 0x5B or char == 0x7B:  # "[" or "{"
            stack.append([char == 0x5B, 0, None])
            if len(stack) > MAX_DEPTH + records_at:
                on_path = all(not stack[i][0] and stack[i][2] == key for i, key in enumerate(keys))
                records = stack[records_at - 1]
                return int(records[1]) if on_path and records[0] else -1
        elif stack:  # "]" or "}"
            stack.pop()
    return None


def bounded(failure: Failure) -> Failure:
    """The refusal with at most MAX_PROBLEMS details, each text cut to
    MAX_PROBLEM_CHARS, and the details cut short (`... and N more`, N
    counting `failure.omitted` too) before their encoded size passes what
    an error body may hold."""
    message = failure.message
    details = failure.details
    if len(message) <= MAX_PROBLEM_CHARS and len(details) <= MAX_PROBLEMS and not failure.omitted and (
        not details or sum(map(len, details)) <= 8 * 1024
    ):
        return failure  # the usual refusal: nothing to cut
    budget = MAX_ERROR_BYTES - _ENVELOPE_BYTES - 2 * len(_encode(_cut(message)))
    total = len(details) + failure.omitted
    kept: list[str] = []
    for detail in details:
        text = _cut(detail)
        cost = len(_encode(text)) + 1
        if (len(kept) == MAX_PROBLEMS - 1 and total > MAX_PROBLEMS) or cost > budget - 40:
            break
        kept.append(text)
        budget -= cost
    if total > len(kept):
        kept.append(f"... and {total - len(kept)} more")
    return msgspec.structs.replace(failure, message=_cut(message), details=tuple(kept), omitted=0)


def _cut(text: str) -> str:
    """Long texts lose their middle: the head names the field, the tail
    says what is wrong with it."""
    if len(text) <= MAX_PROBLEM_CHARS:
        return text
    tail = MAX_PROBLEM_CHARS // 3
    return text[: MAX_PROBLEM_CHARS - tail - 3] + "..." + text[-tail:]
