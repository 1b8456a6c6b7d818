"""Instants given by people: `--since`/`--until` and the admin API's
`since`/`until`.

An instant is epoch milliseconds (ASCII digits only) or an ISO 8601 date or
date-time (`2026-12-06`, `2026-12-06T13:00:00Z`, `2026-12-06 13:00+01:00`);
one without an offset is UTC, a date alone its midnight UTC, and a fraction
below a millisecond is dropped. A range is half-open: since included, until
excluded.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from storage.export import Span

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# Event times are BIGINT milliseconds.
LARGEST = 2**63 - 1


def parse_instant(text: str, name: str = "time") -> int:
    """Epoch milliseconds; ValueError naming `name` when `text` is neither form."""
    value = text.strip()
    if value.isascii() and value.isdigit():
        if len(value) > 19 or int(value) > LARGEST:
            raise ValueError(f"{name} is out of range (epoch milliseconds up to {LARGEST})")
        return int(value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} must be epoch milliseconds or an ISO 8601 date or date-time, "
                         f"not {text[:64]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed - _EPOCH) // _MS


def span_of(since: str | None, until: str | None) -> Span:
    """The half-open range [since, until); ValueError when either is not an
    instant or until is not after since."""
    return Span(
        None if since is None else parse_instant(since, "since"),
        None if until is None else parse_instant(until, "until"),
    )
