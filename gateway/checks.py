"""What `serve` could not run, refused when the settings are loaded (so
`check-config` and `serve` refuse the same): credentials that are empty,
shared by two projects or unable to pick a dialect on a shared path; zero,
negative or non-finite numbers; binds without a port; URL schemes the
engines do not open; the example admin key off loopback; a certificate and
key that do not load. And the masking of passwords in URLs, for these
messages and the settings' reprs."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Hashable
from typing import TYPE_CHECKING

import msgspec

from gateway import tls

if TYPE_CHECKING:
    from gateway.config import Settings


class ConfigError(Exception):
    pass


def check(settings: Settings) -> None:
    _check_credentials(settings)
    for index, cidr in enumerate(settings.server.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies[{index}]: not a CIDR: {cidr!r}") from None
    _check_numbers(settings, "")
    public = _address("server.bind", settings.server.bind)
    if any(not key for key in settings.admin.keys):
        raise ConfigError("admin.keys: empty key")
    admin = public
    if settings.admin.bind:
        admin = _address("admin.bind", settings.admin.bind)
        if admin[1] == public[1]:
            raise ConfigError("admin.bind: must use another port than server.bind")
    if EXAMPLE_ADMIN_KEY in settings.admin.keys and not _loopback(admin[0]):
        where = settings.admin.bind or settings.server.bind
        raise ConfigError(
            f"admin.keys: the example key {EXAMPLE_ADMIN_KEY!r} must not be used while the admin API "
            f"listens on {where}, a non-loopback address; put a key of your own in admin.keys"
        )
    _check_tls("server", settings.server.certfile, settings.server.keyfile)
    _check_tls("admin", settings.admin.certfile, settings.admin.keyfile)
    if settings.admin.certfile and not settings.admin.bind:
        raise ConfigError("admin.certfile: only for a listener of its own (admin.bind); without one the admin "
                          "API is served on server.bind, with server.certfile")
    if settings.storage.max_profile_bytes < 2:
        raise ConfigError("storage.max_profile_bytes: must be at least 2 (an empty profile, {})")
    _check_url("storage.url", settings.storage.url, STORAGE_SCHEMES)
    if settings.redis.url:
        _check_url("redis.url", settings.redis.url, REDIS_SCHEMES)


# The admin key config.example.toml ships with.
EXAMPLE_ADMIN_KEY = "adm_change_me"
# What storage.engine and redis-py open (a URL they would refuse is refused here).
STORAGE_SCHEMES = ("sqlite+aiosqlite", "postgresql+asyncpg")
REDIS_SCHEMES = ("redis", "rediss", "unix")
# Numbers for which 0 means something (every other number must be above 0).
ZERO_ALLOWED = frozenset({"storage.batch_delay_ms", "quarantine.keep_days", "retention.events_days",
                          "retention.quarantine_days"})


def _check_numbers(node: msgspec.Struct, path: str) -> None:
    """Every number of every section is finite and above 0 (0 where
    ZERO_ALLOWED): a zero or negative timeout, limit, size or count is a
    mistake `serve` would run into later. Project tables hold identifiers
    (collect site ids), not limits, and check their own."""
    for name in node.__struct_fields__:
        value = getattr(node, name)
        key = f"{path}.{name}" if path else name
        if key == "projects" or isinstance(value, bool):
            continue
        if isinstance(value, msgspec.Struct):
            _check_numbers(value, key)
        elif isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number")
            if value < 0 or (value == 0 and key not in ZERO_ALLOWED):
                raise ConfigError(f"{key}: must be {'0 or more' if key in ZERO_ALLOWED else 'greater than 0'}")


def _address(key: str, bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT (port 1-65535), got {bind!r}")
    return host.strip("[]"), int(port)


def _check_tls(section: str, certfile: str, keyfile: str) -> None:
    if not certfile and not keyfile:
        return
    if not certfile or not keyfile:
        raise ConfigError(f"{section}.certfile, {section}.keyfile: give both (HTTPS) or neither (plain HTTP)")
    if (problem := tls.problem(certfile, keyfile)) is not None:
        raise ConfigError(f"{section}.{problem}")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name (or all addresses): assume it is reachable


def _check_url(key: str, url: str, schemes: tuple[str, ...]) -> None:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in schemes:
        raise ConfigError(f"{key}: unsupported URL {mask_url(url)!r}: use {' or '.join(s + '://' for s in schemes)}")
    address = rest.rpartition("@")[2].partition("/")[0].partition("?")[0]
    if scheme != "unix" and address.rpartition("]")[2].count(":") == 1:
        port = address.rpartition(":")[2]
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{key}: invalid port in {mask_url(url)!r}")


def _check_credentials(settings: Settings) -> None:
    """Project names are unique and given; every credential is usable and
    names one project (whichever list it is in); and no credential is in
    the lists of two dialects that share a path, where it could not pick
    the dialect (a rule of shared paths, see `dialects.base`)."""
    shared = _shared_paths(settings)
    owner: dict[Hashable, tuple[str, str, str]] = {}  # key -> (project, field, dialect)
    names: set[str] = set()
    for index, project in enumerate(settings.projects):
        if not project.name:
            raise ConfigError(f"projects[{index}].name: must not be empty")
        if project.name in names:
            raise ConfigError(f"projects[{index}].name: duplicate project {project.name!r}")
        names.add(project.name)
        for dialect in settings.registry:
            for credential in dialect.credential_lists:
                field = credential.field
                for item in getattr(project, field):
                    if credential.empty(item):
                        raise ConfigError(f"projects[{index}].{field}: empty credential")
                    previous = owner.setdefault(credential.key(item), (project.name, field, dialect.name))
                    if previous[0] != project.name:
                        raise ConfigError(
                            f"projects[{index}].{field}: a credential of project "
                            f"{project.name!r} is also used by project {previous[0]!r}"
                        )
                    path = shared.get(frozenset((previous[2], dialect.name)))
                    if path is not None:
                        raise ConfigError(
                            f"projects[{index}].{field}: a credential of project {project.name!r} is also in "
                            f"its {previous[1]}; dialects {previous[2]} and {dialect.name} share {path}, where "
                            "the credential picks the dialect"
                        )


def _shared_paths(settings: Settings) -> dict[frozenset[str], str]:
    """{the names of two enabled dialects: a path both serve}."""
    served: dict[str, list[str]] = {}
    for dialect in settings.registry:
        config = settings.dialect_config(dialect.name)
        if config.enabled:
            for endpoint in dialect(config, {}).endpoints():
                served.setdefault(endpoint.path, []).append(dialect.name)
    shared: dict[frozenset[str], str] = {}
    for path, dialects in served.items():
        for a in dialects:
            for b in dialects:
                if a != b:
                    shared.setdefault(frozenset((a, b)), path)
    return shared


def mask_url(url: str) -> str:
    """The URL with its password hidden, in the user info or as a query
    parameter (`?password=`, which libpq, asyncpg and redis-py all take)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    prefix = ""
    if "@" in rest:
        # Everything up to the last "@" is taken for the user info: at worst
        # more is hidden than needed, never a password shown.
        userinfo, _, rest = rest.rpartition("@")
        prefix = f"{userinfo.split(':', 1)[0]}:***@"
    address, qsep, query = rest.partition("?")
    if qsep:
        query = "&".join(_mask_param(part) for part in query.split("&"))
    return f"{scheme}://{prefix}{address}{qsep}{query}"


def _mask_param(part: str) -> str:
    name, eq, _ = part.partition("=")
    return f"{name}=***" if eq and name.lower() in ("password", "passwd", "pass") else part
