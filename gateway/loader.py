"""`dialgate load --config FILE`: the settings turned into a running
storage.loader.Loader, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.app import stream_options
from gateway.config import Settings
from gateway.loadmetrics import LoaderMetrics
from gateway.pipeline import now_ms
from gateway.quarantine import Sampler
from storage.engine import create_engine
from storage.loader import Loader, LoadOptions
from storage.loadwrite import LoadStore
from storage.migrate import upgrade

log = logging.getLogger("dialgate.loader")


def load_options(settings: Settings) -> LoadOptions:
    loader = settings.loader
    return LoadOptions(batch_max_records=loader.batch_max_records, lease_seconds=loader.lease_seconds,
                       ack_wait_seconds=loader.ack_wait_seconds)


def build(settings: Settings, metrics: LoaderMetrics | None = None) -> tuple[Loader, LoadStore, AsyncEngine]:
    """The loader of these settings, its store and its engine (to dispose)."""
    engine = create_engine(settings.storage.url)
    sampler = Sampler(settings.quarantine.per_minute, settings.quarantine.excerpt_bytes)
    options = stream_options(settings)
    store = LoadStore(engine, options.stream, clock=now_ms, admit=sampler.admit,
                      max_profile_bytes=settings.storage.max_profile_bytes)
    loader = Loader(options, store, [p.name for p in settings.projects], load_options(settings), metrics)
    return loader, store, engine


async def run(settings: Settings, *, migrate: bool = True, metrics_bind: str = "") -> int:
    from gateway.serve import tune_gc

    # A batch of messages allocates as many containers as a worker's requests.
    tune_gc()
    metrics = LoaderMetrics()
    bind = metrics_bind or settings.loader.metrics_bind
    if bind:
        metrics.serve(bind)
    loader, _, engine = build(settings, metrics)
    if migrate and settings.storage.migrate_on_start:
        await upgrade(engine)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loader.stop)
    log.info("loading stream %s into the database (%d projects)", settings.sink.stream, len(settings.projects))
    try:
        await loader.run()
    finally:
        await engine.dispose()
    return 0
