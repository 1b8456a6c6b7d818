"""Profile verbs applied to a person's properties: pure, so they are tested alone.

Equality is JSON's: numbers by value (1 and 1.0 are one item), booleans
apart from numbers (true is not 1), strings, null, and arrays and objects
item by item with the same rules. Python's own == would take true for 1.

Every verb costs time linear in the values it names and in the list it
changes: `$union` looks items up in a set of the list's items (kept from one
operation to the next on the same profile), `$append` pushes in place,
`$remove` filters the list once. The encoded size of the properties is kept
current from what each operation changes, so a size cap costs no encoding of
the whole profile per operation.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import msgspec

from gateway.model import ProfileUpdate

_encode = msgspec.json.encode
_GONE = object()  # a key that is absent
# Tags that keep a boolean, an array and an object apart from any other key.
_BOOL, _LIST, _DICT = object(), object(), object()
_PLAIN = frozenset({str, int, float, type(None)})


def json_key(value: Any) -> Hashable:
    """A hashable key equal for two values exactly when they are equal JSON."""
    kind = type(value)
    if kind is bool:
        return (_BOOL, value)
    if kind is list:
        return (_LIST, tuple(json_key(item) for item in value))
    if kind is dict:
        return (_DICT, frozenset((k, json_key(v)) for k, v in value.items()))
    return value  # str, int, float, None: Python's own equality is JSON's


def _keys_of(items: list[Any]) -> set[Hashable]:
    if set(map(type, items)) <= _PLAIN:
        return set(items)  # all in C: the common case of a list of strings or numbers
    return set(map(json_key, items))


def _size(value: Any) -> int:
    return len(_encode(value))


class Profile:
    """A person's properties, with their encoded size (compact JSON, in
    bytes) known at every step. Updates change `props` in place."""

    __slots__ = ("props", "_entries", "_total", "_index")

    def __init__(self, props: dict[str, Any]) -> None:
        self.props = props
        self._entries: dict[str, int] | None = None  # key -> bytes of `"key":value`
        self._total = 0
        self._index: dict[str, set[Hashable]] = {}  # list key -> keys of its items

    @property
    def size(self) -> int:
        entries = self._sizes()
        return 2 + self._total + max(len(entries) - 1, 0)

    def _sizes(self) -> dict[str, int]:
        if self._entries is None:
            self._entries = {k: _size(k) + 1 + _size(v) for k, v in self.props.items()}
            self._total = sum(self._entries.values())
        return self._entries

    def apply(self, update: ProfileUpdate, max_bytes: int | None = None) -> tuple[list[str], int | None]:
        """Apply the verbs (not `delete`, the caller's) in the order $set_once,
        $set, $add, $append, $union, $remove, $unset. Returns the keys left
        alone (the wrong type for their verb), and, when the result would
        be over `max_bytes` and larger than before, its size: then nothing
        of the update stays."""
        entries = self._sizes()
        before = self.size
        step = _Step(self, entries)
        problems = step.run(update)
        after = self.size
        if max_bytes is not None and after > max_bytes and after > before:
            step.undo()
            return problems, after
        return problems, None


class _Step:
    """One update applied in place, with what it takes to undo it."""

    def __init__(self, profile: Profile, entries: dict[str, int]) -> None:
        self.p = profile
        self.entries = entries
        # key -> (value before, entry size before, list length before)
        self.saved: dict[str, tuple[Any, int | None, int | None]] = {}

    def _save(self, key: str) -> Any:
        held = self.p.props.get(key, _GONE)
        if key not in self.saved:
            length = len(held) if type(held) is list else None
            self.saved[key] = (held, self.entries.get(key), length)
        return held

    def _put(self, key: str, value: Any) -> None:
        self._save(key)
        if type(value) is list:
            value = list(value)  # pushed onto in place later: never the update's own list
        self.p.props[key] = value
        self._resize(key, _size(key) + 1 + _size(value))
        self.p._index.pop(key, None)

    def _resize(self, key: str, entry: int | None) -> None:
        old = self.entries.get(key)
        if old is not None:
            self.p._total -= old
        if entry is None:
            self.entries.pop(key, None)
        else:
            self.entries[key] = entry
            self.p._total += entry

    def _grow_list(self, key: str, held: list[Any], items: list[Any]) -> None:
        """Push items onto the list at `key`, and its size with them."""
        before = len(held)
        held.extend(items)
        added = sum(map(_size, items)) + len(items) - (1 if before == 0 and items else 0)
        self._resize(key, self.entries[key] + added)

    def run(self, update: ProfileUpdate) -> list[str]:
        props = self.p.props
        problems: list[str] = []
        for key, value in update.set_once.items():
            if key not in props:
                self._put(key, value)
        for key, value in update.set.items():
            self._put(key, value)
        for key, amount in update.add.items():
            held = props.get(key, 0)
            if type(held) in (int, float):
                self._put(key, held + amount)
            else:
                problems.append(f"$add.{key}: profile value is not a number")
        for key, value in update.append.items():
            held = self._save(key)
            if held is _GONE or held is None:
                self._put(key, [value])
            elif type(held) is list:
                self._grow_list(key, held, [value])
                index = self.p._index.get(key)
                if index is not None:
                    index.add(json_key(value))
            else:
                problems.append(f"$append.{key}: profile value is not a list")
        for key, items in update.union.items():
            held = self._save(key)
            if held is _GONE or held is None:
                self._put(key, [])
                held = props[key]
            elif type(held) is not list:
                problems.append(f"$union.{key}: profile value is not a list")
                continue
            index = self.p._index.get(key)
            if index is None:
                index = self.p._index[key] = _keys_of(held)
            added = []
            for item in items:
                item_key = json_key(item)
                if item_key not in index:
                    index.add(item_key)
                    added.append(item)
            self._grow_list(key, held, added)
        for key, value in update.remove.items():
            held = self._save(key)
            if held is _GONE or held is None:
                continue
            if type(held) is not list:
                problems.append(f"$remove.{key}: profile value is not a list")
                continue
            index = self.p._index.get(key)
            target = json_key(value)
            if index is not None and target not in index:
                continue
            kept = _without(held, value, target)
            if len(kept) != len(held):
                if type(value) in (str, bool) or value is None:
                    gone = (len(held) - len(kept)) * _size(value)
                else:  # 1 and 1.0, or objects in another key order: equal, not the same bytes
                    gone = sum(map(_size, _without(held, value, target, keep=False)))
                # "[a,b,c]": the items, a comma between two, the brackets.
                items = self.entries[key] - _size(key) - 1 - 2 - max(len(held) - 1, 0) - gone
                props[key] = kept
                self._resize(key, _size(key) + 1 + 2 + items + max(len(kept) - 1, 0))
            if index is not None:
                index.discard(target)
        for key in update.unset:
            if key in props:
                self._save(key)
                del props[key]
                self._resize(key, None)
                self.p._index.pop(key, None)
        return problems

    def undo(self) -> None:
        props = self.p.props
        for key, (value, entry, length) in self.saved.items():
            if value is _GONE:
                props.pop(key, None)
            else:
                if length is not None:
                    del value[length:]  # pushed in place
                props[key] = value
            self._resize(key, entry)
            self.p._index.pop(key, None)


def _without(held: list[Any], value: Any, target: Hashable, keep: bool = True) -> list[Any]:
    """The list without any item equal (as JSON) to `value` (keep=False:
    only those items)."""
    kind = type(value)
    if kind is bool or value is None:
        return [item for item in held if (item is not value) is keep]
    if kind is str:
        return [item for item in held if (item != value) is keep]  # only an equal string is equal
    if kind is int or kind is float:
        return [item for item in held if (item != value or type(item) is bool) is keep]
    return [item for item in held if (type(item) is not kind or json_key(item) != target) is keep]


def apply_update(
    current: dict[str, Any] | None, update: ProfileUpdate
) -> tuple[dict[str, Any] | None, list[str]]:
    """Return the new properties (None: deleted) and the keys left alone.

    `delete` wins over everything else in the same operation. A key whose
    current value has the wrong type for its verb is left alone and
    reported, and the other keys still apply. `current` is not changed.
    """
    if update.delete:
        return None, []
    copied = {k: list(v) if type(v) is list else v for k, v in (current or {}).items()}
    profile = Profile(copied)
    problems, _ = profile.apply(update)
    return profile.props, problems
