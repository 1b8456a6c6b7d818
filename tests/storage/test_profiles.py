from __future__ import annotations

from gateway.model import ProfileUpdate
from storage.profiles import apply_update


def _op(**verbs: object) -> ProfileUpdate:
    return ProfileUpdate(project="p", source="s", distinct_id="d", time=0, **verbs)


def test_verb_order_within_one_operation() -> None:
    props, problems = apply_update(
        {"seen": 1},
        _op(set_once={"a": 1, "seen": 2}, set={"a": 2}, add={"a": 3}, append={"l": "x"},
            union={"l": ["x", "y"]}, remove={"l": "x"}, unset=["seen"]),
    )
    assert props == {"a": 5, "l": ["y"]}
    assert problems == []


def test_wrong_types_are_left_alone_and_reported() -> None:
    props, problems = apply_update(
        {"s": "text", "n": 1}, _op(add={"s": 1, "n": 2}, append={"s": 1}, union={"n": [1]}, remove={"s": "t"})
    )
    assert props == {"s": "text", "n": 3}
    assert len(problems) == 4 and problems[0].startswith("$add.s")


def test_delete_wins_over_other_verbs() -> None:
    assert apply_update({"a": 1}, _op(delete=True, set={"b": 2})) == (None, [])


def test_union_keeps_existing_order_and_adds_missing_in_order() -> None:
    props, _ = apply_update({"l": [3, 1]}, _op(union={"l": [1, 2, 2, 4]}))
    assert props == {"l": [3, 1, 2, 4]}
