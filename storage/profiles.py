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
    scalar: Hashable = value  # str, int, float, None: Python's own equality is JSON's
    return scalar


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
    """One update applied in place, with a log of what it takes to undo it."""

    def __init__(self, profile: Profile, entries: dict[str, int]) -> None:
        self.p = profile
        self.entries = entries
        self.log: list[tuple[Any, ...]] = []

    def _assign(self, key: str, value: Any) -> None:
        """props[key] = value (_GONE: delete), its entry size with it."""
        props = self.p.props
        self.log.append(("key", key, props.get(key, _GONE), self.entries.get(key)))
        if value is _GONE:
            del props[key]
            self._resize(key, None)
        else:
            props[key] = value
            self._resize(key, _size(key) + 1 + _size(value))
        self.p._index.pop(key, None)

    def _put(self, key: str, value: Any) -> None:
        if type(value) is list:
            value = list(value)  # pushed onto in place later: never the update's own list
        self._assign(key, value)

    def _resize(self, key: str, entry: int | None) -> None:
        old = self.entries.get(key)
        if old is not None:
            self.p._total -= old
        if entry is None:
            self.entries.pop(key, None)
        else:
            self.entries[key] = entry
            self.p._total += entry

    def _list_changed(self, key: str, before: int, after: int, items_delta: int) -> None:
        """The list at `key` went from `before` to `after` items whose
        encodings grew by `items_delta` bytes: "[a,b]" has a comma between two."""
        entry = self.entries[key] + items_delta + max(after - 1, 0) - max(before - 1, 0)
        self.log.append(("size", key, self.entries[key]))
        self._resize(key, entry)

    def _index(self, key: str, held: list[Any]) -> set[Hashable]:
        index = self.p._index.get(key)
        if index is None:
            index = self.p._index[key] = _keys_of(held)
        return index

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
            held = props.get(key)
            if held is None:
                self._put(key, [value])
            elif type(held) is list:
                self.log.append(("extend", held, len(held)))
                held.append(value)
                self._list_changed(key, len(held) - 1, len(held), _size(value))
                index = self.p._index.get(key)
                if index is not None:
                    index.add(json_key(value))
            else:
                problems.append(f"$append.{key}: profile value is not a list")
        for key, items in update.union.items():
            held = props.get(key)
            if held is None:
                self._put(key, [])
                held = props[key]
            elif type(held) is not list:
                problems.append(f"$union.{key}: profile value is not a list")
                continue
            index = self._index(key, held)
            added = []
            for item in items:
                item_key = json_key(item)
                if item_key not in index:
                    index.add(item_key)
                    added.append(item)
            if added:
                self.log.append(("extend", held, len(held)))
                held.extend(added)
                self._list_changed(key, len(held) - len(added), len(held), sum(map(_size, added)))
        for key, value in update.remove.items():
            held = props.get(key)
            if held is None:
                continue
            if type(held) is not list:
                problems.append(f"$remove.{key}: profile value is not a list")
                continue
            index = self._index(key, held)
            target = json_key(value)
            if target not in index:
                continue  # nothing to remove: no pass over the list
            before = len(held)
            if _scan_safe(value, index):
                removed = _remove_all(held, value)
                self.log.append(("removed", held, removed))
                gone = sum(_size(item) for _, item in removed)
            else:
                kept = [item for item in held if json_key(item) != target]
                gone = _size(held) - _size(kept) - max(before - 1, 0) + max(len(kept) - 1, 0)
                self.log.append(("key", key, held, self.entries.get(key)))
                props[key] = held = kept
            index.discard(target)
            self._list_changed(key, before, len(held), -gone)
        for key in update.unset:
            if key in props:
                self._assign(key, _GONE)
        return problems

    def undo(self) -> None:
        props = self.p.props
        for entry in reversed(self.log):
            kind = entry[0]
            if kind == "key":
                _, key, value, size = entry
                if value is _GONE:
                    props.pop(key, None)
                else:
                    props[key] = value
                self._resize(key, size)
                self.p._index.pop(key, None)
            elif kind == "size":
                self._resize(entry[1], entry[2])
            elif kind == "extend":
                del entry[1][entry[2]:]
            else:  # "removed": put the items back where they were
                held = entry[1]
                for position, item in reversed(entry[2]):
                    held.insert(position, item)
        # The indexes of lists changed in place no longer match them.
        for entry in self.log:
            if entry[0] in ("key", "size"):
                self.p._index.pop(entry[1], None)
        self.p._index.clear()


def _scan_safe(value: Any, index: set[Hashable]) -> bool:
    """Whether the list's own search (Python's ==) finds exactly the items
    JSON-equal to `value`: a string or null always; a number when the list
    holds no boolean, a boolean when it holds no 0 or 1."""
    kind = type(value)
    if kind is str or value is None:
        return True
    if kind is int or kind is float:
        return (_BOOL, True) not in index and (_BOOL, False) not in index
    if kind is bool:
        return 1 not in index and 0 not in index
    return False


def _remove_all(held: list[Any], value: Any) -> list[tuple[int, Any]]:
    """Remove every occurrence in place (the search and the move in C);
    the (position, item) of each, in the order removed."""
    removed: list[tuple[int, Any]] = []
    start = 0
    while True:
        try:
            position = held.index(value, start)
        except ValueError:
            return removed
        removed.append((position, held[position]))
        del held[position]
        start = position


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
