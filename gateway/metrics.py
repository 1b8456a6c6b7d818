"""A small Prometheus text registry: counters and one histogram."""

from __future__ import annotations

import bisect
import collections

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

HELP = {
    "dialgate_events_received_total": "Events received in accepted requests.",
    "dialgate_events_stored_total": "Events newly stored.",
    "dialgate_events_deduplicated_total": "Events skipped as already stored.",
    "dialgate_rejections_total": "Rejected requests and quarantined records.",
}


class Metrics:
    def __init__(self) -> None:
        self.counters: dict[str, collections.Counter[tuple[tuple[str, str], ...]]] = {
            name: collections.Counter() for name in HELP
        }
        self._hist: dict[str, list[float]] = {}  # dialect -> bucket counts + [sum, count]
        # Label keys kept, not sorted anew for every request.
        self._event_labels: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        self._rejection_labels: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}

    def rejection(self, dialect: str, reason: str) -> None:
        """One rejected request or quarantined record."""
        labels = self._rejection_labels.get((dialect, reason))
        if labels is None:
            labels = self._rejection_labels[(dialect, reason)] = (("dialect", dialect), ("reason", reason))
        self.counters["dialgate_rejections_total"][labels] += 1

    def events(self, dialect: str, project: str, received: int, stored: int) -> None:
        """A request's events of one project: received, stored and the rest
        deduplicated."""
        labels = self._event_labels.get((dialect, project))
        if labels is None:
            labels = self._event_labels[(dialect, project)] = (("dialect", dialect), ("project", project))
        counters = self.counters
        counters["dialgate_events_received_total"][labels] += received
        if stored:
            counters["dialgate_events_stored_total"][labels] += stored
        if received - stored:
            counters["dialgate_events_deduplicated_total"][labels] += received - stored

    def observe(self, dialect: str, seconds: float) -> None:
        row = self._hist.get(dialect)
        if row is None:
            row = self._hist[dialect] = [0.0] * (len(BUCKETS) + 2)
        index = bisect.bisect_left(BUCKETS, seconds)
        if index < len(BUCKETS):
            row[index] += 1
        row[-2] += seconds
        row[-1] += 1

    def render(self) -> str:
        lines: list[str] = []
        for name, counter in self.counters.items():
            lines += [f"# HELP {name} {HELP[name]}", f"# TYPE {name} counter"]
            for labels, value in sorted(counter.items()):
                lines.append(f"{name}{_labels(labels)} {value}")
        name = "dialgate_request_duration_seconds"
        lines += [f"# HELP {name} Ingestion request latency.", f"# TYPE {name} histogram"]
        for dialect, row in sorted(self._hist.items()):
            cumulative = 0.0
            # The row holds the sum and the count past the buckets: not zipped.
            for bound, count in zip(BUCKETS, row, strict=False):
                cumulative += count
                lines.append(f'{name}_bucket{{dialect="{dialect}",le="{bound}"}} {int(cumulative)}')
            lines.append(f'{name}_bucket{{dialect="{dialect}",le="+Inf"}} {int(row[-1])}')
            lines.append(f'{name}_sum{{dialect="{dialect}"}} {row[-2]}')
            lines.append(f'{name}_count{{dialect="{dialect}"}} {int(row[-1])}')
        return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
