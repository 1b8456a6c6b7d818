"""The JetStream sink and `dialgate load` against their ceilings, in one run.

    .venv/bin/python bench/jetstream.py                 # 15 s per measurement, 3 rounds
    .venv/bin/python bench/jetstream.py --seconds 4 --rounds 1 --lag-seconds 5   # a quick check

Same machine, same helpers as bench/run.py (wrk, real `dialgate serve`
processes, PostgreSQL and Redis on 127.0.0.1), plus a `nats-server -js` of
its own on a free port (a one-replica stream) and `dialgate load` processes.

1. Acknowledged events/s of Cohorly batch-500 through three servers, in
   rounds so each ratio is of measurements seconds apart: the JetStream sink,
   the PostgreSQL sink, and the HTTP ceiling (bench/noop.py). No loader runs
   meanwhile: at scale loaders run on other hosts, here they would take the
   gateways' cores.
2. The loaders' drain rate: the backlog of step 1 drained into PostgreSQL,
   rows counted as they become visible; against the COPY ceiling, asyncpg
   COPY of the same rows (sampled from what the loaders stored, fresh
   insert ids) into the events table in batches of the loader's size.
3. The end-to-end lag at half the JetStream sink's rate (bench/jslag.py): a
   paced client notes each request's acknowledgement, a poller when that
   request's last event is visible in PostgreSQL.

Aims (issue 18): acknowledged events/s >= 2x the PostgreSQL sink's, drain >=
0.8x the COPY ceiling, p99 lag < 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from jslag import batch500, lag
from run import NONCE, PY, ROOT, Process, forget_redis_keys, free_port, gateway_config, pg_admin, wrk

sys.path.insert(0, str(ROOT))
from tests.natsserver import NatsServer

STREAM = f"dialgate_bench_{NONCE}"
DB = "dialgate_bench_js"
# Every column the gateway writes (not id): the COPY ceiling writes the same.
COLUMNS = ("project", "source", "name", "distinct_id", "anonymous_id", "user_id", "time", "received_at",
           "insert_id", "session_id", "properties", "context", "consent")


def jetstream_config(path: Path, port: int, storage: str, redis_url: str, workers: int, nats_url: str,
                     loader_batch: int) -> None:
    gateway_config(path, port, storage, redis_url, workers)
    with path.open("a", encoding="utf-8") as f:
        f.write(f"""
[sink]
kind = "jetstream"
servers = ["{nats_url}"]
stream = "{STREAM}"
replicas = 1
duplicate_window_seconds = 120

[loader]
batch_max_records = {loader_batch}
""")


def eps(result: dict, events: int = 500) -> float:
    return float(result["ok"]) * events / float(result["seconds"])


async def pg_fetchval(dsn: str, sql: str, *args: object) -> int:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql, *args) or 0)
    finally:
        await conn.close()


def count_like(dsn: str, prefix: str) -> int:
    return asyncio.run(pg_fetchval(
        dsn, "SELECT count(*) FROM events WHERE project = 'bench' AND insert_id LIKE $1", prefix + "%"))


def loaded_events(binds: list[str]) -> int:
    """Events the loaders have committed, by their own counters
    (`dialgate_loader_records_total{kind="events"}` on each /metrics)."""
    total = 0.0
    for bind in binds:
        with urllib.request.urlopen(f"http://{bind}/metrics", timeout=5) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith('dialgate_loader_records_total{kind="events"}'):
                    total += float(line.rpartition(" ")[2])
    return int(total)


def watch_drain(binds: list[str], expected: int, started: float, timeout: float) -> dict:
    """The loaders' committed events read every 0.25 s from their own
    counters until at least `expected` are there and the count has not
    moved for 1 s (wrk's count leaves out requests answered after its
    cut-off, whose rows are there too), or nothing moved for `timeout` s.
    Not a count(*) of the table: on a million rows each poll would take the
    PostgreSQL core from the loaders (a tenth to a quarter of it), which the
    COPY ceiling does not pay. The rate: rows over the time from `started`
    (every loader ready) to the poll that first saw the last count, so it
    includes the loaders' first fetch; the rows stored are counted after."""
    count, changed = 0, time.monotonic()
    while True:
        n = loaded_events(binds)
        now = time.monotonic()
        if n != count:
            count, changed = n, now
        if (count >= expected and now - changed >= 1.0) or now - changed > timeout:
            break
        time.sleep(0.25)
    seconds = changed - started
    return {"rows": count, "seconds": seconds, "events_per_s": count / seconds if seconds > 0 else 0.0}


def copy_ceiling(dsn: str, sample_prefix: str, batch: int, seconds: float) -> float:
    """asyncpg COPY of rows like the stored ones into events, one batch per
    transaction (a loader's commit), fresh insert ids."""

    async def measure() -> float:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            sample = await conn.fetch(
                f"SELECT {', '.join(COLUMNS)} FROM events WHERE project = 'bench' AND insert_id LIKE $1 LIMIT $2",
                sample_prefix + "%", batch)
            assert sample, "no stored rows to copy"
            rows = [list(r) for r in sample]
            while len(rows) < batch:
                rows += [list(r) for r in sample[: batch - len(rows)]]
            at = COLUMNS.index("insert_id")
            tag = uuid.uuid4().hex[:12]
            done = 0
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                for i, row in enumerate(rows):
                    row[at] = f"copy{tag}-{done + i}"
                await conn.copy_records_to_table("events", records=[tuple(r) for r in rows], columns=COLUMNS)
                done += len(rows)
            return done / (time.perf_counter() - started)
        finally:
            await conn.close()

    return asyncio.run(measure())


def start_loaders(config: Path, count: int,
                  work: Path) -> tuple[list[subprocess.Popen[bytes]], list[str], float]:
    """`count` loaders, their metrics addresses, and the moment all of them
    answer on /metrics."""
    loaders, binds = [], []
    for i in range(count):
        binds.append(f"127.0.0.1:{free_port()}")
        with (work / f"loader{i}.log").open("wb") as log:
            loaders.append(subprocess.Popen(
                [PY, "-m", "gateway.cli", "load", "--config", str(config), "--no-migrate", "--metrics-bind", binds[-1]],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + 60
    for proc, bind in zip(loaders, binds, strict=True):
        while True:
            try:
                urllib.request.urlopen(f"http://{bind}/metrics", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"loader did not start: {(work / 'loader0.log').read_text()[-2000:]}") from None
                time.sleep(0.02)
    return loaders, binds, time.monotonic()


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15, help="per measured scenario and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lag-seconds", type=float, default=20)
    parser.add_argument("--loaders", type=int, default=1, help="`dialgate load` processes")
    parser.add_argument("--loader-batch", type=int, default=20_000,
                        help="the loaders' batch_max_records, also the COPY's rows per transaction")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk (Debian's package)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="dialgate-bench-js-"))
    dsn = f"{args.pg_dsn.rpartition('/')[0]}/{DB}"
    pg_url = "postgresql+asyncpg://" + dsn.removeprefix("postgresql://")
    asyncio.run(pg_admin(args.pg_dsn, f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)"))
    asyncio.run(pg_admin(args.pg_dsn, f"CREATE DATABASE {DB}"))
    nats = NatsServer(work)
    servers: list[Process] = []
    loaders: list[subprocess.Popen[bytes]] = []
    figures: dict[str, object] = {}
    try:
        nats.start()
        pg_port, js_port, noop_port = free_port(), free_port(), free_port()
        gateway_config(work / "pg.toml", pg_port, pg_url, args.redis_url, args.workers)
        servers.append(pg := Process([PY, "-m", "gateway.cli", "serve", "--config", str(work / "pg.toml")],
                                     pg_port, work / "pg.log"))  # migrates the database
        js_conf = work / "js.toml"
        jetstream_config(js_conf, js_port, pg_url, args.redis_url, args.workers, nats.url, args.loader_batch)
        servers.append(js := Process([PY, "-m", "gateway.cli", "serve", "--config", str(js_conf), "--no-migrate"],
                                     js_port, work / "js.log"))
        servers.append(noop := Process([PY, "-m", "gateway.serve", "bench.noop:app", "--bind",
                                        f"127.0.0.1:{noop_port}", "--workers", str(args.workers)],
                                       noop_port, work / "noop.log"))
        scenario = batch500()
        urls = {name: f"http://127.0.0.1:{p.port}" for name, p in (("js", js), ("pg", pg), ("http", noop))}
        print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} cores, workers={args.workers}, "
              f"{args.seconds:.0f} s x {args.rounds} rounds, loaders={args.loaders}, "
              f"loader batch={args.loader_batch}", flush=True)
        js_acked = 0
        for name, url in urls.items():
            warm = wrk(url, scenario, 2, f"{name}warm{NONCE}")
            js_acked += warm["ok"] * scenario.events if name == "js" else 0
        rounds: list[dict[str, float]] = []
        for r in range(max(1, args.rounds)):
            measured = {}
            for name, url in urls.items():
                result = wrk(url, scenario, args.seconds, f"{name}{NONCE}r{r}")
                measured[name] = eps(result)
                js_acked += result["ok"] * scenario.events if name == "js" else 0
                measured[f"{name}_p99_ms"] = result["p99"]
                measured[f"{name}_non2xx"] = result["non2xx"] + result["errors"]
            rounds.append(measured)
            print(f"round {r + 1}: " + ", ".join(f"{k}={v:,.0f}" for k, v in measured.items()), flush=True)
        for name in urls:
            figures[f"{name}_eps"] = statistics.median(m[name] for m in rounds)
        figures["js_vs_pg"] = statistics.median(m["js"] / m["pg"] for m in rounds)
        figures["js_vs_http"] = statistics.median(m["js"] / m["http"] for m in rounds)

        loaders, binds, ready = start_loaders(js_conf, args.loaders, work)
        drain = watch_drain(binds, js_acked, ready, timeout=30)
        stored = count_like(dsn, "js")
        figures.update(drain_eps=drain["events_per_s"], drain_rows=drain["rows"], drain_s=drain["seconds"],
                       js_acked=js_acked, js_stored=stored, js_missing=max(0, js_acked - stored))
        figures["copy_eps"] = copy_ceiling(dsn, "js", args.loader_batch, args.seconds)
        figures["drain_vs_copy"] = float(drain["events_per_s"]) / float(figures["copy_eps"])  # type: ignore[arg-type]
        print(f"drain: {drain}; COPY ceiling {figures['copy_eps']:,.0f} events/s", flush=True)

        # The table grew from nothing: without fresh statistics the poller's
        # lookup by insert id may be planned as a scan of every row.
        asyncio.run(pg_admin(dsn, "ANALYZE events"))
        half = float(figures["js_eps"]) / 2  # type: ignore[arg-type]
        figures["lag_rate"] = half
        # First the same measurement against the PostgreSQL sink, whose rows
        # are committed before its 2xx: what the poller itself adds (the
        # stream's backlog drained, the loaders idle).
        floor = lag(urls["pg"], dsn, half, max(2.0, args.lag_seconds / 2))
        figures.update({f"lag_{k}": v for k, v in lag(urls["js"], dsn, half, args.lag_seconds).items()})
        figures.update(lag_floor_p50=floor["p50"], lag_floor_p99=floor["p99"])
    finally:
        stop(loaders)
        for proc in servers:
            proc.stop()
        nats.stop()
        asyncio.run(pg_admin(args.pg_dsn, f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)"))
        forget_redis_keys(args.redis_url)
        shutil.rmtree(work, ignore_errors=True)
    report(figures)
    return 0


def report(f: dict) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    print()
    print(f"{'Cohorly batch-500 acknowledged, JetStream sink':<52} {f['js_eps']:>10,.0f} events/s")
    print(f"{'Cohorly batch-500 acknowledged, PostgreSQL sink':<52} {f['pg_eps']:>10,.0f} events/s")
    print(f"{'HTTP ceiling (bench/noop.py), batch-500':<52} {f['http_eps']:>10,.0f} events/s")
    print(f"{'loader drain into PostgreSQL':<52} {f['drain_eps']:>10,.0f} events/s "
          f"({f['drain_rows']:,} rows in {f['drain_s']:.1f} s)")
    print(f"{'COPY ceiling (asyncpg COPY, same rows)':<52} {f['copy_eps']:>10,.0f} events/s")
    print(f"{'end-to-end lag at ' + format(f['lag_rate'], ',.0f') + ' events/s':<52} "
          f"p50 {f['lag_p50'] * 1000:,.0f} ms, p99 {f['lag_p99'] * 1000:,.0f} ms, max {f['lag_max'] * 1000:,.0f} ms "
          f"({f['lag_visible']} requests, {f['lag_never_visible']} never visible, {f['lag_failed']} failed)")
    print(f"{'  measurement floor (PostgreSQL sink, same rate)':<52} "
          f"p50 {f['lag_floor_p50'] * 1000:,.0f} ms, p99 {f['lag_floor_p99'] * 1000:,.0f} ms")
    print(f"{'JetStream acked / stored / missing':<52} {f['js_acked']:,} / {f['js_stored']:,} / {f['js_missing']:,}"
          " (stored also holds requests answered after wrk's cut-off, which wrk does not count)")
    print()
    print(f"{'acked events/s, JetStream / PostgreSQL sink':<52} {f['js_vs_pg']:6.2f}  (aim >= 2)    "
          f"{verdict(f['js_vs_pg'] >= 2)}")
    print(f"{'acked events/s, JetStream / HTTP ceiling':<52} {f['js_vs_http']:6.2f}  (for reference)")
    print(f"{'drain / COPY ceiling':<52} {f['drain_vs_copy']:6.2f}  (aim >= 0.8)  {verdict(f['drain_vs_copy'] >= 0.8)}")
    print(f"{'p99 lag':<52} {f['lag_p99']:6.2f} s (aim < 2)   "
          f"{verdict(f['lag_p99'] < 2 and f['lag_never_visible'] == 0)}")
    if f["drain_eps"] < f["lag_rate"]:
        print(f"note: the lag was measured at {f['lag_rate']:,.0f} events/s, above the loaders' drain rate: "
              "the backlog, and the lag with it, grew for the whole lag run")
    print(f"{'acknowledged events missing':<52} {f['js_missing']:6d}  (aim 0)    {verdict(f['js_missing'] == 0)}")


if __name__ == "__main__":
    sys.exit(main())
