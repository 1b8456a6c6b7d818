"""Instants as people give them: epoch ms or ISO 8601, ranges half-open."""

from __future__ import annotations

import pytest

from gateway.timespan import LARGEST, parse_instant, span_of
from storage.export import Span

MS = 1_765_000_000_000  # 2025-12-06T05:46:40Z


@pytest.mark.parametrize(("text", "expected"), [
    ("1765000000000", MS),
    ("0", 0),
    (" 1765000000000 ", MS),
    ("2025-12-06T05:46:40Z", MS),
    ("2025-12-06T05:46:40.000Z", MS),
    ("2025-12-06T05:46:40.0019Z", MS + 1),  # below a millisecond: dropped
    ("2025-12-06T05:46:40", MS),  # no offset: UTC
    ("2025-12-06 06:46:40+01:00", MS),
    ("2025-12-06", MS - (5 * 3600 + 46 * 60 + 40) * 1000),  # a date: its midnight UTC
    ("1969-12-31T23:59:59.999Z", -1),
    (str(LARGEST), LARGEST),
])
def test_instants(text: str, expected: int) -> None:
    assert parse_instant(text) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "-5", "1.5", "+1765000000000", "1_000", "١٢٣",
                                  str(LARGEST + 1), "2025-13-01", "12/06/2025"])
def test_what_is_not_an_instant_is_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match=r"^since "):
        parse_instant(text, "since")


def test_spans() -> None:
    assert span_of(None, None) == Span()
    assert span_of("2025-12-06", "1765065600000") == Span(MS - 20800000, 1765065600000)
    with pytest.raises(ValueError, match="until must be after since"):
        span_of("2025-12-07", "2025-12-06")
    with pytest.raises(ValueError, match="until must be after since"):
        span_of("5", "5")
    with pytest.raises(ValueError, match="until must be epoch milliseconds"):
        span_of("5", "soon")
