"""gateway.metrics: the families the gateway exports at /metrics, in one
process and summed over workers (a real `dialgate serve` with two)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.metrics import BUCKETS, MULTIPROC_ENV, Metrics, fresh_directory, remove_directory, worker_exited
from tests.support import children_of, config_file, dialgate_serve, free_port, gateway, settings_for

pytestmark = pytest.mark.anyio

FAMILIES = [("dialgate_events_received_total", "counter"), ("dialgate_events_stored_total", "counter"),
            ("dialgate_events_deduplicated_total", "counter"), ("dialgate_rejections_total", "counter"),
            ("dialgate_request_duration_seconds", "histogram"), ("dialgate_commit_duration_seconds", "histogram"),
            ("dialgate_writer_backlog_rows", "gauge"), ("dialgate_db_pool_checked_out", "gauge"),
            ("dialgate_db_pool_size", "gauge"), ("dialgate_redis_up", "gauge"),
            ("dialgate_redis_last_failure_timestamp_seconds", "gauge")]


def samples(text: str | bytes) -> dict[str, float]:
    if isinstance(text, bytes):
        text = text.decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def dialgate_only(found: dict[str, float]) -> dict[str, float]:
    """The counters and the request histogram: what must be exact."""
    kept = ("dialgate_events_", "dialgate_rejections_total", "dialgate_request_duration_seconds_count")
    return {name: value for name, value in found.items() if name.startswith(kept)}


# -- one process ------------------------------------------------------------------


def test_every_family_is_declared_before_anything_is_counted() -> None:
    text = Metrics(redis=True).render().decode()
    for name, kind in FAMILIES:
        assert f"# TYPE {name} {kind}\n" in text
        assert re.search(rf"^# HELP {name} \S", text, re.MULTILINE)
    found = samples(text)
    assert not any(name.startswith(("dialgate_events", "dialgate_rejections")) for name in found)
    assert found["dialgate_commit_duration_seconds_count"] == 0
    # prometheus_client's process collector, in one process.
    assert found["process_resident_memory_bytes"] > 0


def test_events_are_split_into_stored_and_deduplicated_per_dialect_and_project() -> None:
    metrics = Metrics()
    metrics.events("cohorly", "shop", received=5, stored=3)
    metrics.events("cohorly", "shop", received=2, stored=2)
    metrics.events("cohorly", "blog", received=4, stored=0)
    metrics.events("inslytic", "shop", received=1, stored=1)
    found = samples(metrics.render())
    shop, blog = '{dialect="cohorly",project="shop"}', '{dialect="cohorly",project="blog"}'
    assert found["dialgate_events_received_total" + shop] == 7
    assert found["dialgate_events_stored_total" + shop] == 5
    assert found["dialgate_events_deduplicated_total" + shop] == 2
    assert found["dialgate_events_received_total" + blog] == 4
    assert found["dialgate_events_stored_total" + blog] == 0  # declared with its siblings
    assert found["dialgate_events_deduplicated_total" + blog] == 4
    assert found['dialgate_events_deduplicated_total{dialect="inslytic",project="shop"}'] == 0


def test_rejections_are_counted_per_dialect_and_reason() -> None:
    metrics = Metrics()
    for reason in ("unauthorized", "unauthorized", "invalid"):
        metrics.rejection("client", reason)
    found = samples(metrics.render())
    assert found['dialgate_rejections_total{dialect="client",reason="unauthorized"}'] == 2
    assert found['dialgate_rejections_total{dialect="client",reason="invalid"}'] == 1


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.events("cohorly", 'a"b\\c\nd', received=1, stored=1)
    text = metrics.render().decode()
    assert 'dialgate_events_stored_total{dialect="cohorly",project="a\\"b\\\\c\\nd"} 1.0\n' in text
    assert all(line.count(" ") >= 1 for line in text.splitlines())  # no line split by the newline


def test_the_duration_histogram_is_per_route_cumulative_with_each_bound_inclusive() -> None:
    metrics = Metrics()
    timer = metrics.timer("collect", "events")
    for seconds in (0.0005, BUCKETS[0], 0.003, 0.003, 0.2, 7.0):
        timer.observe(seconds)
    metrics.timer("collect", "batch").observe(0.1)
    found = samples(metrics.render())

    def bucket(le: str) -> float:
        return found[f'dialgate_request_duration_seconds_bucket{{dialect="collect",endpoint="events",le="{le}"}}']

    assert bucket("0.001") == 2  # the one on the bound counts in it
    assert bucket("0.0025") == 2
    assert bucket("0.005") == 4
    assert bucket("0.25") == 5
    assert bucket("5.0") == 5  # the 7 s one is past every bound ...
    assert bucket("+Inf") == 6  # ... but counted
    counts = [bucket(str(b)) for b in BUCKETS]
    assert counts == sorted(counts)
    assert found['dialgate_request_duration_seconds_count{dialect="collect",endpoint="events"}'] == 6
    assert abs(found['dialgate_request_duration_seconds_sum{dialect="collect",endpoint="events"}'] - 7.2075) < 1e-9
    assert found['dialgate_request_duration_seconds_count{dialect="collect",endpoint="batch"}'] == 1


# -- a known mix of requests --------------------------------------------------------

SHOP = {"X-Cohorly-Token": "tok_shop"}


def _b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def _track(insert_id: str) -> dict[str, Any]:
    return {"event": "E", "properties": {"distinct_id": "u", "$insert_id": insert_id}}


def mix() -> list[tuple[str, str, dict[str, Any], int]]:
    """(method, path, httpx arguments, status): accepted, duplicate,
    refused and quarantined records, the quarantine decided by the dialect
    and by the storage inside its transaction."""
    collect = {"event_name": "view", "user": {"id": "k"}, "context": {"page": {"url": "https://x.example/"}}}
    big = {"$token": "tok_shop", "distinct_id": "big", "$set": {"blob": "x" * 600}}
    return [
        *[("POST", "/track", {"json": _track(f"m{i}"), "headers": SHOP}, 200) for i in range(12)],
        *[("POST", "/track", {"json": _track(f"m{i}"), "headers": SHOP}, 200) for i in range(4)],  # duplicates
        *[("POST", "/track", {"json": _track("x"), "headers": {"X-Cohorly-Token": "tok_nope"}}, 401)] * 3,
        *[("POST", "/track", {"content": b"{not json", "headers": SHOP}, 400)] * 2,
        ("POST", "/engage", {"json": {"$token": "tok_shop", "distinct_id": "p1", "$set": {"n": "text"}}}, 200),
        ("POST", "/engage", {"json": {"$token": "tok_shop", "distinct_id": "p1", "$add": {"n": 1}}}, 200),
        ("POST", "/engage", {"json": big}, 200),  # over max_profile_bytes
        ("POST", "/alias", {"json": {"token": "tok_shop", "alias": "a1", "distinct_id": "p1"}}, 200),
        ("POST", "/alias", {"json": {"token": "tok_shop", "alias": "a1", "distinct_id": "p2"}}, 400),  # strict
        ("POST", "/api/client/identify", {"json": {"external_id": "c-0", "anonymous_id": "c-anon"},
                                          "headers": {"Authorization": "Bearer pk_shop"}}, 204),
        ("POST", "/api/client/alias", {"json": {"anonymous_id": "c-anon", "external_id": "c-else"},
                                       "headers": {"Authorization": "Bearer pk_shop"}}, 204),
        ("GET", "/groups", {"params": {"verbose": "1", "data": _b64(
            {"$token": "mp_shop", "$group_key": "co", "$group_id": "1", "$set": {"tags": "x"}})}}, 200),
        ("GET", "/groups", {"params": {"verbose": "1", "data": _b64(
            {"$token": "mp_shop", "$group_key": "co", "$group_id": "1", "$union": {"tags": ["y"]}})}}, 200),
        ("POST", "/events/batch?tc_s=1234&token=src_shop",
         {"json": {"batch": [collect, {"no_name": 1}, "not an event"]}}, 200),
    ]


REQUESTS = len(mix())
PROFILE_CAP = {"max_profile_bytes": 400}
EXPECTED = {
    'dialgate_events_received_total{dialect="cohorly",project="shop"}': 16,
    'dialgate_events_stored_total{dialect="cohorly",project="shop"}': 12,
    'dialgate_events_deduplicated_total{dialect="cohorly",project="shop"}': 4,
    'dialgate_events_received_total{dialect="collect",project="shop"}': 1,
    'dialgate_events_stored_total{dialect="collect",project="shop"}': 1,
    'dialgate_events_deduplicated_total{dialect="collect",project="shop"}': 0,
    'dialgate_rejections_total{dialect="cohorly",reason="unauthorized"}': 3,
    'dialgate_rejections_total{dialect="cohorly",reason="bad_request"}': 2,
    # Decided by the storage, inside its transaction.
    'dialgate_rejections_total{dialect="cohorly",reason="profile_type_mismatch"}': 1,
    'dialgate_rejections_total{dialect="cohorly",reason="profile_too_large"}': 1,
    'dialgate_rejections_total{dialect="cohorly",reason="alias_conflict"}': 1,  # strict: answered 400
    'dialgate_rejections_total{dialect="client",reason="alias_conflict"}': 1,  # quarantined
    'dialgate_rejections_total{dialect="mixpanel",reason="profile_type_mismatch"}': 1,  # a group's
    # Decided by the dialect.
    'dialgate_rejections_total{dialect="collect",reason="no_event_name"}': 1,
    'dialgate_rejections_total{dialect="collect",reason="not_an_event"}': 1,
}


def _durations(found: dict[str, float]) -> float:
    return sum(v for k, v in found.items() if k.startswith("dialgate_request_duration_seconds_count"))


async def test_every_refusal_is_counted_whoever_decides_it(backend: dict[str, str]) -> None:
    settings = settings_for(backend, storage=PROFILE_CAP)
    async with gateway(settings) as client:
        for method, path, arguments, status in mix():
            reply = await client.request(method, path, **arguments)
            assert reply.status_code == status, (path, reply.text)
        found = samples((await client.get("/metrics")).content)
    assert dialgate_only(found) == {**EXPECTED, **{
        k: v for k, v in dialgate_only(found).items() if k.startswith("dialgate_request_duration")}}
    assert _durations(found) == REQUESTS
    assert found['dialgate_request_duration_seconds_count{dialect="client",endpoint="alias"}'] == 1
    assert found["dialgate_commit_duration_seconds_count"] >= 1


# -- a real `dialgate serve`, with workers ---------------------------------------------


def _fresh(base: str, method: str, path: str, **arguments: Any) -> httpx.Response:
    # A connection of its own: the kernel spreads them over the workers.
    with httpx.Client(base_url=base, timeout=15, headers={"Connection": "close"}) as client:
        return client.request(method, path, **arguments)


@pytest.mark.parametrize("workers", [1, 2])
def test_totals_are_exact_whichever_worker_answers_the_scrape(backend: dict[str, str], tmp_path: Path,
                                                              workers: int) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = config_file(tmp_path / "dialgate.toml", backend, port, server={"workers": workers}, storage=PROFILE_CAP)
    with dialgate_serve(config, port, workers=workers, stderr=str(tmp_path / "err.log")) as process:
        for method, path, arguments, status in mix():
            reply = _fresh(base, method, path, **arguments)
            assert reply.status_code == status, (path, reply.text)
        scrapes = [samples(_fresh(base, "GET", "/metrics").content) for _ in range(10)]
        pids = sorted(children_of(process.pid)) if workers > 1 else [process.pid]
        directories = {_environ(pid).get("PROMETHEUS_MULTIPROC_DIR") for pid in pids}
    for found in scrapes:
        exact = dialgate_only(found)
        assert {k: v for k, v in exact.items() if not k.startswith("dialgate_request_duration")} == EXPECTED
        assert _durations(found) == REQUESTS
    last = scrapes[-1]
    # Every worker's pool, summed (each worker samples its own, whoever answers).
    assert last["dialgate_db_pool_size"] == workers * {"sqlite": 4, "postgres": 5}[backend["name"]]
    # Every worker's own process figures, labelled with its pid.
    started = sorted(int(m.group(1)) for name in last
                     if (m := re.fullmatch(r'process_start_time_seconds(?:\{pid="(\d+)"\})?', name)) and m.group(1))
    if workers > 1:
        assert started == pids
        # One fresh directory for the run, shared, and removed after it.
        [directory] = directories
        assert directory is not None and directory.startswith("/") and not os.path.exists(directory)
    else:
        assert started == [] and "process_start_time_seconds" in last and directories == {None}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if b"=" in item)


WORKER = """
import os, sys
from gateway.metrics import Metrics
metrics = Metrics()
metrics.rejection("cohorly", "unauthorized")
metrics.timer("cohorly", "track").observe(0.002)
metrics.backlog.set(5)
print(os.getpid())
"""


def test_a_worker_that_exited_keeps_its_counts_but_not_its_gauges(tmp_path: Path) -> None:
    directory = fresh_directory()
    try:
        assert os.listdir(directory) == []
        env = {**os.environ, MULTIPROC_ENV: directory}
        pids = [int(subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True,
                                   check=True).stdout) for _ in range(2)]

        def merged() -> dict[str, float]:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, directory)
            return samples(generate_latest(registry))

        both = merged()
        assert both['dialgate_rejections_total{dialect="cohorly",reason="unauthorized"}'] == 2
        assert both['dialgate_request_duration_seconds_count{dialect="cohorly",endpoint="track"}'] == 2
        assert both["dialgate_writer_backlog_rows"] == 10
        worker_exited(pids[0], directory)
        one = merged()
        assert one['dialgate_rejections_total{dialect="cohorly",reason="unauthorized"}'] == 2
        assert one["dialgate_writer_backlog_rows"] == 5
    finally:
        remove_directory(directory)
    assert not os.path.exists(directory)
