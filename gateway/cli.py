"""`dialgate serve | migrate | check-config`."""

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
    serve.add_argument("--config", default=os.environ.get("DIALGATE_CONFIG"), help="TOML file (or DIALGATE_CONFIG)")
    serve.add_argument("--no-migrate", action="store_true", help="do not run migrations on start")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    migrate = sub.add_parser("migrate", help="upgrade the database schema to head")
    migrate.add_argument("--config", default=os.environ.get("DIALGATE_CONFIG"))
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    args = parser.parse_args(argv)
    logs.configure()

    try:
        settings = load(args.file if args.command == "check-config" else args.config)
    except ConfigError as exc:
        print(f"dialgate: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{args.file}: ok ({len(settings.projects)} projects)")
        return 0
    if args.command == "migrate":
        asyncio.run(_migrate(settings))
        print("database is at head")
        return 0
    return _serve(settings, args.config, migrate=not args.no_migrate, worker=args.worker)


async def _migrate(settings: Settings) -> None:
    from storage.engine import create_engine
    from storage.migrate import upgrade

    engine = create_engine(settings.storage.url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


def _serve(settings: Settings, config_path: str | None, *, migrate: bool, worker: bool) -> int:
    from gateway import serve

    if migrate and settings.storage.migrate_on_start and not worker:
        asyncio.run(_migrate(settings))
    graceful = float(settings.server.graceful_timeout)
    if settings.server.workers > 1 and not worker:
        # Workers load the same settings (file + environment); this process
        # has migrated already.
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--no-migrate", "--worker"]
        if config_path:
            argv += ["--config", os.path.abspath(config_path)]
        logging.getLogger("dialgate").info(
            "serving on http://%s with %d workers", settings.server.bind, settings.server.workers)
        return serve.supervise(argv, settings.server.workers, graceful_timeout=graceful)

    from gateway.app import build_app

    try:
        config = serve.hypercorn_config(
            settings.server.bind, graceful_timeout=graceful,
            read_timeout=settings.server.read_timeout, reuse_port=worker,
        )
    except serve.CannotListen as exc:
        print(f"dialgate: {exc}", file=sys.stderr)
        return 2
    banner = f"worker {os.getpid()} serving" if worker else f"serving on http://{settings.server.bind}"
    return serve.run_one(build_app(settings, migrate=False), config, graceful_timeout=graceful, banner=banner)


if __name__ == "__main__":
    sys.exit(main())
