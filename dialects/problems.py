"""Every problem of a refused request, each named by where it is.

Some vendors answer a bad request with the list of all its problems, not
the first one, each under its path ("Event 3: timestamp is required",
"0/user/email: Expected `str`, got `int`"). Three helpers:
- `Problems` collects them as phrased, the first `MAX_PROBLEMS` kept and
  the rest only counted (`Failure.omitted`): a flood of bad records costs
  a count each, and `limits.bounded` writes the `... and N more`.
- `check` checks a value against a msgspec schema (a `Checked` Struct)
  field by field, so that every bad field is named, not only the first one
  a decode stops at. Paths are keys and indexes joined by "/".
- `phrase` turns msgspec's ValidationError into the same path form.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import msgspec

from dialects.base import Failure, FailureKind
from dialects.limits import MAX_PROBLEMS


class Problems:
    """Problems in the order found; at most MAX_PROBLEMS phrased."""

    __slots__ = ("phrased", "omitted")

    def __init__(self) -> None:
        self.phrased: list[str] = []
        self.omitted = 0  # found past MAX_PROBLEMS: counted, not phrased

    def __bool__(self) -> bool:
        return bool(self.phrased) or self.omitted > 0

    def extend(self, where: str, found: Sequence[str], more: int = 0) -> None:
        """`found` (each prefixed by `where`) and `more` not phrased."""
        room = MAX_PROBLEMS - len(self.phrased)  # never negative
        self.phrased += [where + problem for problem in found[:room]]
        self.omitted += more + max(0, len(found) - room)

    def failure(self, kind: FailureKind) -> Failure:
        """The refusal: the first problem as its message, all as details."""
        return Failure(kind=kind, message=self.phrased[0], details=tuple(self.phrased), omitted=self.omitted)


class Checked(msgspec.Struct):
    """Base of a schema `check` walks. The field types say what msgspec
    checks; a subclass adds what it cannot express by overriding the hooks
    (each is asked only about values whose types are right)."""

    def valid(self) -> bool:
        """The extra rules on a converted value (not its nested schemas,
        which are asked themselves): False sends it to the full walk."""
        return True

    @classmethod
    def field_problem(cls, name: str, value: Any) -> str | None:
        """What is wrong with field `name`'s value beyond its type."""
        return None

    @classmethod
    def record_problems(cls, value: dict[str, Any]) -> Iterable[tuple[str, str]]:
        """(field, problem) pairs of rules across fields, after the fields."""
        return ()


S = TypeVar("S", bound=Checked)


class _Field(typing.NamedTuple):
    name: str  # as encoded
    attribute: str
    type: Any
    required: bool
    nested: type[Checked] | None  # a schema walked under its own path


@functools.cache
def _fields(schema: type[Checked]) -> tuple[_Field, ...]:
    # Resolving a Struct's annotations is costly: once per schema, not per value.
    return tuple(
        _Field(field.encode_name, field.name, field.type, field.required, _nested(field.type))
        for field in msgspec.structs.fields(schema)
    )


def _nested(kind: Any) -> type[Checked] | None:
    """The schema of a field typed `Schema` or `Schema | None`."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    found = [option for option in options if isinstance(option, type) and issubclass(option, Checked)]
    return found[0] if len(found) == 1 else None


def _valid(parsed: Checked) -> bool:
    if not parsed.valid():
        return False
    for field in _fields(type(parsed)):
        if field.nested is not None:
            item = getattr(parsed, field.attribute)
            if item is not None and not _valid(item):
                return False
    return True


def check(value: Any, schema: type[S], path: str = "", root: str = "body") -> tuple[S | None, list[str]]:
    """`value` converted to `schema`, or None and every problem of it, each
    as "<path>/<field>: <problem>" (`root` names the value at path "").

    A valid value converts in one pass; only an invalid one pays for the
    field-by-field walk: each field converted alone (so every bad field is
    reported), a nested schema walked under its own path, then unknown
    fields (when the schema forbids them) and the rules across fields."""
    prefix = f"{path}/" if path else ""
    if type(value) is not dict:
        return None, [f"{path or root}: must be an object"]
    try:
        parsed = msgspec.convert(value, schema)
    except msgspec.ValidationError:
        pass
    else:
        if _valid(parsed):
            return parsed, []
    problems: list[str] = []
    fields = _fields(schema)
    for field in fields:
        name = field.name
        if name not in value:
            if field.required:
                problems.append(f"{prefix}{name}: is required")
            continue
        item = value[name]
        if field.nested is not None and item is not None:
            problems += check(item, field.nested, prefix + name)[1]
            continue
        try:
            msgspec.convert(item, field.type)
        except msgspec.ValidationError as exc:
            problems.append(f"{prefix}{name}: {phrase(exc)}")
            continue
        problem = schema.field_problem(name, item)
        if problem is not None:
            problems.append(f"{prefix}{name}: {problem}")
    if schema.__struct_config__.forbid_unknown_fields:
        known = {field.name for field in fields}
        problems += [f"{prefix}{key}: unknown field" for key in value if key not in known]
    problems += [f"{prefix}{name}: {problem}" for name, problem in schema.record_problems(value)]
    if problems:
        return None, problems
    return msgspec.convert(value, schema), []


def phrase(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `str`, got `int` - at `$[0].user`" as
    "Expected `str`, got `int` (at 0/user)"."""
    text, sep, where = str(exc).rpartition(" - at `")
    if not sep:
        return str(exc)
    inner = where.rstrip("`").removeprefix("$").replace(".", "/").replace("[", "/").replace("]", "")
    return f"{text} (at {inner.lstrip('/')})" if inner else text
