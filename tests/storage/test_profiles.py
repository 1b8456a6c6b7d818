from __future__ import annotations

import json
import random
import time

import msgspec

from gateway.model import ProfileUpdate
from storage.profiles import Profile, apply_update


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


def test_list_items_compare_as_json_numbers_by_value_booleans_apart() -> None:
    props, _ = apply_update({"l": [1, True, "1", None]}, _op(union={"l": [1.0, True, False, 1, None, "1", 0]}))
    assert props == {"l": [1, True, "1", None, False, 0]}
    props, _ = apply_update({"l": [1, 1.0, True, [1], {"a": [True]}, {"a": [1]}]}, _op(remove={"l": 1}))
    assert props == {"l": [True, [1], {"a": [True]}, {"a": [1]}]}
    props, _ = apply_update({"l": [1, True, 0, False]}, _op(remove={"l": True}))
    assert props == {"l": [1, 0, False]}
    props, _ = apply_update({"l": [{"a": 1, "b": [2]}, {"b": [2.0], "a": 1}, {"a": True}]},
                            _op(remove={"l": {"b": [2], "a": 1.0}}))
    assert props == {"l": [{"a": True}]}


def _reference(props: dict, update: ProfileUpdate) -> dict:
    """The verbs spelled out naively, comparing JSON texts (numbers as floats)."""
    def same(a: object, b: object) -> bool:
        def norm(v: object) -> object:
            if type(v) is bool or v is None or type(v) is str:
                return (type(v).__name__, v)
            if type(v) in (int, float):
                return ("n", float(v))  # type: ignore[arg-type]
            if type(v) is list:
                return ("l", [norm(x) for x in v])
            return ("d", sorted((k, norm(x)) for k, x in v.items()))  # type: ignore[union-attr]
        return json.dumps(norm(a)) == json.dumps(norm(b))
    props = json.loads(json.dumps(props))
    for key, value in update.set.items():
        props[key] = value
    for key, value in update.append.items():
        if props.get(key) is None:
            props[key] = [value]
        elif type(props[key]) is list:
            props[key] = props[key] + [value]
    for key, items in update.union.items():
        held = props.get(key)
        if held is None:
            held = []
        elif type(held) is not list:
            continue
        for item in items:
            if not any(same(item, h) for h in held):
                held = [*held, item]
        props[key] = held
    for key, value in update.remove.items():
        if type(props.get(key)) is list:
            props[key] = [h for h in props[key] if not same(h, value)]
    for key in update.unset:
        props.pop(key, None)
    return props


def test_random_list_operations_match_the_reference_and_the_size_is_exact() -> None:
    rng = random.Random(15)
    values = [0, 1, 1.0, True, False, "1", "", None, [1], [True], {"a": 1}, {"a": 1.0}, 2.5, "x\u00e9"]
    profile = Profile({})
    for step in range(3000):
        key = rng.choice("abc")
        roll = rng.random()
        if roll < 0.3:
            update = _op(union={key: rng.sample(values, 3)})
        elif roll < 0.55:
            update = _op(append={key: rng.choice(values)})
        elif roll < 0.8:
            update = _op(remove={key: rng.choice(values)})
        elif roll < 0.9:
            update = _op(set={key: rng.choice([*values, [1, 2]])})
        else:
            update = _op(unset=[key])
        expected = _reference(profile.props, update)
        profile.apply(update)
        assert profile.props == expected and json.dumps(profile.props) == json.dumps(expected), (step, update)
        assert profile.size == len(msgspec.json.encode(profile.props)), (step, update)


def test_an_update_over_the_cap_is_undone_whole() -> None:
    rng = random.Random(7)
    profile = Profile({"l": list(range(50)), "s": "text"})
    for step in range(500):
        before = msgspec.json.encode(profile.props)
        update = _op(
            set={"s": "y" * rng.randrange(0, 200)},
            append={"l": rng.randrange(100)},
            union={"l": [rng.randrange(300) for _ in range(rng.randrange(0, 40))]},
            remove={"l": rng.randrange(100)},
            unset=rng.choice([[], ["s"]]),
        )
        _, refused = profile.apply(update, max_bytes=700)
        after = msgspec.json.encode(profile.props)
        if refused is not None:
            assert after == before, step
            assert refused > 700 and refused > len(before)
        assert profile.size == len(after), step


def test_40000_items_take_linear_time() -> None:
    numbers = list(range(40_000))
    started = time.perf_counter()
    profile = Profile({"l": list(range(20_000))})
    profile.apply(_op(union={"l": numbers}))
    for n in range(0, 40_000, 400):
        profile.apply(_op(remove={"l": n}))
    profile.apply(_op(append={"l": numbers}))
    assert time.perf_counter() - started < 2.0
    assert len(profile.props["l"]) == 40_000 - 100 + 1
