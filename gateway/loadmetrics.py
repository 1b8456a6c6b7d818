"""The stream's and the loaders' Prometheus series (prometheus_client), in
a registry of their own so that they stay apart from gateway.metrics:

- `dialgate_loader_records_total{kind}`: records written by this loader
  (kind: events, identity, rejections), a rate with `rate()`.
- `dialgate_stream_pending_messages{consumer}`: messages of the stream not
  yet acknowledged by the loaders (waiting plus delivered and unacknowledged),
  per consumer (`<stream>_events`, `<stream>_id_<project>`).

`dialgate load --metrics-bind HOST:PORT` serves them; a gateway with the
stream sink adds the backlog (`stream_backlog_text(sink)`) to its /metrics,
once a loader has made its consumers.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server


class LoaderMetrics:
    """storage.loader.Progress, as Prometheus series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.records = Counter("dialgate_loader_records", "Records written to the database by this loader",
                               ["kind"], registry=self.registry)
        self.batches = Counter("dialgate_loader_batches", "Transactions committed by this loader",
                               ["kind"], registry=self.registry)
        self.pending = Gauge("dialgate_stream_pending_messages",
                             "Stream messages not yet acknowledged by the loaders", ["consumer"],
                             registry=self.registry)

    def loaded(self, kind: str, count: int) -> None:
        self.records.labels(kind).inc(count)
        self.batches.labels(kind).inc()

    def backlog(self, pending: dict[str, int]) -> None:
        for consumer, count in pending.items():
            self.pending.labels(consumer).set(count)

    def serve(self, bind: str) -> None:
        """/metrics on HOST:PORT, from a thread of prometheus_client's."""
        host, _, port = bind.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=self.registry)

    def text(self) -> bytes:
        return generate_latest(self.registry)


async def stream_backlog_text(sink: Any) -> str:
    """The stream's backlog as Prometheus text, for a gateway's /metrics
    (`sink`: the stream sink, storage.jetstream.StreamSink); empty when the
    sink has no stream or the stream cannot be asked."""
    backlog = getattr(sink, "stream_backlog", None)
    if backlog is None:
        return ""
    try:
        pending: dict[str, int] = await backlog()
    except Exception:
        return ""
    lines = ["# HELP dialgate_stream_pending_messages Stream messages not yet acknowledged by the loaders",
             "# TYPE dialgate_stream_pending_messages gauge"]
    for name, count in sorted(pending.items()):
        lines.append(f'dialgate_stream_pending_messages{{consumer="{name}"}} {count}')
    return "\n".join(lines) + "\n"
