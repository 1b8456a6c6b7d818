"""Profile verbs applied to a property dict: pure, so they are tested alone."""

from __future__ import annotations

from typing import Any

from gateway.model import ProfileUpdate


def apply_update(
    current: dict[str, Any] | None, update: ProfileUpdate
) -> tuple[dict[str, Any] | None, list[str]]:
    """Return the new properties (None: deleted) and the keys left alone.

    Verbs apply in the order $set_once, $set, $add, $append, $union, $remove,
    $unset; `delete` wins over everything else in the same operation. A key
    whose current value has the wrong type for its verb is left alone and
    reported, and the other keys still apply.
    """
    if update.delete:
        return None, []
    props = dict(current) if current is not None else {}
    problems: list[str] = []
    for key, value in update.set_once.items():
        if key not in props:
            props[key] = value
    props.update(update.set)
    for key, amount in update.add.items():
        held = props.get(key, 0)
        if type(held) in (int, float):
            props[key] = held + amount
        else:
            problems.append(f"$add.{key}: profile value is not a number")
    for key, value in update.append.items():
        held = props.get(key)
        if held is None:
            props[key] = [value]
        elif type(held) is list:
            props[key] = [*held, value]
        else:
            problems.append(f"$append.{key}: profile value is not a list")
    for key, items in update.union.items():
        held = props.get(key)
        if held is None:
            held = []
        elif type(held) is not list:
            problems.append(f"$union.{key}: profile value is not a list")
            continue
        merged = list(held)
        for item in items:
            if item not in merged:
                merged.append(item)
        props[key] = merged
    for key, value in update.remove.items():
        held = props.get(key)
        if held is None:
            continue
        if type(held) is not list:
            problems.append(f"$remove.{key}: profile value is not a list")
            continue
        props[key] = [item for item in held if item != value]
    for key in update.unset:
        props.pop(key, None)
    return props, problems
