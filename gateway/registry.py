"""The dialect registry: every class registered in the `dialgate.dialects`
entry-point group, the dialects shipped with Dialgate included (its own
`pyproject.toml` registers them the way any other distribution would).

The order is deterministic, and it matters where dialects share a path (the
first one answers a request carrying no credential): Dialgate's own first,
then other distributions by name; within one, entry points by name. A
plug-in therefore never takes a shared path's default answer from a shipped
dialect. A plug-in that cannot be loaded stops the start with an error
naming its entry point: serving without it would silently drop its traffic.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points

from dialects.base import Dialect

GROUP = "dialgate.dialects"
# The distribution whose dialects come first.
HOME = "dialgate"

Registry = tuple[type[Dialect], ...]


class PluginError(Exception):
    """A dialect entry point that cannot be used."""


@functools.cache
def discover() -> Registry:
    """The installed dialects, loaded once per process."""
    found = sorted(entry_points(group=GROUP), key=_order)
    if not found:
        raise PluginError(
            f"no dialects registered in the entry-point group {GROUP!r}: is dialgate installed "
            "(pip install . or pip install -e .)?"
        )
    return check((_describe(ep), _load(ep)) for ep in found)


def check(entries: Iterable[tuple[str, object]]) -> Registry:
    """The dialect classes of (origin, object) pairs, in order, after the
    checks every registry passes: Dialect subclasses with a name, a Config
    and endpoints, unique names, and `[[projects]]` keys no two dialects
    both claim."""
    registry: list[type[Dialect]] = []
    names: dict[str, str] = {}
    fields: dict[str, str] = {"name": "the project itself"}
    for origin, cls in entries:
        if not (isinstance(cls, type) and issubclass(cls, Dialect)):
            raise PluginError(f"dialect entry point {origin}: not a subclass of dialects.base.Dialect")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise PluginError(f"dialect entry point {origin}: `name` must be an identifier")
        if not hasattr(cls, "Config") or "enabled" not in getattr(cls.Config, "__struct_fields__", ()):
            raise PluginError(f"dialect entry point {origin}: `Config` must be a Struct with `enabled`")
        if name in names:
            raise PluginError(f"dialect entry point {origin}: dialect name {name!r} is taken by {names[name]}")
        names[name] = origin
        for field in [c.field for c in cls.credential_lists] + [o.field for o in cls.project_fields]:
            if field in fields:
                raise PluginError(
                    f"dialect entry point {origin}: [[projects]] key {field!r} is already declared by {fields[field]}"
                )
            fields[field] = origin
        registry.append(cls)
    return tuple(registry)


def _order(ep: EntryPoint) -> tuple[bool, str, str]:
    dist = _distribution(ep)
    return (dist != HOME, dist, ep.name)


def _distribution(ep: EntryPoint) -> str:
    dist = ep.dist
    return "" if dist is None else dist.metadata["Name"].lower().replace("_", "-")


def _describe(ep: EntryPoint) -> str:
    return f"{ep.name!r} ({ep.value}, from {_distribution(ep) or 'an unknown distribution'})"


def _load(ep: EntryPoint) -> object:
    try:
        loaded: object = ep.load()
    except Exception as exc:  # any failure of a plug-in's import is reported as its own
        raise PluginError(
            f"dialect entry point {_describe(ep)}: cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    name = getattr(loaded, "name", None)
    if isinstance(loaded, type) and issubclass(loaded, Dialect) and name != ep.name:
        raise PluginError(f"dialect entry point {_describe(ep)}: named {ep.name!r} but the dialect is {name!r}")
    return loaded
