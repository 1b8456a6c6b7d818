"""Settings: TOML decoded into frozen Structs that refuse unknown keys.

Every scalar can be overridden by `DIALGATE_<SECTION>__<KEY>` (nesting with
further `__`, e.g. `DIALGATE_DIALECTS__COHORLY__ENABLED=false`); a value that
looks like a JSON array or object is decoded as JSON, anything else is a
string that the typed decode converts (`"8"` to 8 for an int field).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import tomllib
import types
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, cast

import msgspec
from msgspec import Meta

from dialects.base import CredentialList, Dialect, ProjectField, SlidingWindow
from gateway.registry import PluginError, Registry, discover

ENV_PREFIX = "DIALGATE_"


class ConfigError(Exception):
    pass


class _Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Frozen and strict: a typo in the config file is an error, not a default.

    Subclasses say `frozen=True` again: msgspec inherits it at run time, but
    type checkers read class parameters per class (PEP 681), and would take a
    subclass for a mutable one."""


class ServerConfig(_Base, frozen=True):
    bind: str = "127.0.0.1:8000"
    workers: int = 1
    # CIDRs whose X-Forwarded-For header is believed.
    trusted_proxies: list[str] = []
    # Seconds a client may take to send its request headers, and then its
    # body (slow clients are cut off); also the longest silence on a connection.
    read_timeout: int = 30
    # Seconds in-flight requests get to finish on shutdown.
    graceful_timeout: int = 10
    # Open connections per listener and worker; past it new connections wait
    # in the kernel's listen backlog until one closes.
    max_connections: int = 1000
    # Cleartext HTTP/2 (prior knowledge or `Upgrade: h2c`). Off: no SDK needs
    # it, and one HTTP/2 connection multiplexes many requests past the
    # per-connection limits.
    h2c: bool = False
    # Request body bytes one worker admits at once (declared Content-Length,
    # or bytes read so far when chunked); past it: 503 with Retry-After.
    max_inflight_bytes: int = 64 * 1024 * 1024


class StorageConfig(_Base, frozen=True):
    url: str = "sqlite+aiosqlite:///./dialgate.db"
    migrate_on_start: bool = True
    # Group commit: the writer flushes whatever is queued, at most this many
    # rows per transaction; a positive delay waits that long for a group to fill.
    batch_max_rows: int = 5000
    batch_delay_ms: float = 0.0
    # PostgreSQL: transactions written concurrently by each process (events
    # only; identity and profile work keeps one ordered lane). SQLite: 1.
    writer_lanes: int = 3
    # Seconds a client is told to wait when the database is unreachable.
    unavailable_retry_after: int = 5
    # Rows (records and rejections) queued or being written per worker; past
    # it a request is answered 503 with Retry-After (a request alone always fits).
    max_backlog_rows: int = 50_000
    # A profile's properties, encoded as compact JSON; an update that would
    # grow one past it is not applied and is quarantined (profile_too_large).
    max_profile_bytes: int = 1_048_576

    def __repr__(self) -> str:
        return f"StorageConfig(url={_mask_url(self.url)!r}, ...)"


class RedisConfig(_Base, frozen=True):
    url: str = ""  # empty: in-process limits and dedup cache
    dedup_ttl_seconds: int = 86400
    key_prefix: str = "dialgate"
    # Seconds before Redis is tried again after it failed.
    retry_interval: float = 2.0
    # In-process dedup cache size (used without Redis): about 200 bytes an
    # id, so the default holds a worker's cache near 50 MB.
    local_dedup_max_entries: int = 250_000
    # Seconds /readyz keeps answering 503 after a Redis call failed (an OOM
    # refusal, a timeout, a lost connection), even if Redis answers again.
    failure_window: Annotated[float, Meta(ge=0)] = 10.0

    def __repr__(self) -> str:
        return f"RedisConfig(url={_mask_url(self.url)!r}, ...)"


class AdminConfig(_Base, frozen=True):
    keys: list[str] = []
    # HOST:PORT of a listener of its own for the admin API, /metrics and
    # /readyz (then 404 on the public one); empty: the public listener.
    bind: str = ""

    def __repr__(self) -> str:
        return f"AdminConfig(keys=<{len(self.keys)} masked>)"


class ProjectConfig(_Base, frozen=True):
    """One `[[projects]]` table. Its other keys are the dialects': each
    dialect's credential lists and per-project options (`schema` adds them)."""

    name: str

    def __repr__(self) -> str:
        return f"ProjectConfig(name={self.name!r}, credentials=<masked>)"


class QuarantineConfig(_Base, frozen=True):
    # Rejection rows kept per (project, source, reason) per minute and process;
    # the first of each minute is always kept.
    per_minute: int = 10
    excerpt_bytes: int = 2048
    # Rejection rows older than this are deleted (hourly, in small batches); 0 keeps them.
    keep_days: int = 30


class SinkConfig(_Base, frozen=True):
    # Where accepted records go: "database" writes the tables of [storage] url.
    kind: Literal["database"] = "database"


class LimitsConfig(_Base, frozen=True):
    # At most `requests` per client IP in any `per_seconds` on every
    # ingestion endpoint that may answer 429 (not collect, not /health);
    # beside the dialects' own limits. None: off.
    per_ip: SlidingWindow | None = None


class Settings(_Base, frozen=True):
    """The whole configuration. What the dialects add (`projects`' keys
    beyond `name`, the `dialects` section) depends on the registry: the
    Settings of one registry is the subclass `schema(registry)` makes,
    which knows its registry."""

    # The dialects this configuration was read for, in their order.
    registry: ClassVar[Registry] = ()

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    quarantine: QuarantineConfig = msgspec.field(default_factory=QuarantineConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    sink: SinkConfig = msgspec.field(default_factory=SinkConfig)
    projects: list[ProjectConfig] = []
    dialects: Any = None  # one `[dialects.<name>]` table per dialect

    def dialect_config(self, name: str) -> Any:
        return getattr(self.dialects, name)


@functools.cache
def schema(registry: Registry) -> type[Settings]:
    """Settings with the `[[projects]]` keys and `[dialects.*]` tables of
    these dialects (each dialect's `credential_lists`, `project_fields` and
    `Config`), strict like the rest."""
    project_fields: list[tuple[str, Any, Any]] = []
    for dialect in registry:
        for credential in dialect.credential_lists:
            # list[item], spelled as the alias it is: `item` is a value here.
            items = types.GenericAlias(list, (credential.item,))
            project_fields.append((credential.field, items, msgspec.field(default_factory=list)))
        for option in dialect.project_fields:
            project_fields.append((option.field, option.type, option.default))
    project = msgspec.defstruct("ProjectConfig", project_fields, bases=(ProjectConfig,), module=__name__)
    dialects = msgspec.defstruct(
        "DialectsConfig",
        [(d.name, d.Config, msgspec.field(default_factory=d.Config)) for d in registry],
        frozen=True,
        forbid_unknown_fields=True,
        kw_only=True,
        module=__name__,
    )
    built = msgspec.defstruct(
        "Settings",
        [
            ("projects", types.GenericAlias(list, (project,)), msgspec.field(default_factory=list)),
            ("dialects", dialects, msgspec.field(default_factory=dialects)),
        ],
        bases=(Settings,),
        namespace={"registry": registry},
        module=__name__,
    )
    # A subclass of Settings (bases= above), made at run time: beyond what
    # defstruct's signature can say.
    return cast("type[Settings]", built)


def load(
    path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None,
    registry: Registry | None = None,
) -> Settings:
    """Read a TOML file (or nothing), fold in the environment, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return from_dict(raw, os.environ if environ is None else environ, registry)


def from_dict(
    raw: dict[str, Any], environ: Mapping[str, str] | None = None, registry: Registry | None = None
) -> Settings:
    """Settings for the installed dialects (`gateway.registry.discover`),
    or for the ones given."""
    if registry is None:
        try:
            registry = discover()
        except PluginError as exc:
            raise ConfigError(str(exc)) from None
    settings_type = schema(registry)
    data = _apply_env(raw, environ or {}, _defaults(settings_type))
    try:
        settings = msgspec.convert(data, settings_type, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_phrase(str(exc))) from None
    _check(settings)
    return settings


def _defaults(settings_type: type[Settings]) -> dict[str, Any]:
    defaults: dict[str, Any] = msgspec.to_builtins(settings_type())
    return defaults


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str], defaults: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = _deepcopy(raw)
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX) :]:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if any(not part for part in path):
            continue
        node, default = data, defaults
        for part in path[:-1]:
            default = default.get(part, {}) if isinstance(default, dict) else {}
            if part not in node:
                # Overriding one key of a table the file left out: start from
                # the table's defaults, not from an empty table.
                node[part] = _deepcopy(default) if isinstance(default, dict) else {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path[:-1])} is not a table")
            node = child
        node[path[-1]] = _env_value(name, value)
    return data


def _env_value(name: str, value: str) -> Any:
    if value[:1] in ("[", "{"):
        try:
            return msgspec.json.decode(value)
        except msgspec.DecodeError:
            raise ConfigError(f"{name}: not valid JSON") from None
    return value


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def _phrase(message: str) -> str:
    # msgspec says "... - at `$.server.workers`"; name the key path plainly.
    text, sep, where = message.rpartition(" - at `")
    key = where.rstrip("`").removeprefix("$").removeprefix(".") if sep else ""
    if not sep:
        text = message
    unknown = text.removeprefix("Object contains unknown field `")
    if unknown != text:
        # "server: unknown field `workerz`" -> "server.workerz: unknown key"
        field = unknown.rstrip("`")
        return f"{key + '.' if key else ''}{field}: unknown key"
    return f"{key}: {text}" if key else text


def _check(settings: Settings) -> None:
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
ZERO_ALLOWED = frozenset({"storage.batch_delay_ms", "quarantine.keep_days"})


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
        raise ConfigError(f"{key}: unsupported URL {_mask_url(url)!r}: use {' or '.join(s + '://' for s in schemes)}")
    address = rest.rpartition("@")[2].partition("/")[0].partition("?")[0]
    if scheme != "unix" and address.rpartition("]")[2].count(":") == 1:
        port = address.rpartition(":")[2]
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{key}: invalid port in {_mask_url(url)!r}")


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


def credentials_for(settings: Settings, credential: CredentialList) -> dict[Any, str]:
    """credential key -> project name, for one credential list of a dialect."""
    table: dict[Any, str] = {}
    for project in settings.projects:
        for item in getattr(project, credential.field):
            table[credential.key(item)] = project.name
    return table


def lookups_for(settings: Settings, dialect: type[Dialect]) -> dict[str, dict[Any, str]]:
    """Every credential list's lookup of a dialect, by field."""
    return {c.field: credentials_for(settings, c) for c in dialect.credential_lists}


def project_options(settings: Settings, fields: tuple[ProjectField, ...]) -> dict[str, dict[str, Any]]:
    """project name -> {field: value} for the `[[projects]]` fields a dialect reads."""
    return {p.name: {f.field: getattr(p, f.field) for f in fields} for p in settings.projects}


def _mask_url(url: str) -> str:
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
