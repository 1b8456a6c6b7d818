"""dialects/times.py: vendor times to exact unix milliseconds."""

from __future__ import annotations

import datetime as dt

import pytest

from dialects.times import MAX_TIME_MS, datetime_ms, iso8601_ms, lenient_iso_ms

FEB_16 = 1771237800000  # 2026-02-16T10:30:00Z


def test_max_time_is_the_last_millisecond_of_year_9999() -> None:
    assert datetime_ms(dt.datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=dt.UTC)) == MAX_TIME_MS


@pytest.mark.parametrize(
    ("moment", "ms"),
    [
        (dt.datetime(1970, 1, 1, tzinfo=dt.UTC), 0),
        # timestamp() * 1000 gives ...237 for this one.
        (dt.datetime(2004, 9, 27, 11, 29, 40, 238000, tzinfo=dt.UTC), 1096284580238),
        (dt.datetime(2026, 2, 16, 10, 30, 0, 999999, tzinfo=dt.UTC), FEB_16 + 999),  # cut, not rounded
        (dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC), -1),
        (dt.datetime(2026, 2, 16, 11, 30, tzinfo=dt.timezone(dt.timedelta(hours=1))), FEB_16),
        (dt.datetime(1, 1, 1, tzinfo=dt.UTC), -62135596800000),
    ],
)
def test_datetime_ms_is_exact(moment: dt.datetime, ms: int) -> None:
    assert datetime_ms(moment) == ms


# (text, strict iso8601_ms, lenient_iso_ms)
CASES = [
    ("2026-02-16T10:30:00.000Z", FEB_16, FEB_16),
    ("2026-02-16T10:30:00Z", FEB_16, FEB_16),
    ("2026-02-16T10:30Z", FEB_16, FEB_16),
    ("2026-02-16T10:30:00+01:00", FEB_16 - 3600_000, FEB_16 - 3600_000),
    ("2026-02-16T10:30:00+0530", FEB_16 - 19800_000, FEB_16 - 19800_000),
    ("2026-02-16T10:30:00+05", FEB_16 - 18000_000, FEB_16 - 18000_000),
    ("2026-02-16T10:30:00,5+05:30", FEB_16 - 19800_000 + 500, FEB_16 - 19800_000 + 500),
    ("20260216T103000Z", FEB_16, FEB_16),  # basic format
    ("20260216T1030+0100", FEB_16 - 3600_000, FEB_16 - 3600_000),
    # RFC 3339 allows a space and lower case; fromisoformat no lower-case z.
    ("2026-02-16 10:30:00Z", FEB_16, FEB_16),
    ("2026-02-16t10:30:00z", FEB_16, None),
    # Fractions: cut to the millisecond.
    ("2026-02-16T10:30:00.123456789Z", FEB_16 + 123, FEB_16 + 123),
    ("2026-02-16T10:30:00.999999Z", FEB_16 + 999, FEB_16 + 999),
    ("2004-09-27T11:29:40.238Z", 1096284580238, 1096284580238),
    # No zone: not a timestamp strictly; UTC leniently.
    ("2026-02-16T10:30:00", None, FEB_16),
    ("2026-02-16", None, FEB_16 - 37800_000),
    # No leap second in datetime.
    ("2026-02-16T23:59:60Z", None, None),
    ("2026-13-01T00:00:00Z", None, None),
    # Out of the model's range: kept strictly (the vendor's rule), refused leniently.
    ("0001-01-01T00:00:00Z", -62135596800000, None),
    ("1969-12-31T23:59:59.999Z", -1, None),
    ("9999-12-31T23:59:59.999Z", MAX_TIME_MS, MAX_TIME_MS),
    ("9999-12-31T23:59:59-01:00", 253402304399000, None),
    ("1970-01-01T00:00:00Z", 0, 0),
    # Not date-times.
    ("x", None, None),
    ("", None, None),
    ("２０２６-02-16T10:30:00Z", None, None),  # full-width digits
    ("2026-02-16T10:30:00 +01:00", None, FEB_16 - 3600_000),  # a space before the zone
    # A NUL: never a strict timestamp; fromisoformat reads past it.
    ("2026-02-16T10:30:00\x00Z", None, FEB_16),
]


@pytest.mark.parametrize(("text", "strict", "lenient"), CASES)
def test_iso_readings(text: str, strict: int | None, lenient: int | None) -> None:
    assert iso8601_ms(text) == strict
    assert lenient_iso_ms(text) == lenient


def test_strict_reading_refuses_separators_fromisoformat_takes() -> None:
    assert lenient_iso_ms("2026-02-16X10:30:00Z") is not None
    assert iso8601_ms("2026-02-16X10:30:00Z") is None
    assert iso8601_ms("2026-02-16T10:30:00+01:00:30") is None  # seconds in the offset
