"""`dialgate serve | load | migrate | check-config | reload | export | prune
| erase | replay`, and `dialgate --version`.

Every command takes the configuration the same way: `--config FILE`, else
the file named by DIALGATE_CONFIG, else none (defaults and the environment);
`check-config FILE` (positional) is kept as well. A failure to start is one
line on stderr and a non-zero exit: 2 when the configuration must change
(a config error, a taken port), 1 when a service it needs does not answer
(the database, Redis) or a migration fails.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys

from gateway import export_cli, logs, startup
from gateway.config import ConfigError, Settings, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dialgate", description="Multi-dialect event ingestion gateway")
    parser.add_argument("--version", action="version", version=f"dialgate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    _config_option(serve)
    serve.add_argument("--no-migrate", action="store_true", help="do not run migrations on start")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    migrate = sub.add_parser("migrate", help="upgrade the database schema to head")
    _config_option(migrate)
    loading = sub.add_parser("load", help="drain the stream of [sink] into the database (kind = jetstream)")
    _config_option(loading)
    loading.add_argument("--no-migrate", action="store_true", help="do not run migrations on start")
    loading.add_argument("--metrics-bind", default="", help="HOST:PORT to serve /metrics on (or [loader] metrics_bind)")
    check = sub.add_parser("check-config", help="validate a config file (as serve reads it) and exit")
    _config_option(check)
    check.add_argument("file", nargs="?", help="the file (same as --config)")
    export_cli.add_parser(sub, _config_option)
    reload = sub.add_parser("reload", help="check the config file, then tell the running gateway to reload it")
    _config_option(reload)
    reload.add_argument("--pid", type=int, help="the gateway's pid (default: read from the pid file)")
    reload.add_argument("--pid-file", help="default: server.pid_file of the config")
    for name, about in MAINTENANCE.items():
        command = sub.add_parser(name, help=about)
        _config_option(command)
        importlib.import_module(f"gateway.{MODULES[name]}").add_arguments(command)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from gateway.serve import die_with_parent, hold_hangup

        # At once: a SIGHUP during start-up must not kill the process; it
        # is held and applied once serving.
        hold_hangup()
        if args.parent is not None:
            die_with_parent()
    logs.configure()

    path = args.config
    if args.command == "check-config" and args.file is not None:
        if args.config is not None and args.config != os.environ.get("DIALGATE_CONFIG") and args.config != args.file:
            print("dialgate: config error: two different files given (FILE and --config)", file=sys.stderr)
            return 2
        path = args.file
    try:
        settings = load(path)
    except ConfigError as exc:
        print(f"dialgate: config error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.logging.format, settings.logging.level, access_log=settings.logging.access_log)
    if args.command == "check-config":
        print(f"{path or '(no file: defaults and environment)'}: ok ({len(settings.projects)} projects)")
        return 0
    if args.command == "export":
        return export_cli.run(settings, args)
    if args.command == "reload":
        return _reload(settings, args.pid, args.pid_file)
    if args.command in MAINTENANCE:
        return _maintain(settings, args)
    if args.command == "migrate":
        try:
            startup.run(lambda: startup.prepare_database(settings.storage.url, migrate=True))
        except startup.StartupError as exc:
            print(f"dialgate: {exc}", file=sys.stderr)
            return 1
        print("database is at head")
        return 0
    if args.command == "load":
        from gateway import loader

        return asyncio.run(loader.run(settings, migrate=not args.no_migrate, metrics_bind=args.metrics_bind))
    return _serve(settings, path, migrate=not args.no_migrate, parent=args.parent)


# The commands of the data after the write: name -> help, and the module
# (of gateway/) with their `add_arguments` and `command`.
MAINTENANCE = {
    "prune": "delete events and quarantine rows past [retention], in small batches",
    "erase": "erase a person: every linked id, events, devices, profile; prints a receipt",
    "replay": "re-run quarantined records through the current pipeline",
}
MODULES = {"prune": "retention", "erase": "erasure", "replay": "replay"}


def _maintain(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from storage.faults import short

    module = importlib.import_module(f"gateway.{MODULES[args.command]}")
    try:
        code: int = asyncio.run(module.command(settings, args))
    except (SQLAlchemyError, OSError) as exc:
        # Unreachable, or not migrated ("no such table"): one line, no traceback.
        print(f"dialgate: {args.command}: database error: {short(exc)} (is storage.url right, and the "
              "schema at head? `dialgate migrate`)", file=sys.stderr)
        return 1
    return code


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.environ.get("DIALGATE_CONFIG") or None,
                        help="TOML file (default: $DIALGATE_CONFIG)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dialgate")
    except PackageNotFoundError:
        return "(not installed)"


def _prepare(settings: Settings, *, migrate: bool) -> None:
    """The database answers (migrated when asked), and Redis when one is
    configured; else a StartupError (gateway.startup)."""

    async def checks() -> None:
        await startup.prepare_database(settings.storage.url, migrate=migrate)
        if settings.redis.url:
            await startup.check_redis(settings.redis.url)

    startup.run(checks)


def _reload(settings: Settings, pid: int | None, pid_file: str | None) -> int:
    from gateway.reload import NoProcess, find_pid, send

    try:
        target = find_pid(pid, pid_file, settings)
        send(target)
    except NoProcess as exc:
        print(f"dialgate: reload: {exc}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to {target}; the gateway's log says what it applied")
    return 0


def _serve(settings: Settings, config_path: str | None, *, migrate: bool, parent: int | None) -> int:
    from gateway import reload, serve, tls
    from gateway.server import Limits, Listener

    worker = parent is not None
    migrate = migrate and settings.storage.migrate_on_start
    graceful = float(settings.server.graceful_timeout)
    if settings.server.workers > 1 and not worker:
        try:
            # The workers bind later: a taken port fails here, once.
            for bind in filter(None, (settings.server.bind, settings.admin.bind)):
                serve.bind_socket(bind, reuse_port=False).close()
            _prepare(settings, migrate=migrate)
        except (serve.CannotListen, startup.StartupError) as exc:
            print(f"dialgate: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, serve.CannotListen) else 1
        # Workers load the same settings (file + environment); this process
        # has migrated already.
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--no-migrate"]
        if config_path:
            argv += ["--config", os.path.abspath(config_path)]
        logging.getLogger("dialgate").info(
            "serving on %s://%s with %d workers%s", "https" if settings.server.certfile else "http",
            settings.server.bind, settings.server.workers,
            f" (admin on {'https' if settings.admin.certfile else 'http'}://{settings.admin.bind})"
            if settings.admin.bind else "")
        with reload.pid_file(settings.server.pid_file):
            return serve.supervise(argv, settings.server.workers, graceful_timeout=graceful,
                                   reload=lambda: reload.check(config_path, settings))

    from gateway.app import build_app

    app = build_app(settings, migrate=False)
    server, admin = settings.server, settings.admin
    public_tls = tls.certificate(server.certfile, server.keyfile, http2=server.h2c)
    admin_tls = tls.certificate(admin.certfile, admin.keyfile, http2=server.h2c)
    try:
        listeners = [Listener(serve.bind_socket(server.bind, reuse_port=worker), app, "public", public_tls)]
        if admin.bind:
            listeners.append(Listener(serve.bind_socket(admin.bind, reuse_port=worker), app.admin, "admin",
                                      admin_tls))
    except serve.CannotListen as exc:
        print(f"dialgate: {exc}", file=sys.stderr)
        return 2
    if not worker:
        try:
            _prepare(settings, migrate=migrate)
        except startup.StartupError as exc:
            print(f"dialgate: {exc}", file=sys.stderr)
            return 1
    limits = Limits(read_timeout=server.read_timeout, max_connections=server.max_connections, h2c=server.h2c)
    where = f"{tls.scheme(public_tls)}://{server.bind}"
    if admin.bind:
        where += f", admin on {tls.scheme(admin_tls)}://{admin.bind}"
    banner = f"worker {os.getpid()} serving" if worker else f"serving on {where}"
    reloader = reload.Reloader(app, settings, config_path, worker=worker,
                               certificates=[c for c in (public_tls, admin_tls) if c is not None])
    with reload.pid_file("" if worker else settings.server.pid_file):
        return serve.run_one(app, listeners, serve.hypercorn_config(graceful_timeout=graceful), limits,
                             graceful_timeout=graceful, banner=banner, parent=parent, reload=reloader)


if __name__ == "__main__":
    sys.exit(main())
