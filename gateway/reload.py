"""Reloading the configuration on SIGHUP, without a restart.

What a reload swaps in: `[[projects]]` (names, credentials, per-project
options), `[dialects.*]`, `[limits]` and `admin.keys`. The new file (with
the environment the process started with) is read and validated whole,
the new routes are built, then one reference is swapped (`build_app`'s
`reconfigure`): requests already being served finish on the old
configuration, every later one sees the new one. Connections, the
database engine, Redis and the writer are kept as they are.

Everything else (`server.*`, `storage.*`, `redis.*`, `admin.bind`,
`quarantine.*`, `sink.*`, ...) is bound at start: a change there is named
in a log line and waits for a restart; the rest of the file is applied.
The certificate and key files of a TLS listener are read again (a renewed
certificate at the same paths is served to the next handshakes).
A file that does not load (unreadable, invalid TOML, a refused setting) is
refused with a log line and the running configuration keeps serving.

With `server.workers` > 1 the supervisor validates the file first (a file
it refuses never reaches the workers), then passes SIGHUP to every worker,
and each reloads as above. `dialgate reload` sends the signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from gateway.config import ConfigError, Settings, load
from gateway.tls import Certificate

log = logging.getLogger("dialgate")

# Top-level sections a reload applies; of `admin`, only the keys.
RELOADED = frozenset({"projects", "dialects", "limits"})
RELOADED_KEYS = frozenset({"admin.keys"})


def read(path: str | None, running: Settings, who: str = "") -> Settings | None:
    """The file's settings, or None (logged) when they cannot be used."""
    try:
        # The dialects installed when the process started: a plug-in
        # installed since needs a restart (its code is not loaded).
        return load(path, registry=running.registry)
    except ConfigError as exc:
        log.error("%sreload refused: %s; the running configuration is kept", who, exc)
        return None


def restart_needed(running: Settings, new: Settings) -> list[str]:
    """The keys that differ outside what a reload applies (names only:
    values may be secrets)."""
    changed: list[str] = []
    _diff(_plain(running), _plain(new), "", changed)
    return [key for key in changed if key.partition(".")[0] not in RELOADED and key not in RELOADED_KEYS]


def _plain(settings: Settings) -> dict[str, Any]:
    plain: dict[str, Any] = msgspec.to_builtins(settings)
    return plain


def _diff(old: Any, new: Any, path: str, changed: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key, changed)
    elif old != new:
        changed.append(path)


def warn_restart(running: Settings, new: Settings) -> None:
    if keys := restart_needed(running, new):
        log.warning("reload: %s changed; these need a restart, the running values are kept", ", ".join(keys))


class Reloader:
    """Called on SIGHUP in the process that serves `app` (the app of
    `build_app(started)`): reads `path` again and swaps the result in."""

    def __init__(self, app: Any, started: Settings, path: str | None, *, worker: bool = False,
                 certificates: Sequence[Certificate] = ()) -> None:
        self.app = app
        # Read again on every reload (a renewed certificate at the same paths).
        self.certificates = tuple(certificates)
        self.started = started
        self.current = started
        self.path = path
        # A worker leaves the restart warning to its supervisor (said once).
        self.worker = worker
        self.who = f"worker {os.getpid()}: " if worker else ""

    def __call__(self) -> bool:
        new = read(self.path, self.current, self.who)
        if new is None:
            return False
        if not self.worker:
            warn_restart(self.started, new)
        try:
            # Nothing is swapped until all of it is built.
            contexts = [certificate.fresh() for certificate in self.certificates]
            self.app.reconfigure(new)
        except Exception as exc:  # a certificate gone bad since the check; a dialect refusing its config
            log.error("%sreload refused: %s: %s; the running configuration is kept", self.who,
                      type(exc).__name__, exc)
            return False
        for certificate, context in zip(self.certificates, contexts, strict=True):
            certificate.context = context
        old, self.current = self.current, new
        log.info("%sconfiguration reloaded from %s: %s", self.who, self.path or "the environment",
                 _summary(old, new))
        return True


def _summary(old: Settings, new: Settings) -> str:
    before = {p.name for p in old.projects}
    after = {p.name for p in new.projects}
    parts = [f"{len(after)} projects"]
    if added := sorted(after - before):
        parts.append("added " + ", ".join(added))
    if removed := sorted(before - after):
        parts.append("removed " + ", ".join(removed))
    changed = [key for key in ("projects", "dialects", "limits", "admin.keys")
               if _section(old, key) != _section(new, key)]
    parts.append("changed: " + ", ".join(changed) if changed else "nothing changed")
    return "; ".join(parts)


def _section(settings: Settings, key: str) -> Any:
    node: Any = _plain(settings)
    for part in key.split("."):
        node = node[part]
    return node


def check(path: str | None, started: Settings) -> bool:
    """The supervisor's part: is the file usable (logged either way)?"""
    new = read(path, started)
    if new is None:
        return False
    warn_restart(started, new)
    return True


@contextlib.contextmanager
def pid_file(path: str) -> Iterator[None]:
    """`path` holds this process's pid while it runs (nothing when empty)."""
    if not path:
        yield
        return
    Path(path).write_text(f"{os.getpid()}\n", encoding="ascii")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            Path(path).unlink()


class NoProcess(Exception):
    pass


def find_pid(pid: int | None, pid_path: str | None, settings: Settings) -> int:
    """The gateway's pid: given, or read from a pid file (given, else
    `server.pid_file`). Raises NoProcess with what is missing."""
    if pid is not None:
        return pid
    path = pid_path or settings.server.pid_file
    if not path:
        raise NoProcess("no gateway pid: give --pid or --pid-file, or set server.pid_file")
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except OSError as exc:
        raise NoProcess(f"cannot read the pid file {path}: {exc.strerror} (is the gateway running?)") from None
    if not text.isdigit():
        raise NoProcess(f"the pid file {path} holds no pid")
    return int(text)


def send(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise NoProcess(f"no process {pid} (a stale pid file?)") from None
    except PermissionError:
        raise NoProcess(f"not allowed to signal process {pid} (run as the gateway's user)") from None
