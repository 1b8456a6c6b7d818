"""gateway.model: the canonical records, and the id limits every dialect's
records are held to (`long_id`, checked by the pipeline after translation)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from gateway.model import MAX_ID_BYTES, MAX_INSERT_ID, Alias, Device, Event, ProfileUpdate, Rejection, long_id


def _event(**fields: object) -> Event:
    return Event(**{"project": "shop", "source": "cohorly", "name": "e", "distinct_id": "u", "time": 1,
                    "received_at": 2, **fields})  # type: ignore[arg-type]


def test_records_are_frozen_and_keyword_only() -> None:
    event = _event()
    with pytest.raises(AttributeError):
        event.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Alias("shop", "cohorly", "a", "b")  # type: ignore[misc]
    assert (event.insert_id, event.properties, event.consent) == (None, {}, None)
    # A default bag is not shared between records.
    assert _event().properties is not _event().properties


def test_records_round_trip_through_msgpack() -> None:
    records = [
        _event(insert_id="i", properties={"a": [1, {"b": None}]}, consent=True),
        ProfileUpdate(project="shop", source="client", distinct_id="u", time=1, set={"a": 1}, unset=["b"]),
        Alias(project="shop", source="cohorly", alias="anon", distinct_id="u", strict=True),
        Device(project="shop", source="client", distinct_id="u", device_id="d", os="iOS"),
        Rejection(project=None, source="collect", reason="id_too_long", detail="d"),
    ]
    for record in records:
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(record), type=type(record)) == record


@pytest.mark.parametrize(("field", "make"), [
    ("distinct_id", lambda v: _event(distinct_id=v)),
    ("anonymous_id", lambda v: _event(anonymous_id=v)),
    ("user_id", lambda v: _event(user_id=v)),
    ("distinct_id", lambda v: ProfileUpdate(project="p", source="s", distinct_id=v, time=1)),
    ("alias", lambda v: Alias(project="p", source="s", alias=v, distinct_id="u")),
    ("distinct_id", lambda v: Alias(project="p", source="s", alias="a", distinct_id=v)),
    ("distinct_id", lambda v: Device(project="p", source="s", distinct_id=v, device_id="d")),
    ("device_id", lambda v: Device(project="p", source="s", distinct_id="u", device_id=v)),
])
def test_an_id_over_its_limit_in_utf8_bytes_is_named(field: str, make: Callable[[str], object]) -> None:
    assert long_id(make("x" * MAX_ID_BYTES)) is None
    assert long_id(make("x" * (MAX_ID_BYTES + 1))) == field
    # Bytes, not characters: 256 four-byte characters fit, one more does not.
    assert long_id(make("\U0001F600" * (MAX_ID_BYTES // 4))) is None
    assert long_id(make("\U0001F600" * (MAX_ID_BYTES // 4) + "x")) == field
    assert long_id(make("é" * (MAX_ID_BYTES // 2 + 1))) == field
    # A lone surrogate (what a JSON \\ud800 escape decodes to) is counted, not an error.
    assert long_id(make("\ud800" * (MAX_ID_BYTES // 3 + 1))) == field


def test_an_insert_id_is_limited_in_characters() -> None:
    assert long_id(_event(insert_id="é" * MAX_INSERT_ID)) is None
    assert long_id(_event(insert_id="x" * (MAX_INSERT_ID + 1))) == "insert_id"
    # The first field over its limit is the one named.
    assert long_id(_event(distinct_id="x" * 2000, insert_id="x" * 300)) == "distinct_id"


def test_other_values_are_not_ids() -> None:
    assert long_id(_event(name="x" * 5000, properties={"p": "x" * 5000}, session_id="x" * 5000)) is None
    assert long_id(_event(distinct_id=None)) is None
    assert long_id(Rejection(project="p", source="s", reason="r", detail="x" * 5000)) is None
    device = Device(project="p", source="s", distinct_id="u", device_id="d", push_token="x" * 5000)
    assert long_id(device) is None
