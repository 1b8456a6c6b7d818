"""`dialgate serve | load | migrate | check-config`.

Every command takes the configuration the same way: `--config FILE`, else
the file named by DIALGATE_CONFIG, else none (defaults and the environment);
`check-config FILE` (positional) is kept as well.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from gateway import logs
from gateway.config import ConfigError, Settings, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dialgate", description="Multi-dialect event ingestion gateway")
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
    args = parser.parse_args(argv)
    if args.command == "serve":
        from gateway.serve import die_with_parent, ignore_hangup

        # At once: a SIGHUP during start-up must not kill the process either.
        ignore_hangup()
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
    if args.command == "check-config":
        print(f"{path or '(no file: defaults and environment)'}: ok ({len(settings.projects)} projects)")
        return 0
    if args.command == "migrate":
        asyncio.run(_migrate(settings))
        print("database is at head")
        return 0
    if args.command == "load":
        from gateway import loader

        return asyncio.run(loader.run(settings, migrate=not args.no_migrate, metrics_bind=args.metrics_bind))
    return _serve(settings, path, migrate=not args.no_migrate, parent=args.parent)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.environ.get("DIALGATE_CONFIG") or None,
                        help="TOML file (default: $DIALGATE_CONFIG)")


async def _migrate(settings: Settings) -> None:
    from storage.engine import create_engine
    from storage.migrate import upgrade

    engine = create_engine(settings.storage.url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


def _serve(settings: Settings, config_path: str | None, *, migrate: bool, parent: int | None) -> int:
    from gateway import serve
    from gateway.server import Limits, Listener

    worker = parent is not None
    if migrate and settings.storage.migrate_on_start and not worker:
        asyncio.run(_migrate(settings))
    graceful = float(settings.server.graceful_timeout)
    if settings.server.workers > 1 and not worker:
        # Workers load the same settings (file + environment); this process
        # has migrated already.
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--no-migrate"]
        if config_path:
            argv += ["--config", os.path.abspath(config_path)]
        logging.getLogger("dialgate").info(
            "serving on http://%s with %d workers%s", settings.server.bind, settings.server.workers,
            f" (admin on http://{settings.admin.bind})" if settings.admin.bind else "")
        return serve.supervise(argv, settings.server.workers, graceful_timeout=graceful)

    from gateway.app import build_app

    app = build_app(settings, migrate=False)
    try:
        listeners = [Listener(serve.bind_socket(settings.server.bind, reuse_port=worker), app, "public")]
        if settings.admin.bind:
            listeners.append(Listener(serve.bind_socket(settings.admin.bind, reuse_port=worker), app.admin,
                                      "admin"))
    except serve.CannotListen as exc:
        print(f"dialgate: {exc}", file=sys.stderr)
        return 2
    server = settings.server
    limits = Limits(read_timeout=server.read_timeout, max_connections=server.max_connections, h2c=server.h2c)
    where = f"http://{server.bind}" + (f", admin on http://{settings.admin.bind}" if settings.admin.bind else "")
    banner = f"worker {os.getpid()} serving" if worker else f"serving on {where}"
    return serve.run_one(app, listeners, serve.hypercorn_config(graceful_timeout=graceful), limits,
                         graceful_timeout=graceful, banner=banner, parent=parent)


if __name__ == "__main__":
    sys.exit(main())
