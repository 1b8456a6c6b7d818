"""Settings: TOML decoded into frozen Structs that refuse unknown keys.

Every scalar can be overridden by `DIALGATE_<SECTION>__<KEY>` (nesting with
further `__`, e.g. `DIALGATE_DIALECTS__COHORLY__ENABLED=false`); a value that
looks like a JSON array or object is decoded as JSON, anything else is a
string that the typed decode converts (`"8"` to 8 for an int field).
"""

from __future__ import annotations

import functools
import os
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, cast

import msgspec
from msgspec import Meta

from dialects.base import CredentialList, Dialect, ProjectField, SlidingWindow
from gateway.checks import ConfigError as ConfigError  # re-exported: the error of loading settings
from gateway.checks import check, mask_url
from gateway.logs import LogFormat, LogLevel
from gateway.registry import PluginError, Registry, discover

ENV_PREFIX = "DIALGATE_"




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
    # A file `serve` writes its pid to (the supervisor's with workers), for
    # `dialgate reload`; removed on exit. Empty: none.
    pid_file: str = ""
    # PEM files: with both, the listener speaks HTTPS only (TLS 1.2+).
    certfile: str = ""
    keyfile: str = ""


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
        return f"StorageConfig(url={mask_url(self.url)!r}, ...)"


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
        return f"RedisConfig(url={mask_url(self.url)!r}, ...)"


class AdminConfig(_Base, frozen=True):
    keys: list[str] = []
    # HOST:PORT of a listener of its own for the admin API, /metrics and
    # /readyz (then 404 on the public one); empty: the public listener.
    bind: str = ""
    # PEM files for that listener (HTTPS); empty: plain HTTP.
    certfile: str = ""
    keyfile: str = ""

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
    # Deprecated: `[retention] quarantine_days` (gateway.retention).
    keep_days: int | None = None


class RetentionConfig(_Base, frozen=True):
    # Events whose time is older are deleted by `dialgate prune` (and the
    # daily run); 0 keeps them forever.
    events_days: int = 0
    # Quarantine rows received longer ago are deleted (hourly by every
    # worker, and by prune); 0 keeps them. Unset: 30 (gateway.retention).
    quarantine_days: int | None = None
    # A prune inside `serve` once a day: true (03:00 UTC) or "HH:MM" UTC.
    daily: bool | str = False


class SinkConfig(_Base, frozen=True):
    # Where accepted records go: "database" writes the tables of [storage] url;
    # "jetstream" publishes them to a replicated stream that `dialgate load`
    # drains into that database (README "Past one database").
    kind: Literal["database", "jetstream"] = "database"
    # jetstream: the servers (any of the cluster), the stream (created or
    # updated on start, subjects "<stream>.>"), its replicas, and how long
    # it remembers a message id (a retried event within it is a duplicate).
    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    # A NATS stream name, also the first token of its subjects.
    stream: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "dialgate"
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    duplicate_window_seconds: Annotated[int, Meta(ge=1)] = 120
    # Seconds a request waits for the stream's acknowledgements before it
    # is answered 503 (with [storage] unavailable_retry_after).
    ack_timeout_seconds: Annotated[float, Meta(gt=0)] = 5.0
    # Hours a message stays in the stream, loaded or not: the longest a
    # loader outage may last without losing records.
    max_age_hours: Annotated[int, Meta(ge=1)] = 168


class LoaderConfig(_Base, frozen=True):
    """`dialgate load`: the stream of [sink] into the database of [storage]."""

    # Records per transaction, about: a loader fetches as many messages as
    # make up this many records (messages carry a request's records each).
    batch_max_records: Annotated[int, Meta(ge=1, le=1_000_000)] = 20_000
    # Seconds an identity partition's holder keeps it without renewing; a
    # crashed holder's projects move to another loader after it.
    lease_seconds: Annotated[float, Meta(gt=0)] = 15.0
    # Seconds the stream waits for a loader's acknowledgement before it
    # delivers the message again (to any loader).
    ack_wait_seconds: Annotated[float, Meta(gt=0)] = 60.0
    # HOST:PORT where the loader serves Prometheus /metrics; empty: none.
    metrics_bind: str = ""


class LimitsConfig(_Base, frozen=True):
    # At most `requests` per client IP in any `per_seconds` on every
    # ingestion endpoint that may answer 429 (not collect, not /health);
    # beside the dialects' own limits. None: off.
    per_ip: SlidingWindow | None = None


class LoggingConfig(_Base, frozen=True):
    # "text": `time LEVEL logger message`; "json": one object a line (gateway.logs).
    format: LogFormat = "text"
    level: LogLevel = "info"
    # One line per request (method, path without its query, status,
    # duration, peer), written whatever `level` says.
    access_log: bool = False


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
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    sink: SinkConfig = msgspec.field(default_factory=SinkConfig)
    loader: LoaderConfig = msgspec.field(default_factory=LoaderConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
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
    check(settings)
    from gateway import retention  # it reads Settings: imported once they exist

    retention.check(settings)
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
