"""gateway.metrics: the Prometheus text the gateway serves at /metrics
(through the pipeline: tests/gateway/test_pipeline.py)."""

from __future__ import annotations

import re

from gateway.metrics import BUCKETS, Metrics


def _samples(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_an_empty_registry_declares_every_family() -> None:
    text = Metrics().render()
    assert text.endswith("\n")
    families = [("dialgate_events_received_total", "counter"), ("dialgate_events_stored_total", "counter"),
                ("dialgate_events_deduplicated_total", "counter"), ("dialgate_rejections_total", "counter"),
                ("dialgate_request_duration_seconds", "histogram")]
    for name, kind in families:
        assert f"# TYPE {name} {kind}\n" in text
        assert re.search(rf"^# HELP {name} \S", text, re.MULTILINE)
    assert _samples(text) == {}


def test_events_are_split_into_stored_and_deduplicated_per_dialect_and_project() -> None:
    metrics = Metrics()
    metrics.events("cohorly", "shop", received=5, stored=3)
    metrics.events("cohorly", "shop", received=2, stored=2)
    metrics.events("cohorly", "blog", received=4, stored=0)
    metrics.events("inslytic", "shop", received=1, stored=1)
    samples = _samples(metrics.render())
    shop, blog = '{dialect="cohorly",project="shop"}', '{dialect="cohorly",project="blog"}'
    assert samples["dialgate_events_received_total" + shop] == 7
    assert samples["dialgate_events_stored_total" + shop] == 5
    assert samples["dialgate_events_deduplicated_total" + shop] == 2
    assert samples["dialgate_events_received_total" + blog] == 4
    assert "dialgate_events_stored_total" + blog not in samples  # no sample of nothing stored
    assert samples["dialgate_events_deduplicated_total" + blog] == 4
    assert 'dialgate_events_deduplicated_total{dialect="inslytic",project="shop"}' not in samples


def test_rejections_are_counted_per_dialect_and_reason() -> None:
    metrics = Metrics()
    for reason in ("unauthorized", "unauthorized", "invalid"):
        metrics.rejection("client", reason)
    samples = _samples(metrics.render())
    assert samples['dialgate_rejections_total{dialect="client",reason="unauthorized"}'] == 2
    assert samples['dialgate_rejections_total{dialect="client",reason="invalid"}'] == 1


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.events("cohorly", 'a"b\\c\nd', received=1, stored=1)
    text = metrics.render()
    assert 'dialgate_events_stored_total{dialect="cohorly",project="a\\"b\\\\c\\nd"} 1\n' in text
    assert all(line.count(" ") >= 1 for line in text.splitlines())  # no line split by the newline


def test_the_histogram_is_cumulative_with_each_bound_inclusive() -> None:
    metrics = Metrics()
    for seconds in (0.0005, BUCKETS[0], 0.003, 0.003, 0.2, 7.0):
        metrics.observe("collect", seconds)
    samples = _samples(metrics.render())

    def bucket(le: str) -> float:
        return samples[f'dialgate_request_duration_seconds_bucket{{dialect="collect",le="{le}"}}']

    assert bucket("0.001") == 2  # the one on the bound counts in it
    assert bucket("0.0025") == 2
    assert bucket("0.005") == 4
    assert bucket("0.25") == 5
    assert bucket("5.0") == 5  # the 7 s one is past every bound ...
    assert bucket("+Inf") == 6  # ... but counted
    counts = [bucket(str(b)) for b in BUCKETS]
    assert counts == sorted(counts)
    assert samples['dialgate_request_duration_seconds_count{dialect="collect"}'] == 6
    assert abs(samples['dialgate_request_duration_seconds_sum{dialect="collect"}'] - 7.2075) < 1e-9
    assert not any('dialect="cohorly"' in name for name in samples)
