"""Settings: TOML decoded into frozen Structs that refuse unknown keys.

Every scalar can be overridden by `DIALGATE_<SECTION>__<KEY>` (nesting with
further `__`, e.g. `DIALGATE_DIALECTS__COHORLY__ENABLED=false`); a value that
looks like a JSON array or object is decoded as JSON, anything else is a
string that the typed decode converts (`"8"` to 8 for an int field).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from dialects import REGISTRY
from dialects.base import SlidingWindow

ENV_PREFIX = "DIALGATE_"


class ConfigError(Exception):
    pass


class _Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Frozen and strict: a typo in the config file is an error, not a default."""


class ServerConfig(_Base):
    bind: str = "127.0.0.1:8000"
    workers: int = 1
    # CIDRs whose X-Forwarded-For header is believed.
    trusted_proxies: list[str] = []
    # Seconds a client may take to send its request (slow clients are cut off).
    read_timeout: int = 30
    # Seconds in-flight requests get to finish on shutdown.
    graceful_timeout: int = 10
    # Request body bytes one worker admits at once (declared Content-Length,
    # or bytes read so far when chunked); past it: 503 with Retry-After.
    max_inflight_bytes: int = 64 * 1024 * 1024


class StorageConfig(_Base):
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

    def __repr__(self) -> str:
        return f"StorageConfig(url={_mask_url(self.url)!r}, ...)"


class RedisConfig(_Base):
    url: str = ""  # empty: in-process limits and dedup cache
    dedup_ttl_seconds: int = 86400
    key_prefix: str = "dialgate"
    # Seconds before Redis is tried again after it failed.
    retry_interval: float = 2.0
    # In-process dedup cache size (used without Redis): about 200 bytes an
    # id, so the default holds a worker's cache near 50 MB.
    local_dedup_max_entries: int = 250_000

    def __repr__(self) -> str:
        return f"RedisConfig(url={_mask_url(self.url)!r}, ...)"


class AdminConfig(_Base):
    keys: list[str] = []

    def __repr__(self) -> str:
        return f"AdminConfig(keys=<{len(self.keys)} masked>)"


class CollectSource(_Base):
    site: int
    token: str

    def __repr__(self) -> str:
        return f"CollectSource(site={self.site}, token=<masked>)"


class ProjectConfig(_Base):
    name: str
    cohorly_tokens: list[str] = []
    client_keys: list[str] = []
    inslytic_keys: list[str] = []
    collect_sources: list[CollectSource] = []
    # Overrides [dialects.inslytic] events_per_minute for this project.
    inslytic_events_per_minute: Annotated[int, Meta(ge=1)] | None = None

    def __repr__(self) -> str:
        return f"ProjectConfig(name={self.name!r}, credentials=<masked>)"


class QuarantineConfig(_Base):
    # Rejection rows kept per (project, source, reason) per minute and process;
    # the first of each minute is always kept.
    per_minute: int = 10
    excerpt_bytes: int = 2048


class LimitsConfig(_Base):
    # At most `requests` per client IP in any `per_seconds` on every
    # ingestion endpoint that may answer 429 (not collect, not /health);
    # beside the dialects' own limits. None: off.
    per_ip: SlidingWindow | None = None


DialectsConfig: type[msgspec.Struct] = msgspec.defstruct(
    "DialectsConfig",
    [(d.name, d.Config, msgspec.field(default_factory=d.Config)) for d in REGISTRY],
    frozen=True,
    forbid_unknown_fields=True,
    kw_only=True,
)


class Settings(_Base):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    quarantine: QuarantineConfig = msgspec.field(default_factory=QuarantineConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    projects: list[ProjectConfig] = []
    dialects: DialectsConfig = msgspec.field(default_factory=DialectsConfig)  # type: ignore[valid-type]

    def dialect_config(self, name: str) -> Any:
        return getattr(self.dialects, name)


def load(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Settings:
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
    return from_dict(raw, os.environ if environ is None else environ)


def from_dict(raw: dict[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    data = _apply_env(raw, environ or {}, _defaults())
    try:
        settings = msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_phrase(str(exc))) from None
    _check(settings)
    return settings


def _defaults() -> dict[str, Any]:
    return msgspec.to_builtins(Settings())  # type: ignore[no-any-return]


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str], defaults: dict[str, Any]) -> dict[str, Any]:
    data = _deepcopy(raw)
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
    owner: dict[Any, str] = {}
    names: set[str] = set()
    for index, project in enumerate(settings.projects):
        if not project.name:
            raise ConfigError(f"projects[{index}].name: must not be empty")
        if project.name in names:
            raise ConfigError(f"projects[{index}].name: duplicate project {project.name!r}")
        names.add(project.name)
        for field in ("cohorly_tokens", "client_keys", "inslytic_keys", "collect_sources"):
            for item in getattr(project, field):
                key = (item.site, item.token) if isinstance(item, CollectSource) else item
                if key == "" or (isinstance(key, tuple) and key[1] == ""):
                    raise ConfigError(f"projects[{index}].{field}: empty credential")
                previous = owner.setdefault(key, project.name)
                if previous != project.name:
                    raise ConfigError(
                        f"projects[{index}].{field}: a credential of project "
                        f"{project.name!r} is also used by project {previous!r}"
                    )
    for index, cidr in enumerate(settings.server.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies[{index}]: not a CIDR: {cidr!r}") from None
    if settings.server.workers < 1:
        raise ConfigError("server.workers: must be at least 1")
    host, sep, port = settings.server.bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"server.bind: expected HOST:PORT, got {settings.server.bind!r}")
    if any(not key for key in settings.admin.keys):
        raise ConfigError("admin.keys: empty key")
    if settings.storage.writer_lanes < 1:
        raise ConfigError("storage.writer_lanes: must be at least 1")
    if settings.server.max_inflight_bytes < 1:
        raise ConfigError("server.max_inflight_bytes: must be at least 1")
    per_ip = settings.limits.per_ip
    if per_ip is not None and (per_ip.requests < 1 or per_ip.per_seconds < 1):
        raise ConfigError("limits.per_ip: requests and per_seconds must be at least 1")
    if settings.storage.batch_max_rows < 1:
        raise ConfigError("storage.batch_max_rows: must be at least 1")


def credentials_for(settings: Settings, field: str) -> dict[Any, str]:
    """credential -> project name, for one `[[projects]]` credential field."""
    table: dict[Any, str] = {}
    for project in settings.projects:
        for item in getattr(project, field):
            key = (item.site, item.token) if isinstance(item, CollectSource) else item
            table[key] = project.name
    return table


def project_options(settings: Settings, fields: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """project name -> {field: value} for the `[[projects]]` fields a dialect reads."""
    return {p.name: {f: getattr(p, f) for f in fields} for p in settings.projects}


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
