"""`dialgate serve | migrate | check-config`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from gateway.config import ConfigError, Settings, load


# After SIGTERM, how long the gateway must see no request before it stops.
DRAIN_QUIET = 0.2


def configure_logging() -> None:
    # One line per rejected request is on the reject path's hot loop: skip the
    # thread and process bookkeeping each record would otherwise gather.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dialgate", description="Multi-dialect event ingestion gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=os.environ.get("DIALGATE_CONFIG"), help="TOML file (or DIALGATE_CONFIG)")
    serve.add_argument("--no-migrate", action="store_true", help="do not run migrations on start")
    migrate = sub.add_parser("migrate", help="upgrade the database schema to head")
    migrate.add_argument("--config", default=os.environ.get("DIALGATE_CONFIG"))
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    args = parser.parse_args(argv)
    configure_logging()

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
    return _serve(settings, args.config, migrate=not args.no_migrate)


async def _migrate(settings: Settings) -> None:
    from storage.engine import create_engine
    from storage.migrate import upgrade

    engine = create_engine(settings.storage.url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


def hypercorn_config(settings: Settings) -> object:
    from hypercorn.config import Config

    config = Config()
    config.bind = [settings.server.bind]
    config.workers = settings.server.workers
    config.graceful_timeout = float(settings.server.graceful_timeout)
    # Slow clients trickling a body are cut off after read_timeout seconds.
    config.read_timeout = settings.server.read_timeout
    config.keep_alive_timeout = 75
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def _serve(settings: Settings, config_path: str | None, *, migrate: bool) -> int:
    from hypercorn.asyncio import serve

    if migrate and settings.storage.migrate_on_start:
        asyncio.run(_migrate(settings))
    config = hypercorn_config(settings)
    if settings.server.workers > 1:
        from hypercorn.run import run

        # Workers build the app from the same settings (file + environment).
        if config_path:
            os.environ["DIALGATE_CONFIG"] = os.path.abspath(config_path)
        config.application_path = "gateway.asgi:app_from_env()"  # type: ignore[attr-defined]
        return run(config)  # type: ignore[arg-type]

    from gateway.app import build_app
    from gateway.http import Drain

    app = Drain(build_app(settings, migrate=False))
    graceful = float(settings.server.graceful_timeout)
    # The drain and hypercorn's own wait share the graceful timeout.
    config.graceful_timeout = graceful / 2  # type: ignore[attr-defined]

    async def run_one() -> None:
        signalled = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signalled.set)
        logging.getLogger("dialgate").info("serving on http://%s", settings.server.bind)

        async def shutdown_trigger() -> None:
            # Drain first: keep serving (answers now close their connection)
            # until nothing has been in flight for a moment, so requests sent
            # just before the signal are answered; only then tell hypercorn,
            # which closes the idle connections and waits for the rest.
            await signalled.wait()
            app.begin()
            await app.idle(quiet=DRAIN_QUIET, timeout=graceful / 2)

        await serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]

    asyncio.run(run_one())
    return 0


if __name__ == "__main__":
    sys.exit(main())
