"""The gauges of what is a state rather than a count: the writer's backlog,
the database pool, Redis's health and the process itself, read from the
app's resources and set into `gateway.metrics` gauges.

The worker answering a scrape samples itself first. With several workers
each one also samples itself every `INTERVAL` seconds, so the figures of
the others are at most that old when one of them answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client.process_collector import ProcessCollector
from sqlalchemy.pool import QueuePool

from gateway.metrics import Metrics
from gateway.redislink import RedisLink
from storage.sink import Queueing

log = logging.getLogger("dialgate")

INTERVAL = 1.0


class Probes:
    def __init__(self, metrics: Metrics, *, sink: Any, engine: Any, redis: RedisLink | None) -> None:
        self._metrics = metrics
        self._sink = sink
        self._engine = engine
        self._redis = redis
        # The process's own figures, to copy into per-worker gauges (see
        # gateway.metrics); one process alone has the collector registered.
        self._process = ProcessCollector(registry=None) if metrics.process else None
        self._failed = False

    def sample(self) -> None:
        metrics = self._metrics
        if isinstance(self._sink, Queueing):
            metrics.backlog.set(self._sink.backlog)
        # Read each time: disposing of an engine gives it a new pool.
        pool = self._engine.sync_engine.pool
        if isinstance(pool, QueuePool):
            metrics.pool_checked_out.set(pool.checkedout())
            metrics.pool_size.set(pool.size())
        redis = self._redis
        if redis is not None and metrics.redis_up is not None and metrics.redis_failure is not None:
            metrics.redis_up.set(1 if redis.healthy else 0)
            failure = redis.last_failure
            # The failure's time is on the monotonic clock: as wall time.
            metrics.redis_failure.set(0 if failure is None else time.time() - (time.monotonic() - failure.at))
        if self._process is not None:
            for family in self._process.collect():
                for sample in family.samples:
                    gauge = metrics.process.get(sample.name)
                    if gauge is not None:
                        gauge.set(sample.value)

    async def run(self, interval: float = INTERVAL) -> None:
        """Sample every `interval` seconds until cancelled."""
        while True:
            try:
                self.sample()
            except Exception:  # a probe must never take the worker down
                if not self._failed:  # once, not every second
                    log.exception("sampling the metrics failed")
                self._failed = True
            await asyncio.sleep(interval)
