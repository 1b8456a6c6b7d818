"""dialects/limits.py: the nesting limit, the JSON loader and the bounds on
what a refusal says (the HTTP side is tests/hostile/test_limits.py)."""

from __future__ import annotations

import msgspec
import pytest

from dialects.base import Failure
from dialects.limits import (
    MAX_DEPTH,
    MAX_ERROR_BYTES,
    MAX_PROBLEM_CHARS,
    MAX_PROBLEMS,
    SHALLOW_LEVELS,
    TOO_DEEP,
    NotJson,
    TooDeep,
    bounded,
    decode_json,
    deep_record,
    deep_record_raw,
    deep_records,
    load_json,
    too_shallow_to_check,
)


def nested(levels: int, inner: str = "1") -> str:
    """`levels` levels of arrays around `inner`."""
    return "[" * levels + inner + "]" * levels


def test_too_deep_names_the_limit() -> None:
    assert TOO_DEEP == "nested too deeply (more than 64 levels)"


# -- decode_json / load_json ----------------------------------------------------


def test_decode_json_says_whether_a_value_is_shallow() -> None:
    assert decode_json(nested(SHALLOW_LEVELS).encode()) == (msgspec.json.decode(nested(SHALLOW_LEVELS)), True)
    value, shallow = decode_json(nested(SHALLOW_LEVELS + 1).encode())
    assert value == msgspec.json.decode(nested(SHALLOW_LEVELS + 1)) and shallow is False


def test_a_number_out_of_range_is_not_json() -> None:
    # The typed pass refuses 1e400, and so does the untyped one.
    with pytest.raises(msgspec.DecodeError):
        decode_json(b"[1e400]")
    with pytest.raises(NotJson):
        load_json(b"[1e400]")


@pytest.mark.parametrize("raw", [b"", b"{", b"[1,]", b"\xff", b'"\xff"', b"nul"])
def test_load_json_refuses_what_is_not_json(raw: bytes) -> None:
    with pytest.raises(NotJson):
        load_json(raw)


def test_load_json_returns_value_and_shallowness() -> None:
    assert load_json(b'{"a":[1,{"b":null}]}') == ({"a": [1, {"b": None}]}, True)


def test_load_json_names_the_record_too_deep_for_the_decoder() -> None:
    raw = ("[1," + nested(5000) + "]").encode()
    with pytest.raises(TooDeep) as info:
        load_json(raw)
    assert info.value.index == 1
    assert str(info.value) == TOO_DEEP


def test_load_json_finds_records_under_their_envelope() -> None:
    raw = ('{"other":1,"events":[{},{},{"p":' + nested(5000) + "}]}").encode()
    with pytest.raises(TooDeep) as info:
        load_json(raw, ("events",))
    assert info.value.index == 2


def test_load_json_too_deep_outside_the_records_has_no_index() -> None:
    raw = ('{"x":' + nested(5000) + ',"events":[]}').encode()
    with pytest.raises(TooDeep) as info:
        load_json(raw, ("events",))
    assert info.value.index is None


def test_load_json_without_envelope_does_not_locate() -> None:
    with pytest.raises(TooDeep) as info:
        load_json(("[" + nested(5000) + "]").encode(), None)
    assert info.value.index is None


def test_load_json_unclosed_brackets_are_too_deep_not_a_crash() -> None:
    with pytest.raises(TooDeep) as info:
        load_json(b"[" * 5000)
    assert info.value.index == 0


# -- deep_record(s) -------------------------------------------------------------


def test_at_the_limit_is_not_too_deep() -> None:
    records = [msgspec.json.decode(nested(MAX_DEPTH)), msgspec.json.decode(nested(MAX_DEPTH + 1))]
    assert deep_records(None, records) == [1]
    assert deep_record(None, records) == 1
    assert deep_record(None, records[:1]) is None


def test_objects_and_arrays_both_count() -> None:
    value: object = 1
    for level in range(MAX_DEPTH):
        value = {"k": value} if level % 2 else [value]
    assert deep_record(None, [value]) is None
    assert deep_record(None, [{"k": value}]) == 0
    assert deep_record(None, [[value]]) == 0


def test_level_counts_the_records_place() -> None:
    # A property object sits at level 2: one level less is left for it.
    record = msgspec.json.decode(nested(MAX_DEPTH))
    assert deep_record(None, [record], level=1) is None
    assert deep_record(None, [record], level=2) == 0


def test_scalars_are_never_too_deep() -> None:
    assert deep_records(None, [1, "x", None, True]) == []


def test_few_brackets_need_no_walk() -> None:
    raw = nested(MAX_DEPTH).encode()
    assert too_shallow_to_check(raw)
    assert not too_shallow_to_check(nested(MAX_DEPTH + 1).encode())
    # The raw body short-cuts the walk: a body with few brackets is shallow.
    assert deep_records(raw, [msgspec.json.decode(raw)]) == []


def test_brackets_in_strings_are_not_nesting() -> None:
    raw = ('["' + "[" * 200 + '", "\\"[[["]').encode()
    assert deep_record_raw(raw) is None


@pytest.mark.parametrize(("raw", "envelope", "index"), [
    ("[1,2," + nested(MAX_DEPTH + 1) + "]", (), 2),
    ("[1,2," + nested(MAX_DEPTH) + "]", (), None),
    ('{"batch":[{"a":' + nested(MAX_DEPTH) + "}]}", ("batch",), 0),
    ('{"batch":[],"b":' + nested(MAX_DEPTH + 3) + "}", ("batch",), -1),
    ('{"a":{"batch":[' + nested(MAX_DEPTH + 3) + "]}}", ("batch",), -1),  # not at the envelope's path
])
def test_deep_record_raw(raw: str, envelope: tuple[str, ...], index: int | None) -> None:
    assert deep_record_raw(raw.encode(), envelope) == index


# -- bounded --------------------------------------------------------------------


def test_a_usual_refusal_is_returned_as_it_is() -> None:
    failure = Failure(kind="invalid", message="a", details=("a", "b"))
    assert bounded(failure) is failure


def test_more_than_max_problems_end_with_a_count() -> None:
    failure = Failure(kind="invalid", message="p0", details=tuple(f"p{i}" for i in range(250)))
    details = bounded(failure).details
    assert len(details) == MAX_PROBLEMS
    assert details[-2] == f"p{MAX_PROBLEMS - 2}"
    assert details[-1] == f"... and {250 - MAX_PROBLEMS + 1} more"


def test_omitted_problems_are_counted_in() -> None:
    failure = Failure(kind="invalid", message="p0", details=("p0", "p1"), omitted=5)
    result = bounded(failure)
    assert result.details == ("p0", "p1", "... and 5 more")
    assert result.omitted == 0


def test_long_texts_lose_their_middle() -> None:
    key = "k" * 10_000
    failure = Failure(kind="invalid", message=f"{key}: must be a string", details=(f"{key}: must be a string",))
    result = bounded(failure)
    assert len(result.message) == MAX_PROBLEM_CHARS
    assert result.message.startswith("kkk") and result.message.endswith(": must be a string")
    assert "..." in result.message
    assert result.details == (result.message,)


def test_the_encoded_details_stay_under_the_error_cap() -> None:
    details = tuple("\x00" * 1000 + str(i) for i in range(MAX_PROBLEMS))  # each NUL encodes as 6 bytes
    result = bounded(Failure(kind="invalid", message=details[0], details=details))
    size = len(msgspec.json.encode(list(result.details))) + 2 * len(msgspec.json.encode(result.message))
    assert size < MAX_ERROR_BYTES
    assert result.details[-1].startswith("... and ")
