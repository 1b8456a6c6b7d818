"""dialects/problems.py: every problem of a refused request under its path."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

import msgspec
import pytest

from dialects.limits import MAX_PROBLEMS, bounded
from dialects.problems import Checked, Problems, check, phrase

# -- Problems -----------------------------------------------------------------


def test_problems_start_empty_and_falsy() -> None:
    problems = Problems()
    assert not problems
    assert problems.phrased == [] and problems.omitted == 0


def test_problems_are_phrased_under_their_path_in_order() -> None:
    problems = Problems()
    problems.extend("Event 0: ", ["a is required", "b must be a string"])
    problems.extend("Event 2: ", ["c is required"])
    assert problems
    failure = problems.failure("invalid")
    assert failure.kind == "invalid"
    assert failure.message == "Event 0: a is required"
    assert failure.details == ("Event 0: a is required", "Event 0: b must be a string", "Event 2: c is required")
    assert failure.omitted == 0


def test_problems_past_the_cap_are_counted_not_phrased() -> None:
    problems = Problems()
    problems.extend("x ", [f"p{i}" for i in range(MAX_PROBLEMS - 1)])
    problems.extend("y ", ["q1", "q2", "q3"], more=10)
    assert len(problems.phrased) == MAX_PROBLEMS
    assert problems.phrased[-1] == "y q1"
    assert problems.omitted == 2 + 10
    problems.extend("z ", ["r"], more=1)
    assert len(problems.phrased) == MAX_PROBLEMS
    assert problems.omitted == 14
    # What the answer says: 99 problems and the count of the rest.
    details = bounded(problems.failure("invalid")).details
    assert len(details) == MAX_PROBLEMS
    assert details[-1] == f"... and {MAX_PROBLEMS - 1 + 3 + 10 + 2 - 99} more"


def test_only_counted_problems_still_refuse() -> None:
    problems = Problems()
    problems.extend("", [], more=3)
    assert problems
    assert problems.omitted == 3


def test_problem_texts_are_kept_as_sent_nul_included() -> None:
    problems = Problems()
    problems.extend("Event 1: ", ["properties.a\x00b must be a string"])
    assert problems.failure("invalid").details == ("Event 1: properties.a\x00b must be a string",)


# -- check ----------------------------------------------------------------------

ZONES = frozenset({"Europe/Paris", "UTC"})


class Block(Checked, kw_only=True, forbid_unknown_fields=True):
    zone: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)

    def valid(self) -> bool:
        return self.zone is None or self.zone in ZONES

    @classmethod
    def field_problem(cls, name: str, value: Any) -> str | None:
        if name == "zone" and value is not None and value not in ZONES:
            return "not a zone"
        return None


class Item(Checked, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    a: str | None = None
    b: str | None = None
    block: Block | None = None

    def valid(self) -> bool:
        return self.a is not None or self.b is not None

    @classmethod
    def record_problems(cls, value: dict[str, Any]) -> Iterable[tuple[str, str]]:
        if value.get("a") is None and value.get("b") is None:
            return (("b", "a or b is required"),)
        return ()


def test_a_valid_value_converts() -> None:
    parsed, problems = check({"name": "n", "a": "x", "block": {"zone": "UTC", "tags": ["t"]}}, Item)
    assert problems == []
    assert parsed == Item(name="n", a="x", block=Block(zone="UTC", tags=["t"]))


def test_every_problem_is_named_with_its_path() -> None:
    value = {"name": "", "a": 1, "block": {"zone": "Mars", "tags": [1], "extra": 0}, "other": 1}
    parsed, problems = check(value, Item, "3")
    assert parsed is None
    assert problems == [
        "3/name: Expected `str` of length >= 1",
        "3/a: Expected `str | null`, got `int`",
        # The nested schema under its own path, its rules included.
        "3/block/zone: not a zone",
        "3/block/tags: Expected `str`, got `int` (at 0)",
        "3/block/extra: unknown field",
        # Item does not forbid unknown fields: "other" is not a problem.
    ]


def test_missing_fields_and_rules_across_fields() -> None:
    parsed, problems = check({}, Item)
    assert parsed is None
    assert problems == ["name: is required", "b: a or b is required"]


def test_a_rule_that_fails_after_a_clean_convert_is_walked() -> None:
    # Types fine, so msgspec converts; the schema's rule sends it to the walk.
    assert check({"name": "n", "a": "x", "block": {"zone": "Mars"}}, Item) == (None, ["block/zone: not a zone"])
    assert check({"name": "n"}, Item) == (None, ["b: a or b is required"])


def test_null_nested_schema_is_allowed() -> None:
    parsed, problems = check({"name": "n", "b": "y", "block": None}, Item)
    assert problems == [] and parsed is not None and parsed.block is None


@pytest.mark.parametrize(("value", "path", "problem"), [
    ([], "", "body: must be an object"),
    (None, "", "body: must be an object"),
    ("x", "7", "7: must be an object"),
])
def test_a_value_that_is_not_an_object(value: Any, path: str, problem: str) -> None:
    assert check(value, Item, path) == (None, [problem])


def test_the_root_has_a_name_of_the_callers_choosing() -> None:
    assert check(1, Item, root="event") == (None, ["event: must be an object"])


def test_nested_not_an_object_names_the_nested_path() -> None:
    assert check({"name": "n", "a": "x", "block": 3}, Item, "0") == (None, ["0/block: must be an object"])


def test_nul_in_keys_is_named_as_sent() -> None:
    _parsed, problems = check({"name": "n", "a": "x", "block": {"zo\x00ne": "UTC"}}, Item)
    assert problems == ["block/zo\x00ne: unknown field"]


# -- phrase ---------------------------------------------------------------------


def _error(value: Any, kind: Any) -> msgspec.ValidationError:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(value, kind)
    return info.value


def test_phrase_without_a_path_is_msgspec_text() -> None:
    assert phrase(_error(1, str)) == "Expected `str`, got `int`"


def test_phrase_turns_msgspec_paths_into_slashes() -> None:
    assert phrase(_error([{"tags": ["t", 1]}], list[Block])) == "Expected `str`, got `int` (at 0/tags/1)"
    assert phrase(_error([{}, {"z": 1}], list[Block])) == "Object contains unknown field `z` (at 1)"


def test_phrase_of_a_value_under_a_free_form_key() -> None:
    # msgspec does not name the key of a dict value (`$[0][...][1]`): the
    # client's answers have always read so; kept as it is, byte for byte.
    assert phrase(_error([{"a": [1, "x"]}], list[dict[str, list[int]]])) == "Expected `int`, got `str` (at 0/////1)"
