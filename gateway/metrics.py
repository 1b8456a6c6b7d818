"""The gateway's Prometheus metrics, through prometheus_client.

One process: the families live in a registry of the app's own, beside
prometheus_client's process collector. Several workers (`server.workers` >
1): the supervisor makes one fresh directory per run (`fresh_directory`)
and names it to every worker in PROMETHEUS_MULTIPROC_DIR. prometheus_client
then keeps each worker's values in files of that worker's own there, and a
scrape, whichever worker answers it, merges them all: counters and
histograms are summed over every worker that ran in this run (one that
exited still counts), gauges are combined as each family's
`multiprocess_mode` says. prometheus_client picks its way of keeping values
when it is first imported, so the variable is set in the workers'
environment before they start, never later.

The request path increments label children bound once and kept, per
(dialect, project), (dialect, reason) and route: no label lookup or
allocation per request.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.process_collector import ProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# prometheus_client's process collector reads the scraping process only, so
# with workers each one copies its own figures into gauges of these names
# (one series per worker, labelled `pid`).
PROCESS_GAUGES = {
    "process_cpu_seconds_total": "Total user and system CPU time spent in seconds.",
    "process_resident_memory_bytes": "Resident memory size in bytes.",
    "process_virtual_memory_bytes": "Virtual memory size in bytes.",
    "process_start_time_seconds": "Start time of the process since unix epoch in seconds.",
    "process_open_fds": "Number of open file descriptors.",
    "process_max_fds": "Maximum number of open file descriptors.",
}

# The `_created` series (one more per counter child) carry nothing a rate()
# needs, and multiprocess mode has none: left out in both. (prometheus_client
# leaves these functions unannotated.)
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """Every family the gateway exports, for one app (one process)."""

    def __init__(self, *, redis: bool = True) -> None:
        """`redis`: whether a Redis is configured (else no Redis series:
        a 0 would read as Redis down)."""
        # Set: values go to files in that directory, and a scrape merges
        # every worker's (see the module docstring).
        self.directory = os.environ.get(MULTIPROC_ENV) or None
        registry = None if self.directory else CollectorRegistry()
        self._registry = registry
        self._sample: Callable[[], None] | None = None
        self.received = Counter("dialgate_events_received", "Events received in accepted requests.",
                                ("dialect", "project"), registry=registry)
        self.stored = Counter("dialgate_events_stored", "Events newly stored.", ("dialect", "project"),
                              registry=registry)
        self.deduplicated = Counter("dialgate_events_deduplicated", "Events skipped as already stored.",
                                    ("dialect", "project"), registry=registry)
        self.rejections = Counter("dialgate_rejections", "Rejected requests and quarantined records, by reason.",
                                  ("dialect", "reason"), registry=registry)
        self.duration = Histogram("dialgate_request_duration_seconds",
                                  "Ingestion request latency, from the request to its answer.",
                                  ("dialect", "endpoint"), buckets=BUCKETS, registry=registry)
        self.commit = Histogram("dialgate_commit_duration_seconds",
                                "Seconds each committed write transaction of the sink took.",
                                buckets=BUCKETS, registry=registry)
        self.backlog = Gauge("dialgate_writer_backlog_rows",
                             "Rows (records and rejections) queued or being written, all workers.",
                             registry=registry, multiprocess_mode="livesum")
        self.pool_checked_out = Gauge("dialgate_db_pool_checked_out",
                                      "Database connections checked out of the pool, all workers.",
                                      registry=registry, multiprocess_mode="livesum")
        self.pool_size = Gauge("dialgate_db_pool_size",
                               "Database connections the pool keeps (pool_size), all workers.",
                               registry=registry, multiprocess_mode="livesum")
        self.redis_up: Gauge | None = None
        self.redis_failure: Gauge | None = None
        if redis:
            self.redis_up = Gauge("dialgate_redis_up",
                                  "1 while Redis answers the gateway's calls (every worker's), 0 after one failed.",
                                  registry=registry, multiprocess_mode="livemin")
            self.redis_failure = Gauge("dialgate_redis_last_failure_timestamp_seconds",
                                       "When a Redis call last failed (unix time; 0: never).",
                                       registry=registry, multiprocess_mode="livemax")
        self.process: dict[str, Gauge] = {}
        if registry is not None:
            ProcessCollector(registry=registry)
        else:
            self.process = {name: Gauge(name, text, registry=None, multiprocess_mode="liveall")
                            for name, text in PROCESS_GAUGES.items()}
        self._events: dict[tuple[str, str], tuple[Counter, Counter, Counter]] = {}
        self._reasons: dict[tuple[str, str], Counter] = {}

    # -- the request path --------------------------------------------------

    def events(self, dialect: str, project: str, received: int, stored: int) -> None:
        """A request's events of one project: received, stored and the rest
        deduplicated."""
        children = self._events.get((dialect, project))
        if children is None:
            children = self._events[(dialect, project)] = (
                self.received.labels(dialect, project),
                self.stored.labels(dialect, project),
                self.deduplicated.labels(dialect, project),
            )
        children[0].inc(received)
        if stored:
            children[1].inc(stored)
        if received - stored:
            children[2].inc(received - stored)

    def rejection(self, dialect: str, reason: str) -> None:
        """One rejected request or refused record."""
        child = self._reasons.get((dialect, reason))
        if child is None:
            child = self._reasons[(dialect, reason)] = self.rejections.labels(dialect, reason)
        child.inc()

    def timer(self, dialect: str, endpoint: str) -> Histogram:
        """The request duration histogram of one route, bound once by the route."""
        return self.duration.labels(dialect, endpoint)

    def observe_commit(self, seconds: float) -> None:
        self.commit.observe(seconds)

    # -- the scrape --------------------------------------------------------

    def sample_with(self, sample: Callable[[], None]) -> None:
        """Have `sample` set this process's gauges before every scrape."""
        self._sample = sample

    def render(self) -> bytes:
        """The Prometheus text format of every family, every worker's."""
        if self._sample is not None:
            self._sample()
        if self._registry is not None:
            return generate_latest(self._registry)
        assert self.directory is not None
        merged = CollectorRegistry()
        MultiProcessCollector(merged, self.directory)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


def fresh_directory() -> str:
    """A new, empty directory for the metric files of one run of workers
    (never one left by an earlier run: its counts would be added in).
    `remove_directory` when the run ends."""
    return tempfile.mkdtemp(prefix="dialgate-metrics-")


def remove_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def worker_exited(pid: int, directory: str) -> None:
    """Drop the gauges of a worker that exited (its counts stay)."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
