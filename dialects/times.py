"""Times as the canonical model keeps them: unix milliseconds, exact.

A vendor's time becomes an `int` of milliseconds since 1970-01-01T00:00Z.
Date-times are converted with integer arithmetic: `timestamp() * 1000` is
a float and can land 1 ms early (2004-09-27T11:29:40.238Z gave ...237).
Fractions finer than a millisecond are cut, never rounded. Python's
datetime has no leap second: `23:59:60` is not a time.

Two readings of ISO 8601, because the vendors differ:
- `iso8601_ms`: strictly ISO 8601 with a zone (what a vendor that says
  "ISO 8601 date-time with a timezone" accepts); no range check.
- `lenient_iso_ms`: whatever Python's `fromisoformat` reads, a missing zone
  meaning UTC, inside `0..MAX_TIME_MS` (for tags that send looser forms).
"""

from __future__ import annotations

import datetime as dt
import re

import msgspec

# Unix ms up to the end of year 9999: anything larger is not a time.
MAX_TIME_MS = 253_402_300_799_999

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)
_as_datetime = msgspec.json.Decoder(dt.datetime).decode
# ISO 8601 date-time with a zone, extended or basic format; anything looser
# (other separators, seconds in the offset) is not a timestamp.
_ISO = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}([.,]\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)"  # extended
    r"|\d{8}T\d{4}(\d{2}([.,]\d+)?)?(Z|[+-]\d{2}(\d{2})?)",  # basic
    re.ASCII | re.IGNORECASE,
)


def datetime_ms(moment: dt.datetime) -> int:
    """Unix ms of an aware date-time, exactly (sub-millisecond cut)."""
    return (moment - _EPOCH) // _MS


def iso8601_ms(text: str) -> int | None:
    """ISO 8601 date-time with a zone -> unix ms; None when it is not one.
    Any year datetime holds (0001 gives a negative time)."""
    try:
        # msgspec's RFC 3339 parser first: it is the shape SDKs send, and fast.
        moment = _as_datetime(b'"' + text.encode() + b'"')
    except (msgspec.DecodeError, UnicodeEncodeError):
        # Other ISO 8601 forms, strictly: fromisoformat alone is lenient
        # (any separator, and it stops reading at a NUL).
        if not _ISO.fullmatch(text):
            return None
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            return None
    if moment.tzinfo is None:
        return None
    return (moment - _EPOCH) // _MS


def lenient_iso_ms(text: str) -> int | None:
    """What `datetime.fromisoformat` reads -> unix ms, no zone meaning UTC;
    None when it reads nothing or the time is outside 0..MAX_TIME_MS."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    ms = (moment - _EPOCH) // _MS
    return ms if 0 <= ms <= MAX_TIME_MS else None
